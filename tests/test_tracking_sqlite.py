"""The first use of a fresh tracking store, and of a run, by steps that start together (issue: two
Airflow tasks under the LocalExecutor created the MLflow schema at once, one failed)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from tasks.config import RunConfig
from tasks.registry import tracking
from tasks.registry.tracking import sqlite_path

FIRST_USE = """
import sys, time
from pathlib import Path
import mlflow
from tasks.registry import tracking

barrier, index = Path(sys.argv[1]), sys.argv[2]
mlflow.set_tracking_uri(sys.argv[3])
(barrier / f"ready-{index}").touch()
while not (barrier / "go").exists():  # imports done: every process starts its first use at once
    time.sleep(0.005)
print(tracking.ensure_experiment("race"))
"""

PROCESSES = 3


def test_processes_that_start_together_on_a_fresh_store_all_succeed(tmp_path):
    """Without the lock, two of three such processes failed in each of two tries."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    processes = [subprocess.Popen([sys.executable, "-c", FIRST_USE, str(tmp_path), str(i), uri],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for i in range(PROCESSES)]
    deadline = time.monotonic() + 120
    while len(list(tmp_path.glob("ready-*"))) < PROCESSES:
        assert time.monotonic() < deadline, "the processes did not get ready"
        assert all(p.poll() is None for p in processes), [p.communicate() for p in processes]
        time.sleep(0.05)
    (tmp_path / "go").touch()
    results = [p.communicate(timeout=120) for p in processes]
    for process, (_out, err) in zip(processes, results, strict=True):
        assert process.returncode == 0, err[-3000:]
    assert len({out.strip().splitlines()[-1] for out, _ in results}) == 1  # one experiment, seen by all


def test_sqlite_path():
    assert sqlite_path("sqlite:////abs/mlflow.db") == Path("/abs/mlflow.db")
    assert sqlite_path("sqlite:///rel/mlflow.db?timeout=5") == Path("rel/mlflow.db")
    assert sqlite_path("http://127.0.0.1:5000") is None
    assert sqlite_path("postgresql://u@h/db") is None


def test_two_steps_opening_one_run_at_once_log_the_config_once(tmp_path, monkeypatch):
    """Two steps that start together both miss the run and both create one: the loser's is deleted
    and only the winner logs the config (the same params inserted twice at once failed a step on
    Postgres, and Airflow retried it)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    config = RunConfig.for_profile("demo", {"experiment_name": "open-race"})
    winner = tracking.open_run(config, "run-1")
    logged = []
    monkeypatch.setattr(tracking, "_find_run", lambda *_: None)  # looked before the winner had created it
    monkeypatch.setattr(tracking, "log_params", lambda run_id, *_, **__: logged.append(run_id))

    assert tracking.open_run(config, "run-1", tags={"step": "second"}) == winner
    assert logged == []
    experiment = tracking.client().get_experiment_by_name("open-race")
    (run,) = tracking.client().search_runs([experiment.experiment_id])  # the loser's run is deleted
    assert run.info.run_id == winner and run.data.tags["step"] == "second"
    assert run.data.params["config/experiment_name"] == "open-race"
