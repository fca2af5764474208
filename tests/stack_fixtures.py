"""The served stack (``make up``) as a pytest fixture: one per test session, shared by every test
that needs a real scheduler, the Airflow UI and REST API, or the MLflow server.

``stack`` yields what ``stack.json`` holds (``airflow_url``, ``mlflow_url``, ``s3_endpoint``,
``username``, ``password``, ``home``, ...) while the stack runs on free ports, in a home of its own
that holds a copy of the session's embedded default. ``airflow_api`` wraps its REST API.
``browser`` is a headless Chromium page logged in to its UI; ``approved_run`` the session's first
``detox_retrain`` run, approved there.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote

import pytest
import requests
from support import PROMOTING_FORM, copy_embedded_builds, require, shared_root

from tasks.io.s3_server import free_port
from tasks.local.demo import DAG_ID


class AirflowAPI:
    """Airflow's REST API v2 with a token from ``POST /auth/token`` (the stack.json login)."""

    def __init__(self, stack: dict):
        from tasks.local.stack import airflow_token

        self.url = stack["airflow_url"]
        self.token = airflow_token(self.url, stack["username"], stack["password"])
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {self.token}"

    def get(self, path: str, **params) -> dict:
        response = self.session.get(f"{self.url}/api/v2{path}", params=params, timeout=60)
        response.raise_for_status()
        return response.json()

    def trigger(self, dag_id: str, conf: dict) -> str:
        response = self.session.post(f"{self.url}/api/v2/dags/{dag_id}/dagRuns",
                                     json={"logical_date": None, "conf": conf}, timeout=60)
        assert response.status_code == 200, response.text
        return response.json()["dag_run_id"]

    def wait_for_run(self, dag_id: str, run_id: str, timeout_s: float = 900) -> dict:
        """The run once it ends; its task instances' states on failure or time-out."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            run = self.get(f"/dags/{dag_id}/dagRuns/{run_id}")
            if run["state"] in ("success", "failed"):
                return run
            time.sleep(2)
        states = {ti["task_id"]: ti["state"] for ti in self.task_instances(dag_id, run_id)}
        raise AssertionError(f"{run_id} did not end within {timeout_s:.0f} s: {states}")

    def wait_for_task(self, dag_id: str, run_id: str, task_id: str, states: set[str], timeout_s: float = 900) -> str:
        """The state of ``task_id`` once it is one of ``states``; fails as soon as a task of the run fails."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            tasks = {ti["task_id"]: ti["state"] for ti in self.task_instances(dag_id, run_id)}
            if tasks.get(task_id) in states:
                return tasks[task_id]
            failed = [name for name, state in tasks.items() if state == "failed"]
            assert not failed, f"{run_id}: {failed} failed"
            time.sleep(2)
        raise AssertionError(f"{task_id} of {run_id} not in {states} within {timeout_s:.0f} s")

    def task_instances(self, dag_id: str, run_id: str) -> list[dict]:
        return self.get(f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances", limit=100)["task_instances"]


def listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="session")
def stack(embedded, detox_home, tmp_path_factory, request):
    """The whole stack started as ``make up`` starts it (``detox up`` in a process group of its own) on
    free ports; at session end, Ctrl-C (SIGINT) to that group must leave nothing alive or listening
    within 30 s. One per session: under pytest-xdist its modules share one worker (tests/conftest.py)."""
    try:
        (shared_root(request.config) / "stack-started").open("x").close()
    except FileExistsError:
        pytest.fail("a second stack in this session: pytest-xdist did not keep the modules on the stack on "
                    "one worker (their xdist_group marks, tests/conftest.py)", pytrace=False)
    home = tmp_path_factory.mktemp("stack-home")
    copy_embedded_builds(detox_home, home)
    groups: list[int] = []
    ports = {"DETOX_AIRFLOW_PORT": free_port(), "DETOX_MLFLOW_PORT": free_port()}
    env = {**os.environ, "DETOX_HOME": str(home), **{name: str(port) for name, port in ports.items()}}
    log = open(home / "detox-up.log", "wb")  # noqa: SIM115  (closed at teardown)
    up = subprocess.Popen([sys.executable, "-m", "tasks.cli", "up"], env=env, stdout=log, stderr=subprocess.STDOUT,
                          stdin=subprocess.DEVNULL, start_new_session=True)
    stack_file = home / "stack.json"
    try:
        deadline = time.monotonic() + 300
        while not stack_file.exists():
            assert up.poll() is None, (home / "detox-up.log").read_text()[-5000:]
            assert time.monotonic() < deadline, "no stack.json within 300 s"
            time.sleep(1)
        info = json.loads(stack_file.read_text())
        ports["s3"] = int(info["s3_endpoint"].rsplit(":", 1)[1])
        groups.extend(info["pids"].values())  # each service leads a process group of its own
        yield {**info, "home": str(home)}
    finally:
        os.killpg(up.pid, signal.SIGINT)  # what Ctrl-C in the terminal of `make up` sends
        stopped = time.monotonic() + 30
        while time.monotonic() < stopped and (any(map(group_alive, [up.pid, *groups]))
                                              or any(map(listening, ports.values()))):
            up.poll()
            time.sleep(0.5)
        left = [pgid for pgid in {up.pid, *groups} if group_alive(pgid)]
        open_ports = [port for port in ports.values() if listening(port)]
        for pgid in left:
            os.killpg(pgid, signal.SIGKILL)
        up.wait(timeout=30)
        log.close()
    assert not left and not open_ports, f"30 s after Ctrl-C: groups alive {left}, listening {open_ports}"
    assert not stack_file.exists()


