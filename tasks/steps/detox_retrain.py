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

from tasks.config import RunConfig
from tasks.evaluation.protocol import eval_fingerprint, sample_count
from tasks.io.dialogues import load_prepared
from tasks.io.models import RewardModel, classifier, load_policy, policy_loading, resolve_device
from tasks.registry import tracking
from tasks.steps.context import StepContext

logger = logging.getLogger(__name__)


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
    def champion_eval(self) -> Path:
        return self.root / "eval" / "champion"

    @property
    def decision(self) -> Path:
        return self.root / "promotion" / "decision.json"

    @property
    def approval(self) -> Path:
        return self.root / "promotion" / "approval.json"

    @property
    def registration(self) -> Path:
        return self.root / "registry" / "registered.json"

    @property
    def report(self) -> Path:
        return self.root / "report"

    @property
    def merged(self) -> Path:
        return self.root / "registry" / "merged"


def layout(config: RunConfig, ctx: StepContext) -> RunLayout:
    return RunLayout(config.run_dir(ctx.run_key))


def prepare_dataset(config: RunConfig, ctx: StepContext) -> dict:
    from transformers import AutoTokenizer

    from tasks.io.dialogues import prepare_dataset as build
    from tasks.io.s3 import mirrored_model

    paths = layout(config, ctx)
    run_id = tracking.open_run(config, ctx.run_key, ctx.tags("prepare_dataset"))
    tokenizer = AutoTokenizer.from_pretrained(
        mirrored_model(config.model.policy_name), trust_remote_code=config.model.trust_remote_code
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
    from tasks.io.s3 import download_adapter as fetch

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
    """The PPO candidate under the identical protocol."""
    paths = layout(config, ctx)
    adapters = [Path(adapter_dir or paths.sft_adapter), Path(ppo_adapter_dir or paths.ppo_adapter)]
    return _evaluate_step(config, ctx, "eval", adapters, dataset_uri, paths.candidate_eval)


def champion_eval(config: RunConfig, ctx: StepContext, dataset_uri: str | None = None) -> dict:
    """The registered champion's metrics under this run's protocol, or ``{"exists": False}``.

    A champion registered under the same eval fingerprint brings its metrics in its version
    tags; one measured under another protocol (other prompts, seeds, settings or scorers)
    is downloaded from the registry and evaluated again, so the comparison stays paired.
    """
    from tasks.registry.model_registry import champion_version

    paths = layout(config, ctx)
    run_id = tracking.open_run(config, ctx.run_key, ctx.tags("champion_eval"))
    version = champion_version(config)
    if version is None:
        logger.info("no %s@%s registered yet", config.registered_model_name, config.champion_alias)
        result = {"exists": False}
    else:
        splits, prepared = load_prepared(dataset_uri or paths.dataset)
        fingerprint = eval_fingerprint(config, prepared.fingerprint, sample_count(config.eval, len(splits["test"])))
        tags = version.tags
        if tags.get("eval_fingerprint") == fingerprint and all(
            key in tags for key in ("toxicity_after", "rouge_l_after", "judge_after")
        ):
            logger.info("champion version %s was evaluated under this protocol (%s); using its tags",
                        version.version, fingerprint)
            metrics = {"toxicity_mean": float(tags["toxicity_after"]), "rouge_l_mean": float(tags["rouge_l_after"]),
                       "judge_mean": float(tags["judge_after"])}
            result = {"source": "version tags", **metrics}
        else:
            logger.info("champion version %s was evaluated under protocol %s, this run uses %s: evaluating it again",
                        version.version, tags.get("eval_fingerprint"), fingerprint)
            result = {"source": "re-evaluated", **_evaluate_registered(config, version, splits, paths.champion_eval)}
        result.update(exists=True, version=str(version.version), eval_fingerprint=fingerprint,
                      model_uri=f"models:/{version.name}/{version.version}")
        tracking.log_metrics(run_id, {k: result[k] for k in ("toxicity_mean", "rouge_l_mean", "judge_mean")},
                             "champion/")
        tracking.set_tags(run_id, {"champion.version": version.version, "champion.source": result["source"]})
    paths.champion_eval.mkdir(parents=True, exist_ok=True)
    (paths.champion_eval / "result.json").write_text(json.dumps(result, indent=2))
    return result


def evaluate_registered(config: RunConfig, ctx: StepContext, model: str) -> dict:
    """Audit: a registered version (``models:/name@alias``, ``models:/name/N`` or ``N``) on the held-out set.

    Runs this run's prepare_dataset step first when its data set is not there yet; results
    go to the run folder under ``audit/<name>-v<version>`` and to the MLflow run under ``audit/``.
    """
    from tasks.registry.model_registry import resolve_version

    paths = layout(config, ctx)
    version = resolve_version(model, config.registered_model_name)
    if not (paths.dataset / "prepared.json").is_file():
        prepare_dataset(config, ctx)
    run_id = tracking.open_run(config, ctx.run_key, ctx.tags("audit"))
    splits, prepared = load_prepared(paths.dataset)
    out_dir = paths.root / "audit" / f"{version.name}-v{version.version}"
    summary = _evaluate_registered(config, version, splits, out_dir)
    fingerprint = eval_fingerprint(config, prepared.fingerprint, summary["num_samples"])
    tracking.log_metrics(run_id, summary, "audit/")
    tracking.set_tags(run_id, {"audit.model": f"models:/{version.name}/{version.version}",
                               "audit.eval_fingerprint": fingerprint})
    tracking.log_artifact(run_id, out_dir / "samples.jsonl", "audit")
    stored = {key: version.tags.get(key) for key in ("toxicity_after", "rouge_l_after", "judge_after",
                                                     "eval_fingerprint")}
    return {"model": f"models:/{version.name}/{version.version}", "aliases": list(version.aliases),
            "eval_dir": str(out_dir), "eval_fingerprint": fingerprint, **summary, "stored_tags": stored}


def _evaluate_registered(config: RunConfig, version, splits, out_dir: Path) -> dict:
    """A registered version under the protocol; its downloaded weights are removed afterwards."""
    import shutil

    from tasks.registry.model_registry import SERVING_CONFIG, download_merged

    device = resolve_device(config.device)
    download = out_dir / "model"
    try:
        merged = download_merged(version.name, version.version, download)
        family = json.loads((merged / SERVING_CONFIG).read_text()).get("family", "auto")
        model, tokenizer = load_policy(str(merged), [], device, trust_remote_code=config.model.trust_remote_code,
                                       family=family)
        desc = f"{version.name} v{version.version}"
        summary = _score(config, model, tokenizer, splits["test"], device, out_dir, desc)
    finally:
        shutil.rmtree(download, ignore_errors=True)
    return summary.to_dict()


def _evaluate_step(config: RunConfig, ctx: StepContext, prefix: str, adapters: list[Path],
                   dataset_uri: str | None, out_dir: Path) -> dict:
    paths = layout(config, ctx)
    run_id = tracking.open_run(config, ctx.run_key, ctx.tags(prefix))
    splits, prepared = load_prepared(dataset_uri or paths.dataset)
    device = resolve_device(config.device)
    model, tokenizer = load_policy(config.model.policy_name, adapters, device, **policy_loading(config))
    summary = _score(config, model, tokenizer, splits["test"], device, out_dir, prefix)
    fingerprint = eval_fingerprint(config, prepared.fingerprint, summary.num_samples)
    tracking.log_metrics(run_id, summary.to_dict(), f"{prefix}/")
    tracking.log_params(run_id, {"eval_fingerprint": fingerprint, "dataset_fingerprint": prepared.fingerprint,
                                 "seed": config.eval.seed, "judge": config.eval.judge}, f"{prefix}/")
    tracking.log_artifact(run_id, out_dir / "samples.jsonl", prefix)
    result = {"eval_dir": str(out_dir), "eval_fingerprint": fingerprint,
              "dataset_fingerprint": prepared.fingerprint, **summary.to_dict()}
    (out_dir / "result.json").write_text(json.dumps(result, indent=2))
    return result


def _score(config: RunConfig, model, tokenizer, test_split, device: torch.device, out_dir: Path, desc: str):
    """One policy under the evaluation protocol, with this config's toxicity scorer and judge."""
    from tasks.evaluation.protocol import evaluate_policy, load_judge

    return evaluate_policy(
        model, tokenizer, test_split, _toxicity_model(config, device),
        load_judge(config.eval, device, config.model.trust_remote_code),
        config.eval, out_dir, desc=desc,
    )


def ppo_train(config: RunConfig, ctx: StepContext, dataset_uri: str | None = None,
              adapter_dir: str | None = None) -> dict:
    """PPO against the reward model; resumes from the run's last checkpoint when there is one.

    Step metrics reach MLflow at each checkpoint, from the checkpoint's own history, so a
    retried task neither loses nor repeats a step in the run's metric history. While MLflow
    is unreachable training goes on and the metrics wait in the checkpoints; if it is still
    unreachable at the end the task fails, and its retry only logs what is missing.
    """
    from tasks.rewards.reward_model import resolve_reward_model
    from tasks.rl.trainer import checkpoint_step, latest_checkpoint
    from tasks.rl.workers import PPOJob, launch_workers, processes_for, publish, train_ppo

    paths = layout(config, ctx)
    run_id = tracking.open_run(config, ctx.run_key, ctx.tags("ppo_train"))
    device = resolve_device(config.device)
    reward_source, reward_tags = resolve_reward_model(config.model.reward_model_name, paths.ppo / "reward-model")
    tracking.set_tags(run_id, reward_tags)
    job = PPOJob(config=config.model_dump(mode="json"), dataset=str(dataset_uri or paths.dataset),
                 sft_adapter=str(adapter_dir or paths.sft_adapter), reward_model=str(reward_source),
                 out_dir=str(paths.ppo), device=device.type)
    checkpoints = job.checkpoints

    def on_checkpoint(history: list[dict]) -> None:
        try:
            tracking.log_step_history(run_id, history, "ppo/")
        except tracking.TrackingUnavailableError as error:
            # Training goes on: the steps are in the checkpoint and reach MLflow with a later one.
            logger.warning("step metrics not logged, they wait in %s: %s", latest_checkpoint(checkpoints), error)

    processes = processes_for(config, device)
    resume_from = latest_checkpoint(checkpoints)
    resumed_from_step = checkpoint_step(resume_from) if resume_from is not None else None
    tracking.set_tags(run_id, {"ppo.processes": processes, "ppo.resumed_from_step": resumed_from_step or 0})
    if processes == 1:
        history = train_ppo(job, on_checkpoint=on_checkpoint)
    else:
        history = launch_workers(job, processes, on_checkpoint=on_checkpoint)
    try:
        tracking.log_step_history(run_id, history, "ppo/")
    except tracking.TrackingUnavailableError as error:
        raise tracking.TrackingUnavailableError(
            f"PPO finished all {len(history)} steps, but their metrics could not reach MLflow run {run_id}. "
            f"Retry the task once MLflow is back: it resumes from {latest_checkpoint(checkpoints)} without "
            f"training again and logs the missing steps into the same run. ({error})"
        ) from error
    publish(job)
    (paths.ppo / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in history))
    final = history[-1]
    return {"ppo_adapter_dir": str(paths.ppo_adapter), "steps": len(history),
            "resumed_from_step": resumed_from_step,
            "reward_mean": final["reward_mean"], "kl": final["kl"]}


def promotion_check(config: RunConfig, ctx: StepContext, baseline: dict | None = None,
                    candidate: dict | None = None, champion: dict | None = None) -> dict:
    """The gate on this run's paired evaluations (and the champion's); decision and reasons logged."""
    from tasks.evaluation.gate import decide
    from tasks.evaluation.protocol import compare, load_samples

    paths = layout(config, ctx)
    baseline = baseline or _read_json(paths.baseline_eval / "result.json", "baseline_eval")
    candidate = candidate or _read_json(paths.candidate_eval / "result.json", "evaluate")
    champion = champion or _read_json(paths.champion_eval / "result.json", "champion_eval")
    run_id = tracking.open_run(config, ctx.run_key, ctx.tags("promotion_check"))
    if baseline.get("eval_fingerprint") != candidate.get("eval_fingerprint"):
        raise ValueError("baseline and candidate were evaluated under different protocols "
                         f"({baseline.get('eval_fingerprint')} vs {candidate.get('eval_fingerprint')}); "
                         "the comparison is unpaired")
    if champion.get("exists") and champion.get("eval_fingerprint") != candidate["eval_fingerprint"]:
        raise ValueError("the champion's metrics come from another protocol than the candidate's; "
                         "run champion_eval of this run again")
    intervals = compare(load_samples(baseline["eval_dir"]), load_samples(candidate["eval_dir"]), config.eval)
    decision = decide(baseline, candidate, intervals, config.promotion,
                      champion=champion if champion.get("exists") else None)
    for reason in decision.reasons:
        logger.info("promotion: %s", reason)
    logger.info("promotion decision: %s", "PROMOTE" if decision.promote else "DO NOT PROMOTE")
    result = {**decision.to_dict(), "champion_version": champion.get("version") if champion.get("exists") else None}
    paths.decision.parent.mkdir(parents=True, exist_ok=True)
    paths.decision.write_text(json.dumps(result, indent=2))
    metrics = {"promote": float(decision.promote), "toxicity_change": decision.toxicity_change,
               "rouge_l_change": decision.rouge_l_change,
               **{f"check_{name}": float(passed) for name, passed in decision.checks.items()}}
    for metric, interval in intervals.items():
        metrics.update({f"{metric}_change_mean": interval.mean, f"{metric}_change_ci_low": interval.low,
                        f"{metric}_change_ci_high": interval.high})
    tracking.log_metrics(run_id, metrics, "promotion/")
    tracking.log_artifact(run_id, paths.decision, "promotion")
    tracking.set_tags(run_id, {"promotion.decision": "promote" if decision.promote else "reject",
                               "promotion.failed_checks": ",".join(
                                   name for name, ok in decision.checks.items() if not ok) or "none",
                               "promotion.bootstrap_seed": config.eval.seed})
    return result


