"""One of the two processes of ``test_ppo_processes.py``'s gradient check (not a test module).

    RANK=0 WORLD_SIZE=2 MASTER_ADDR=... MASTER_PORT=... python tests/ppo_gradient_worker.py <folder>

Reads the tiny T5's weights and a frozen rollout from ``<folder>/job.pt``, trains on every
other row of the rollout in a two-process trainer, and writes the gradient of the first
optimizer step, averaged over the processes, to ``<folder>/gradient-<rank>.pt``.
"""

import sys
from pathlib import Path

import torch

# one optimizer step over the whole batch (a global mini-batch of 16), no clipping
# With the critic's own adapter, whose gradients are averaged with the policy's.
SETTINGS = {"mini_batch_size": 16, "ppo_epochs": 1, "max_grad_norm": 1e9, "critic": "adapter"}


def first_gradient(trainer) -> list[torch.Tensor]:
    """The gradient the trainer's first optimizer step applies (after averaging over processes)."""
    steps: list[list[torch.Tensor]] = []
    real_step = trainer.optimizer.step

    def recording_step(*args, **kwargs):
        steps.append([param.grad.clone() for param in trainer.trainable_params])
        return real_step(*args, **kwargs)

    trainer.optimizer.step = recording_step
    trainer.step([[5, 1]] * 16)  # the prompts do not matter: the rollout is frozen
    return steps[0]


def main(folder: Path) -> None:
    from accelerate import Accelerator
    from test_ppo import as_if_trained, freeze_rollout, make_trainer

    from tasks.rl.trainer import Rollout

    accelerator = Accelerator(cpu=True)
    rank = accelerator.process_index
    job = torch.load(folder / "job.pt", weights_only=False)
    trainer = as_if_trained(make_trainer(job["state"], accelerator=accelerator, **SETTINGS))
    freeze_rollout(trainer, Rollout(**{name: value[rank::2] for name, value in vars(job["rollout"]).items()}))
    torch.save(first_gradient(trainer), folder / f"gradient-{rank}.pt")
    accelerator.end_training()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
