"""The demo DAG with Airflow's metadata and MLflow's backend on a real Postgres server.

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
from support import postgres_bin

from tasks.demo import run_pipeline
from tasks.local_s3 import free_port

PG_BIN = postgres_bin()  # initdb's folder: the binary .ci/run checks for too

# Skipped where missing, failed instead where DETOX_REQUIRE names postgres (conftest.py).
pytestmark = [pytest.mark.slow, pytest.mark.postgres,
              pytest.mark.skipif(PG_BIN is None, reason="PostgreSQL server binaries (initdb) not installed")]

OVERRIDES = {"ppo.steps": 6, "eval.num_samples": 32, "registered_model_name": "detox-postgres-demo",
             "experiment_name": "detox-postgres-demo"}


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


def test_the_demo_dag_runs_on_postgres(demo, postgres, tmp_path, monkeypatch):
    monkeypatch.setenv("AIRFLOW_HOME", str(tmp_path / "airflow"))
    monkeypatch.setenv("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", f"{postgres}/airflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"{postgres}/mlflow")

    report = run_pipeline("airflow", OVERRIDES)

    assert report["decision"] in ("promote", "reject") and report["toxicity_after"] is not None
    states = query(postgres, "airflow", "SELECT state FROM dag_run WHERE dag_id = %s", "detox_retrain")
    assert states == [("success",)]
    tasks = dict(query(postgres, "airflow", "SELECT task_id, state FROM task_instance WHERE dag_id = %s",
                       "detox_retrain"))
    assert tasks["ppo_train"] == tasks["report"] == "success"
    runs = query(postgres, "mlflow", "SELECT run_uuid FROM tags WHERE key = %s AND value = %s",
                 "detox.run_key", report["run_key"])
    assert runs == [(report["mlflow_run_id"],)]
    steps = query(postgres, "mlflow", "SELECT DISTINCT step FROM metrics WHERE run_uuid = %s AND key = %s",
                  report["mlflow_run_id"], "ppo/kl")
    assert sorted(step for (step,) in steps) == list(range(6))
