"""Registration of a promoted policy in the MLflow model registry.

The SFT and PPO adapters are merged into the base weights, saved with
``save_pretrained`` and logged as a pyfunc model (see :mod:`tasks.serving`); the new
version gets the champion alias only once the registry reports it READY.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

import mlflow
from mlflow.entities.model_registry.model_version_status import ModelVersionStatus
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema

from tasks import tracking
from tasks.config import RunConfig
from tasks.fsutil import replace_dir
from tasks.models import load_policy

logger = logging.getLogger(__name__)

SERVING_CODE = Path(__file__).with_name("serving.py")
SERVING_CONFIG = "detox_serving.json"  # serving.py reads it; importing serving.py would run set_model
# One unnamed string column: a list of dialogues or a DataFrame with one column both fit.
SIGNATURE = ModelSignature(inputs=Schema([ColSpec("string")]), outputs=Schema([ColSpec("string")]))


def merge_policy(config: RunConfig, adapter_dirs: list[Path], out_dir: Path) -> Path:
    """Base + adapters merged and saved (safetensors) with the tokenizer and serving settings."""
    # Merged in full precision even when training ran on a 4-bit base: served weights are not quantized.
    model, tokenizer = load_policy(
        config.model.policy_name, adapter_dirs, device="cpu", trust_remote_code=config.model.trust_remote_code,
        family=config.model.policy_family,
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
) -> dict:
    """Log the merged policy to ``mlflow_run_id`` and register it as the new champion (see :func:`register_pyfunc`)."""
    return register_pyfunc(
        mlflow_run_id, merged_dir, SERVING_CODE, SIGNATURE, [example_dialogue], version_tags,
        name=config.registered_model_name, champion_alias=config.champion_alias,
        previous_alias=config.previous_alias,
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
) -> dict:
    """Log ``model_dir`` as the artifact ``model`` of the pyfunc in ``code`` and register it under ``name``.

    The aliases move only once the registry reports the version READY; the champion it
    replaces keeps ``previous_alias``, so a rollback is one alias move.
    """
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
    client = tracking.client()
    wait_until_ready(name, version)
    for key, value in version_tags.items():
        client.set_model_version_tag(name, version, key, str(value))
    replaced = alias_version(name, champion_alias)
    replaced_version = str(replaced.version) if replaced is not None else None
    if replaced_version is not None and replaced_version != version:
        client.set_registered_model_alias(name, previous_alias, replaced_version)
        logger.info("%s version %s keeps alias %s", name, replaced_version, previous_alias)
    client.set_registered_model_alias(name, champion_alias, version)
    uri = f"models:/{name}@{champion_alias}"
    logger.info("registered %s version %s as %s", name, version, uri)
    return {"model_uri": uri, "version": version, "model_name": name, "previous_version": replaced_version}


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
