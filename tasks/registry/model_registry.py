"""Registration of a promoted policy in the MLflow model registry.

The SFT and PPO adapters are merged into the base weights, saved with
``save_pretrained`` and logged as a pyfunc model (see :mod:`tasks.registry.serving`); the new
version gets the champion alias only once the registry reports it READY.

Registration is safe to retry and to run concurrently: a retried task reuses the version
its MLflow run registered before, the aliases of one registered model move under a lock
held in the registry itself (:func:`alias_lock`), and a decision made against a champion
that has since been replaced does not move the alias (:class:`ChampionMovedError`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
from mlflow.entities.model_registry.model_version_status import ModelVersionStatus
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema

from tasks.config import RunConfig
from tasks.errors import InputError
from tasks.io.fsutil import replace_dir
from tasks.io.models import load_policy
from tasks.registry import tracking

logger = logging.getLogger(__name__)

SERVING_CODE = Path(__file__).with_name("serving.py")
SERVING_CONFIG = "detox_serving.json"  # serving.py reads it; importing serving.py would run set_model
# One unnamed string column: a list of dialogues or a DataFrame with one column both fit.
SIGNATURE = ModelSignature(inputs=Schema([ColSpec("string")]), outputs=Schema([ColSpec("string")]))
LOCK_SUFFIX = ".alias-lock"
ANY_CHAMPION = "any"  # expected_champion of a registration that was not decided against a champion


class ChampionMovedError(InputError, RuntimeError):
    """The champion changed after the promotion decision was made; the alias was not moved."""


def merge_policy(config: RunConfig, adapter_dirs: list[Path], out_dir: Path) -> Path:
    """Base + adapters merged and saved (safetensors) with the tokenizer and serving settings."""
    # Merged in full precision even when training ran on a 4-bit base: served weights are not quantized.
    model, tokenizer = load_policy(
        config.model.policy_name, adapter_dirs, device="cpu", trust_remote_code=config.model.trust_remote_code,
        family=config.model.policy_family, eos_token=config.model.eos_token,
    )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        serving = {
            "family": "seq2seq" if model.config.is_encoder_decoder else "causal",
            "prompt_template": config.data.prompt_template,
            "max_prompt_tokens": config.data.max_prompt_tokens,
            "max_new_tokens": config.eval.max_new_tokens,
            "batch_size": config.eval.batch_size,
        }
        (staging / SERVING_CONFIG).write_text(json.dumps(serving, indent=2))
        replace_dir(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def register(
    config: RunConfig,
    mlflow_run_id: str,
    merged_dir: Path,
    example_dialogue: str,
    version_tags: dict[str, str],
    expected_champion: str | None = ANY_CHAMPION,
) -> dict:
    """Log the merged policy to ``mlflow_run_id`` and register it as the new champion (see :func:`register_pyfunc`)."""
    return register_pyfunc(
        mlflow_run_id, merged_dir, SERVING_CODE, SIGNATURE, [example_dialogue], version_tags,
        name=config.registered_model_name, champion_alias=config.champion_alias,
        previous_alias=config.previous_alias, expected_champion=expected_champion,
    )


def register_pyfunc(
    mlflow_run_id: str,
    model_dir: Path,
    code: Path,
    signature: ModelSignature,
    input_example,
    version_tags: dict[str, str],
    name: str,
    champion_alias: str = "champion",
    previous_alias: str = "previous",
    expected_champion: str | None = ANY_CHAMPION,
) -> dict:
    """Log ``model_dir`` as the artifact ``model`` of the pyfunc in ``code`` and register it under ``name``.

    The aliases move only once the registry reports the version READY; the champion it
    replaces keeps ``previous_alias``, so a rollback is one alias move. A version that
    ``mlflow_run_id`` registered before (an interrupted attempt) is finished, not duplicated.
    ``expected_champion`` is the champion version the promotion was decided against (None:
    there was none); when the champion is another one by the time the alias would move,
    :class:`ChampionMovedError` is raised and the alias stays where it is.
    """
    client = tracking.client()
    version = _version_of_run(name, mlflow_run_id)
    if version is None:
        _check_champion(name, champion_alias, expected_champion, candidate=None)  # before logging anything
        with mlflow.start_run(run_id=mlflow_run_id):
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=str(code),
                artifacts={"model": str(model_dir)},
                signature=signature,
                input_example=input_example,
                pip_requirements=[f"mlflow=={mlflow.__version__}", "torch", "transformers", "safetensors"],
                registered_model_name=name,
            )
        version = str(info.registered_model_version)
    else:
        logger.info("%s version %s was registered by MLflow run %s before; finishing its registration",
                    name, version, mlflow_run_id)
    wait_until_ready(name, version)
    for key, value in version_tags.items():
        client.set_model_version_tag(name, version, key, str(value))
    with alias_lock(name):
        replaced_version = _check_champion(name, champion_alias, expected_champion, candidate=version)
        if replaced_version is not None and replaced_version != version:
            client.set_registered_model_alias(name, previous_alias, replaced_version)
            logger.info("%s version %s keeps alias %s", name, replaced_version, previous_alias)
        client.set_registered_model_alias(name, champion_alias, version)
    if replaced_version == version:  # a retry after the alias had moved
        previous = alias_version(name, previous_alias)
        replaced_version = str(previous.version) if previous is not None else None
    uri = f"models:/{name}@{champion_alias}"
    logger.info("registered %s version %s as %s", name, version, uri)
    return {"model_uri": uri, "version": version, "model_name": name, "previous_version": replaced_version}


def _version_of_run(name: str, mlflow_run_id: str) -> str | None:
    """The version of ``name`` that ``mlflow_run_id`` registered, if any (READY or on its way)."""
    failed = ModelVersionStatus.to_string(ModelVersionStatus.FAILED_REGISTRATION)
    versions = [
        version for version in tracking.client().search_model_versions(
            f"name = '{name}' and run_id = '{mlflow_run_id}'")
        if version.status != failed
    ]
    return str(min(int(version.version) for version in versions)) if versions else None


def _check_champion(name: str, alias: str, expected: str | None, candidate: str | None) -> str | None:
    """The current champion version; :class:`ChampionMovedError` unless it is ``expected`` (or ``candidate``)."""
    current = alias_version(name, alias)
    current_version = str(current.version) if current is not None else None
    if expected == ANY_CHAMPION or current_version in (expected, candidate):
        return current_version
    decided = f"version {expected}" if expected is not None else "no champion"
    raise ChampionMovedError(
        f"{name}@{alias} is version {current_version} now, but this run's promotion was decided against "
        f"{decided}; the alias was not moved. Run champion_eval and promotion_check of this run again "
        "to decide against the new champion."
    )


@contextmanager
def alias_lock(name: str, timeout_s: float = 300.0, stale_after_s: float = 900.0) -> Iterator[None]:
    """Hold the lock on the aliases of registered model ``name`` while moving them.

    The lock is a registered model named ``<name>.alias-lock``: the registry refuses a
    second model of the same name, so only one holder can create it, whichever machine it
    runs on. A lock older than ``stale_after_s`` (its holder died) is broken with a warning.
    """
    client = tracking.client()
    lock = f"{name}{LOCK_SUFFIX}"
    holder = f"{socket.gethostname()}:{os.getpid()}"
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            client.create_registered_model(
                lock, tags={"holder": holder, "acquired_at": f"{time.time():.3f}"},
                description=f"Held while the aliases of {name} move; delete it only if its holder is gone.",
            )
            break
        except MlflowException as err:
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        try:
            held = client.get_registered_model(lock)
        except MlflowException:
            continue  # released between our attempt and the look-up
        other, age = held.tags.get("holder", "?"), time.time() - float(held.tags.get("acquired_at", 0))
        if age > stale_after_s:
            logger.warning("breaking the alias lock of %s left by %s %.0f s ago", name, other, age)
            _delete_lock(lock)
        elif time.monotonic() > deadline:
            raise TimeoutError(f"the aliases of {name} have been locked by {other} for {age:.0f} s; "
                               f"if that process is gone, delete the registered model {lock}")
        else:
            time.sleep(0.2)
    try:
        yield
    finally:
        _delete_lock(lock)


def _delete_lock(lock: str) -> None:
    try:
        tracking.client().delete_registered_model(lock)
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise


def champion_version(config: RunConfig):
    """The registry's current champion (a ``ModelVersion``), or None when there is none yet."""
    return alias_version(config.registered_model_name, config.champion_alias)


