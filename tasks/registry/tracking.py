"""MLflow bookkeeping: one run per pipeline run, shared by every step.

The run is found by the tag ``detox.run_key`` (the Airflow run id, or the id given to
the ``detox`` command), so a retried task or a later step logs into the same run
instead of opening a second one. Steps log under their own prefix
(``data/``, ``adapter/``, ``baseline/``, ``ppo/``, ``eval/``, ``promotion/``).

A tracking server that cannot be reached surfaces as :class:`TrackingUnavailableError`,
naming the server, after the MLflow client's own retries (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``,
``MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR``) have run out.

On a SQLite backend (the embedded default without a tracking server) the first client of a
process creates or upgrades the schema under an inter-process file lock, so tasks that start
together never race to create the same tables (MLflow's own migration is not safe to run
twice at once: the loser fails with "table ... already exists" or "duplicate column").
"""

from __future__ import annotations

import fcntl
import functools
import logging
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from tasks.config import RunConfig

logger = logging.getLogger(__name__)

RUN_KEY_TAG = "detox.run_key"

P = ParamSpec("P")
T = TypeVar("T")


class TrackingUnavailableError(ConnectionError):
    """The MLflow tracking server (or its database) could not be reached."""


def unreachable(error: BaseException) -> bool:
    """Whether ``error`` says the tracking server or its database could not be reached at all."""
    import requests
    import sqlalchemy.exc

    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, (requests.ConnectionError, requests.Timeout, sqlalchemy.exc.OperationalError)):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _outages_named(function: Callable[P, T]) -> Callable[P, T]:
    """Turn an unreachable tracking server into a :class:`TrackingUnavailableError` naming it."""

    @functools.wraps(function)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return function(*args, **kwargs)
        except Exception as error:
            if isinstance(error, TrackingUnavailableError) or not unreachable(error):
                raise
            raise TrackingUnavailableError(redact(
                f"MLflow tracking server {mlflow.get_tracking_uri()} is unreachable ({function.__name__}): {error}"
            )) from error

    return wrapper


def redact(text: str) -> str:
    """``text`` with the user:password part of any URL in it replaced by ``***``."""
    return re.sub(r"(\w+://)[^/@\s]+@", r"\1***@", text)


def client() -> MlflowClient:
    _schema_ready(mlflow.get_tracking_uri())
    return MlflowClient()


_ready_stores: set[str] = set()
_ready_lock = threading.Lock()


def sqlite_path(tracking_uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` tracking URI; None for any other store."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    path = tracking_uri.removeprefix("sqlite:///").split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


def _schema_ready(tracking_uri: str) -> None:
    """Create or upgrade a SQLite store's schema once per process, one process at a time.

    MLflow builds its tracking and registry stores (and runs their migrations) on first use and
    caches them per URI; doing that first use here, under a lock file next to the database,
    serialises the migrations of processes that start together. Later calls return at once.
    """
    database = sqlite_path(tracking_uri)
    if database is None or tracking_uri in _ready_stores:
        return
    with _ready_lock:
        if tracking_uri in _ready_stores:
            return
        database.parent.mkdir(parents=True, exist_ok=True)
        with open(database.with_name(database.name + ".lock"), "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                first = MlflowClient(tracking_uri)
                first.search_experiments(max_results=1)  # the tracking store: tables created or upgraded
                first.search_registered_models(max_results=1)  # the registry store, same database
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
        _ready_stores.add(tracking_uri)


@_outages_named
def ensure_experiment(name: str, artifact_location: str | None = None) -> str:
    mlflow_client = client()
    experiment = mlflow_client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return mlflow_client.create_experiment(name, artifact_location=artifact_location)
    except mlflow.exceptions.MlflowException:
        # Another step created it between our look-up and create.
        experiment = mlflow_client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


@_outages_named
def open_run(config: RunConfig, run_key: str, tags: dict[str, str] | None = None) -> str:
    """The id of the MLflow run for ``run_key``, created (with the config as params) on first use."""
    experiment_id = ensure_experiment(config.experiment_name, config.mlflow_artifact_location)
    mlflow_client = client()
    run_id = _find_run(experiment_id, run_key)
    if run_id is None:
        created = mlflow_client.create_run(experiment_id, run_name=run_key, tags={RUN_KEY_TAG: run_key}).info.run_id
        run_id = _settle_race(experiment_id, run_key, created)
        if run_id == created:
            # Only the winner logs the config: two steps inserting the same params at once make one
            # of them fail on a database with real concurrency (Postgres behind an MLflow server).
            log_params(run_id, flatten(config.model_dump()), prefix="config/")
        logger.info("opened MLflow run %s for %s", run_id, run_key)
    if tags:
        mlflow_client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
    return run_id


def _find_run(experiment_id: str, run_key: str) -> str | None:
    runs = _runs_for_key(experiment_id, run_key)
    return runs[0] if runs else None


def _runs_for_key(experiment_id: str, run_key: str) -> list[str]:
    escaped = run_key.replace("'", "\\'")
    runs = client().search_runs(
        [experiment_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{escaped}'", max_results=50
    )
    return [run.info.run_id for run in sorted(runs, key=lambda r: (r.info.start_time, r.info.run_id))]


def _settle_race(experiment_id: str, run_key: str, created: str) -> str:
    """Two steps that start together may both create a run: the oldest wins, the others are deleted."""
    winner = _runs_for_key(experiment_id, run_key)[0]
    if winner != created:
        client().delete_run(created)
        logger.info("run %s for %s already existed; using it", winner, run_key)
    return winner


@_outages_named
def log_params(run_id: str, params: dict[str, Any], prefix: str = "") -> None:
    entries = [Param(f"{prefix}{k}", str(v)[:6000]) for k, v in params.items()]
    for start in range(0, len(entries), 100):
        client().log_batch(run_id, params=entries[start : start + 100])


@_outages_named
def log_metrics(run_id: str, metrics: dict[str, float], prefix: str = "", step: int = 0) -> None:
    import time

    now = int(time.time() * 1000)
    entries = [
        Metric(f"{prefix}{k}", float(v), now, step)
        for k, v in metrics.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    ]
    if entries:
        client().log_batch(run_id, metrics=entries)


@_outages_named
def log_step_history(run_id: str, history: list[dict[str, float]], prefix: str = "") -> int:
    """Log the steps of ``history`` (step ``i`` = ``history[i]``) that the run does not have yet.

    A resumed training run calls this again with the history restored from its checkpoint:
    steps already in MLflow are not logged twice. Returns the number of steps logged.
    """
    if not history:
        return 0
    import time

    probe = f"{prefix}{next(iter(history[0]))}"
    logged_through = max((metric.step for metric in client().get_metric_history(run_id, probe)), default=-1)
    now = int(time.time() * 1000)
    entries = [
        Metric(f"{prefix}{key}", float(value), now, step)
        for step in range(logged_through + 1, len(history))
        for key, value in history[step].items()
        if isinstance(value, (int, float)) and not isinstance(value, bool)
    ]
    for start in range(0, len(entries), 1000):  # the tracking server takes 1000 metrics per batch
        client().log_batch(run_id, metrics=entries[start : start + 1000])
    return max(0, len(history) - logged_through - 1)


@_outages_named
def set_tags(run_id: str, tags: dict[str, Any]) -> None:
    client().log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


@_outages_named
def log_artifact(run_id: str, path: Path, artifact_path: str | None = None) -> None:
    client().log_artifact(run_id, str(path), artifact_path)


def flatten(tree: dict[str, Any], parent: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{parent}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat
