"""What the Airflow UI plugin (``plugins/``) reads and writes, without Airflow.

* A ``detox_retrain`` run's report, read from MLflow by the Airflow run id: the gate's
  decision, metrics before and after with their intervals, plots, the per-sample table and
  the registered version. Whatever the run has logged so far; nothing is copied anywhere.
* Labeling: items to rank (a finished run's held-out samples, or a jsonl of candidates in
  S3), and rankings written to S3 as one object per submission, each a record in the format
  ``reward_model_train`` reads (``prompt``, ``responses``, ``ranking``) plus who ranked it,
  when, and from which run.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import random
import tempfile
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import combinations
from pathlib import Path

import pandas as pd

from tasks.config import PROMPT_TEMPLATE
from tasks.errors import InputError
from tasks.io.s3 import parse_s3_uri, s3_client
from tasks.registry import tracking
from tasks.rewards.preferences import pairs_from_ranking

logger = logging.getLogger(__name__)

DAG_ID = "detox_retrain"
REPORT_METRICS = ("toxicity_mean", "judge_mean", "rouge_l_mean")
# The interval names that promotion_check logs for each reported metric.
INTERVAL_OF = {"toxicity_mean": "toxicity", "judge_mean": "judge", "rouge_l_mean": "rouge_l"}
PLOTS = ("report/toxicity_before_after.png", "report/ppo_reward_kl.png")
# Candidate summaries a finished run offers for ranking: MLflow artifact -> label.
CANDIDATE_ARTIFACTS = {"baseline/samples.jsonl": "sft", "eval/samples.jsonl": "ppo",
                       "champion/samples.jsonl": "champion"}


class ReviewError(InputError, ValueError):
    """A request the pages cannot serve: unknown run, bad source, bad ranking."""


@dataclass
class RunReport:
    """What one DAG run has logged to MLflow so far."""

    run_key: str
    mlflow_run_id: str | None = None
    experiment_id: str | None = None
    status: str = "not started"
    decision: dict | None = None
    tags: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    table: list[dict] = field(default_factory=list)
    plots: list[str] = field(default_factory=list)

    @property
    def registered_uri(self) -> str | None:
        uri = self.tags.get("registry.model_uri")
        return None if uri in (None, "none") else uri

    def before_after(self) -> list[dict]:
        """Per reported metric: before, after, and the paired interval of the change when logged."""
        rows = []
        for metric in REPORT_METRICS:
            interval = INTERVAL_OF[metric]
            rows.append({
                "metric": metric.removesuffix("_mean"),
                "before": self.metrics.get(f"baseline/{metric}"),
                "after": self.metrics.get(f"eval/{metric}"),
                "change": self.metrics.get(f"promotion/{interval}_change_mean"),
                "low": self.metrics.get(f"promotion/{interval}_change_ci_low"),
                "high": self.metrics.get(f"promotion/{interval}_change_ci_high"),
            })
        return rows


def find_run(run_key: str, dag_id: str = DAG_ID):
    """The MLflow run of Airflow run ``run_key`` of ``dag_id`` (any experiment), or None."""
    client = tracking.client()
    experiments = [e.experiment_id for e in client.search_experiments()]
    if not experiments:
        return None
    escaped = run_key.replace("\\", "\\\\").replace("'", "\\'")
    runs = client.search_runs(
        experiments, filter_string=f"tags.`{tracking.RUN_KEY_TAG}` = '{escaped}'", max_results=50)
    runs = [run for run in runs if run.data.tags.get("airflow.dag_id", dag_id) == dag_id]
    return min(runs, key=lambda r: (r.info.start_time, r.info.run_id)) if runs else None


def run_report(run_key: str, max_rows: int | None = None) -> RunReport:
    """The report of DAG run ``run_key``: everything its MLflow run holds so far."""
    run = find_run(run_key)
    report = RunReport(run_key=run_key)
    if run is None:
        return report
    report.mlflow_run_id, report.experiment_id = run.info.run_id, run.info.experiment_id
    report.status = run.info.status
    report.tags = dict(run.data.tags)
    report.metrics = dict(run.data.metrics)
    logged = _artifact_names(run.info.run_id)
    if "promotion/decision.json" in logged:
        report.decision = json.loads(_download_text(run.info.run_id, "promotion/decision.json"))
    report.plots = [name for name in PLOTS if name in logged]
    if {"baseline/samples.jsonl", "eval/samples.jsonl"} <= logged:
        from tasks.evaluation.protocol import comparison_table

        table = comparison_table(_samples(run.info.run_id, "baseline/samples.jsonl"),
                                 _samples(run.info.run_id, "eval/samples.jsonl"))
        report.table = table.head(max_rows).to_dict("records") if max_rows else table.to_dict("records")
    return report


def plot_bytes(mlflow_run_id: str, name: str) -> bytes:
    """One of the report's PNG plots; nothing else of the run can be read this way."""
    if name not in PLOTS:
        raise ReviewError(f"unknown plot {name!r}")
    import mlflow

    with tempfile.TemporaryDirectory() as tmp:
        path = mlflow.artifacts.download_artifacts(run_id=mlflow_run_id, artifact_path=name, dst_path=tmp)
        return Path(path).read_bytes()