def after_gate(config: RunConfig, decision: dict) -> str:
    """The step that follows the gate: ``skip_registration`` for a rejected candidate; for a promoted
    one ``approval`` when a person must approve it first (``promotion.require_approval``), else
    ``register_model``."""
    if not decision["promote"]:
        return "skip_registration"
    return "approval" if config.promotion.require_approval else "register_model"


def record_approval(config: RunConfig, ctx: StepContext, response: dict) -> dict:
    """A person's answer to the approval (or its absence at the timeout), logged to the run's MLflow
    run as ``approval.*`` tags and ``promotion/approval.json``.

    ``response`` is what Airflow's human-in-the-loop task received: ``chosen_options``,
    ``params_input`` (the reviewer's ``comment``), ``responded_by_user`` (None when the timeout
    chose the default) and ``responded_at``.
    """
    chosen = (response.get("chosen_options") or ["Reject"])[0]
    reviewer = response.get("responded_by_user") or {}
    timed_out = bool(response.get("timedout")) or not reviewer
    record = {
        "outcome": "timed out" if timed_out else "approved" if chosen == "Approve" else "rejected",
        "reviewer": reviewer.get("name") or reviewer.get("id") or "",
        "comment": str((response.get("params_input") or {}).get("comment") or ""),
        "responded_at": str(response.get("responded_at") or ""),
    }
    paths = layout(config, ctx)
    paths.approval.parent.mkdir(parents=True, exist_ok=True)
    paths.approval.write_text(json.dumps(record, indent=2))
    run_id = tracking.open_run(config, ctx.run_key, ctx.tags("approval"))
    tracking.set_tags(run_id, {f"approval.{key}": value for key, value in record.items()})
    tracking.log_artifact(run_id, paths.approval, "promotion")
    logger.info("approval: %s by %s%s", record["outcome"], record["reviewer"] or "nobody",
                f": {record['comment']}" if record["comment"] else "")
    return record


