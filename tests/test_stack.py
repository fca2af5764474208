"""The workflow as its users run it: ``make up``'s stack (real scheduler, api-server, MLflow server,
S3 on loopback), driven through Airflow's REST API v2, the MLflow REST API, the served champion and
a headless Chromium.

One stack for the session (tests/stack_fixtures.py); two DAG runs: the first promotes a champion
(the session's ``approved_run``, approved in the UI, which tests/test_plugin_live.py reads too), the
second is refused by an impossible threshold while the first's champion is served and shown.
"""

from __future__ import annotations

import itertools
from datetime import datetime
from pathlib import Path

import pytest
import requests
from support import PROMOTING_FORM

from tasks.io.s3_server import free_port
from tasks.local.demo import DAG_ID

pytestmark = pytest.mark.slow

MODEL = "detox-summarizer-demo"
GPU_TASKS = {"baseline_eval", "ppo_train", "evaluate", "champion_eval"}
# The first run's evaluation protocol (so the champion's metrics come from its version tags), a token
# PPO run, and a threshold no model can pass: the gate must refuse.
SECOND_CONF = {**PROMOTING_FORM, "ppo_steps": 1, "min_toxicity_reduction": 1.0}


def mlflow_get(stack: dict, path: str, **params) -> dict:
    response = requests.get(f"{stack['mlflow_url']}/api/2.0/mlflow/{path}", params=params, timeout=30)
    response.raise_for_status()
    return response.json()


def champion(stack: dict) -> dict:
    return mlflow_get(stack, "registered-models/alias", name=MODEL, alias="champion")["model_version"]


@pytest.fixture(scope="module")
def first_run(approved_run, airflow_api) -> dict:
    """The session's first run: triggered through the REST API, approved in the UI, ended."""
    return {"run": airflow_api.wait_for_run(DAG_ID, approved_run),
            "tasks": airflow_api.task_instances(DAG_ID, approved_run)}


@pytest.fixture(scope="module")
def second_run_id(first_run, airflow_api) -> str:
    """Triggered once the first ended; the tests between this and :func:`second_run` overlap with it."""
    return airflow_api.trigger(DAG_ID, SECOND_CONF)


@pytest.fixture(scope="module")
def second_run(second_run_id, airflow_api) -> dict:
    run = airflow_api.wait_for_run(DAG_ID, second_run_id)
    return {"run": run, "tasks": airflow_api.task_instances(DAG_ID, second_run_id)}


def test_stack_json_login_pool_and_connections(stack, airflow_api):
    home = Path(stack["home"])
    assert (home / "stack.json").exists()
    assert {"airflow_url", "mlflow_url", "s3_endpoint", "username", "password"} <= set(stack)
    assert all(stack[url].startswith("http://127.0.0.1:") for url in ("airflow_url", "mlflow_url", "s3_endpoint"))
    bad = requests.post(f"{stack['airflow_url']}/auth/token",
                        json={"username": stack["username"], "password": "wrong"}, timeout=30)
    assert bad.status_code == 401
    assert airflow_api.get("/pools/gpu")["slots"] == 1
    s3 = airflow_api.get("/connections/detox_s3")
    assert s3["conn_type"] == "aws" and stack["s3_endpoint"] in s3["extra"]
    assert airflow_api.get("/connections/detox_mlflow")["host"] == stack["mlflow_url"]
    dag = airflow_api.get(f"/dags/{DAG_ID}")
    assert dag["is_paused"] is False  # a trigger from the form starts at once
    assert requests.get(f"{stack['mlflow_url']}/health", timeout=10).ok


