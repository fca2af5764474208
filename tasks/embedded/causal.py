"""The embedded default's causal policy: a tiny Llama (grouped-query attention, untied head) and
its SFT LoRA adapter, TinyLlama's stand-in, so that the whole chain also runs on a causal policy.
:func:`build_embedded_causal` trains both under ``<home>/embedded-causal`` the way
:mod:`tasks.embedded.builds` trains the T5 policy: the same training dialogues, the insult
decision weighted the same, built once per seed into a folder renamed into place; the data set
and the hate classifier the chain runs it with are the embedded default's.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.config import PROMPT_TEMPLATE
from tasks.embedded.builds import (
    MAX_PROMPT_TOKENS,
    MAX_SUMMARY_TOKENS,
    build_once,
    decision_weights,
    fit,
    heldout_groups,
    point_adapter_at,
    resolve_home,
    sample_summaries,
    substream,
    torch_settings,
    train_bpe,
)
from tasks.embedded.world import contains_insult, generate_dialogues

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

CAUSAL_BUILD_VERSION = 1
CAUSAL_BASE_STEPS = 400
CAUSAL_SFT_STEPS = 80


@dataclass(frozen=True)
class CausalPaths:
    """The causal (Llama-architecture) policy of the embedded default: TinyLlama's stand-in."""

    root: Path
    policy_base: Path
    sft_adapter: Path

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"


def causal_paths(home: Path | None = None) -> CausalPaths:
    root = resolve_home(home) / "embedded-causal"
    return CausalPaths(root=root, policy_base=root / "policy-base", sft_adapter=root / "policy-sft")


def build_embedded_causal(home: Path | None = None, seed: int = 0, force: bool = False) -> CausalPaths:
    """Build a tiny Llama policy and its SFT LoRA adapter under ``<home>/embedded-causal``.

    Built like the T5 policy of :func:`tasks.embedded.builds.build_embedded_default` (same
    training dialogues, same insult-decision weighting, LoRA r=8 on ``q_proj``/``v_proj``), it
    lets the whole chain run on a causal policy the way the TinyLlama seed does. The data set and the
    hate classifier are the embedded default's; build that first. Skipped when a complete
    build for ``seed`` exists.
    """
    paths = causal_paths(home)
    build_once(paths.root, CAUSAL_BUILD_VERSION, seed, [paths.sft_adapter / "adapter_config.json"], force,
                lambda staging: _build_causal_into(staging, paths, seed))
    return paths


