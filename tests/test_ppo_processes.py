"""Data-parallel PPO: ``ppo_train`` with ``ppo.num_processes=2`` on the CPU.

torchrun starts two processes and accelerate joins them with gloo, as it joins one
process per GPU with NCCL on a GPU worker. Each process samples half of every batch;
the gradients are averaged, so both end with the same weights (the workers check this
themselves and fail otherwise). The task's process logs each step to MLflow once.
"""

import json

import pytest
import torch
from safetensors.torch import load_file

from tasks import pipeline, tracking
from tasks.config import RunConfig

pytestmark = pytest.mark.slow

RUN_KEY = "two-processes"


def steps_in_mlflow(config: RunConfig) -> list[int]:
    run_id = tracking.open_run(config, RUN_KEY)
    return sorted(metric.step for metric in tracking.client().get_metric_history(run_id, "ppo/reward_mean"))


def test_ppo_train_on_two_processes_then_resumed_on_two(demo):
    config = RunConfig.for_profile("demo", {"ppo.steps": 4, "ppo.checkpoint_every": 2, "ppo.num_processes": 2})
    ctx = pipeline.StepContext(run_key=RUN_KEY)
    pipeline.prepare_dataset(config, ctx)
    pipeline.download_adapter(config, ctx)

    result = pipeline.ppo_train(config, ctx)

    assert result["steps"] == 4 and result["resumed_from_step"] is None
    ppo_dir = config.run_dir(RUN_KEY) / "ppo"
    checkpoints = ppo_dir / "checkpoints"
    assert sorted(path.name for path in checkpoints.iterdir()) == ["step-000002", "step-000004"]
    state = torch.load(checkpoints / "step-000004" / "training_state.pt", weights_only=True)
    first, second = state["random_states"]  # one per process: each samples its own responses
    assert not torch.equal(first["torch"], second["torch"])
    assert torch.equal(first["trainer"], second["trainer"])  # the same prompt order everywhere
    adapter = load_file(str(ppo_dir / "adapter" / "adapter_model.safetensors"))
    assert any(bool(tensor.abs().sum() > 0) for name, tensor in adapter.items() if "lora_B" in name)  # trained
    assert json.loads((ppo_dir / "trainer_state.json").read_text())["steps_done"] == 4
    assert steps_in_mlflow(config) == [0, 1, 2, 3]
    run = tracking.client().get_run(tracking.open_run(config, RUN_KEY))
    assert run.data.tags["ppo.processes"] == "2"

    longer = config.model_copy(update={"ppo": config.ppo.model_copy(update={"steps": 6})})
    resumed = pipeline.ppo_train(longer, ctx)

    assert resumed["steps"] == 6 and resumed["resumed_from_step"] == 4
    assert steps_in_mlflow(config) == list(range(6))  # none repeated, none lost
    assert json.loads((ppo_dir / "trainer_state.json").read_text())["steps_done"] == 6