def register_model(config: RunConfig, ctx: StepContext, decision: dict | None = None,
                   adapter_dir: str | None = None, ppo_adapter_dir: str | None = None) -> dict:
    from tasks.registry.model_registry import ANY_CHAMPION, merge_policy, register

    paths = layout(config, ctx)
    decision = decision or _read_json(paths.decision, "promotion_check")
    if not decision.get("promote"):
        raise ValueError("register_model called without a positive promotion decision")
    candidate = _read_json(paths.candidate_eval / "result.json", "evaluate")
    run_id = tracking.open_run(config, ctx.run_key, ctx.tags("register_model"))
    adapters = [Path(adapter_dir or paths.sft_adapter), Path(ppo_adapter_dir or paths.ppo_adapter)]
    merged = merge_policy(config, adapters, paths.merged)
    splits, _ = load_prepared(paths.dataset)
    tox_ci = decision["toxicity_change_ci"]
    result = register(
        config, run_id, merged, example_dialogue=splits["test"][0]["dialogue"],
        version_tags={
            "toxicity_before": f"{decision['toxicity_before']:.6f}",
            "toxicity_after": f"{decision['toxicity_after']:.6f}",
            "toxicity_change_ci": f"[{tox_ci['low']:.6f}, {tox_ci['high']:.6f}]",
            "rouge_l_before": f"{decision['rouge_l_before']:.6f}",
            "rouge_l_after": f"{decision['rouge_l_after']:.6f}",
            "judge": config.eval.judge,
            "judge_before": f"{decision['judge_before']:.6f}",
            "judge_after": f"{decision['judge_after']:.6f}",
            "eval_fingerprint": candidate["eval_fingerprint"],
            "eval_samples": str(candidate["num_samples"]),
            "dataset_fingerprint": candidate["dataset_fingerprint"],
            "airflow.dag_id": ctx.dag_id,
            "airflow.run_id": ctx.run_key,
            "mlflow.source_run_id": run_id,
            "decided_against_champion": str(decision.get("champion_version") or "none"),
        },
        expected_champion=decision.get("champion_version", ANY_CHAMPION),
    )
    tracking.set_tags(run_id, {"registry.model_uri": result["model_uri"], "registry.version": result["version"]})
    paths.registration.parent.mkdir(parents=True, exist_ok=True)
    paths.registration.write_text(json.dumps(result, indent=2))
    return result


