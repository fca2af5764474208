"""Rollout speed and training memory of the PPO trainer, against the seeds' way of doing it.

Speed, in one process, on the same policy, batch, prompts and length bounds:

* **seeds' loop** — what the seed notebooks ran each PPO step before ``ppo_trainer.step``:
  for every prompt, draw a length from the LengthSampler, one ``generate`` call for that
  prompt alone, decode; then the reward pipeline (``text-classification``, raw logits,
  batch 16) over each prompt + response, as the seeds scored it;
* **batched generate-and-score** — :meth:`tasks.rl.trainer.PPOTrainer.generate_and_score`, the same
  work: one batched decode with a length budget per sample, one reward call;
* **full rollout** — :meth:`tasks.rl.trainer.PPOTrainer.rollout`: the above plus the policy, reference
  and value forward passes over the responses, which the seeds ran inside ``ppo_trainer.step``
  and which are not counted on the seeds' side.

Prints samples per second of each, a line ``rollout speed-up: N.Nx`` (seeds' loop against the
batched generate-and-score) and the full rollout's ratio to the seeds' loop, per batch size.

Memory, each measurement in a fresh process (peak GPU memory allocated on CUDA, peak
resident set size above the process's size before loading anything on CPU):

* **inference** — the policy (SFT merged) and the reward model, one batched sample
  and score of ``--memory-batch`` prompts;
* **PPO training** — the PPO policy, value head and reward model, one full PPO step
  (rollout + update in the production default's mini-batches of 4) on the same prompts, reference = the adapter
  switched off; once as is and once with ``ppo.gradient_checkpointing``;
* **seeds' layout** — the same step with a frozen second copy of the policy held as
  the reference, as the seeds' ``create_reference_model`` did.

On CPU each is measured twice: under glibc's default allocator settings, which keep freed
blocks of up to 32 MB in the process's heaps (so peak RSS also counts what the allocator held
on to), and with ``MALLOC_MMAP_THRESHOLD_`` at 1 MiB, where every block of 1 MiB or more goes
back to the system when it is freed and peak RSS follows the memory that was live, as
``max_memory_allocated`` does on CUDA.

Models: ``demo`` is the embedded default (built on first use); ``flan-t5-base`` and
``tinyllama`` are built from those architectures' configs with random weights (speed and
memory do not depend on the weights) and a word-level tokenizer of the real vocabulary
size. The memory comparison runs on ``flan-t5-base`` by default: the demo policy's 7 MB
of weights would drown in allocator noise, while the reference copy the trainer avoids
is exactly a second set of weights.

    python benchmarks/ppo_rollout.py                                   # demo model, CPU
    python benchmarks/ppo_rollout.py --model flan-t5-base --device cuda
    python benchmarks/ppo_rollout.py --model tinyllama --device cuda --load-in-4bit --memory-model tinyllama
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from tasks.config import GenerationSettings, LoraSettings, PPOSettings, RunConfig
from tasks.io.models import RewardModel, pad_prompts, special_tokens

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
logger = logging.getLogger("benchmarks.ppo_rollout")

SIZED_CONFIGS = {
    # google/flan-t5-base
    "flan-t5-base": dict(
        family="seq2seq", vocab_size=32128, d_model=768, d_kv=64, d_ff=2048, num_layers=12,
        num_decoder_layers=12, num_heads=12, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
    ),
    # TinyLlama/TinyLlama-1.1B-Chat
    "tinyllama": dict(
        family="causal", vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
        num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=False,
    ),
}


# ---------------------------------------------------------------------------------------------
# Models and prompts
# ---------------------------------------------------------------------------------------------


def prepare(model: str, workdir: Path, device: str, load_in_4bit: bool = False) -> dict:
    """Paths and settings of the benchmark's policy, reward model and prompts."""
    from tasks.embedded.builds import build_embedded_default

    config = RunConfig.for_profile("demo")
    embedded = build_embedded_default()  # the sized models score with its classifier too
    if model == "demo":
        return {
            "policy": str(embedded.policy_base),
            "sft_adapter": str(embedded.sft_adapter),
            "reward": str(embedded.reward_model),
            "dataset": str(embedded.dataset_csv),
            "prompt_tokens": config.data.max_prompt_tokens,
            "generation": config.generation.model_dump(),
            "lora": config.lora.model_dump(),
            "load_in_4bit": False,
        }
    policy_dir = workdir / model
    if not (policy_dir / "config.json").exists():
        _save_sized_policy(model, policy_dir)
    return {
        "policy": str(policy_dir),
        "sft_adapter": None,
        "reward": str(embedded.reward_model),
        "dataset": None,
        "prompt_tokens": 256 if device == "cuda" else 128,
        # the seeds' FLAN-T5 lab: LengthSampler(100, 400), r=32 on q and v; on a CPU the demo's
        # 40-48 tokens, or a 250M-parameter model takes minutes per batch
        "generation": (
            {"min_new_tokens": 100, "max_new_tokens": 400} if device == "cuda"
            else config.generation.model_dump()
        ),
        "lora": {"r": 32, "alpha": 32, "dropout": 0.05},
        "load_in_4bit": load_in_4bit,  # the TinyLlama seed's QLoRA (CUDA only)
    }