@pytest.fixture(scope="session")
def airflow_api(stack) -> AirflowAPI:
    return AirflowAPI(stack)


# Promotes on the embedded default (see tests/support.py), then asks a person. No champion comparison,
# so a second run with it reaches the question whatever the first registered.
APPROVAL_CONF = {**PROMOTING_FORM, "require_approval": True,
                 "overrides": {**PROMOTING_FORM["overrides"], "promotion.compare_with_champion": False}}


@pytest.fixture(scope="session")
def browser(stack, airflow_api):
    """A headless Chromium page logged in to the stack's Airflow UI (skipped where Chromium is missing,
    failed in CI: ``DETOX_REQUIRE`` names it)."""
    chromium_path = require("chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=chromium_path, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        context = chromium.new_context(viewport={"width": 1400, "height": 1000})
        # The UI's own cookie, as after its login page.
        context.add_cookies([{"name": "_token", "value": airflow_api.token, "url": stack["airflow_url"]}])
        page = context.new_page()
        page.set_default_timeout(120_000)
        yield page
        chromium.close()


@pytest.fixture(scope="session")
def shots(stack) -> Path:
    folder = Path(os.environ.get("DETOX_SCREENSHOT_DIR") or Path(stack["home"]) / "screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def wait_for_the_deferral_report(stack, run_id: str, timeout_s: float = 120) -> None:
    """Until the scheduler has taken in the executor's report that the approval task's first
    attempt ended (it defers, awaiting input).

    Airflow 3.3 fails a deferred task whose resumed attempt is already running when that report
    comes in (apache/airflow#72716, open): an answer given within seconds of the request fails the
    approval once, and its retry asks again. A reviewer takes longer than that; on a loaded machine
    a test may not, so it waits for the scheduler's log line instead of guessing a delay."""
    log = Path(stack["logs"]) / "airflow-scheduler.log"
    wanted = f"task_id='approval', run_id='{run_id}'"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if any("Received executor event" in line and wanted in line for line in log.read_text().splitlines()):
            return
        time.sleep(1)
    raise AssertionError(f"no executor event for the approval of {run_id} in {log} within {timeout_s:.0f} s")


def answer_approval(page, stack, run_id: str, option: str, comment: str, shot: Path | None = None) -> None:
    """Airflow's own required-actions page of the approval task: the comment, then the button."""
    wait_for_the_deferral_report(stack, run_id)
    page.goto(f"{stack['airflow_url']}/dags/{DAG_ID}/runs/{quote(run_id, safe='')}/tasks/approval/required_actions")
    try:
        page.get_by_text("Register this detox_retrain candidate?").first.wait_for()
        page.get_by_role("textbox").first.fill(comment)
        if shot:
            page.screenshot(path=str(shot), full_page=True)
        with page.expect_response(lambda r: r.request.method == "PATCH" and "hitlDetails" in r.url) as answer:
            page.get_by_role("button", name=option).click()
        assert answer.value.ok, answer.value.text()
        page.goto("about:blank")  # Airflow's pages poll the API while open: no CPU for that while the run goes on
    except Exception:
        failed = Path(stack["home"]) / "approval-failure"
        page.screenshot(path=f"{failed}.png", full_page=True)
        Path(f"{failed}.html").write_text(page.content())
        raise


@pytest.fixture(scope="session")
def approved_run(stack, airflow_api, browser, shots) -> str:
    """The session's first ``detox_retrain`` run on the stack, as a user makes it: triggered through
    the REST API with the trigger form's values, approved in Airflow's UI with a comment once its
    gate promotes. It registers the first champion of the demo's model. Shared by
    tests/test_stack.py (the run, the pool, the champion) and tests/test_plugin_live.py (the report,
    labeling, the approval), so the stack trains one such run instead of two."""
    run_id = airflow_api.trigger(DAG_ID, APPROVAL_CONF)
    assert airflow_api.wait_for_task(DAG_ID, run_id, "approval", {"awaiting_input", "skipped"}) == "awaiting_input"
    answer_approval(browser, stack, run_id, "Approve", "summaries read well", shots / "approval.png")
    run = airflow_api.wait_for_run(DAG_ID, run_id)
    assert run["state"] == "success", airflow_api.task_instances(DAG_ID, run_id)
    return run_id