def alias_version(name: str, alias: str):
    client = tracking.client()
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def resolve_version(reference: str, default_name: str):
    """The ``ModelVersion`` named by ``models:/<name>@<alias>``, ``models:/<name>/<version>``
    or a bare version number of ``default_name``; a clear error when it does not exist."""
    client = tracking.client()
    reference = reference.strip()
    if reference.isdigit():
        name, version, alias = default_name, reference, None
    elif reference.startswith("models:/"):
        body = reference[len("models:/"):]
        if "@" in body:
            name, _, alias = body.partition("@")
            version = None
        else:
            name, _, version = body.partition("/")
            alias = None
        if not name or not (alias or version and version.isdigit()):
            raise ValueError(f"cannot read model reference {reference!r}: expected models:/<name>@<alias> "
                             "or models:/<name>/<version>")
    else:
        raise ValueError(f"cannot read model reference {reference!r}: expected models:/<name>@<alias>, "
                         "models:/<name>/<version> or a version number")
    if alias is not None:
        found = alias_version(name, alias)
        if found is None:
            raise ValueError(f"registered model {name!r} has no version with alias {alias!r}")
        return found
    try:
        return client.get_model_version(name, version)
    except MlflowException as err:
        raise ValueError(f"registered model {name!r} has no version {version}") from err


def download_merged(name: str, version: str, dest: Path) -> Path:
    """The merged ``save_pretrained`` folder of a registered version, downloaded under ``dest``."""
    return download_model_dir(name, version, dest, SERVING_CONFIG, "a detox summarizer")


def download_model_dir(name: str, version: str, dest: Path, marker: str, kind: str) -> Path:
    """The ``save_pretrained`` folder (the one holding ``marker``) of a registered version, under ``dest``.

    Downloaded next to ``dest`` and renamed into place, so ``dest`` never holds half a model.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=str(staging))
        found = sorted(staging.rglob(marker))
        if not found:
            raise ValueError(f"{name} version {version} is not {kind}: its artifacts hold no {marker}")
        relative = found[0].parent.relative_to(staging)
        replace_dir(staging, dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return dest / relative


def wait_until_ready(name: str, version: str, timeout_s: float = 300.0) -> None:
    client = tracking.client()
    deadline = time.monotonic() + timeout_s
    while True:
        status = client.get_model_version(name, version).status
        if status == ModelVersionStatus.to_string(ModelVersionStatus.READY):
            return
        if status == ModelVersionStatus.to_string(ModelVersionStatus.FAILED_REGISTRATION):
            raise RuntimeError(f"registration of {name} version {version} failed")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{name} version {version} not READY after {timeout_s:.0f}s (status {status})")
        time.sleep(1.0)