def _save_sized_policy(model: str, out: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        PreTrainedTokenizerFast,
        T5Config,
        T5ForConditionalGeneration,
    )

    spec = dict(SIZED_CONFIGS[model])
    family = spec.pop("family")
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2} | {f"t{i}": i for i in range(3, spec["vocab_size"])}
    word_level = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=word_level, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )
    torch.manual_seed(0)
    if family == "seq2seq":
        policy = T5ForConditionalGeneration(T5Config(**spec, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    else:
        policy = LlamaForCausalLM(LlamaConfig(**spec, pad_token_id=0, bos_token_id=2, eos_token_id=1))
    policy.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def load_prompts(setup: dict, tokenizer, count: int) -> list[list[int]]:
    """``count`` prompt token lists: demo dialogues behind the instruction, or random tokens."""
    if setup["dataset"] is None:
        generator = torch.Generator().manual_seed(0)
        lengths = torch.randint(setup["prompt_tokens"] // 2, setup["prompt_tokens"] + 1, (count,), generator=generator)
        return [torch.randint(3, len(tokenizer), (int(n),), generator=generator).tolist() for n in lengths]
    import pandas as pd

    from tasks.config import PROMPT_TEMPLATE

    dialogues = pd.read_csv(setup["dataset"])["dialogue"].tolist()[:count]
    prompts = [PROMPT_TEMPLATE.format(dialogue=d) for d in dialogues]
    return tokenizer(prompts, truncation=True, max_length=setup["prompt_tokens"])["input_ids"]


def build_trainer(
    setup: dict, device: str, batch_size: int, frozen_copy: bool = False, gradient_checkpointing: bool = False,
    critic: str = "head",
):
    from tasks.rl.policy import ValueHead, build_policy
    from tasks.rl.trainer import PPOTrainer

    lora = LoraSettings(**setup["lora"])
    sft = Path(setup["sft_adapter"]) if setup["sft_adapter"] else None
    policy, tokenizer = build_policy(setup["policy"], sft, lora, device, load_in_4bit=setup["load_in_4bit"])
    reward = RewardModel(setup["reward"], batch_size=64, device=device)
    # mini-batches and everything else as in production (the seeds' mini-batch of 4)
    ppo = PPOSettings(batch_size=batch_size, ppo_epochs=1, learning_rate=1e-4,
                      gradient_checkpointing=gradient_checkpointing, critic=critic)
    trainer = PPOTrainer(policy, ValueHead(policy.config.hidden_size), tokenizer, reward.reward, ppo,
                         GenerationSettings(**setup["generation"]), device)
    if frozen_copy:  # the seeds' reference: a second full copy of the policy's weights
        import copy

        trainer.frozen_reference = copy.deepcopy(policy.get_base_model()).eval().requires_grad_(False)
    return trainer, reward


# ---------------------------------------------------------------------------------------------
# Speed
# ---------------------------------------------------------------------------------------------


def seeds_loop(trainer, reward_pipe, prompts: list[list[int]]) -> list[str]:
    """The seeds' rollout: a LengthSampler draw and one ``generate`` per prompt, then the reward
    pipeline over prompt + response, as the seeds scored it."""
    generation = trainer.generation
    tokens = trainer.tokens
    queries, texts = [], []
    for prompt in prompts:
        max_new_tokens = int(torch.randint(generation.min_new_tokens, generation.max_new_tokens + 1, (1,)))
        input_ids = torch.tensor([prompt], device=trainer.device)
        with torch.no_grad():
            output = trainer.policy.generate(
                input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=True, top_k=0,
                top_p=1.0, max_new_tokens=max_new_tokens, pad_token_id=tokens.pad, eos_token_id=tokens.eos,
                **({"decoder_start_token_id": tokens.decoder_start} if tokens.is_encoder_decoder else {}),
            )
        texts.append(trainer.tokenizer.decode(output[0, -max_new_tokens:], skip_special_tokens=True))
        queries.append(trainer.tokenizer.decode(prompt, skip_special_tokens=True))
    reward_pipe([q + r for q, r in zip(queries, texts, strict=True)])
    return texts


def seeds_reward_pipeline(setup: dict, device: str):
    """The seeds' scorer: a text-classification pipeline returning raw logits of every label."""
    from functools import partial

    from transformers import pipeline

    pipe = pipeline("text-classification", model=setup["reward"], device=torch.device(device))
    return partial(pipe, top_k=None, function_to_apply="none", batch_size=16, truncation=True)


def timed(fn, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def _median_time(fn, batches: list[list[list[int]]], device: str) -> float:
    """Median seconds of ``fn(batch)`` over the batches, from the same random state each time."""
    torch.manual_seed(0)
    return statistics.median(timed(lambda b=b: fn(b), device) for b in batches)


def speed(setup: dict, device: str, batch_sizes: list[int], repeats: int) -> list[dict]:
    trainer, _ = build_trainer(setup, device, max(batch_sizes))
    reward_pipe = seeds_reward_pipeline(setup, device)
    prompts = load_prompts(setup, trainer.tokenizer, max(batch_sizes) * repeats)
    trainer.rollout(prompts[:2])  # warm-up
    seeds_loop(trainer, reward_pipe, prompts[:2])
    rows = []
    for batch_size in batch_sizes:
        batches = [prompts[i * batch_size : (i + 1) * batch_size] for i in range(repeats)]

        seeds = _median_time(lambda b: seeds_loop(trainer, reward_pipe, b), batches, device)
        batched = _median_time(trainer.generate_and_score, batches, device)
        full = _median_time(trainer.rollout, batches, device)
        rows.append({"batch": batch_size, "seeds_s": seeds, "batched_s": batched, "full_rollout_s": full})
        print(
            f"batch {batch_size:>3}: seeds' loop {batch_size / seeds:7.2f} samples/s ({seeds:6.2f} s)   "
            f"batched generate-and-score {batch_size / batched:7.2f} samples/s ({batched:6.2f} s)   "
            f"full rollout {batch_size / full:7.2f} samples/s ({full:6.2f} s)",
            flush=True,
        )
        print(f"rollout speed-up: {seeds / batched:.1f}x (batch {batch_size})", flush=True)
        print(f"full rollout, log-prob passes included on this side only: {seeds / full:.1f}x "
              f"(batch {batch_size})", flush=True)
    return rows


def step_time(setup: dict, device: str, batch_size: int, steps: int) -> None:
    """Wall time of whole PPO steps (rollout + update) and response tokens per second, with each
    critic (``ppo.critic``) on the same prompts, one after the other in this process."""
    medians, prompts = {}, None
    for critic in ("head", "adapter"):
        torch.manual_seed(0)
        trainer, _ = build_trainer(setup, device, batch_size, critic=critic)
        if prompts is None:
            prompts = load_prompts(setup, trainer.tokenizer, batch_size * (steps + 1))
        trainer.step(prompts[:batch_size])  # warm-up
        times, tokens = [], []
        for i in range(1, steps + 1):
            started = time.perf_counter()
            metrics = trainer.step(prompts[i * batch_size : (i + 1) * batch_size])
            times.append(time.perf_counter() - started)
            tokens.append(metrics["response_length"] * batch_size)
        medians[critic] = statistics.median(times)
        print(f"PPO step (batch {batch_size}, critic {critic}): {medians[critic]:.2f} s median of {steps}, "
              f"{sum(tokens) / sum(times):.0f} response tokens/s", flush=True)
        del trainer
    print(f"critic adapter step time: {medians['adapter'] / medians['head']:.2f}x the head's", flush=True)


# ---------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _memory_child(kind: str, setup: dict, device: str, batch_size: int, queue) -> None:
    import peft  # noqa: F401  every library loaded before the baseline: only model memory counts
    import transformers  # noqa: F401

    import tasks.rl.trainer  # noqa: F401

    logging.disable(logging.WARNING)
    baseline = _current_rss_bytes()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    if kind == "inference":
        from tasks.io.models import load_policy, sample

        adapters = [Path(setup["sft_adapter"])] if setup["sft_adapter"] else []
        model, tokenizer = load_policy(setup["policy"], adapters, device, load_in_4bit=setup["load_in_4bit"])
        reward = RewardModel(setup["reward"], batch_size=64, device=device)
        prompts = load_prompts(setup, tokenizer, batch_size)
        tokens = special_tokens(model, tokenizer)
        ids, mask = pad_prompts(prompts, tokens, device)
        generation = GenerationSettings(**setup["generation"])
        with torch.inference_mode():
            responses = sample(model, ids, mask, generation, generation.max_new_tokens, tokens)
        reward.reward(tokenizer.batch_decode(responses, skip_special_tokens=True))
    else:
        trainer, _ = build_trainer(setup, device, batch_size, frozen_copy=kind == "seeds_layout",
                                   gradient_checkpointing=kind == "ppo_checkpointed")
        trainer.step(load_prompts(setup, trainer.tokenizer, batch_size))
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = _peak_rss_bytes() - baseline
    queue.put(peak)


def _current_rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


MEMORY_KINDS = ("inference", "ppo_training", "ppo_checkpointed", "seeds_layout")
ALLOCATORS = {
    "glibc default": {},
    "freed blocks returned": {"MALLOC_MMAP_THRESHOLD_": str(2**20)},
}


def _measure(kind: str, setup: dict, device: str, batch_size: int, environment: dict[str, str]) -> int:
    """Peak memory of ``kind`` in a fresh process started with ``environment`` added."""
    context = multiprocessing.get_context("spawn")
    saved = {name: os.environ.get(name) for name in environment}
    os.environ.update(environment)  # glibc reads its tunables when the child starts
    try:
        queue = context.Queue()
        child = context.Process(target=_memory_child, args=(kind, setup, device, batch_size, queue))
        child.start()
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    peak = queue.get()
    child.join()
    if child.exitcode != 0:
        raise RuntimeError(f"memory measurement {kind} failed with exit code {child.exitcode}")
    return peak


def memory(setup: dict, device: str, batch_size: int) -> None:
    allocators = ALLOCATORS if device == "cpu" else {"CUDA caching allocator": {}}
    what = "peak GPU memory allocated" if device == "cuda" else "peak RSS above the empty process"
    for allocator, environment in allocators.items():
        peaks = {kind: _measure(kind, setup, device, batch_size, environment) for kind in MEMORY_KINDS}
        print(f"memory ({what}, batch {batch_size}, {allocator}):", flush=True)
        for kind, peak in peaks.items():
            print(f"  {kind:<16} {peak / 2**20:9.1f} MiB   {peak / peaks['inference']:.2f}x inference", flush=True)
        best = min(peaks["ppo_training"], peaks["ppo_checkpointed"])
        print(f"memory ratio PPO training / inference: {best / peaks['inference']:.2f}x ({allocator})", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["demo", *SIZED_CONFIGS], default="demo")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--repeats", type=int, default=5, help="batches timed per batch size (median reported)")
    parser.add_argument("--memory-batch", type=int, default=16)
    parser.add_argument("--memory-model", choices=["demo", *SIZED_CONFIGS], default="flan-t5-base",
                        help="model of the memory comparison; the demo model's few MB drown in allocator noise")
    parser.add_argument("--steps", type=int, default=0, help="also time this many whole PPO steps")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--load-in-4bit", action="store_true",
                        help="sized models in 4-bit NF4, as the TinyLlama seed (CUDA only)")
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "detox-benchmarks"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    setup = prepare(args.model, Path(args.workdir), args.device, args.load_in_4bit)
    print(f"model {args.model} on {args.device}, {torch.get_num_threads()} threads, "
          f"response length {setup['generation']['min_new_tokens']}-{setup['generation']['max_new_tokens']} tokens",
          flush=True)
    if not args.skip_speed:
        speed(setup, args.device, args.batch_sizes, args.repeats)
    if args.steps:
        step_time(setup, args.device, 16, args.steps)
    if not args.skip_memory:
        memory_setup = setup if args.memory_model == args.model else prepare(
            args.memory_model, Path(args.workdir), args.device, args.load_in_4bit
        )
        print(f"memory model {args.memory_model}", flush=True)
        memory(memory_setup, args.device, args.memory_batch)
    return 0


if __name__ == "__main__":
    sys.exit(main())