def process_group(pgid: int) -> list[str]:
    """The command lines of the processes in process group ``pgid``."""
    commands = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid, pgrp
            if int(fields[2]) == pgid:
                commands.append((stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode())
        except (OSError, IndexError, ValueError):  # ended meanwhile
            pass
    return commands


def test_the_mlflow_server_runs_without_a_job_runner(stack):
    """MLflow's GenAI job runner (its huey consumers) stays off: tasks/local/stack.py says why."""
    commands = process_group(stack["pids"]["mlflow-server"])
    assert any("mlflow server" in command for command in commands), commands
    assert not [command for command in commands if "huey" in command or "_job_runner" in command]


def test_a_run_triggered_through_the_rest_api_succeeds_with_no_retries(first_run):
    assert first_run["run"]["state"] == "success", first_run["tasks"]
    assert first_run["run"]["run_type"] == "manual"
    states = {ti["task_id"]: ti["state"] for ti in first_run["tasks"]}
    assert states["register_model"] == "success" and states["skip_registration"] == "skipped", states
    assert all(ti["try_number"] == 1 for ti in first_run["tasks"] if ti["state"] != "skipped"), \
        {ti["task_id"]: ti["try_number"] for ti in first_run["tasks"]}


def test_starting_the_stack_fired_no_scheduled_run(first_run, airflow_api):
    runs = airflow_api.get(f"/dags/{DAG_ID}/dagRuns", limit=100)["dag_runs"]
    assert {run["run_type"] for run in runs} == {"manual"}, runs


def test_the_pool_lets_one_gpu_task_run_at_a_time(first_run):
    gpu = [ti for ti in first_run["tasks"] if ti["task_id"] in GPU_TASKS]
    assert {ti["pool"] for ti in gpu} == {"gpu"} and len(gpu) == len(GPU_TASKS)
    spans = {ti["task_id"]: (datetime.fromisoformat(ti["start_date"]), datetime.fromisoformat(ti["end_date"]))
             for ti in gpu}
    for (a, (a_start, a_end)), (b, (b_start, b_end)) in itertools.combinations(spans.items(), 2):
        assert a_end <= b_start or b_end <= a_start, f"{a} {a_start}-{a_end} overlaps {b} {b_start}-{b_end}"


def test_the_champion_moved_to_the_registered_version_with_its_tags(stack, first_run):
    version = champion(stack)
    tags = {tag["key"]: tag["value"] for tag in version.get("tags", [])}
    assert tags["airflow.run_id"] == first_run["run"]["dag_run_id"]
    assert tags["airflow.dag_id"] == DAG_ID
    assert float(tags["toxicity_after"]) < float(tags["toxicity_before"])
    assert version["status"] == "READY"


def test_second_run_is_triggered(second_run_id):
    assert second_run_id.startswith("manual__")


def test_the_served_champion_answers(stack, first_run, second_run_id):
    from tasks.local.stack import served_champion

    dialogues = ["#Person1#: Did you finish the report? #Person2#: Yes, I sent it this morning.",
                 "#Person1#: The train is late again. #Person2#: Let's take the bus then."]
    with served_champion(stack["mlflow_url"], free_port(), MODEL,
                         log_path=Path(stack["home"]) / "logs" / "serve.log") as url:
        response = requests.post(f"{url}/invocations", json={"inputs": dialogues}, timeout=120)
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    assert len(predictions) == 2 and all(isinstance(p, str) and p.strip() for p in predictions)


def test_the_ui_pages_show_the_dag_and_the_champion(stack, first_run, second_run_id, browser, shots):
    browser.goto(f"{stack['airflow_url']}/dags/{DAG_ID}")
    browser.get_by_text("prepare_dataset").first.wait_for()
    browser.screenshot(path=str(shots / "airflow-dag.png"))
    airflow_dom = browser.content()
    browser.goto(f"{stack['mlflow_url']}/#/models/{MODEL}")
    browser.get_by_text(MODEL).first.wait_for()
    browser.wait_for_function("() => document.body.innerText.includes('champion')")
    browser.screenshot(path=str(shots / "mlflow-model.png"))
    mlflow_dom = browser.content()
    browser.goto("about:blank")
    assert DAG_ID in airflow_dom and "ppo_train" in airflow_dom
    assert MODEL in mlflow_dom and "champion" in mlflow_dom


def test_an_impossible_threshold_skips_registration_and_keeps_the_champion(stack, first_run, second_run):
    assert second_run["run"]["state"] == "success", second_run["tasks"]
    states = {ti["task_id"]: ti["state"] for ti in second_run["tasks"]}
    assert states["skip_registration"] == "success" and states["register_model"] == "skipped", states
    assert all(ti["try_number"] == 1 for ti in second_run["tasks"] if ti["state"] != "skipped")
    tags = {tag["key"]: tag["value"] for tag in champion(stack).get("tags", [])}
    assert tags["airflow.run_id"] == first_run["run"]["dag_run_id"]  # still the first run's version
