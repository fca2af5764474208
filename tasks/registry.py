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
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema

from tasks import tracking
from tasks.config import RunConfig
from tasks.fsutil import replace_dir
from tasks.models import load_policy

logger = logging.getLogger(__name__)

SERVING_CODE = Path(__file__).with_name("serving.py")
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
        (staging / "detox_serving.json").write_text(json.dumps(serving, indent=2))
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
    """Log the merged model to ``mlflow_run_id``, register it, move the champion alias; return its URI."""
    with mlflow.start_run(run_id=mlflow_run_id):
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(SERVING_CODE),
            artifacts={"model": str(merged_dir)},
            signature=SIGNATURE,
            input_example=[example_dialogue],
            pip_requirements=[f"mlflow=={mlflow.__version__}", "torch", "transformers", "safetensors"],
            registered_model_name=config.registered_model_name,
        )
    version = str(info.registered_model_version)
    client = tracking.client()
    wait_until_ready(config.registered_model_name, version)
    for key, value in version_tags.items():
        client.set_model_version_tag(config.registered_model_name, version, key, str(value))
    client.set_registered_model_alias(config.registered_model_name, config.champion_alias, version)
    uri = f"models:/{config.registered_model_name}@{config.champion_alias}"
    logger.info("registered %s version %s as %s", config.registered_model_name, version, uri)
    return {"model_uri": uri, "version": version, "model_name": config.registered_model_name}


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