def mlflow_run_url(report: RunReport, base_url: str | None) -> str | None:
    """Link to the run in the MLflow UI, when the UI's address is known."""
    if not base_url or report.mlflow_run_id is None:
        return None
    return f"{base_url.rstrip('/')}/#/experiments/{report.experiment_id}/runs/{report.mlflow_run_id}"


def mlflow_ui_url() -> str | None:
    """The MLflow UI: ``DETOX_MLFLOW_UI_URL``, else the tracking URI when it is a web address."""
    explicit = os.environ.get("DETOX_MLFLOW_UI_URL")
    if explicit:
        return explicit
    import mlflow

    uri = mlflow.get_tracking_uri()
    return tracking.redact(uri) if uri.startswith(("http://", "https://")) else None


def recent_runs(limit: int = 20) -> list[dict]:
    """The latest ``detox_retrain`` runs in MLflow that have held-out samples to rank, newest first."""
    client = tracking.client()
    experiments = [e.experiment_id for e in client.search_experiments()]
    if not experiments:
        return []
    runs = client.search_runs(experiments, filter_string=f"tags.`airflow.dag_id` = '{DAG_ID}'",
                              order_by=["attributes.start_time DESC"], max_results=limit)
    return [{"run_key": run.data.tags[tracking.RUN_KEY_TAG], "status": run.info.status}
            for run in runs if tracking.RUN_KEY_TAG in run.data.tags and "eval/toxicity_mean" in run.data.metrics]


# --- labeling -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Item:
    """One prompt and its 2-4 candidate summaries, each named by where it came from."""

    item_id: str
    prompt: str
    dialogue: str
    candidates: dict[str, str]  # source label -> text


def labels_uri() -> str:
    """Where rankings go: ``DETOX_LABELS_URI``; on the demo, the loopback bucket."""
    explicit = os.environ.get("DETOX_LABELS_URI")
    if explicit:
        return explicit.rstrip("/") + "/"
    if os.environ.get("DETOX_PROFILE") == "demo":
        return "s3://detox-demo/labels/"
    return "s3://detox-preferences/labels/"


def load_items(source: str) -> list[Item]:
    """The items of a source: an Airflow run id of ``detox_retrain``, or ``s3://…jsonl`` of candidates.

    A candidates file has one JSON object per line: ``prompt`` (or ``dialogue``) and
    ``responses`` (2-4 texts); an optional ``id``.
    """
    if source.startswith("s3://"):
        return _items_from_s3(source)
    return _items_from_run(source)


def _items_from_run(run_key: str) -> list[Item]:
    run = find_run(run_key)
    if run is None:
        raise ReviewError(f"no MLflow run for {DAG_ID} run {run_key!r}")
    logged = _artifact_names(run.info.run_id)
    frames = {label: _samples(run.info.run_id, name) for name, label in CANDIDATE_ARTIFACTS.items() if name in logged}
    if len(frames) < 2:
        raise ReviewError(f"run {run_key!r} has no held-out samples before and after PPO yet")
    template = run.data.params.get("config/data.prompt_template", PROMPT_TEMPLATE)
    first = next(iter(frames.values()))
    texts = {label: dict(zip(frame["id"].astype(str), frame["generated"], strict=True))
             for label, frame in frames.items()}
    items = []
    for sample_id, dialogue in zip(first["id"].astype(str), first["dialogue"], strict=True):
        candidates = {label: str(by_id[sample_id]) for label, by_id in texts.items() if sample_id in by_id}
        if len(set(candidates.values())) < 2:
            continue  # identical summaries leave nothing to rank
        items.append(Item(_item_id(run_key, sample_id), template.format(dialogue=dialogue), str(dialogue),
                          candidates))
    return items


