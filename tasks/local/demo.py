"""The embedded default, end to end: no network, no GPU.

Builds the tiny models and data set, starts an S3 server on loopback holding the SFT
adapter, points MLflow at SQLite and Airflow at a SQLite metadata database under
``DETOX_HOME``, and runs the ``detox_retrain`` DAG with ``airflow dags test`` (or the
same steps in this process with ``engine="local"``).
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from contextlib import closing, contextmanager
from datetime import UTC, datetime
from pathlib import Path

from tasks.config import DEMO_PREFERENCES_URI, RewardRunConfig, RunConfig, detox_home
from tasks.embedded.builds import EmbeddedPaths, build_embedded_default
from tasks.embedded.causal import build_embedded_causal, causal_paths
from tasks.embedded.reward import build_embedded_reward
from tasks.io.fsutil import exclusive_lock
from tasks.registry import tracking

logger = logging.getLogger(__name__)

DAGS_FOLDER = Path(__file__).resolve().parents[2] / "dags"
DAG_ID = "detox_retrain"
REWARD_DAG_ID = "reward_model_train"


def demo_environment(home: Path) -> dict[str, str]:
    """Environment variables for the demo's MLflow, Airflow and Hugging Face (offline)."""
    airflow_home = home / "airflow"
    return {
        "DETOX_HOME": str(home),
        "DETOX_PROFILE": "demo",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}",
        "AIRFLOW_HOME": str(airflow_home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS_FOLDER),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{airflow_home / 'airflow.db'}",
    }


@contextmanager
def demo_services(home: Path | None = None, causal: bool = False) -> Iterator[EmbeddedPaths]:
    """The demo's world: environment set, embedded default built, S3 on loopback holding the SFT
    adapter and the preference rankings.

    With ``causal`` the tiny Llama policy is built too and its SFT adapter uploaded to
    :data:`CAUSAL_ADAPTER_URI` (see :func:`causal_overrides`).
    """
    from tasks.io.s3 import parse_s3_uri, s3_client, upload_directory
    from tasks.io.s3_server import LocalS3Server

    home = (home or detox_home()).resolve()
    os.environ.update(demo_environment(home))
    (home / "airflow").mkdir(parents=True, exist_ok=True)
    embedded = build_embedded_default(home)
    preferences = build_embedded_reward(home).preferences
    adapters = {RunConfig.for_profile("demo").model.sft_adapter_uri: embedded.sft_adapter}
    if causal:
        adapters[CAUSAL_ADAPTER_URI] = build_embedded_causal(home).sft_adapter
    with LocalS3Server() as s3:
        os.environ.update(s3.env())
        client = s3_client(s3.endpoint_url)
        for adapter_uri, adapter_dir in adapters.items():
            upload_directory(adapter_dir, adapter_uri, client=client)
            logger.info("SFT adapter uploaded to %s on %s", adapter_uri, s3.endpoint_url)
        bucket, key = parse_s3_uri(DEMO_PREFERENCES_URI)
        client.upload_file(str(preferences), bucket, key)
        logger.info("preference rankings uploaded to %s", DEMO_PREFERENCES_URI)
        yield embedded


CAUSAL_ADAPTER_URI = "s3://detox-demo/adapters/policy-causal-sft"


def causal_overrides(home: Path | None = None) -> dict:
    """Demo overrides that swap the T5 policy for the embedded tiny Llama (the TinyLlama seed's family)."""
    return {
        "model.policy_name": str(causal_paths(home).policy_base),
        "model.sft_adapter_uri": CAUSAL_ADAPTER_URI,
        "registered_model_name": "detox-summarizer-causal-demo",
        # The synthetic references of heated dialogues repeat their insults: the tiny Llama loses
        # 5-6% ROUGE-L whenever PPO halves its toxicity (the T5 gains), so its gate tolerates 8%.
        "promotion.max_rouge_l_drop": 0.08,
    }


def run_demo(
    engine: str = "airflow", overrides: dict | None = None, home: Path | None = None, family: str = "seq2seq"
) -> dict:
    """Build the embedded default, run the pipeline, and return what the run produced.

    ``family="causal"`` runs the chain on the embedded tiny Llama instead of the T5.
    """
    if family not in ("seq2seq", "causal"):
        raise ValueError(f"unknown policy family {family!r}: expected 'seq2seq' or 'causal'")
    causal = family == "causal"
    with demo_services(home, causal=causal):
        merged = {**(causal_overrides(home) if causal else {}), **(overrides or {})}
        return run_pipeline(engine, merged)


def run_pipeline(engine: str = "airflow", overrides: dict | None = None) -> dict:
    """One run of ``detox_retrain`` on the demo profile (inside :func:`demo_services`); its report."""
    from tasks.steps import detox_retrain

    config = RunConfig.for_profile("demo", overrides)
    run_key, log_path = _run(DAG_ID, config, engine, overrides or {}, detox_retrain.run_all)
    return {**run_report(config, run_key), **({"dag_log": str(log_path)} if log_path else {})}


def run_reward_pipeline(engine: str = "airflow", overrides: dict | None = None) -> dict:
    """One run of ``reward_model_train`` on the demo profile (inside :func:`demo_services`); its outcome."""
    from tasks.steps import reward_model_train

    config = RewardRunConfig.for_profile("demo", overrides)
    run_key, log_path = _run(REWARD_DAG_ID, config, engine, overrides or {}, reward_model_train.run_all)
    return {**reward_report(config, run_key), **({"dag_log": str(log_path)} if log_path else {})}


