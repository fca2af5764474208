"""How much the demo's outcome depends on the PPO seed: PPO seeds 0-4 on the demo's settings.

The data set, the SFT adapter and the baseline evaluation are the same for every seed (the
evaluation protocol has its own fixed seed); for each PPO seed the script trains the PPO
adapter on the demo profile with ``ppo.seed`` set and evaluates it under the same protocol,
in this process (the ``local`` engine's steps, without promotion or registration, so the
demo's registry and its champion are left alone). MLflow runs go to the experiment
``detox-demo-seeds``.

Prints one row per seed, then

    median toxicity change: -NN.N%
    worst toxicity change: -NN.N%
    worst rouge-l change: -N.N%

where a change is (after - before) / before of the held-out mean, and "worst" is the seed
closest to no improvement (toxicity) or with the largest ROUGE-L loss.

    python benchmarks/demo_seeds.py                 # after `make demo`, about 2 CPU-minutes a seed
    python benchmarks/demo_seeds.py --seeds 0 1 --set ppo.steps=40
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

logger = logging.getLogger("benchmarks.demo_seeds")

EXPERIMENT = "detox-demo-seeds"


def change(before: float, after: float) -> float:
    """Relative change in percent."""
    return 100.0 * (after - before) / before


def run_seeds(seeds: list[int], overrides: dict, home: Path | None) -> list[dict]:
    """Train and evaluate one PPO adapter per seed; one result row each."""
    from tasks.config import RunConfig
    from tasks.local.demo import demo_services
    from tasks.rl.trainer import checkpoint_history, latest_checkpoint
    from tasks.steps import detox_retrain

    # The process id too: two invocations started in the same second must not share run keys (the shared
    # baseline's MLflow run would then refuse the second one's evaluation settings).
    stamp = f"{datetime.now(UTC):%Y%m%dT%H%M%S}-{os.getpid()}"
    rows = []
    with demo_services(home):
        shared_config = RunConfig.for_profile("demo", {"experiment_name": EXPERIMENT, **overrides})
        shared = detox_retrain.StepContext(run_key=f"demo-seeds-{stamp}-shared")
        data = detox_retrain.prepare_dataset(shared_config, shared)
        adapter = detox_retrain.download_adapter(shared_config, shared)
        baseline = detox_retrain.baseline_eval(shared_config, shared, data["dataset_uri"], adapter["adapter_dir"])
        for seed in seeds:
            config = RunConfig.for_profile("demo", {"experiment_name": EXPERIMENT, **overrides, "ppo.seed": seed})
            ctx = detox_retrain.StepContext(run_key=f"demo-seeds-{stamp}-seed{seed}")
            started = time.perf_counter()
            ppo = detox_retrain.ppo_train(config, ctx, data["dataset_uri"], adapter["adapter_dir"])
            seconds = time.perf_counter() - started
            candidate = detox_retrain.evaluate(config, ctx, data["dataset_uri"], adapter["adapter_dir"],
                                          ppo["ppo_adapter_dir"])
            history = checkpoint_history(latest_checkpoint(detox_retrain.layout(config, ctx).ppo / "checkpoints"))
            last = history[-5:]
            rows.append({
                "seed": seed,
                "toxicity_before": baseline["toxicity_mean"],
                "toxicity_after": candidate["toxicity_mean"],
                "rouge_l_before": baseline["rouge_l_mean"],
                "rouge_l_after": candidate["rouge_l_mean"],
                "explained_variance": statistics.fmean(m["explained_variance"] for m in last),
                "kl": statistics.fmean(m["kl"] for m in last),
                "ppo_seconds": seconds,
            })
            print_row(rows[-1])
    return rows


def print_row(row: dict) -> None:
    print(
        f"| {row['seed']} | {row['toxicity_before']:.4f} -> {row['toxicity_after']:.4f} "
        f"| {change(row['toxicity_before'], row['toxicity_after']):+.1f}% "
        f"| {row['rouge_l_before']:.4f} -> {row['rouge_l_after']:.4f} "
        f"| {change(row['rouge_l_before'], row['rouge_l_after']):+.1f}% "
        f"| {row['explained_variance']:.2f} | {row['kl']:.2f} | {row['ppo_seconds']:.0f} s |",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="a demo config override, as `detox demo --set` takes it")
    parser.add_argument("--home", type=Path, default=None, help="DETOX_HOME of the demo (default: ./.detox)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1: the demo's tiny models gain nothing from more, "
                        "and on a busy machine spinning OpenMP threads stall each step)")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from tasks.cli import parse_overrides

    overrides = parse_overrides(args.set)
    print("| PPO seed | toxicity before -> after | change | ROUGE-L before -> after | change "
          "| explained variance (last 5 steps) | KL (last 5 steps) | PPO time |")
    print("|---|---|---|---|---|---|---|---|", flush=True)
    rows = run_seeds(args.seeds, overrides, args.home)
    toxicity = [change(r["toxicity_before"], r["toxicity_after"]) for r in rows]
    rouge = [change(r["rouge_l_before"], r["rouge_l_after"]) for r in rows]
    print(f"median toxicity change: {statistics.median(toxicity):+.1f}%")
    print(f"worst toxicity change: {max(toxicity):+.1f}%")
    print(f"worst rouge-l change: {min(rouge):+.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