def skip_registration(config: RunConfig, ctx: StepContext, decision: dict | None = None) -> dict:
    paths = layout(config, ctx)
    decision = decision or _read_json(paths.decision, "promotion_check")
    run_id = tracking.open_run(config, ctx.run_key, ctx.tags("skip_registration"))
    reasons = list(decision["reasons"])
    if decision["promote"] and paths.approval.is_file():  # the gate passed; a person (or the timeout) said no
        approval = json.loads(paths.approval.read_text())
        by = f" by {approval['reviewer']}" if approval["reviewer"] else ""
        comment = f": {approval['comment']}" if approval["comment"] else ""
        reasons.append(f"FAIL approval {approval['outcome']}{by}{comment}")
    for reason in reasons:
        if reason.startswith("FAIL"):
            logger.warning("not registered: %s", reason)
    tracking.set_tags(run_id, {"registry.model_uri": "none"})
    return {"model_uri": None, "reasons": reasons}


def report(config: RunConfig, ctx: StepContext) -> dict:
    """The run's reports (HTML table, PNG plots, JSON summary) as MLflow artifacts; the summary is
    returned and printed to the task log."""
    from tasks.evaluation.protocol import load_samples
    from tasks.evaluation.reports import write_reports

    paths = layout(config, ctx)
    decision = _read_json(paths.decision, "promotion_check")
    baseline = _read_json(paths.baseline_eval / "result.json", "baseline_eval")
    candidate = _read_json(paths.candidate_eval / "result.json", "evaluate")
    champion_file = paths.champion_eval / "result.json"
    run_id = tracking.open_run(config, ctx.run_key, ctx.tags("report"))
    registered = json.loads(paths.registration.read_text()) if paths.registration.is_file() else None
    history = [json.loads(line) for line in (paths.ppo / "metrics.jsonl").read_text().splitlines() if line]
    metric_keys = ("num_samples", "toxicity_mean", "toxic_share", "judge_mean", "judge_toxic_share",
                   "rouge_1_mean", "rouge_2_mean", "rouge_l_mean", "response_length_mean")
    summary = {
        "run_key": ctx.run_key,
        "mlflow_run_id": run_id,
        "eval_fingerprint": candidate["eval_fingerprint"],
        "baseline": {key: baseline[key] for key in metric_keys},
        "candidate": {key: candidate[key] for key in metric_keys},
        "champion": json.loads(champion_file.read_text()) if champion_file.is_file() else None,
        "decision": {key: decision[key] for key in ("promote", "checks", "reasons", "toxicity_change",
                                                     "toxicity_change_ci", "rouge_l_change", "rouge_l_change_ci",
                                                     "judge_change_ci")},
        "ppo": {"steps": len(history), "reward_mean_first": history[0]["reward_mean"] if history else None,
                "reward_mean_last": history[-1]["reward_mean"] if history else None},
        "registered": registered or {"model_uri": None},
    }
    files = write_reports(paths.report, load_samples(paths.baseline_eval), load_samples(paths.candidate_eval),
                          history, summary)
    for path in files.values():
        tracking.log_artifact(run_id, path, "report")
    logger.info("detox_retrain summary:\n%s", json.dumps(summary, indent=2))
    return summary


