"""The steps of ``reward_model_train``: preferences in, a registered reward model out.

    load_preferences -> build_pairs -> train -> evaluate -> registration_check -> register / skip

Like :mod:`tasks.steps.detox_retrain`, each step takes the run config and a
:class:`~tasks.steps.detox_retrain.StepContext`, works in the run-scoped folder, logs into the
run's one MLflow run under its own prefix (``data/``, ``pairs/``, ``train/``, ``eval/``,
``gate/``) and returns small JSON.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from tasks.config import RewardGateSettings, RewardRunConfig
from tasks.registry import tracking
from tasks.steps.context import StepContext

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RewardLayout:
    root: Path

    @property
    def preferences(self) -> Path:
        return self.root / "preferences"

    @property
    def train_pairs(self) -> Path:
        return self.root / "pairs" / "train.jsonl"

    @property
    def test_pairs(self) -> Path:
        return self.root / "pairs" / "test.jsonl"

    @property
    def model(self) -> Path:
        return self.root / "reward-model"

    @property
    def evaluation(self) -> Path:
        return self.root / "eval" / "result.json"

    @property
    def decision(self) -> Path:
        return self.root / "gate" / "decision.json"

    @property
    def registration(self) -> Path:
        return self.root / "registry" / "registered.json"


def layout(config: RewardRunConfig, ctx: StepContext) -> RewardLayout:
    return RewardLayout(config.run_dir(ctx.run_key))


def load_preferences(config: RewardRunConfig, ctx: StepContext) -> dict:
    """The preference file, copied into the run folder and validated; malformed records are counted
    and listed by line in ``preferences/problems.json``; no usable pair at all is an error."""
    from tasks.io.s3 import download_file
    from tasks.rewards.preferences import PreferenceError, load_pairs

    paths = layout(config, ctx)
    run_id = tracking.open_run(config, ctx.run_key, ctx.tags("load_preferences"))
    source = config.data.source
    local = paths.preferences / Path(source.rstrip("/")).name
    paths.preferences.mkdir(parents=True, exist_ok=True)
    if source.startswith("s3://"):
        download_file(source, local)
    else:
        origin = Path(source).expanduser()
        if not origin.is_file():
            raise PreferenceError(f"preference file {source} does not exist")
        shutil.copyfile(origin, local)
    pair_set = load_pairs(str(local))
    problems = [{"line": p.line, "reason": p.reason} for p in pair_set.problems]
    (paths.preferences / "problems.json").write_text(json.dumps(problems, indent=2), encoding="utf-8")
    fingerprint = hashlib.sha256(local.read_bytes()).hexdigest()[:16]
    counts = {"records": pair_set.records, "malformed_records": len(problems), "pairs": len(pair_set.pairs),
              "tied_pairs": pair_set.ties}
    tracking.log_params(run_id, {"source": source, "fingerprint": fingerprint}, "data/")
    tracking.log_metrics(run_id, counts, "data/")
    if problems:
        tracking.log_artifact(run_id, paths.preferences / "problems.json", "data")
    logger.info("%s: %s", source, counts)
    return {"preferences_path": str(local), "fingerprint": fingerprint, **counts}


def build_pairs(config: RewardRunConfig, ctx: StepContext, preferences_path: str) -> dict:
    """Every ordered pair the rankings imply, split by record into train and held-out test."""
    from tasks.rewards.preferences import load_pairs
    from tasks.rewards.reward_model import split_pairs, write_pairs

    paths = layout(config, ctx)
    run_id = tracking.open_run(config, ctx.run_key, ctx.tags("build_pairs"))
    train, test = split_pairs(load_pairs(preferences_path).pairs, config.data.test_size, config.data.split_seed)
    write_pairs(train, paths.train_pairs)
    write_pairs(test, paths.test_pairs)
    counts = {"train_pairs": len(train), "test_pairs": len(test),
              "train_records": len({p.line for p in train}), "test_records": len({p.line for p in test})}
    tracking.log_metrics(run_id, counts, "pairs/")
    return {"train_path": str(paths.train_pairs), "test_path": str(paths.test_pairs), **counts}


def train(config: RewardRunConfig, ctx: StepContext) -> dict:
    """TRL's RewardTrainer on the training pairs; its logs go to MLflow under ``train/``."""
    from tasks.io.models import resolve_device
    from tasks.rewards.reward_model import read_pairs, train_reward_model

    paths = layout(config, ctx)
    pairs = read_pairs(_require(paths.train_pairs, "build_pairs"))
    run_id = tracking.open_run(config, ctx.run_key, ctx.tags("train"))
    tracking.log_params(run_id, config.training.model_dump(), "train/")

    def log(metrics: dict[str, float], step: int) -> None:
        tracking.log_metrics(run_id, metrics, "train/", step=step)

    device = resolve_device(config.device).type
    metrics = train_reward_model(config.training, pairs, paths.model, device, config.trust_remote_code, log)
    return {"model_dir": str(paths.model), "train_loss": metrics["train_loss"],
            "train_runtime": metrics.get("train_runtime")}