def _run(dag_id: str, config, engine: str, overrides: dict, run_all) -> tuple[str, Path | None]:
    """The DAG through ``airflow dags test`` (its run key and log), or its steps in this process."""
    started = datetime.now(UTC)
    if engine == "airflow":
        return _run_dag(dag_id, config, started, overrides)
    if engine != "local":
        raise ValueError(f"unknown engine {engine!r}: expected 'airflow' or 'local'")
    from tasks.steps.context import StepContext

    run_key = f"local__{started.strftime('%Y%m%dT%H%M%S%f')}"
    run_all(config, StepContext(run_key=run_key, dag_id=dag_id))
    return run_key, None


def ensure_airflow_db() -> None:
    """Create the demo's SQLite Airflow metadata database, with the project's DAGs in it, on first use.

    ``dags test`` runs tasks whatever their pool, so the demo needs no ``gpu`` pool. Each ``dags
    test`` writes its DAG's rows if they are missing: two started at once on a database without
    them both insert, and one dies on the unique ``dag_id``. So the rows are written here, once,
    by one process at a time.
    """
    home = Path(os.environ["AIRFLOW_HOME"])
    home.mkdir(parents=True, exist_ok=True)
    database = home / "airflow.db"
    with exclusive_lock(home / ".detox-airflow-db.lock"):
        if not database.exists():
            logger.info("initialising the Airflow metadata database (SQLite)")
            subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], check=True, capture_output=True)
        with closing(sqlite3.connect(database)) as db:
            has_dags = db.execute("SELECT 1 FROM dag LIMIT 1").fetchone() is not None
        if not has_dags:
            logger.info("writing the DAGs into the Airflow metadata database")
            subprocess.run([sys.executable, "-m", "airflow", "dags", "reserialize"], check=True, capture_output=True)


def _run_dag(dag_id: str, config, started: datetime, overrides: dict) -> tuple[str, Path]:
    """``airflow dags test`` the DAG on SQLite; the Airflow run id of the run it made, and its log."""
    env = dict(os.environ)
    airflow = [sys.executable, "-m", "airflow"]
    ensure_airflow_db()
    conf = {"profile": "demo", "overrides": overrides}
    command = [*airflow, "dags", "test", dag_id, started.isoformat(), "-c", json.dumps(conf)]
    log_path = Path(env["AIRFLOW_HOME"]) / "logs" / f"{dag_id}-{started.strftime('%Y%m%dT%H%M%S%f')}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    logger.info("running: airflow dags test %s (log: %s)", dag_id, log_path)
    # `dags test` writes the task logs to its output only: keep a copy next to Airflow's own logs.
    with open(log_path, "w", encoding="utf-8") as log, subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    ) as process:
        for line in process.stdout:
            sys.stdout.write(line)
            log.write(line)
    if process.returncode != 0:
        raise RuntimeError(f"airflow dags test {dag_id} failed with exit code {process.returncode}; log: {log_path}")
    # `dags test` names its run after the moment it creates it; MLflow has the name.
    experiment_id = tracking.ensure_experiment(config.experiment_name, config.mlflow_artifact_location)
    started_ms = int(started.timestamp() * 1000)
    runs = tracking.client().search_runs(
        [experiment_id],
        filter_string=f"tags.`airflow.dag_id` = '{dag_id}' and attributes.start_time >= {started_ms}",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not runs:
        raise RuntimeError(f"the {dag_id} run finished but left no MLflow run")
    return runs[0].data.tags[tracking.RUN_KEY_TAG], log_path


def _mlflow_run(config, run_key: str):
    experiment_id = tracking.ensure_experiment(config.experiment_name, config.mlflow_artifact_location)
    runs = tracking.client().search_runs(
        [experiment_id], filter_string=f"tags.`{tracking.RUN_KEY_TAG}` = '{run_key}'"
    )
    if not runs:
        raise RuntimeError(f"no MLflow run found for {run_key}")
    return runs[0]


def reward_report(config: RewardRunConfig, run_key: str) -> dict:
    """Pairs, held-out accuracy and margin, decision and registered model of a reward_model_train run."""
    run = _mlflow_run(config, run_key)
    metrics, tags = run.data.metrics, run.data.tags
    return {
        "run_key": run_key,
        "mlflow_run_id": run.info.run_id,
        "records": metrics.get("data/records"),
        "malformed_records": metrics.get("data/malformed_records"),
        "train_pairs": metrics.get("pairs/train_pairs"),
        "test_pairs": metrics.get("pairs/test_pairs"),
        "accuracy": metrics.get("eval/accuracy"),
        "margin_mean": metrics.get("eval/margin_mean"),
        "decision": tags.get("gate.decision"),
        "model_uri": tags.get("registry.model_uri"),
    }


def run_report(config: RunConfig, run_key: str) -> dict:
    """Before/after numbers, decision and registered model of the MLflow run for ``run_key``."""
    run = _mlflow_run(config, run_key)
    metrics, tags = run.data.metrics, run.data.tags
    return {
        "run_key": run_key,
        "mlflow_run_id": run.info.run_id,
        "toxicity_before": metrics.get("baseline/toxicity_mean"),
        "toxicity_after": metrics.get("eval/toxicity_mean"),
        "rouge_l_before": metrics.get("baseline/rouge_l_mean"),
        "rouge_l_after": metrics.get("eval/rouge_l_mean"),
        "toxicity_change_ci": [metrics.get("promotion/toxicity_change_ci_low"),
                               metrics.get("promotion/toxicity_change_ci_high")],
        "judge_before": metrics.get("baseline/judge_mean"),
        "judge_after": metrics.get("eval/judge_mean"),
        "failed_checks": tags.get("promotion.failed_checks"),
        "decision": tags.get("promotion.decision"),
        "model_uri": tags.get("registry.model_uri"),
    }