def _items_from_s3(uri: str) -> list[Item]:
    bucket, key = parse_s3_uri(uri)
    if not key.endswith(".jsonl"):
        raise ReviewError(f"a candidates file must be .jsonl: {uri}")
    body = s3_client().get_object(Bucket=bucket, Key=key)["Body"].read().decode("utf-8")
    items = []
    for number, line in enumerate(body.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            responses = record["responses"]
            dialogue = record.get("dialogue") or record["prompt"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ReviewError(f"{uri} line {number}: not a candidates record ({err})") from None
        if not isinstance(responses, list) or not 2 <= len(responses) <= 4:
            raise ReviewError(f"{uri} line {number}: needs 2 to 4 responses")
        prompt = record.get("prompt") or PROMPT_TEMPLATE.format(dialogue=dialogue)
        candidates = {f"response_{index + 1}": str(text) for index, text in enumerate(responses)}
        items.append(Item(_item_id(uri, str(record.get("id", number))), prompt, str(dialogue), candidates))
    return items


def _item_id(source: str, sample_id: str) -> str:
    return hashlib.sha256(f"{source}\n{sample_id}".encode()).hexdigest()[:16]


def shown_order(item: Item, annotator: str) -> list[str]:
    """The candidates' display order: random, but stable for one annotator and item, so a reload
    shows the same page."""
    order = sorted(item.candidates)
    random.Random(f"{item.item_id}:{annotator}").shuffle(order)
    return order


@dataclass(frozen=True)
class Label:
    item_id: str
    annotator: str
    ranks: dict[str, int]  # candidate label -> rank (1 = best)


def submit_ranking(source: str, item: Item, order: list[str], ranking: list[int], annotator: str,
                   uri: str | None = None) -> str:
    """Write one ranking as its own S3 object; returns its URI.

    ``order`` names the candidates as shown and ``ranking`` gives each one's rank (1 = best,
    equal ranks are ties). The record holds the candidate texts in that order, so it is a
    ``reward_model_train`` record as it stands.
    """
    if sorted(order) != sorted(item.candidates):
        raise ReviewError(f"the ranking names candidates {order}, the item has {sorted(item.candidates)}")
    responses = [item.candidates[label] for label in order]
    try:
        pairs_from_ranking(responses, ranking)
    except ValueError as err:
        raise ReviewError(f"ranking {ranking}: {err}") from None
    if any(not isinstance(rank, int) or rank < 1 for rank in ranking):
        raise ReviewError(f"ranking {ranking}: ranks are 1 (best), 2, ...")
    now = datetime.now(UTC)
    record = {"prompt": item.prompt, "responses": responses, "ranking": ranking, "annotator": annotator,
              "labeled_at": now.isoformat(timespec="seconds"), "source_run": source, "item_id": item.item_id,
              "candidates": order}
    bucket, prefix = parse_s3_uri(uri or labels_uri())
    # One object per submission, named so that concurrent annotators can never collide.
    key = f"{prefix}/{item.item_id}/{now:%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:12]}.json".lstrip("/")
    client = s3_client()
    _ensure_bucket(client, bucket)
    client.put_object(Bucket=bucket, Key=key, Body=json.dumps(record).encode("utf-8"),
                      ContentType="application/json")
    logger.info("ranking of item %s by %s written to s3://%s/%s", item.item_id, annotator, bucket, key)
    return f"s3://{bucket}/{key}"


def read_labels(uri: str | None = None) -> list[dict]:
    """Every ranking record under the labeling prefix, oldest first."""
    bucket, prefix = parse_s3_uri(uri or labels_uri())
    client = s3_client()
    keys = []
    try:
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/" if prefix else "")
        for page in pages:
            keys.extend(entry["Key"] for entry in page.get("Contents", []) if entry["Key"].endswith(".json"))
    except client.exceptions.NoSuchBucket:
        return []
    records = [json.loads(client.get_object(Bucket=bucket, Key=key)["Body"].read()) for key in keys]
    return sorted(records, key=lambda r: r.get("labeled_at", ""))


@dataclass
class Progress:
    items: int
    labeled_items: int
    per_annotator: dict[str, int]
    shared_items: int  # items ranked by two or more annotators
    agreement: float | None  # share of candidate pairs that two annotators ordered alike


def progress(items: list[Item], records: list[dict]) -> Progress:
    """Labeled/total and per annotator for these items; agreement where two annotators ranked one item."""
    ids = {item.item_id for item in items}
    mine = [r for r in records if r.get("item_id") in ids]
    per_annotator: dict[str, int] = {}
    by_item: dict[str, dict[str, dict[str, int]]] = {}
    for record in mine:
        per_annotator[record["annotator"]] = per_annotator.get(record["annotator"], 0) + 1
        # An annotator's latest ranking of an item is the one that counts for agreement.
        by_item.setdefault(record["item_id"], {})[record["annotator"]] = dict(
            zip(record["candidates"], record["ranking"], strict=True))
    agreed = compared = 0
    shared = 0
    for rankings in by_item.values():
        if len(rankings) < 2:
            continue
        shared += 1
        for first, second in combinations(rankings.values(), 2):
            for a, b in combinations(sorted(first), 2):
                compared += 1
                agreed += _sign(first[a] - first[b]) == _sign(second[a] - second[b])
    return Progress(items=len(items), labeled_items=len(by_item), per_annotator=per_annotator,
                    shared_items=shared, agreement=agreed / compared if compared else None)


def next_item(items: list[Item], records: list[dict], annotator: str, skip: set[str] | None = None) -> Item | None:
    """An item this annotator has not ranked or skipped, preferring items nobody has ranked yet."""
    mine = {r["item_id"] for r in records if r.get("annotator") == annotator}
    anyone = {r["item_id"] for r in records}
    open_items = [item for item in items if item.item_id not in mine and item.item_id not in (skip or set())]
    if not open_items:
        return None
    fresh = [item for item in open_items if item.item_id not in anyone]
    return (fresh or open_items)[0]


def snapshot_labels(uri: str | None = None) -> tuple[str, int]:
    """All rankings under the prefix in one jsonl next to it, for a training run to read as it
    was at this moment; returns its URI and the record count."""
    records = read_labels(uri)
    if not records:
        raise ReviewError(f"no rankings under {uri or labels_uri()} yet")
    bucket, prefix = parse_s3_uri(uri or labels_uri())
    # Beside the prefix, not under it: a snapshot is no ranking of its own.
    parent, _, name = prefix.rpartition("/")
    stamp = f"{datetime.now(UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"
    key = f"{parent + '/' if parent else ''}snapshots/{name}-{stamp}.jsonl"
    body = "".join(json.dumps(record) + "\n" for record in records)
    s3_client().put_object(Bucket=bucket, Key=key, Body=body.encode("utf-8"))
    return f"s3://{bucket}/{key}", len(records)


def discard_snapshot(uri: str) -> None:
    """Remove a snapshot that no training run will read."""
    bucket, key = parse_s3_uri(uri)
    s3_client().delete_object(Bucket=bucket, Key=key)


def _sign(value: int) -> int:
    return (value > 0) - (value < 0)


def _ensure_bucket(client, bucket: str) -> None:
    from tasks.io.s3 import _ensure_bucket as ensure

    ensure(client, bucket)


def _artifact_names(mlflow_run_id: str) -> set[str]:
    client = tracking.client()
    names: set[str] = set()
    for folder in client.list_artifacts(mlflow_run_id):
        if folder.is_dir:
            names.update(entry.path for entry in client.list_artifacts(mlflow_run_id, folder.path))
        else:
            names.add(folder.path)
    return names


def _download_text(mlflow_run_id: str, name: str) -> str:
    import mlflow

    with tempfile.TemporaryDirectory() as tmp:
        path = mlflow.artifacts.download_artifacts(run_id=mlflow_run_id, artifact_path=name, dst_path=tmp)
        return Path(path).read_text(encoding="utf-8")


def _samples(mlflow_run_id: str, name: str) -> pd.DataFrame:
    return pd.read_json(io.StringIO(_download_text(mlflow_run_id, name)), orient="records", lines=True)


def approval_summary(decision: dict, report_url: str) -> str:
    """The approval request's body (Markdown): the gate's numbers, every rule, and the report."""
    ci = decision["toxicity_change_ci"]
    lines = [
        f"The gate promotes this candidate. [Open the run report]({report_url}) before answering.",
        "",
        f"- toxicity {decision['toxicity_before']:.4f} -> {decision['toxicity_after']:.4f} "
        f"(change {ci['mean']:+.4f}, {ci['confidence']:.0%} CI [{ci['low']:+.4f}, {ci['high']:+.4f}])",
        f"- independent judge {decision['judge_before']:.4f} -> {decision['judge_after']:.4f}",
        f"- ROUGE-L {decision['rouge_l_before']:.4f} -> {decision['rouge_l_after']:.4f}",
        "",
        "Rules:",
        *(f"- `{reason}`" for reason in decision["reasons"]),
        "",
        "Approve registers the merged model and moves the champion alias; Reject registers nothing. "
        "Your name and comment are logged to the MLflow run.",
    ]
    return "\n".join(lines)
