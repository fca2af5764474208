"""Bad input is refused before it costs anything: the form's bounds in Airflow, unknown config
fields, and data sets that cannot be used. The error names the problem, nothing is written,
and Airflow does not waste retries on it."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime

import pytest

from tasks import pipeline, tracking
from tasks.config import RunConfig
from tasks.data import DataError
from tasks.demo import ensure_airflow_db
from tasks.storage import parse_s3_uri, s3_client

pytestmark = pytest.mark.slow


def dags_test(dag_id: str, conf: dict) -> str:
    """``airflow dags test`` of the demo's DAG; its output. It must fail."""
    ensure_airflow_db()
    command = [sys.executable, "-m", "airflow", "dags", "test", dag_id, datetime.now(UTC).isoformat(),
               "-c", json.dumps(conf)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode != 0, result.stdout[-3000:]
    return result.stdout + result.stderr


def footprint() -> tuple[set[str], int]:
    """Run folders on disk and MLflow runs in all experiments: what a run that did any work leaves."""
    root = RunConfig.for_profile("demo").run_dir("x").parent
    folders = {path.name for path in root.iterdir()} if root.is_dir() else set()
    experiments = [e.experiment_id for e in tracking.client().search_experiments()]
    return folders, len(tracking.client().search_runs(experiments, max_results=5000)) if experiments else 0


@pytest.mark.parametrize(("dag_id", "field", "value"), [
    ("detox_retrain", "ppo_steps", 0),
    ("detox_retrain", "eval_samples", -3),
    ("reward_model_train", "min_accuracy", 1.5),
])
def test_form_values_out_of_range_are_rejected_before_any_work(demo, dag_id, field, value):
    before = footprint()
    output = dags_test(dag_id, {"profile": "demo", field: value})
    assert f"Invalid input for param {field}" in output
    assert footprint() == before


def test_unknown_config_fields_are_named_and_not_retried(demo):
    before = footprint()
    output = dags_test("detox_retrain", {"profile": "demo", "overrides": {"ppo.bogus": 1, "lora.rank_x": 2}})
    assert "unknown field 'lora.rank_x'; unknown field 'ppo.bogus'" in output
    assert "up_for_retry" not in output
    assert footprint() == before


BAD_DATA = {
    "wrong-columns": (b"id,text,topic\n1,hello,t\n", r"missing required column\(s\) \['dialogue', 'summary'\]"),
    "not-utf8": ("id,dialogue,summary,topic\n1,caf\xe9 talk,x,t\n".encode("latin-1"), "not valid UTF-8"),
    "empty": (b"", "is empty"),
    "all-filtered": (b"id,dialogue,summary,topic\n1,#Person1#: Hi.,x,t\n", "no usable rows left"),
}


def upload(case: str) -> str:
    uri = f"s3://detox-demo/faults/{case}.csv"
    bucket, key = parse_s3_uri(uri)
    s3_client().put_object(Bucket=bucket, Key=key, Body=BAD_DATA[case][0])
    return uri


@pytest.mark.parametrize("case", sorted(BAD_DATA))
def test_unusable_data_sets_fail_prepare_dataset_and_write_nothing(demo, case):
    config = RunConfig.for_profile("demo", {"data.source": upload(case)})
    ctx = pipeline.StepContext(run_key=f"bad-data-{case}")
    with pytest.raises(DataError, match=BAD_DATA[case][1]):
        pipeline.prepare_dataset(config, ctx)
    assert not (config.run_dir(ctx.run_key) / "data").exists()


def test_an_unusable_data_set_fails_its_task_once_and_stops_the_run(demo):
    folders_before, _ = footprint()
    output = dags_test("detox_retrain", {"profile": "demo", "dataset_source": upload("wrong-columns")})
    assert "DataError: " in output and "missing required column(s) ['dialogue', 'summary']" in output
    assert "up_for_retry" not in output
    (new_run,) = footprint()[0] - folders_before
    # The fetched source and the adapter (its task does not need the data); no data set, nothing downstream.
    written = {path.name for path in RunConfig.for_profile("demo").run_dir(new_run).iterdir()}
    assert written == {"downloads", "adapters"}
