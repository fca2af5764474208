"""A ppo_train process killed with SIGKILL is retried and resumes from its last checkpoint.

The retried process ends with the configured number of steps, exactly the weights and
metrics of a run that was never interrupted (CPU runs are deterministic), and every
step once in the MLflow run's metric history. A checkpoint that was being written at the
moment of the kill is never the one resumed from.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from tasks.config import RunConfig
from tasks.registry import tracking
from tasks.rl.trainer import latest_checkpoint
from tasks.steps import detox_retrain

pytestmark = pytest.mark.slow

# Half the demo's batch: what is checked is the resume, not the outcome.
OVERRIDES = {"ppo.steps": 6, "ppo.checkpoint_every": 2, "ppo.batch_size": 16, "ppo.mini_batch_size": 8}


def ppo_train_command(run_key: str) -> list[str]:
    sets = [arg for key, value in OVERRIDES.items() for arg in ("--set", f"{key}={value}")]
    return [sys.executable, "-m", "tasks.cli", "ppo-train", "--run-id", run_key, "--profile", "demo", *sets]


def prepare(run_key: str) -> RunConfig:
    config = RunConfig.for_profile("demo", OVERRIDES)
    ctx = detox_retrain.StepContext(run_key=run_key)
    detox_retrain.prepare_dataset(config, ctx)
    detox_retrain.download_adapter(config, ctx)
    return config


def test_a_killed_ppo_train_resumes_from_its_last_checkpoint(demo, tmp_path):
    config = prepare("resume-killed")
    prepare("resume-reference")
    # One thread each: the uninterrupted reference trains alongside the run that gets killed.
    env = dict(os.environ, OMP_NUM_THREADS="1")

    reference_log = (tmp_path / "reference.log").open("w")
    reference_run = subprocess.Popen(ppo_train_command("resume-reference"), env=env, stdout=subprocess.DEVNULL,
                                     stderr=reference_log)
    checkpoints = config.run_dir("resume-killed") / "ppo" / "checkpoints"
    process = subprocess.Popen(ppo_train_command("resume-killed"), env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while not (checkpoints / "step-000002").is_dir():
        assert process.poll() is None, "ppo_train ended before it could be killed"
        assert time.monotonic() < deadline, "no checkpoint after step 2 within 10 minutes"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=60) == -signal.SIGKILL
    killed_at = int(latest_checkpoint(checkpoints).name.split("-")[-1])
    assert 2 <= killed_at < 6
    assert not (config.run_dir("resume-killed") / "ppo" / "adapter").exists()  # no final output yet
    # What a kill in the middle of writing the next checkpoint leaves: its temporary folder, half full.
    half_written = checkpoints / f".step-{killed_at + 1:06d}-killed"
    half_written.mkdir()
    (half_written / "trainer_state.json").write_text(json.dumps({"steps_done": killed_at + 1}))
    (half_written / "value_head.safetensors").write_bytes(b"\x00" * 10)

    retry = subprocess.run(ppo_train_command("resume-killed"), env=env, capture_output=True, text=True, timeout=600)
    assert retry.returncode == 0, retry.stderr[-3000:]
    assert reference_run.wait(timeout=600) == 0, (tmp_path / "reference.log").read_text()[-3000:]
    result = json.loads(retry.stdout[retry.stdout.index("{"):])
    assert result["steps"] == 6 and result["resumed_from_step"] == killed_at  # not from the half-written one
    assert not half_written.exists()  # cleaned up by the next checkpoint

    killed_dir, reference_dir = (config.run_dir(key) / "ppo" for key in ("resume-killed", "resume-reference"))
    assert json.loads((killed_dir / "trainer_state.json").read_text())["steps_done"] == 6
    resumed = load_file(str(killed_dir / "adapter" / "adapter_model.safetensors"))
    reference = load_file(str(reference_dir / "adapter" / "adapter_model.safetensors"))
    assert resumed.keys() == reference.keys()
    assert all(bool((resumed[name] == reference[name]).all()) for name in resumed)

    run_id = tracking.open_run(config, "resume-killed")
    steps = [metric.step for metric in tracking.client().get_metric_history(run_id, "ppo/reward_mean")]
    assert sorted(steps) == list(range(6))  # each step once: none lost, none repeated
    reference_run = tracking.open_run(config, "resume-reference")
    def rewards(run):
        return {m.step: m.value for m in tracking.client().get_metric_history(run, "ppo/reward_mean")}
    assert rewards(run_id) == pytest.approx(rewards(reference_run))
