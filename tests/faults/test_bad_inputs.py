"""Bad input is refused before it costs anything: the form's bounds in Airflow, unknown config
fields, and data sets that cannot be used. The error names the problem, nothing is written,
and Airflow does not waste retries on it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.config import RunConfig
from tasks.io.dialogues import DataError
from tasks.io.s3 import parse_s3_uri, s3_client
from tasks.local.demo import ensure_airflow_db
from tasks.registry import tracking
from tasks.steps import detox_retrain

pytestmark = pytest.mark.slow


def footprint() -> tuple[set[str], int]:
    """Run folders on disk and MLflow runs in all experiments: what a run that did any work leaves."""
    root = RunConfig.for_profile("demo").run_dir("x").parent
    folders = {path.name for path in root.iterdir()} if root.is_dir() else set()
    experiments = [e.experiment_id for e in tracking.client().search_experiments()]
    return folders, len(tracking.client().search_runs(experiments, max_results=5000)) if experiments else 0


FORM_CASES = [
    ("detox_retrain", "ppo_steps", 0),
    ("detox_retrain", "eval_samples", -3),
    ("reward_model_train", "min_accuracy", 1.5),
]


@pytest.fixture(scope="module")
def dag_runs(demo, tmp_path_factory):
    """Every ``airflow dags test`` of this module, all at once (each spends most of its time starting
    Airflow), each on its own copy of the demo's Airflow database; what each printed, and the
    footprint before and after. All of them must fail."""
    ensure_airflow_db()
    copies = tmp_path_factory.mktemp("airflow-dbs")
    confs = {field: (dag_id, {"profile": "demo", field: value}) for dag_id, field, value in FORM_CASES}
    confs["unknown-fields"] = ("detox_retrain", {"profile": "demo",
                                                 "overrides": {"ppo.bogus": 1, "lora.rank_x": 2}})
    confs["unusable-data"] = ("detox_retrain", {"profile": "demo", "dataset_source": upload("wrong-columns")})
    before = footprint()
    processes = {}
    for day, (case, (dag_id, conf)) in enumerate(confs.items(), start=1):
        database = copies / f"{case}.db"
        shutil.copyfile(Path(os.environ["AIRFLOW_HOME"]) / "airflow.db", database)
        env = dict(os.environ, AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=f"sqlite:///{database}")
        command = [sys.executable, "-m", "airflow", "dags", "test", dag_id, f"2026-10-{day:02d}T00:00:00+00:00",
                   "-c", json.dumps(conf)]
        log = (copies / f"{case}.log").open("w")
        processes[case] = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    outputs = {}
    for case, process in processes.items():
        code = process.wait(timeout=600)
        outputs[case] = (copies / f"{case}.log").read_text()
        assert code != 0, outputs[case][-3000:]
    return {"outputs": outputs, "before": before, "after": footprint()}


@pytest.mark.parametrize(("dag_id", "field", "value"), FORM_CASES)
def test_form_values_out_of_range_are_rejected_before_any_work(dag_runs, dag_id, field, value):
    assert f"Invalid input for param {field}" in dag_runs["outputs"][field]


def test_unknown_config_fields_are_named_and_not_retried(dag_runs):
    output = dag_runs["outputs"]["unknown-fields"]
    assert "unknown field 'lora.rank_x'; unknown field 'ppo.bogus'" in output
    assert "up_for_retry" not in output


def test_refused_runs_leave_no_trace(dag_runs):
    """Of the five runs only the one with an unusable data set got as far as writing anything: one
    run folder and one MLflow run (see test_an_unusable_data_set_fails_its_task_once_and_stops_the_run)."""
    (folders_before, runs_before), (folders_after, runs_after) = dag_runs["before"], dag_runs["after"]
    assert len(folders_after - folders_before) == 1
    assert runs_after == runs_before + 1


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
    ctx = detox_retrain.StepContext(run_key=f"bad-data-{case}")
    with pytest.raises(DataError, match=BAD_DATA[case][1]):
        detox_retrain.prepare_dataset(config, ctx)
    assert not (config.run_dir(ctx.run_key) / "data").exists()


def test_an_unusable_data_set_fails_its_task_once_and_stops_the_run(dag_runs):
    output = dag_runs["outputs"]["unusable-data"]
    assert "DataError: " in output and "missing required column(s) ['dialogue', 'summary']" in output
    assert "up_for_retry" not in output
    (new_run,) = dag_runs["after"][0] - dag_runs["before"][0]
    # The fetched source and the adapter (its task does not need the data); no data set, nothing downstream.
    written = {path.name for path in RunConfig.for_profile("demo").run_dir(new_run).iterdir()}
    assert written == {"downloads", "adapters"}
