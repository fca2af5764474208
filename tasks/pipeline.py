"""The pipeline's steps, each callable from Airflow and from the ``detox`` command line.

Every step takes the run config and a :class:`StepContext`, reads its inputs from
the run-scoped folder (or the URIs it is given), logs into the run's single MLflow
run under its own prefix, and returns a small JSON-able dict: URIs and metrics, never
tensors or file contents.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from tasks import tracking
from tasks.config import RunConfig
from tasks.data import load_prepared
from tasks.models import RewardModel, load_policy, resolve_device

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepContext:
    """Who is running: the run key names the artifact folder and the MLflow run."""

    run_key: str
    dag_id: str = "detox_retrain"
    try_number: int = 1

    def tags(self, step: str) -> dict[str, str]:
        return {
            "airflow.dag_id": self.dag_id,
            "airflow.run_id": self.run_key,
            "airflow.try_number": str(self.try_number),
            f"{step}.try_number": str(self.try_number),
        }


@dataclass(frozen=True)
class RunLayout:
    """Where each step writes inside the run folder."""

    root: Path

    @property
    def dataset(self) -> Path:
        return self.root / "data"

    @property
    def sft_adapter(self) -> Path:
        return self.root / "adapters" / "sft"

    @property
    def ppo(self) -> Path:
        return self.root / "ppo"

    @property
    def ppo_adapter(self) -> Path:
        return self.ppo / "adapter"

    @property
    def baseline_eval(self) -> Path:
        return self.root / "eval" / "baseline"

    @property
    def candidate_eval(self) -> Path:
        return self.root / "eval" / "candidate"

    @property
    def decision(self) -> Path:
        return self.root / "promotion" / "decision.json"

    @property
    def merged(self) -> Path:
        return self.root / "registry" / "merged"


def layout(config: RunConfig, ctx: StepContext) -> RunLayout:
    return RunLayout(config.run_dir(ctx.run_key))


def prepare_dataset(config: RunConfig, ctx: StepContext) -> dict:
    from transformers import AutoTokenizer

    from tasks.data import prepare_dataset as build

    paths = layout(config, ctx)
    run_id = tracking.open_run(config, ctx.run_key, ctx.tags("prepare_dataset"))
    tokenizer = AutoTokenizer.from_pretrained(
        config.model.policy_name, trust_remote_code=config.model.trust_remote_code
    )
    prepared = build(config.data, tokenizer, paths.dataset, cache_dir=paths.root / "downloads")
    tracking.log_params(run_id, {"source": config.data.source, "fingerprint": prepared.fingerprint}, "data/")
    tracking.log_metrics(
        run_id,
        {"rows_read": prepared.rows_read, "train_rows": prepared.train_rows, "test_rows": prepared.test_rows,
         **{f"skipped_{reason}": count for reason, count in prepared.skipped.items()}},
        "data/",
    )
    return {"dataset_uri": prepared.path, "fingerprint": prepared.fingerprint,
            "train_rows": prepared.train_rows, "test_rows": prepared.test_rows, "skipped": prepared.skipped}


def download_adapter(config: RunConfig, ctx: StepContext) -> dict:
    from tasks.storage import download_adapter as fetch

    paths = layout(config, ctx)
    run_id = tracking.open_run(config, ctx.run_key, ctx.tags("download_adapter"))
    info = fetch(config.model.sft_adapter_uri, paths.sft_adapter, expected_base_model=config.model.policy_name)
    tracking.log_params(
        run_id, {"uri": config.model.sft_adapter_uri, "base_model": info.base_model, "r": info.r}, "adapter/"
    )
    return {"adapter_dir": str(info.path), "files": info.files}


def baseline_eval(config: RunConfig, ctx: StepContext, dataset_uri: str | None = None,
                  adapter_dir: str | None = None) -> dict:
    """The SFT policy (base + SFT adapter) on the held-out split."""
    paths = layout(config, ctx)
    adapters = [Path(adapter_dir or paths.sft_adapter)]
    return _evaluate_step(config, ctx, "baseline", adapters, dataset_uri, paths.baseline_eval)


def evaluate(config: RunConfig, ctx: StepContext, dataset_uri: str | None = None,
             adapter_dir: str | None = None, ppo_adapter_dir: str | None = None) -> dict:
    """The PPO candidate under the identical protocol, plus the before/after comparison table."""
    from tasks.evaluation import comparison_table, load_samples

    paths = layout(config, ctx)
    adapters = [Path(adapter_dir or paths.sft_adapter), Path(ppo_adapter_dir or paths.ppo_adapter)]
    result = _evaluate_step(config, ctx, "eval", adapters, dataset_uri, paths.candidate_eval)

    table = comparison_table(load_samples(paths.baseline_eval), load_samples(paths.candidate_eval))
    table_path = paths.candidate_eval / "comparison.csv"
    table.to_csv(table_path, index=False)
    run_id = tracking.open_run(config, ctx.run_key)
    tracking.log_artifact(run_id, table_path, "eval")
    return result


def _evaluate_step(config: RunConfig, ctx: StepContext, prefix: str, adapters: list[Path],
                   dataset_uri: str | None, out_dir: Path) -> dict:
    from tasks.evaluation import evaluate_policy

    paths = layout(config, ctx)
    run_id = tracking.open_run(config, ctx.run_key, ctx.tags(prefix))
    splits, prepared = load_prepared(dataset_uri or paths.dataset)
    device = resolve_device(config.device)
    model, tokenizer = load_policy(config.model.policy_name, adapters, device, **_loading(config))
    summary = evaluate_policy(
        model, tokenizer, splits["test"], _reward_model(config, device),
        config.generation, config.eval, out_dir, desc=prefix,
    )
    tracking.log_metrics(run_id, summary.to_dict(), f"{prefix}/")
    tracking.log_params(run_id, {"fingerprint": prepared.fingerprint, "seed": config.eval.seed}, f"{prefix}/")
    tracking.log_artifact(run_id, out_dir / "samples.jsonl", prefix)
    result = {"eval_dir": str(out_dir), "fingerprint": prepared.fingerprint, **summary.to_dict()}
    (out_dir / "result.json").write_text(json.dumps(result, indent=2))
    return result


def ppo_train(config: RunConfig, ctx: StepContext, dataset_uri: str | None = None,
              adapter_dir: str | None = None) -> dict:
    """PPO against the reward model; resumes from the run's last checkpoint when there is one.

    Step metrics reach MLflow at each checkpoint, from the checkpoint's own history, so a
    retried task neither loses nor repeats a step in the run's metric history.
    """
    from tasks.ppo import PPOTrainer, ValueHead, build_policy, latest_checkpoint

    paths = layout(config, ctx)
    run_id = tracking.open_run(config, ctx.run_key, ctx.tags("ppo_train"))
    splits, _ = load_prepared(dataset_uri or paths.dataset)
    device = resolve_device(config.device)
    torch.manual_seed(config.ppo.seed)
    policy, tokenizer = build_policy(
        config.model.policy_name, Path(adapter_dir or paths.sft_adapter), config.lora, device, **_loading(config)
    )
    value_head = ValueHead(policy.config.hidden_size, init_std=config.ppo.value_head_init_std).to(device)
    reward_model = _reward_model(config, device)
    trainer = PPOTrainer(policy, value_head, tokenizer, reward_model.reward, config.ppo, config.generation, device)
    checkpoints = paths.ppo / "checkpoints"
    resume_from = latest_checkpoint(checkpoints)
    resumed_from_step = None
    if resume_from is not None:
        trainer.load_checkpoint(resume_from)
        resumed_from_step = trainer.steps_done
        logger.info("ppo_train resumes after step %d of %d", trainer.steps_done, config.ppo.steps)
        # The previous attempt may have died between writing the checkpoint and logging its steps.
        tracking.log_step_history(run_id, trainer.history, "ppo/")
    tracking.set_tags(run_id, {"ppo.resumed_from_step": resumed_from_step or 0})

    def on_checkpoint(path: Path) -> None:
        tracking.log_step_history(run_id, trainer.history, "ppo/")

    history = trainer.train(list(splits["train"]["input_ids"]), config.ppo.steps,
                            checkpoint_dir=checkpoints, on_checkpoint=on_checkpoint)
    trainer.save(paths.ppo)
    (paths.ppo / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in history))
    final = history[-1]
    return {"ppo_adapter_dir": str(paths.ppo_adapter), "steps": len(history),
            "resumed_from_step": resumed_from_step,
            "reward_mean": final["reward_mean"], "kl": final["kl"]}


def promotion_check(config: RunConfig, ctx: StepContext, baseline: dict | None = None,
                    candidate: dict | None = None) -> dict:
    from tasks.promotion import decide

    paths = layout(config, ctx)
    baseline = baseline or _read_json(paths.baseline_eval / "result.json", "baseline_eval")
    candidate = candidate or _read_json(paths.candidate_eval / "result.json", "evaluate")
    run_id = tracking.open_run(config, ctx.run_key, ctx.tags("promotion_check"))
    if baseline.get("fingerprint") != candidate.get("fingerprint"):
        raise ValueError("baseline and candidate were evaluated on different data sets; the comparison is unpaired")
    decision = decide(baseline, candidate, config.promotion)
    for reason in decision.reasons:
        logger.info("promotion: %s", reason)
    logger.info("promotion decision: %s", "PROMOTE" if decision.promote else "DO NOT PROMOTE")
    paths.decision.parent.mkdir(parents=True, exist_ok=True)
    paths.decision.write_text(json.dumps(decision.to_dict(), indent=2))
    tracking.log_metrics(
        run_id,
        {"promote": float(decision.promote), "toxicity_change": decision.toxicity_change,
         "rouge_l_change": decision.rouge_l_change},
        "promotion/",
    )
    tracking.log_artifact(run_id, paths.decision, "promotion")
    tracking.set_tags(run_id, {"promotion.decision": "promote" if decision.promote else "reject"})
    return decision.to_dict()


def register_model(config: RunConfig, ctx: StepContext, decision: dict | None = None,
                   adapter_dir: str | None = None, ppo_adapter_dir: str | None = None) -> dict:
    from tasks.registry import merge_policy, register

    decision = decision or _read_json(layout(config, ctx).decision, "promotion_check")
    if not decision.get("promote"):
        raise ValueError("register_model called without a positive promotion decision")
    paths = layout(config, ctx)
    run_id = tracking.open_run(config, ctx.run_key, ctx.tags("register_model"))
    adapters = [Path(adapter_dir or paths.sft_adapter), Path(ppo_adapter_dir or paths.ppo_adapter)]
    merged = merge_policy(config, adapters, paths.merged)
    splits, prepared = load_prepared(paths.dataset)
    result = register(
        config, run_id, merged, example_dialogue=splits["test"][0]["dialogue"],
        version_tags={
            "toxicity_before": f"{decision['toxicity_before']:.6f}",
            "toxicity_after": f"{decision['toxicity_after']:.6f}",
            "rouge_l_before": f"{decision['rouge_l_before']:.6f}",
            "rouge_l_after": f"{decision['rouge_l_after']:.6f}",
            "eval_fingerprint": prepared.fingerprint,
            "airflow.dag_id": ctx.dag_id,
            "airflow.run_id": ctx.run_key,
            "mlflow.source_run_id": run_id,
        },
    )
    tracking.set_tags(run_id, {"registry.model_uri": result["model_uri"], "registry.version": result["version"]})
    return result


def skip_registration(config: RunConfig, ctx: StepContext, decision: dict) -> dict:
    run_id = tracking.open_run(config, ctx.run_key, ctx.tags("skip_registration"))
    for reason in decision["reasons"]:
        logger.warning("not registered: %s", reason)
    tracking.set_tags(run_id, {"registry.model_uri": "none"})
    return {"model_uri": None, "reasons": decision["reasons"]}


def _read_json(path: Path, producer: str) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the {producer} step of this run first")
    return json.loads(path.read_text())


def _loading(config: RunConfig) -> dict:
    """How the policy is loaded, as keyword arguments of ``load_policy`` and ``build_policy``."""
    return {
        "trust_remote_code": config.model.trust_remote_code,
        "family": config.model.policy_family,
        "load_in_4bit": config.model.load_in_4bit,
        "compute_dtype": config.model.bnb_4bit_compute_dtype,
    }


def _reward_model(config: RunConfig, device: torch.device) -> RewardModel:
    return RewardModel(
        config.model.reward_model_name,
        reward_label=config.model.reward_label,
        toxic_label=config.model.toxic_label,
        batch_size=config.model.reward_batch_size,
        device=device,
        trust_remote_code=config.model.trust_remote_code,
    )


def run_all(config: RunConfig, ctx: StepContext) -> dict:
    """The whole chain in one process, in the DAG's order (for ``detox run`` and tests)."""
    data = prepare_dataset(config, ctx)
    adapter = download_adapter(config, ctx)
    baseline = baseline_eval(config, ctx, data["dataset_uri"], adapter["adapter_dir"])
    ppo = ppo_train(config, ctx, data["dataset_uri"], adapter["adapter_dir"])
    candidate = evaluate(config, ctx, data["dataset_uri"], adapter["adapter_dir"], ppo["ppo_adapter_dir"])
    decision = promotion_check(config, ctx, baseline, candidate)
    if decision["promote"]:
        registered = register_model(config, ctx, decision, adapter["adapter_dir"], ppo["ppo_adapter_dir"])
    else:
        registered = skip_registration(config, ctx, decision)
    return {"baseline": baseline, "candidate": candidate, "decision": decision, "registered": registered}
