"""The served stack (``make up``) as a pytest fixture: one per test session, shared by every test
that needs a real scheduler, the Airflow UI and REST API, or the MLflow server.

``stack`` yields what ``stack.json`` holds (``airflow_url``, ``mlflow_url``, ``s3_endpoint``,
``username``, ``password``, ``home``, ...) while the stack runs on free ports, in a home of its own
that holds a copy of the session's embedded default. ``airflow_api`` wraps its REST API.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import requests
from support import copy_embedded_builds, shared_root

from tasks.io.s3_server import free_port


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
