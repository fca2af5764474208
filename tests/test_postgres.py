"""The served stack (``make up``'s) with Airflow's metadata and MLflow's backend on a real Postgres
server: the production topology without containers.

A throwaway cluster on loopback (Debian's ``postgresql`` package; ``.ci/run`` installs it
when it can, and the test is skipped where it is missing).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from stack_fixtures import AirflowAPI
from support import PROMOTING_FORM, copy_embedded_builds, postgres_bin

from tasks.io.s3_server import free_port
from tasks.local.demo import DAG_ID
from tasks.local.stack import running_stack

PG_BIN = postgres_bin()  # initdb's folder: the binary .ci/run checks for too

# Skipped where missing, failed instead where DETOX_REQUIRE names postgres (conftest.py).
pytestmark = [pytest.mark.slow, pytest.mark.postgres,
              pytest.mark.skipif(PG_BIN is None, reason="PostgreSQL server binaries (initdb) not installed")]

# Promotes on a fresh registry (see tests/support.py).
CONF = PROMOTING_FORM


@pytest.fixture(scope="module")
def postgres():
    """A fresh cluster on 127.0.0.1 with databases ``airflow`` and ``mlflow``; its SQLAlchemy URL."""
    root = Path(tempfile.mkdtemp(prefix="detox-postgres-"))
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []  # initdb refuses root
    if as_postgres:
        shutil.chown(root, "postgres")
    data = root / "data"
    port = free_port()
    subprocess.run([*as_postgres, str(PG_BIN / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
                    "--encoding=UTF8"], check=True, capture_output=True)
    subprocess.run([*as_postgres, str(PG_BIN / "pg_ctl"), "-D", str(data), "-l", str(root / "server.log"), "-w",
                    "-o", f"-p {port} -k {root} -c listen_addresses=127.0.0.1", "start"],
                   check=True, capture_output=True)
    try:
        for database in ("airflow", "mlflow"):
            subprocess.run([str(PG_BIN / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres",
                            database], check=True, capture_output=True)
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}"
    finally:
        subprocess.run([*as_postgres, str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "fast", "stop"],
                       capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def query(url: str, database: str, sql: str, *params) -> list[tuple]:
    import psycopg2

    with psycopg2.connect(url.replace("postgresql+psycopg2", "postgresql") + f"/{database}") as connection:
        with connection.cursor() as cursor:
            cursor.execute(sql, params)
            return cursor.fetchall()


def test_a_triggered_run_on_postgres_promotes(embedded, detox_home, postgres, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    copy_embedded_builds(detox_home, home)
    # No pool named (gpu_pool=None): a fresh Airflow as a user brings it, the DAG must run on it as it is.
    with running_stack(home, free_port(), free_port(), database_url=f"{postgres}/airflow",
                       mlflow_backend_uri=f"{postgres}/mlflow", gpu_pool=None) as stack:
        api = AirflowAPI(stack)
        run_id = api.trigger(DAG_ID, CONF)
        run = api.wait_for_run(DAG_ID, run_id)
        tasks = api.task_instances(DAG_ID, run_id)

    assert run["state"] == "success", tasks
    assert {ti["pool"] for ti in tasks} == {"default_pool"}
    # Airflow's own record of the run is in Postgres, every task there once.
    assert query(postgres, "airflow", "SELECT run_id, state FROM dag_run WHERE dag_id = %s", DAG_ID) == [
        (run_id, "success")]
    tries = dict(query(postgres, "airflow", "SELECT task_id, try_number FROM task_instance WHERE run_id = %s "
                       "AND state != 'skipped'", run_id))
    assert set(tries.values()) == {1} and "register_model" in tries, tries
    # MLflow's run, decision and champion are in Postgres too.
    # Active runs only: steps that start together may both create the run, and the losers are deleted.
    (mlflow_run,), = query(postgres, "mlflow", "SELECT t.run_uuid FROM tags t JOIN runs r ON r.run_uuid = t.run_uuid "
                           "WHERE t.key = %s AND t.value = %s AND r.lifecycle_stage = 'active'",
                           "detox.run_key", run_id)
    assert query(postgres, "mlflow", "SELECT value FROM tags WHERE run_uuid = %s AND key = %s",
                 mlflow_run, "promotion.decision") == [("promote",)]
    steps = query(postgres, "mlflow", "SELECT DISTINCT step FROM metrics WHERE run_uuid = %s AND key = %s",
                  mlflow_run, "ppo/kl")
    assert sorted(step for (step,) in steps) == list(range(CONF["ppo_steps"]))
    assert query(postgres, "mlflow", "SELECT name, alias FROM registered_model_aliases") == [
        ("detox-summarizer-demo", "champion")]
