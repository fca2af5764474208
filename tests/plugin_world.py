"""An Airflow api-server app with the plugin mounted, in this process, for TestClient tests.

Airflow's metadata database (SQLite, migrated, both DAGs serialized), SimpleAuthManager with
three users (admin; viewer: read only; trainer: may trigger runs), MLflow on SQLite, and moto's
S3 server on loopback for the labels. A ``detox_retrain``-like MLflow run is logged through the
project's own tracking, evaluation, promotion and report functions.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
PASSWORDS = {"admin": "admin-pw", "viewer": "viewer-pw", "trainer": "trainer-pw"}
XSS = '<script>document.title="pwned"</script><img src=x onerror="alert(1)">'


@contextmanager
def airflow_world(home: Path):
    """Yields (TestClient of Airflow's app, S3 server); restores the environment afterwards."""
    from tasks.io.s3_server import LocalS3Server

    saved = dict(os.environ)
    (home / "airflow").mkdir(parents=True, exist_ok=True)
    (home / "passwords.json").write_text(json.dumps(PASSWORDS))
    env = {
        "AIRFLOW_HOME": str(home / "airflow"),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow' / 'airflow.db'}",
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__AUTH_MANAGER":
            "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin,viewer:viewer,trainer:user",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(home / "passwords.json"),
        "AIRFLOW__API_AUTH__JWT_SECRET": "plugin-tests-secret-" + "x" * 48,
        "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}",
        "DETOX_MLFLOW_UI_URL": "http://mlflow.example:5000",
        "DETOX_LABELS_URI": "s3://detox-labels/ranked/",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    os.environ.update(env)
    server = LocalS3Server().start()
    os.environ.update(server.env())
    try:
        airflow = [sys.executable, "-m", "airflow"]
        subprocess.run([*airflow, "db", "migrate"], check=True, capture_output=True)
        subprocess.run([*airflow, "dags", "reserialize"], check=True, capture_output=True)
        from fastapi.testclient import TestClient

        yield TestClient(_airflow_app()), server
    finally:
        server.stop()
        os.environ.clear()
        os.environ.update(saved)


def _airflow_app():
    """Airflow's api-server app, built after the environment above is in place (Airflow may have
    been imported by an earlier test with other settings)."""
    from airflow import plugins_manager, settings
    from airflow.configuration import conf

    settings.SQL_ALCHEMY_CONN = conf.get("database", "sql_alchemy_conn")
    settings.PLUGINS_FOLDER = conf.get("core", "plugins_folder")  # read once, when Airflow was first imported
    settings.configure_orm()
    for name in dir(plugins_manager):  # the plugin lists are cached per process
        cached = getattr(plugins_manager, name)
        if hasattr(cached, "cache_clear"):
            cached.cache_clear()
    plugins_folder = str(ROOT / "plugins")
    if plugins_folder not in sys.path:
        sys.path.append(plugins_folder)
    from airflow.api_fastapi.app import create_app

    return create_app()


def token(client, user: str) -> str:
    response = client.post("/auth/token", json={"username": user, "password": PASSWORDS[user]})
    assert response.status_code == 201, response.text
    return response.json()["access_token"]


def samples(n: int, seed: int, toxicity_shift: float) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    dialogues = [f"#Person1#: line {i} about the weather.\n#Person2#: reply {i}." for i in range(n)]
    dialogues[0] = f"#Person1#: {XSS}\n#Person2#: that is not a summary."
    return pd.DataFrame({
        "id": [f"s{i}" for i in range(n)],
        "dialogue": dialogues,
        "reference": [f"reference {i}" for i in range(n)],
        "generated": [f"summary {i} ({'after' if toxicity_shift else 'before'})" for i in range(n)],
        "toxicity": np.clip(rng.uniform(0.3, 0.8, n) - toxicity_shift, 0, 1),
        "judge": rng.uniform(0, 0.2, n),
        "rouge_l": rng.uniform(0.3, 0.5, n),
    })


def log_detox_run(run_key: str, work: Path, finished: bool = True) -> str:
    """A detox_retrain MLflow run as the pipeline logs it: evaluations, the gate, the reports.
    ``finished=False`` stops after the baseline evaluation, like a run still in training."""
    from tasks.config import EvalSettings, PromotionSettings, RunConfig
    from tasks.evaluation.gate import decide
    from tasks.evaluation.protocol import COMPARED_METRICS, compare
    from tasks.evaluation.reports import write_reports
    from tasks.registry import tracking

    config = RunConfig.for_profile("demo", {"artifact_root": str(work / "artifacts"),
                                            "mlflow_artifact_location": (work / "mlartifacts").as_uri()})
    tags = {"airflow.dag_id": "detox_retrain", "airflow.run_id": run_key}
    run_id = tracking.open_run(config, run_key, tags)
    folder = work / run_key.replace(":", "_").replace("+", "_")
    baseline, candidate = samples(12, 0, 0.0), samples(12, 0, 0.25)
    for prefix, frame in (("baseline", baseline), ("eval", candidate)):
        if prefix == "eval" and not finished:
            break
        path = folder / prefix / "samples.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        frame.to_json(path, orient="records", lines=True)
        tracking.log_artifact(run_id, path, prefix)
        tracking.log_metrics(run_id, {f"{m}_mean": float(frame[m].mean()) for m in COMPARED_METRICS}, f"{prefix}/")
    if not finished:
        return run_id
    intervals = compare(baseline, candidate, EvalSettings(bootstrap_resamples=200))
    summary = {name: {f"{m}_mean": float(frame[m].mean()) for m in COMPARED_METRICS}
               for name, frame in (("baseline", baseline), ("candidate", candidate))}
    decision = decide(summary["baseline"], summary["candidate"], intervals, PromotionSettings()).to_dict()
    decision_path = folder / "promotion" / "decision.json"
    decision_path.parent.mkdir(parents=True, exist_ok=True)
    decision_path.write_text(json.dumps(decision))
    tracking.log_artifact(run_id, decision_path, "promotion")
    for metric, interval in intervals.items():
        tracking.log_metrics(run_id, {f"{metric}_change_mean": interval.mean, f"{metric}_change_ci_low": interval.low,
                                      f"{metric}_change_ci_high": interval.high}, "promotion/")
    report_summary = {"run_key": run_key, "decision": decision, **summary}
    history = [{"reward_mean": float(step), "kl": 0.1 * step} for step in range(5)]
    for path in write_reports(folder / "report", baseline, candidate, history, report_summary).values():
        tracking.log_artifact(run_id, path, "report")
    tracking.set_tags(run_id, {"registry.model_uri": "models:/detox-summarizer-demo/3", "registry.version": "3"})
    return run_id
