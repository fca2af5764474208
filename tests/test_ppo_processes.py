"""Data-parallel PPO: ``ppo_train`` with ``ppo.num_processes=2`` on the CPU.

torchrun starts two processes and accelerate joins them with gloo, as it joins one
process per GPU with NCCL on a GPU worker. Each process samples half of every batch;
the gradients are averaged, so both end with the same weights (the workers check this
themselves and fail otherwise). The task's process logs each step to MLflow once.

The update itself is checked on the tiny T5 of ``test_ppo.py``: two processes
(``ppo_gradient_worker.py``), each with half of a frozen rollout, apply the gradient one
process computes on the whole rollout.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tasks.config import RunConfig
from tasks.io.s3_server import free_port
from tasks.registry import tracking
from tasks.steps import detox_retrain

pytestmark = pytest.mark.slow

RUN_KEY = "two-processes"


def steps_in_mlflow(config: RunConfig) -> list[int]:
    run_id = tracking.open_run(config, RUN_KEY)
    return sorted(metric.step for metric in tracking.client().get_metric_history(run_id, "ppo/reward_mean"))


def test_ppo_train_on_two_processes_then_resumed_on_two(demo):
    config = RunConfig.for_profile("demo", {"ppo.steps": 2, "ppo.checkpoint_every": 1, "ppo.num_processes": 2})
    ctx = detox_retrain.StepContext(run_key=RUN_KEY)
    detox_retrain.prepare_dataset(config, ctx)
    detox_retrain.download_adapter(config, ctx)

    result = detox_retrain.ppo_train(config, ctx)

    assert result["steps"] == 2 and result["resumed_from_step"] is None
    ppo_dir = config.run_dir(RUN_KEY) / "ppo"
    checkpoints = ppo_dir / "checkpoints"
    assert sorted(path.name for path in checkpoints.iterdir()) == ["step-000001", "step-000002"]
    state = torch.load(checkpoints / "step-000002" / "training_state.pt", weights_only=True)
    first, second = state["random_states"]  # one per process: each samples its own responses
    assert not torch.equal(first["torch"], second["torch"])
    assert torch.equal(first["trainer"], second["trainer"])  # the same prompt order everywhere
    adapter = load_file(str(ppo_dir / "adapter" / "adapter_model.safetensors"))
    assert any(bool(tensor.abs().sum() > 0) for name, tensor in adapter.items() if "lora_B" in name)  # trained
    assert json.loads((ppo_dir / "trainer_state.json").read_text())["steps_done"] == 2
    assert steps_in_mlflow(config) == [0, 1]
    run = tracking.client().get_run(tracking.open_run(config, RUN_KEY))
    assert run.data.tags["ppo.processes"] == "2"

    longer = config.model_copy(update={"ppo": config.ppo.model_copy(update={"steps": 3})})
    resumed = detox_retrain.ppo_train(longer, ctx)

    assert resumed["steps"] == 3 and resumed["resumed_from_step"] == 2
    assert steps_in_mlflow(config) == list(range(3))  # none repeated, none lost
    assert json.loads((ppo_dir / "trainer_state.json").read_text())["steps_done"] == 3



def test_two_processes_apply_the_gradient_of_one_process_on_the_whole_batch(tmp_path):
    from ppo_gradient_worker import SETTINGS, first_gradient
    from test_ppo import as_if_trained, freeze_rollout, insulting_t5_weights, make_trainer, tiny_prompts

    state = insulting_t5_weights()
    trainer = as_if_trained(make_trainer(state, **SETTINGS))
    rollout = trainer.rollout(tiny_prompts()[:16])
    torch.save({"state": state, "rollout": rollout}, tmp_path / "job.pt")
    freeze_rollout(trainer, rollout)
    whole = first_gradient(trainer)

    worker = Path(__file__).with_name("ppo_gradient_worker.py")
    env = os.environ | {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2",
                        "LOCAL_WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"}
    workers = [subprocess.Popen([sys.executable, str(worker), str(tmp_path)],
                                env=env | {"RANK": str(rank), "LOCAL_RANK": str(rank)}) for rank in (0, 1)]
    assert [worker.wait(timeout=600) for worker in workers] == [0, 0]
    for rank in (0, 1):
        averaged = torch.load(tmp_path / f"gradient-{rank}.pt", weights_only=True)
        for got, want in zip(averaged, whole, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