def _build_causal_into(staging: Path, final: CausalPaths, seed: int) -> None:
    import torch
    from peft import LoraConfig, TaskType, get_peft_model

    started = time.perf_counter()
    with torch_settings():
        training_rows = generate_dialogues(random.Random(substream(seed, "train")), 2400)
        corpus = [PROMPT_TEMPLATE] + [text for row in training_rows for text in (row["dialogue"], row["summary"])]
        tokenizer = _causal_tokenizer(corpus)
        batches = _causal_batches(tokenizer, training_rows, batch_size=24)
        torch.manual_seed(seed)
        base = _new_causal_policy(tokenizer)
        loss = fit(base, batches, CAUSAL_BASE_STEPS, 3e-3, seed, "causal policy base")
        logger.info("causal policy base: %d parameters, final loss %.3f", base.num_parameters(), loss)
        base.save_pretrained(staging / "policy-base", safe_serialization=True)
        tokenizer.save_pretrained(staging / "policy-base")

        torch.manual_seed(seed + 1)
        lora = LoraConfig(task_type=TaskType.CAUSAL_LM, r=8, lora_alpha=16, lora_dropout=0.0,
                          target_modules=["q_proj", "v_proj"])
        sft = get_peft_model(base, lora)
        loss = fit(sft, batches, CAUSAL_SFT_STEPS, 2e-3, seed + 1, "causal SFT adapter", warmup=10)
        logger.info("causal SFT adapter: final loss %.3f", loss)
        sft.save_pretrained(staging / "policy-sft", safe_serialization=True)
        point_adapter_at(staging / "policy-sft", final.policy_base, seed)
        checks = _measure_causal(sft, tokenizer, seed)
    manifest = {
        "build_version": CAUSAL_BUILD_VERSION,
        "seed": seed,
        "build_seconds": round(time.perf_counter() - started, 1),
        "parameters": {"policy_base": base.num_parameters(),
                       "sft_adapter": sum(p.numel() for n, p in sft.named_parameters() if "lora_" in n)},
        "checks": checks,
    }
    (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    logger.info("embedded causal policy built in %.0f s: %s", manifest["build_seconds"], json.dumps(checks))


def _causal_tokenizer(corpus: Sequence[str]) -> PreTrainedTokenizerBase:
    """Llama conventions: <unk>=0, <s>=1, </s>=2, "<s>" before every input, no pad token of its own."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tokenizer = train_bpe(corpus, ["<unk>", "<s>", "</s>"])
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        model_max_length=MAX_PROMPT_TOKENS + MAX_SUMMARY_TOKENS, padding_side="left",
    )


def _new_causal_policy(tokenizer: PreTrainedTokenizerBase) -> Any:
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention, as in TinyLlama
        max_position_embeddings=MAX_PROMPT_TOKENS + MAX_SUMMARY_TOKENS + 8,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
    )
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id, max_new_tokens=MAX_SUMMARY_TOKENS,
    )
    return model


def _causal_batches(
    tokenizer: PreTrainedTokenizerBase, rows: Sequence[dict[str, str]], batch_size: int
) -> list[dict[str, torch.Tensor]]:
    """Length-bucketed, right-padded "<s> prompt summary </s>" sequences; the loss covers the
    summary and its EOS, with the insult decision weighted as in :func:`tasks.embedded.builds._policy_batches`."""
    import torch

    prompts = tokenizer(
        [PROMPT_TEMPLATE.format(dialogue=row["dialogue"]) for row in rows],
        truncation=True, max_length=MAX_PROMPT_TOKENS,
    )["input_ids"]
    summaries = tokenizer(
        [row["summary"] for row in rows], truncation=True, max_length=MAX_SUMMARY_TOKENS - 1,
        add_special_tokens=False, return_offsets_mapping=True,
    )
    sequences, labels, weights = [], [], []
    for row, prompt, ids, offsets in zip(rows, prompts, summaries["input_ids"], summaries["offset_mapping"],
                                         strict=True):
        summary_weights = decision_weights(row["summary"], offsets) + [1.0]  # the EOS
        sequences.append(prompt + ids + [tokenizer.eos_token_id])
        labels.append([-100] * len(prompt) + ids + [tokenizer.eos_token_id])
        weights.append([0.0] * len(prompt) + summary_weights)
    order = sorted(range(len(rows)), key=lambda i: len(sequences[i]))
    batches = []
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        width = max(len(sequences[i]) for i in chunk)
        input_ids = torch.full((len(chunk), width), tokenizer.eos_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
        label_ids = torch.full((len(chunk), width), -100, dtype=torch.long)
        loss_weights = torch.zeros((len(chunk), width))
        for row_index, i in enumerate(chunk):
            length = len(sequences[i])
            input_ids[row_index, :length] = torch.tensor(sequences[i])
            attention_mask[row_index, :length] = 1
            label_ids[row_index, :length] = torch.tensor(labels[i])
            loss_weights[row_index, :length] = torch.tensor(weights[i])
        batches.append({"input_ids": input_ids, "attention_mask": attention_mask, "labels": label_ids,
                        "loss_weights": loss_weights})
    return batches


def _measure_causal(policy: Any, tokenizer: PreTrainedTokenizerBase, seed: int, per_group: int = 64) -> dict:
    """Insult share of sampled summaries for heated and calm dialogues no model saw."""
    import torch

    _, groups = heldout_groups(seed, per_group)
    checks: dict[str, Any] = {}
    torch.manual_seed(seed + 3)
    for name, rows in groups.items():
        samples = sample_summaries(policy, tokenizer, rows)
        checks[f"sampled_insult_share_{name}"] = round(sum(map(contains_insult, samples)) / len(samples), 3)
        checks[f"sample_{name}"] = samples[0]
    return checks
