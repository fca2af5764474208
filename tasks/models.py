"""Loading the policy and the reward classifier.

Models are read as safetensors only; ``trust_remote_code`` stays off unless the run
config turns it on. A name is either a local folder or a Hugging Face Hub repository
(the Hub path needs network; the embedded default never takes it).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GenerationConfig,
)

from tasks.config import GenerationSettings

logger = logging.getLogger(__name__)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was requested but no CUDA device is available")
    return torch.device(device)


def load_policy(
    policy_name: str,
    adapter_dirs: list[Path] | tuple[Path, ...] = (),
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
):
    """Base seq2seq policy with each LoRA adapter merged in, in order, ready for inference."""
    from peft import PeftModel

    tokenizer = AutoTokenizer.from_pretrained(policy_name, trust_remote_code=trust_remote_code)
    model = AutoModelForSeq2SeqLM.from_pretrained(
        policy_name, use_safetensors=True, trust_remote_code=trust_remote_code
    )
    for adapter_dir in adapter_dirs:
        model = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
        logger.info("merged adapter %s into %s", adapter_dir, policy_name)
    model.to(device).eval()
    return model, tokenizer


@dataclass(frozen=True)
class SpecialTokens:
    decoder_start: int
    eos: int
    pad: int


def special_tokens(model, tokenizer) -> SpecialTokens:
    """Decoder start, EOS and pad ids of a seq2seq policy (T5: 0, 1, 0)."""

    def first_set(*candidates: int | None) -> int | None:
        return next((c for c in candidates if c is not None), None)

    # transformers 5 keeps decoder_start_token_id out of T5Config's defaults: a checkpoint's
    # config.json or generation_config.json carries it.
    decoder_start = first_set(
        model.generation_config.decoder_start_token_id, getattr(model.config, "decoder_start_token_id", None)
    )
    eos = first_set(tokenizer.eos_token_id, model.config.eos_token_id)
    pad = first_set(tokenizer.pad_token_id, model.config.pad_token_id)
    if None in (decoder_start, eos, pad):
        raise ValueError(
            "the policy needs decoder_start_token_id, eos_token_id and pad_token_id (T5: 0, 1, 0); "
            f"got {decoder_start}, {eos}, {pad}"
        )
    return SpecialTokens(decoder_start, eos, pad)


def sample(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    generation: GenerationSettings,
    max_new_tokens: int,
    tokens: SpecialTokens,
) -> torch.Tensor:
    """One batched ``generate``: pure sampling from softmax(logits / temperature), filtered
    only by ``top_k``/``top_p`` — the distribution PPO's log-probs describe."""
    config = GenerationConfig(
        do_sample=True,
        top_k=generation.top_k,
        top_p=generation.top_p,
        temperature=generation.temperature,
        max_new_tokens=max_new_tokens,
        num_beams=1,
        decoder_start_token_id=tokens.decoder_start,
        eos_token_id=tokens.eos,
        pad_token_id=tokens.pad,
    )
    with _only_these_settings(model, tokens):
        return model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)


@contextmanager
def _only_these_settings(model, tokens: SpecialTokens) -> Iterator[None]:
    # generate() fills every unset field from the checkpoint's generation_config.json
    # (no_repeat_ngram_size, repetition_penalty, forced_eos_token_id, ...). Any of those
    # would sample from a distribution other than the one whose log-probs PPO uses, so
    # the checkpoint's config is swapped out for the duration of the call.
    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    saved = target.generation_config
    target.generation_config = GenerationConfig(
        decoder_start_token_id=tokens.decoder_start, eos_token_id=tokens.eos, pad_token_id=tokens.pad
    )
    try:
        yield
    finally:
        target.generation_config = saved


class RewardModel:
    """A sequence classifier used as reward (one label's logit) and as toxicity scorer.

    Labels are looked up by name in ``id2label``, never by a hard-coded index.
    """

    def __init__(
        self,
        name: str,
        reward_label: str = "nothate",
        toxic_label: str = "hate",
        batch_size: int = 16,
        device: str | torch.device = "cpu",
        trust_remote_code: bool = False,
        max_length: int = 512,
    ):
        self.name = name
        self.batch_size = batch_size
        self.max_length = max_length
        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            name, use_safetensors=True, trust_remote_code=trust_remote_code
        ).to(self.device).eval()
        self.reward_index = self.label_index(reward_label)
        self.toxic_index = self.label_index(toxic_label)

    def label_index(self, label: str) -> int:
        by_name = {str(name).lower(): int(index) for index, name in self.model.config.id2label.items()}
        if label.lower() not in by_name:
            raise ValueError(
                f"reward model {self.name} has no label {label!r}; its labels are {sorted(by_name)}"
            )
        return by_name[label.lower()]

    @torch.inference_mode()
    def logits(self, texts: list[str]) -> torch.Tensor:
        """Classifier logits, [len(texts), num_labels], in batches of ``batch_size``."""
        chunks = []
        limit = min(self.max_length, getattr(self.model.config, "max_position_embeddings", self.max_length) - 2)
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(
                texts[start : start + self.batch_size],
                padding=True,
                truncation=True,
                max_length=limit,
                return_tensors="pt",
            ).to(self.device)
            chunks.append(self.model(**batch).logits.float().cpu())
        if not chunks:
            return torch.empty(0, self.model.config.num_labels)
        return torch.cat(chunks)

    def reward(self, texts: list[str]) -> torch.Tensor:
        """The reward label's logit per text (the seeds' `nothate` logit)."""
        return self.logits(texts)[:, self.reward_index]

    def toxicity(self, texts: list[str]) -> torch.Tensor:
        """P(toxic label) per text."""
        return self.logits(texts).softmax(dim=-1)[:, self.toxic_index]
