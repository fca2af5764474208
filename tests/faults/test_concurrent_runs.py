"""Two runs of the reward DAG triggered at once, against one MLflow registry, with S3
credentials that exist only in an Airflow connection.

Both runs finish, each keeps its own files, the registry's aliases moved one run at a time,
and the credentials appear nowhere: not in the logs, MLflow params, tags or artifacts, nor
in any file the runs wrote.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from tasks.config import RewardRunConfig
from tasks.local.demo import REWARD_DAG_ID, ensure_airflow_db
from tasks.registry import tracking
from tasks.registry.model_registry import LOCK_SUFFIX, alias_version

pytestmark = pytest.mark.slow

NAME = "fault-concurrent-reward"
ACCESS_KEY = "AKIAFAULTSUITE7EXAMPLE"
SECRET_KEY = "fault-suite-secret/Kq9vT2xW8zR4mN6pL0sJ"
# A quarter of an epoch (about 16 optimizer steps) already ranks every held-out pair right; what is
# checked here is two runs side by side, not the model.
OVERRIDES = {"registered_model_name": NAME, "experiment_name": "fault-concurrent-reward",
             "training.epochs": 0.25, "gate.min_accuracy": 0.6}


@pytest.fixture(scope="module")
def two_runs(demo, tmp_path_factory):
    ensure_airflow_db()
    # The tracking database exists before the runs start, as a tracking server's would: two
    # processes creating one SQLite schema at once race in MLflow's migrations.
    config = RewardRunConfig.for_profile("demo", OVERRIDES)
    tracking.ensure_experiment(config.experiment_name, config.mlflow_artifact_location)
    env = dict(os.environ, OMP_NUM_THREADS="1")  # two runs on two cores: one thread each
    connection = {"conn_type": "aws", "login": ACCESS_KEY, "password": SECRET_KEY,
                  "extra": {"endpoint_url": env.pop("AWS_ENDPOINT_URL_S3"), "region_name": "us-east-1"}}
    env["AIRFLOW_CONN_DETOX_S3"] = json.dumps(connection)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        env.pop(name, None)  # without the connection, boto3 would find no credentials at all
    logs = tmp_path_factory.mktemp("concurrent-logs")
    processes = []
    for seed in (1, 2):
        conf = {"profile": "demo", "overrides": {**OVERRIDES, "training.seed": seed}}
        command = [sys.executable, "-m", "airflow", "dags", "test", REWARD_DAG_ID,
                   f"2026-11-2{seed}T00:00:00+00:00", "-c", json.dumps(conf)]
        log = (logs / f"run-{seed}.log").open("w")
        processes.append((subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT), logs / log.name))
    results = [(process.wait(timeout=900), Path(path).read_text()) for process, path in processes]
    experiment = tracking.client().get_experiment_by_name(OVERRIDES["experiment_name"])
    runs = tracking.client().search_runs([experiment.experiment_id]) if experiment else []
    return {"results": results, "runs": runs}


def test_both_runs_finish_with_their_own_files(two_runs):
    for code, log in two_runs["results"]:
        assert code == 0, log[-3000:]
    runs = two_runs["runs"]
    assert len(runs) == 2
    keys = {run.data.tags[tracking.RUN_KEY_TAG] for run in runs}
    assert len(keys) == 2
    config = RewardRunConfig.for_profile("demo", OVERRIDES)
    weights = {}
    for run in runs:
        folder = config.run_dir(run.data.tags[tracking.RUN_KEY_TAG])
        (model_file,) = folder.rglob("model.safetensors")
        weights[run.info.run_id] = hashlib.sha256(model_file.read_bytes()).hexdigest()
    assert len(set(weights.values())) == 2  # two seeds, two models: neither run overwrote the other

    for version in tracking.client().search_model_versions(f"name = '{NAME}'"):
        downloaded = Path(mlflow.artifacts.download_artifacts(f"models:/{NAME}/{version.version}"))
        (model_file,) = downloaded.rglob("model.safetensors")
        assert hashlib.sha256(model_file.read_bytes()).hexdigest() == weights[version.run_id]


def test_the_aliases_moved_one_run_at_a_time(two_runs):
    versions = {str(v.version) for v in tracking.client().search_model_versions(f"name = '{NAME}'")}
    assert len(versions) == 2  # one version per run, none twice
    champion, previous = alias_version(NAME, "champion"), alias_version(NAME, "previous")
    # Had both read "no champion" and moved the alias at once, neither would hold "previous".
    assert previous is not None and {str(champion.version), str(previous.version)} == versions
    assert not tracking.client().search_registered_models(f"name = '{NAME}{LOCK_SUFFIX}'")


def test_credentials_are_never_written(two_runs, detox_home):
    secrets = (ACCESS_KEY, SECRET_KEY)
    for _, log in two_runs["results"]:
        assert "detox_s3 sets AWS_ACCESS_KEY_ID" in log  # the connection was used...
        assert not any(secret in log for secret in secrets)  # ...and never printed
    for run in two_runs["runs"]:
        written = json.dumps([run.data.params, run.data.tags])
        assert not any(secret in written for secret in secrets)
    for version in tracking.client().search_model_versions(f"name = '{NAME}'"):
        assert not any(secret in json.dumps(version.tags) for secret in secrets)
    # Every file under the home: run folders, MLflow's database and artifacts, Airflow's logs and database.
    leaks = [path for path in detox_home.rglob("*") if path.is_file()
             and any(secret.encode() in path.read_bytes() for secret in secrets)]
    assert leaks == []