def _read_json(path: Path, producer: str) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the {producer} step of this run first")
    return json.loads(path.read_text())


def _toxicity_model(config: RunConfig, device: torch.device) -> RewardModel:
    """The classifier that measures toxicity (``model.toxicity_model_name``, else the reward model)."""
    scorer = classifier(config, config.model.toxicity_scorer, device)
    scorer.label_index(config.model.toxic_label)  # a model without the label fails here, not after generating
    return scorer


def run_all(config: RunConfig, ctx: StepContext) -> dict:
    """The whole chain in one process, in the DAG's order (for ``detox run`` and tests)."""
    data = prepare_dataset(config, ctx)
    adapter = download_adapter(config, ctx)
    baseline = baseline_eval(config, ctx, data["dataset_uri"], adapter["adapter_dir"])
    ppo = ppo_train(config, ctx, data["dataset_uri"], adapter["adapter_dir"])
    candidate = evaluate(config, ctx, data["dataset_uri"], adapter["adapter_dir"], ppo["ppo_adapter_dir"])
    champion = champion_eval(config, ctx, data["dataset_uri"])
    decision = promotion_check(config, ctx, baseline, candidate, champion)
    if decision["promote"]:
        registered = register_model(config, ctx, decision, adapter["adapter_dir"], ppo["ppo_adapter_dir"])
    else:
        registered = skip_registration(config, ctx, decision)
    return {"registered": registered, "summary": report(config, ctx)}
