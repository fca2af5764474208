"""PPO training of one run, in this process or data-parallel in several on the same worker.

:func:`train_ppo` is the training itself: it builds the policy, value head and reward model,
resumes from the run's newest checkpoint and trains, checkpointing as it goes; :func:`publish`
then copies the final checkpoint's adapter into the run's ppo/ folder. ``ppo_train``
calls it in the task's own process when there is one device to train on. With several
(``ppo.num_processes``, by default one per visible GPU) it writes the job to a file and runs

    python -m torch.distributed.run --standalone --nproc-per-node N -m tasks.rl.workers <job.json>

Every process then runs :func:`train_ppo` with an ``accelerate.Accelerator``, which joins
the processes (NCCL on GPUs, gloo on CPU) and gives each its device. Each process holds the
whole policy and samples ``batch_size / N`` prompts of every step; the gradients are averaged
over the processes before each optimizer step, so the replicas stay identical
(:class:`tasks.rl.trainer.PPOTrainer`, which checks this at the end). The first process writes the
checkpoints. The task's process stays the only one that talks to MLflow: while the workers
train it logs the step metrics of each new checkpoint (:func:`launch_workers`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from tasks.config import RunConfig, check_batch_split

logger = logging.getLogger(__name__)

POLL_SECONDS = 5.0


@dataclass(frozen=True)
class PPOJob:
    """Everything a training process needs, as plain values (it travels as JSON to the workers)."""

    config: dict  # RunConfig.model_dump(mode="json")
    dataset: str  # the prepared data set
    sft_adapter: str  # folder of the SFT adapter
    reward_model: str  # folder or Hub name of the reward model
    out_dir: str  # the run's ppo/ folder: checkpoints/ inside, the final adapter/ at the end
    device: str  # "cpu" or "cuda": the kind of device each process trains on

    @property
    def run_config(self) -> RunConfig:
        return RunConfig.model_validate(self.config)

    @property
    def checkpoints(self) -> Path:
        return Path(self.out_dir) / "checkpoints"


def processes_for(config: RunConfig, device: torch.device) -> int:
    """``ppo.num_processes``, or by default one process per visible GPU (one on CPU).

    Raises :class:`~tasks.config.ConfigError` naming the fields when the batch cannot be shared
    by that many processes, before any worker starts."""
    if config.ppo.num_processes:
        return config.ppo.num_processes
    processes = max(torch.cuda.device_count(), 1) if device.type == "cuda" else 1
    check_batch_split(config.ppo, processes)
    return processes


def train_ppo(job: PPOJob, accelerator=None, on_checkpoint: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """Train the job's policy, resuming from its newest checkpoint (in every process of a
    data-parallel job); returns the metrics of every step. The trained adapter is in the newest
    checkpoint (:func:`publish`)."""
    from tasks.io.dialogues import load_prepared
    from tasks.io.models import classifier, policy_loading
    from tasks.rl.policy import ValueHead, build_policy
    from tasks.rl.trainer import PPOTrainer, latest_checkpoint

    config = job.run_config
    device = accelerator.device if accelerator is not None else torch.device(job.device)
    if device.type == "cpu":
        device = torch.device("cpu")  # accelerate numbers CPU processes ("cpu:1"), which loaders refuse
    splits, _ = load_prepared(job.dataset)
    torch.manual_seed(config.ppo.seed)  # the same fresh adapter and value head in every process
    policy, tokenizer = build_policy(
        config.model.policy_name, Path(job.sft_adapter), config.lora, device, **policy_loading(config)
    )
    value_head = ValueHead(policy.config.hidden_size, init_std=config.ppo.value_head_init_std).to(device)
    reward_model = classifier(config, job.reward_model, device)
    trainer = PPOTrainer(policy, value_head, tokenizer, reward_model.reward, config.ppo, config.generation,
                         device, accelerator)
    resume_from = latest_checkpoint(job.checkpoints)
    if resume_from is not None:
        trainer.load_checkpoint(resume_from)
        logger.info("PPO resumes after step %d of %d", trainer.steps_done, config.ppo.steps)
    return trainer.train(
        list(splits["train"]["input_ids"]), config.ppo.steps, checkpoint_dir=job.checkpoints,
        on_checkpoint=None if on_checkpoint is None else lambda path: on_checkpoint(trainer.history),
    )


def publish(job: PPOJob) -> None:
    """Copy the final checkpoint's adapter, value head, critic adapter (if any) and trainer state into the
    run's ppo/ folder, the run's PPO output (the adapter folder is swapped in whole)."""
    from tasks.io.fsutil import replace_dir
    from tasks.rl.trainer import CRITIC_ADAPTER_FILE, latest_checkpoint

    final, out_dir = latest_checkpoint(job.checkpoints), Path(job.out_dir)
    staging = out_dir / ".adapter-publishing"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(final / "adapter", staging)
    replace_dir(staging, out_dir / "adapter")
    names = ["value_head.safetensors", "trainer_state.json"]
    if (final / CRITIC_ADAPTER_FILE).exists():  # with ppo.critic = "adapter"
        names.append(CRITIC_ADAPTER_FILE)
    for name in names:
        shutil.copy2(final / name, out_dir / name)


def launch_workers(
    job: PPOJob, processes: int, on_checkpoint: Callable[[list[dict]], None] | None = None
) -> list[dict]:
    """Run ``job`` in ``processes`` processes under torchrun and wait for them; returns the metrics
    of every step, from the final checkpoint. ``on_checkpoint(history)`` runs here, in the
    caller's process, for each checkpoint the workers write."""
    from tasks.rl.trainer import checkpoint_history, latest_checkpoint

    out_dir = Path(job.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    job_file = out_dir / "ppo-job.json"
    job_file.write_text(json.dumps(asdict(job), indent=2))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
               "-m", "tasks.rl.workers", str(job_file)]
    logger.info("PPO on %d processes: %s", processes, " ".join(command))
    env = dict(os.environ)
    if job.device == "cpu":  # the processes share the cores
        env["OMP_NUM_THREADS"] = str(max((os.cpu_count() or 1) // processes, 1))
    seen = latest_checkpoint(job.checkpoints)
    # The launcher dies with the task's process (Linux), and takes its workers with it.
    process = subprocess.Popen(command, env=env, preexec_fn=_die_with_parent)
    try:
        while process.poll() is None:
            time.sleep(POLL_SECONDS)
            seen = _report_new_checkpoint(job, seen, on_checkpoint)
    except BaseException:
        process.terminate()
        process.wait()
        raise
    if process.returncode != 0:
        raise RuntimeError(f"PPO workers failed (exit code {process.returncode}); their errors are in the log "
                           f"above. A retry resumes from the newest checkpoint in {job.checkpoints}.")
    _report_new_checkpoint(job, seen, on_checkpoint)
    return checkpoint_history(latest_checkpoint(job.checkpoints))


def _report_new_checkpoint(job: PPOJob, seen: Path | None, on_checkpoint) -> Path | None:
    from tasks.rl.trainer import checkpoint_history, latest_checkpoint

    newest = latest_checkpoint(job.checkpoints)
    if newest is not None and newest != seen and on_checkpoint is not None:
        on_checkpoint(checkpoint_history(newest))
    return newest


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def main(argv: list[str] | None = None) -> int:
    """One process of a data-parallel job (started by torchrun): ``python -m tasks.rl.workers <job.json>``."""
    from accelerate import Accelerator

    argv = sys.argv[1:] if argv is None else argv
    job = PPOJob(**json.loads(Path(argv[0]).read_text()))
    accelerator = Accelerator(cpu=job.device == "cpu")
    logging.basicConfig(level=logging.INFO if accelerator.is_main_process else logging.WARNING,
                        format=f"%(asctime)s %(levelname)s [process {accelerator.process_index}] %(name)s: %(message)s")
    train_ppo(job, accelerator)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main())