def evaluate(config: RewardRunConfig, ctx: StepContext) -> dict:
    """Held-out pairwise accuracy and margin, the model scoring exactly as it will as PPO's reward."""
    from tasks.io.models import resolve_device
    from tasks.rewards.reward_model import evaluate_pairs, read_pairs

    paths = layout(config, ctx)
    pairs = read_pairs(_require(paths.test_pairs, "build_pairs"))
    _require(paths.model / "config.json", "train")
    run_id = tracking.open_run(config, ctx.run_key, ctx.tags("evaluate"))
    summary, margins = evaluate_pairs(paths.model, pairs, resolve_device(config.device),
                                      config.training.max_length, trust_remote_code=config.trust_remote_code)
    paths.evaluation.parent.mkdir(parents=True, exist_ok=True)
    per_pair = paths.evaluation.with_name("pairs.jsonl")
    per_pair.write_text("".join(
        json.dumps({"line": pair.line, "margin": round(float(margin), 6), "chosen": pair.chosen,
                    "rejected": pair.rejected}) + "\n"
        for pair, margin in zip(pairs, margins, strict=True)), encoding="utf-8")
    result = summary.to_dict()
    paths.evaluation.write_text(json.dumps(result, indent=2), encoding="utf-8")
    tracking.log_metrics(run_id, result, "eval/")
    tracking.log_artifact(run_id, per_pair, "eval")
    logger.info("held-out pairs: accuracy %.4f, mean margin %.4f (%d pairs)",
                summary.accuracy, summary.margin_mean, summary.pairs)
    return result


def decide(evaluation: dict, gate: RewardGateSettings) -> dict:
    """Register or not, with one ok/FAIL line per rule."""
    accuracy = evaluation["accuracy"]
    checks = {
        "accuracy_finite": accuracy == accuracy,
        "accuracy_at_least_bar": accuracy >= gate.min_accuracy,
    }
    reasons = [
        f"{'ok' if checks['accuracy_finite'] else 'FAIL'} accuracy_finite: {accuracy}",
        f"{'ok' if checks['accuracy_at_least_bar'] else 'FAIL'} accuracy_at_least_bar: held-out pairwise accuracy "
        f"{accuracy:.4f} on {evaluation['pairs']} pairs vs required {gate.min_accuracy:.4f}",
    ]
    return {"register": all(checks.values()), "checks": checks, "reasons": reasons, **evaluation}


def registration_check(config: RewardRunConfig, ctx: StepContext, evaluation: dict) -> dict:
    paths = layout(config, ctx)
    run_id = tracking.open_run(config, ctx.run_key, ctx.tags("registration_check"))
    decision = decide(evaluation, config.gate)
    for reason in decision["reasons"]:
        logger.info("registration: %s", reason)
    paths.decision.parent.mkdir(parents=True, exist_ok=True)
    paths.decision.write_text(json.dumps(decision, indent=2), encoding="utf-8")
    tracking.log_metrics(run_id, {"register": float(decision["register"]), "min_accuracy": config.gate.min_accuracy},
                         "gate/")
    tracking.set_tags(run_id, {"gate.decision": "register" if decision["register"] else "reject"})
    return decision


def register(config: RewardRunConfig, ctx: StepContext, decision: dict) -> dict:
    """The trained model as an MLflow pyfunc, registered; alias ``champion`` moved once it is READY."""
    import pandas as pd
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    from tasks.registry.model_registry import register_pyfunc
    from tasks.rewards.reward_model import SERVING_CODE, read_pairs

    paths = layout(config, ctx)
    if not decision.get("register"):
        raise ValueError("register called without a positive registration decision")
    run_id = tracking.open_run(config, ctx.run_key, ctx.tags("register"))
    example = read_pairs(paths.test_pairs)[0]
    fingerprint = tracking.client().get_run(run_id).data.params.get("data/fingerprint", "")
    result = register_pyfunc(
        run_id, paths.model, SERVING_CODE,
        ModelSignature(inputs=Schema([ColSpec("string", "prompt"), ColSpec("string", "response")]),
                       outputs=Schema([ColSpec("double")])),
        pd.DataFrame({"prompt": [example.prompt], "response": [example.chosen]}),
        version_tags={
            "heldout_accuracy": f"{decision['accuracy']:.6f}",
            "heldout_margin_mean": f"{decision['margin_mean']:.6f}",
            "heldout_pairs": str(decision["pairs"]),
            "base_model": config.training.base_model,
            "preferences_source": config.data.source,
            "preferences_fingerprint": fingerprint,
            "airflow.dag_id": ctx.dag_id,
            "airflow.run_id": ctx.run_key,
            "mlflow.source_run_id": run_id,
        },
        name=config.registered_model_name, champion_alias=config.champion_alias,
        previous_alias=config.previous_alias,
    )
    tracking.set_tags(run_id, {"registry.model_uri": result["model_uri"], "registry.version": result["version"]})
    paths.registration.parent.mkdir(parents=True, exist_ok=True)
    paths.registration.write_text(json.dumps(result, indent=2), encoding="utf-8")
    return result


def skip_registration(config: RewardRunConfig, ctx: StepContext, decision: dict) -> dict:
    run_id = tracking.open_run(config, ctx.run_key, ctx.tags("skip_registration"))
    for reason in decision["reasons"]:
        if reason.startswith("FAIL"):
            logger.warning("reward model not registered: %s", reason)
    tracking.set_tags(run_id, {"registry.model_uri": "none"})
    return {"model_uri": None, "reasons": decision["reasons"]}


def run_all(config: RewardRunConfig, ctx: StepContext) -> dict:
    """The whole DAG in one process, in its order (for ``detox reward-train`` and tests)."""
    loaded = load_preferences(config, ctx)
    build_pairs(config, ctx, loaded["preferences_path"])
    train(config, ctx)
    decision = registration_check(config, ctx, evaluate(config, ctx))
    return register(config, ctx, decision) if decision["register"] else skip_registration(config, ctx, decision)


def _require(path: Path, producer: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run the {producer} step of this run first")
    return path
