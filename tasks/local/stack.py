"""The embedded default served as its users meet it: ``make up`` / ``detox up``.

On 127.0.0.1, until the context exits (Ctrl-C or SIGTERM for ``detox up``):

- Airflow's api-server, scheduler, dag-processor and triggerer (LocalExecutor), the
  metadata database on SQLite under ``<home>/airflow`` (or any SQLAlchemy URL);
- an ``mlflow server`` (UI, REST API, registry; artifacts served through it), its backend
  ``<home>/mlflow.db`` (or any SQLAlchemy URL);
- the loopback S3 server holding the SFT adapter and the preference rankings;
- the GPU pool and the ``detox_s3`` / ``detox_mlflow`` connections, created (or updated)
  through Airflow's REST API on every start, so a second start finds them as they should be.

``<home>/stack.json`` holds the URLs and the login while the stack runs::

    with running_stack(home, airflow_port=8080, mlflow_port=5000) as stack:
        requests.post(stack["airflow_url"] + "/auth/token", json={"username": stack["username"], ...})

Every service runs in its own process group: stopping kills each group (the task processes
of the scheduler's LocalExecutor and the MLflow server's workers with them), first with
SIGTERM, then SIGKILL for what is still there after a grace period.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from tasks.io.s3_server import DUMMY_CREDENTIAL, REGION, LocalS3Server, free_port
from tasks.local.demo import DAG_ID, DAGS_FOLDER, demo_environment

logger = logging.getLogger(__name__)

PLUGINS_FOLDER = DAGS_FOLDER.parent / "plugins"
USERNAME = "admin"
GPU_POOL = "gpu"
STACK_FILE = "stack.json"
# The scheduler's graceful stop waits for its running tasks (hours for a PPO run): after this long
# they are killed, and their Airflow retry resumes from the last checkpoint on the next start.
STOP_GRACE_S = 10.0


class StackInfo(dict):
    """What ``stack.json`` holds; ``services`` are the running processes (not in the file)."""

    services: list[Service]


class StackError(RuntimeError):
    """A service of the stack did not start; the message names it and ends with its log."""


@dataclass
class Service:
    """One long-running process of the stack, in its own process group, logging to a file."""

    name: str
    command: list[str]
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen | None = field(default=None, repr=False)

    def start(self) -> Service:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.command, env=self.env, stdin=subprocess.DEVNULL, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True,
                                            preexec_fn=_terminate_with_parent)
        logger.info("%s started (pid %d, log %s)", self.name, self.process.pid, self.log_path)
        return self

    def check_alive(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            raise StackError(f"{self.name} exited with code {self.process.returncode}:\n{self.log_tail()}")

    def log_tail(self, max_chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-max_chars:] if self.log_path.exists() else ""

    def signal_group(self, signum: int) -> None:
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, signum)
        except ProcessLookupError:
            pass

    def group_alive(self) -> bool:
        """Whether any process of the group is left (the leader may be gone before its children)."""
        if self.process is None:
            return False
        self.process.poll()  # reap the leader, so a zombie does not count
        try:
            os.killpg(self.process.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


def _terminate_with_parent() -> None:
    """In the child: SIGTERM when the stack's process dies, even by SIGKILL (Linux), so no service
    outlives it. The service's own SIGTERM handling then stops what it started."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def stop_services(services: list[Service], grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM every group, wait up to ``grace_s``, SIGKILL what is left."""
    for service in reversed(services):
        service.signal_group(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(s.group_alive() for s in services):
        time.sleep(0.2)
    for service in services:
        if service.group_alive():
            logger.warning("%s did not stop within %.0f s: killing it", service.name, grace_s)
            service.signal_group(signal.SIGKILL)
        if service.process is not None:
            try:
                service.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
    logger.info("stopped: %s", ", ".join(s.name for s in services) or "nothing")


def _secret(path: Path, make) -> str:
    """A secret kept in ``path`` (created on first use), so a restarted stack keeps its login and keys."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(make())
        path.chmod(0o600)
    return path.read_text().strip()


def _fernet_key() -> str:
    from cryptography.fernet import Fernet

    return Fernet.generate_key().decode()


def airflow_environment(home: Path, airflow_port: int, mlflow_url: str, s3_endpoint: str,
                        database_url: str | None = None, gpu_pool: str | None = GPU_POOL) -> dict[str, str]:
    """What every Airflow service of the stack (and the tasks it runs) gets in its environment."""
    airflow_home = home / "airflow"
    password_file = airflow_home / "simple_auth_manager_passwords.json"
    _secret(password_file, lambda: json.dumps({USERNAME: secrets.token_urlsafe(12)}))
    env = {
        **os.environ,
        **demo_environment(home),
        "MLFLOW_TRACKING_URI": mlflow_url,
        "AWS_ENDPOINT_URL_S3": s3_endpoint,
        "AWS_ACCESS_KEY_ID": DUMMY_CREDENTIAL,
        "AWS_SECRET_ACCESS_KEY": DUMMY_CREDENTIAL,
        "AWS_DEFAULT_REGION": REGION,
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        # The tiny models gain nothing from intra-op threads, and two tasks (or a busy neighbour) on
        # two cores make torch's spinning OpenMP threads many times slower: measured 90 s per PPO step.
        "OMP_NUM_THREADS": "1",
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(PLUGINS_FOLDER),
        "AIRFLOW__CORE__FERNET_KEY": _secret(airflow_home / "fernet_key", _fernet_key),
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{airflow_port}/execution/",
        # Unpaused at creation: a run triggered from the form starts at once. The weekly schedule's
        # first run is the next Sunday, never one fired when the stack starts (dags/detox_retrain.py).
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{USERNAME}:admin",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(password_file),
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__PORT": str(airflow_port),
        "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{airflow_port}",
        "AIRFLOW__API__WORKERS": "1",
        "AIRFLOW__API_AUTH__JWT_SECRET": _secret(airflow_home / "jwt_secret", lambda: secrets.token_urlsafe(32)),
        # The scheduler's and triggerer's log servers (all interfaces, requests signed with the JWT secret;
        # Airflow has no host setting for them) on free ports instead of 8793/8794, so stacks do not clash.
        "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
        "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
        "AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK": "False",
        # A task's calls to the execution API wait 5 s by default. On two busy cores the api-server
        # answered a task's start later than that; the retried call was refused (the first had gone
        # through) and the task failed before it ran (seen once: prepare_dataset on try 2).
        "AIRFLOW__WORKERS__EXECUTION_API_TIMEOUT": "60",
    }
    if database_url:
        env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] = database_url
    if gpu_pool:
        env["DETOX_GPU_POOL"] = gpu_pool
    else:
        env.pop("DETOX_GPU_POOL", None)
    return env


def _wait_for(what: str, probe, services: list[Service], timeout_s: float) -> Any:
    """Call ``probe()`` until it returns something truthy; fail when a service dies or time runs out."""
    deadline = time.monotonic() + timeout_s
    while True:
        for service in services:
            service.check_alive()
        try:
            result = probe()
        except (requests.ConnectionError, requests.Timeout):
            result = None
        if result:
            return result
        if time.monotonic() > deadline:
            tails = "\n".join(f"--- {s.name}:\n{s.log_tail(1500)}" for s in services)
            raise StackError(f"{what} not ready within {timeout_s:.0f} s\n{tails}")
        time.sleep(1.0)


def airflow_token(airflow_url: str, username: str, password: str) -> str:
    """A JWT for Airflow's REST API from ``POST /auth/token``."""
    response = requests.post(f"{airflow_url}/auth/token", json={"username": username, "password": password},
                             timeout=30)
    response.raise_for_status()
    return response.json()["access_token"]


def _bulk_upsert(session: requests.Session, url: str, entities: list[dict]) -> None:
    """Create or overwrite entities through a bulk endpoint of REST API v2 (idempotent)."""
    body = {"actions": [{"action": "create", "entities": entities, "action_on_existence": "overwrite"}]}
    response = session.patch(url, json=body, timeout=60)
    response.raise_for_status()
    errors = [e for result in response.json().values() if isinstance(result, dict) for e in result.get("errors", [])]
    if errors:
        raise StackError(f"{url} refused {errors}")


def configure_airflow(airflow_url: str, token: str, mlflow_url: str, s3_endpoint: str,
                      gpu_pool: str | None, gpu_slots: int) -> None:
    """The pool and the two connections the DAGs use, set through the REST API."""
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {token}"
    if gpu_pool:
        _bulk_upsert(session, f"{airflow_url}/api/v2/pools", [
            {"name": gpu_pool, "slots": gpu_slots, "description": "GPU slots (training and evaluation tasks)",
             "include_deferred": False}])
    _bulk_upsert(session, f"{airflow_url}/api/v2/connections", [
        {"connection_id": "detox_s3", "conn_type": "aws", "login": DUMMY_CREDENTIAL, "password": DUMMY_CREDENTIAL,
         "extra": json.dumps({"endpoint_url": s3_endpoint, "region_name": REGION})},
        {"connection_id": "detox_mlflow", "conn_type": "http", "host": mlflow_url},
    ])
    logger.info("pool %s (%d slot(s)) and connections detox_s3, detox_mlflow set", gpu_pool, gpu_slots)


def _upload_demo_inputs(home: Path, s3: LocalS3Server) -> None:
    """The SFT adapter and the preference rankings, where the demo profile looks for them."""
    import boto3

    from tasks.config import DEMO_PREFERENCES_URI, RunConfig
    from tasks.embedded.builds import build_embedded_default
    from tasks.embedded.reward import build_embedded_reward
    from tasks.io.s3 import parse_s3_uri, upload_directory

    embedded = build_embedded_default(home)
    preferences = build_embedded_reward(home).preferences
    client = boto3.client("s3", endpoint_url=s3.endpoint_url, aws_access_key_id=DUMMY_CREDENTIAL,
                          aws_secret_access_key=DUMMY_CREDENTIAL, region_name=REGION)
    upload_directory(embedded.sft_adapter, RunConfig.for_profile("demo").model.sft_adapter_uri, client=client)
    bucket, key = parse_s3_uri(DEMO_PREFERENCES_URI)
    client.upload_file(str(preferences), bucket, key)


# MLflow 3's server starts a job runner by default: about eight huey consumer processes for its GenAI
# jobs (LLM judges, prompt optimization, trace roll-ups), 17 s more CPU at start on two cores and
# memory for as long as it runs. Nothing here submits such jobs. A user who wants them sets the
# variable to true.
MLFLOW_SERVER_ENVIRONMENT = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


@contextmanager
def running_stack(
    home: Path,
    airflow_port: int = 8080,
    mlflow_port: int = 5000,
    *,
    database_url: str | None = None,
    mlflow_backend_uri: str | None = None,
    gpu_pool: str | None = GPU_POOL,
    gpu_slots: int = 1,
    startup_timeout_s: float = 300.0,
) -> Iterator[dict[str, Any]]:
    """Start the whole stack for ``home``; yield what ``<home>/stack.json`` holds; stop it all on exit."""
    home = Path(home).expanduser().resolve()
    airflow_home = home / "airflow"
    airflow_home.mkdir(parents=True, exist_ok=True)
    logs = home / "logs"
    stack_file = home / STACK_FILE
    stack_file.unlink(missing_ok=True)
    airflow_url = f"http://127.0.0.1:{airflow_port}"
    mlflow_url = f"http://127.0.0.1:{mlflow_port}"
    services: list[Service] = []
    started = time.monotonic()
    with ExitStack() as cleanup:
        cleanup.callback(stack_file.unlink, missing_ok=True)
        cleanup.callback(stop_services, services)
        s3 = cleanup.enter_context(LocalS3Server())
        mlflow = Service("mlflow-server", [
            sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(mlflow_port),
            "--workers", "1", "--backend-store-uri", mlflow_backend_uri or f"sqlite:///{home / 'mlflow.db'}",
            "--artifacts-destination", (home / "mlartifacts").as_uri(),
        ], {**MLFLOW_SERVER_ENVIRONMENT, **os.environ, **demo_environment(home)}, logs / "mlflow-server.log").start()
        services.append(mlflow)
        env = airflow_environment(home, airflow_port, mlflow_url, s3.endpoint_url, database_url, gpu_pool)
        # The schema first (its own process), while the embedded default is built or found and uploaded.
        migrate = Service("airflow-db-migrate", [sys.executable, "-m", "airflow", "db", "migrate"], env,
                          logs / "airflow-db-migrate.log").start()
        services.append(migrate)
        _upload_demo_inputs(home, s3)
        if migrate.process.wait() != 0:
            raise StackError(f"airflow db migrate failed:\n{migrate.log_tail()}")
        services.remove(migrate)
        for name in ("api-server", "scheduler", "dag-processor", "triggerer"):
            services.append(Service(f"airflow-{name}", [sys.executable, "-m", "airflow", name], env,
                                    logs / f"airflow-{name}.log").start())
        _wait_for("the MLflow server", lambda: requests.get(f"{mlflow_url}/health", timeout=5).ok,
                  services, startup_timeout_s)
        _wait_for("the Airflow api-server",
                  lambda: requests.get(f"{airflow_url}/api/v2/monitor/health", timeout=5).ok,
                  services, startup_timeout_s)
        password = json.loads((airflow_home / "simple_auth_manager_passwords.json").read_text())[USERNAME]
        token = airflow_token(airflow_url, USERNAME, password)
        configure_airflow(airflow_url, token, mlflow_url, s3.endpoint_url, gpu_pool, gpu_slots)
        headers = {"Authorization": f"Bearer {token}"}
        _wait_for(f"DAG {DAG_ID} in Airflow",
                  lambda: requests.get(f"{airflow_url}/api/v2/dags/{DAG_ID}", headers=headers, timeout=10).ok,
                  services, startup_timeout_s)
        info = StackInfo({
            "airflow_url": airflow_url,
            "mlflow_url": mlflow_url,
            "s3_endpoint": s3.endpoint_url,
            "username": USERNAME,
            "password": password,
            "home": str(home),
            "logs": str(logs),
            "gpu_pool": gpu_pool,
            "pids": {s.name: s.process.pid for s in services} | {"s3": s3.pid},
        })
        info.services = services
        stack_file.write_text(json.dumps(info, indent=2) + "\n")
        stack_file.chmod(0o600)
        logger.info("stack up in %.0f s", time.monotonic() - started)
        yield info


@contextmanager
def served_champion(mlflow_url: str, port: int, model_name: str = "detox-summarizer-demo",
                    alias: str = "champion", log_path: Path | None = None,
                    startup_timeout_s: float = 180.0) -> Iterator[str]:
    """``mlflow models serve`` of ``models:/<model_name>@<alias>`` on 127.0.0.1:``port``; yields its URL."""
    log_path = log_path or Path(os.environ.get("DETOX_HOME", ".detox")) / "logs" / "serve.log"
    # `mlflow models serve` runs `uvicorn` by name: this interpreter's scripts first on the PATH.
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_url,
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    server = Service("mlflow-models-serve", [
        sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{model_name}@{alias}",
        "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port),
    ], env, log_path).start()
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_for(f"the served model {model_name}@{alias}",
                  lambda: requests.get(f"{url}/ping", timeout=5).ok, [server], startup_timeout_s)
        yield url
    finally:
        stop_services([server])


def read_stack(home: Path) -> dict[str, Any]:
    """The running stack's ``stack.json`` under ``home``; a clear error when none runs."""
    path = Path(home) / STACK_FILE
    if not path.exists():
        raise StackError(f"no stack runs for {home}: {path} is missing (start one with `make up`)")
    return json.loads(path.read_text())


def _exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)


def up(home: Path, airflow_port: int, mlflow_port: int) -> None:
    """``make up``: the stack in the foreground until Ctrl-C or SIGTERM, then nothing of it left running."""
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    # A shell starts background jobs with SIGINT ignored, and Python keeps it so: restore Ctrl-C.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with running_stack(home, airflow_port, mlflow_port) as stack:
            print(f"""
detox stack is up (state in {stack['home']}, logs in {stack['logs']})
  Airflow UI   {stack['airflow_url']}/dags/{DAG_ID}   login: {stack['username']} / {stack['password']}
  MLflow UI    {stack['mlflow_url']}
  S3 (moto)    {stack['s3_endpoint']}
  for scripts: {Path(stack['home']) / STACK_FILE}
Trigger detox_retrain from its page (Trigger -> the form), then find the run, its report and the
registered model in MLflow. Serve the champion: detox serve. Stop with Ctrl-C.""", flush=True)
            while True:  # a service that dies takes the stack down, with its log
                for service in stack.services:
                    service.check_alive()
                time.sleep(1.0)
    except KeyboardInterrupt:
        logger.info("Ctrl-C: stopping the stack")


def serve(mlflow_url: str, port: int, model_name: str = "detox-summarizer-demo", alias: str = "champion") -> None:
    """``detox serve``: the registered model in the foreground until Ctrl-C or SIGTERM."""
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with served_champion(mlflow_url, port, model_name, alias) as url:
            print(f"models:/{model_name}@{alias} served at {url}/invocations, e.g.\n"
                  f"  curl -s {url}/invocations -H 'Content-Type: application/json' "
                  f"-d '{{\"inputs\": [\"#Person1#: Hi. #Person2#: Hello.\"]}}'", flush=True)
            while True:
                time.sleep(1.0)
    except KeyboardInterrupt:
        logger.info("Ctrl-C: stopping the model server")
