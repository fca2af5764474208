"""Loading the policy (seq2seq or causal) and the reward classifier, and sampling from the policy.

Models are read as safetensors only; ``trust_remote_code`` stays off unless the run
config turns it on. A name is a local folder, a Hugging Face Hub repository (the Hub
path needs network, or ``HF_ENDPOINT`` pointing at a Hub mirror; the embedded default
never takes it), or ``s3://bucket/prefix`` of a model mirrored in a bucket
(:func:`tasks.io.s3.mirrored_model`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.cache_utils import Cache, DynamicCache, EncoderDecoderCache
from transformers.modeling_outputs import BaseModelOutput

from tasks.config import EvalSettings, GenerationSettings, RunConfig
from tasks.io.s3 import mirrored_model

logger = logging.getLogger(__name__)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was requested but no CUDA device is available")
    return torch.device(device)


PolicyFamily = Literal["seq2seq", "causal"]


def policy_family(policy_name: str, requested: str = "auto", trust_remote_code: bool = False) -> PolicyFamily:
    """``seq2seq`` (FLAN-T5: encoder-decoder) or ``causal`` (TinyLlama: decoder only)."""
    if requested in ("seq2seq", "causal"):
        return requested  # type: ignore[return-value]
    if requested != "auto":
        raise ValueError(f"unknown policy family {requested!r}: expected 'auto', 'seq2seq' or 'causal'")
    config = AutoConfig.from_pretrained(mirrored_model(policy_name), trust_remote_code=trust_remote_code)
    return "seq2seq" if getattr(config, "is_encoder_decoder", False) else "causal"


def load_tokenizer(
    policy_name: str, family: PolicyFamily, trust_remote_code: bool = False, eos_token: str | None = None
):
    """The policy's tokenizer; a causal one pads on the left (prompts end where responses begin)
    and borrows EOS as its pad token when it has none (Llama).

    ``eos_token`` replaces the tokenizer's EOS token: a chat model's answer ends with its end
    of turn (``<|im_end|>`` in ChatML), not with the end of the whole text.
    """
    tokenizer = AutoTokenizer.from_pretrained(mirrored_model(policy_name), trust_remote_code=trust_remote_code)
    if eos_token is not None:
        if eos_token not in tokenizer.get_vocab():
            raise ValueError(f"eos_token {eos_token!r} is not a token of the tokenizer of {policy_name}")
        tokenizer.eos_token = eos_token
    if family == "causal":
        tokenizer.padding_side = "left"
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_policy(
    policy_name: str,
    family: PolicyFamily,
    load_in_4bit: bool = False,
    compute_dtype: str = "float16",
    trust_remote_code: bool = False,
):
    """The base policy, in 4-bit NF4 (QLoRA, the third seed's setup) when ``load_in_4bit``, else in float32.

    float32 is asked for explicitly: transformers 5 loads a checkpoint in the dtype it was saved in,
    and a policy saved in bfloat16 or float16 would train its adapter and take its log-probs at that
    precision. Lower precision for speed is ``ppo.mixed_precision`` (autocast over float32 weights).
    """
    model_class = AutoModelForSeq2SeqLM if family == "seq2seq" else AutoModelForCausalLM
    kwargs: dict = {"use_safetensors": True, "trust_remote_code": trust_remote_code}
    if not load_in_4bit:
        kwargs["dtype"] = torch.float32
    else:  # no dtype: build_policy's prepare_model_for_kbit_training casts the rest to float32
        if not torch.cuda.is_available():
            raise RuntimeError("load_in_4bit needs a CUDA device (bitsandbytes 4-bit kernels); set it to false on CPU")
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=getattr(torch, compute_dtype),
            bnb_4bit_use_double_quant=False,
        )
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    return model_class.from_pretrained(mirrored_model(policy_name), **kwargs)


def load_policy(
    policy_name: str,
    adapter_dirs: list[Path] | tuple[Path, ...] = (),
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
    family: str = "auto",
    load_in_4bit: bool = False,
    compute_dtype: str = "float16",
    eos_token: str | None = None,
):
    """Base policy with each LoRA adapter applied in order, ready for inference.

    Adapters are merged into the weights, except on a 4-bit base, where they stay
    separate adapters that are all active at once.
    """
    from peft import PeftModel

    resolved = policy_family(policy_name, family, trust_remote_code)
    tokenizer = load_tokenizer(policy_name, resolved, trust_remote_code, eos_token)
    model = load_base_policy(policy_name, resolved, load_in_4bit, compute_dtype, trust_remote_code)
    if load_in_4bit and adapter_dirs:
        names = [f"adapter_{index}" for index in range(len(adapter_dirs))]
        model = PeftModel.from_pretrained(model, str(adapter_dirs[0]), adapter_name=names[0])
        for name, adapter_dir in zip(names[1:], adapter_dirs[1:], strict=True):
            model.load_adapter(str(adapter_dir), adapter_name=name)
        model.base_model.set_adapter(names, inference_mode=True)
        logger.info("applied adapters %s to the 4-bit base %s", [str(d) for d in adapter_dirs], policy_name)
    else:
        for adapter_dir in adapter_dirs:
            model = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
            logger.info("merged adapter %s into %s", adapter_dir, policy_name)
    if not load_in_4bit:
        model.to(device)
    model.eval()
    return model, tokenizer


@dataclass(frozen=True)
class SpecialTokens:
    decoder_start: int | None  # None for a causal policy: its responses continue the prompt
    eos: int
    pad: int

    @property
    def is_encoder_decoder(self) -> bool:
        return self.decoder_start is not None


def special_tokens(model, tokenizer) -> SpecialTokens:
    """Decoder start (seq2seq only), EOS and pad ids of a policy (T5: 0, 1, 0)."""

    def first_set(*candidates: int | None) -> int | None:
        return next((c for c in candidates if c is not None), None)

    eos = first_set(tokenizer.eos_token_id, model.config.eos_token_id)
    if isinstance(eos, list):
        eos = eos[0]
    pad = first_set(tokenizer.pad_token_id, model.config.pad_token_id, eos)
    if not model.config.is_encoder_decoder:
        if eos is None:
            raise ValueError("the causal policy needs an eos_token_id")
        return SpecialTokens(None, eos, pad)
    # transformers 5 keeps decoder_start_token_id out of T5Config's defaults: a checkpoint's
    # config.json or generation_config.json carries it.
    decoder_start = first_set(
        model.generation_config.decoder_start_token_id, getattr(model.config, "decoder_start_token_id", None)
    )
    if None in (decoder_start, eos, pad):
        raise ValueError(
            "the policy needs decoder_start_token_id, eos_token_id and pad_token_id (T5: 0, 1, 0); "
            f"got {decoder_start}, {eos}, {pad}"
        )
    return SpecialTokens(decoder_start, eos, pad)


def pad_prompts(
    prompt_input_ids: Sequence[Sequence[int]], tokens: SpecialTokens, device: str | torch.device = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts as one [B, P] tensor and its attention mask.

    A seq2seq encoder is bidirectional with relative positions, so it takes right padding;
    a causal policy's prompts are padded on the left so that every response starts at
    column P, right after its prompt.
    """
    if not prompt_input_ids or any(len(ids) == 0 for ids in prompt_input_ids):
        raise ValueError("prompts must be a non-empty list of non-empty token id lists")
    width = max(len(ids) for ids in prompt_input_ids)
    ids = torch.full((len(prompt_input_ids), width), tokens.pad, dtype=torch.long)
    mask = torch.zeros((len(prompt_input_ids), width), dtype=torch.long)
    for row, prompt in enumerate(prompt_input_ids):
        columns = slice(0, len(prompt)) if tokens.is_encoder_decoder else slice(width - len(prompt), width)
        ids[row, columns] = torch.as_tensor(list(prompt), dtype=torch.long)
        mask[row, columns] = 1
    return ids.to(device), mask.to(device)


@torch.inference_mode()
def sample(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    generation: GenerationSettings | EvalSettings,
    max_new_tokens: int,
    tokens: SpecialTokens,
    length_budget: torch.Tensor | None = None,
    encoder_hidden: torch.Tensor | None = None,
) -> torch.Tensor:
    """Batched sampling from softmax(logits / temperature), filtered only by ``top_k``/``top_p``
    (evaluation's; rollouts refuse them, so PPO's log-probs are those of the distribution
    sampled). Nothing from the checkpoint's
    ``generation_config`` (repetition penalties, forced tokens, ...) takes part.

    One decoding loop for the whole batch with a key/value cache; the prompt is encoded
    once (or not at all when a seq2seq caller passes its ``encoder_hidden``). A row retires
    as soon as it samples EOS or reaches its own length budget (``length_budget[i]``,
    default ``max_new_tokens``) and is dropped from the batch, so no compute goes to
    finished rows. Returns the response tokens, [B, T] with ``T`` the
    longest response: no decoder start token, no prompt; EOS kept; pad after the end.
    """
    device = input_ids.device
    batch_size = input_ids.shape[0]
    if length_budget is None:
        length_budget = torch.full((batch_size,), max_new_tokens, dtype=torch.long)
    budget = length_budget.to(device)
    width = int(budget.max())
    warpers = _sampling_warpers(generation)
    responses = torch.full((batch_size, width), tokens.pad, dtype=torch.long, device=device)
    rows = torch.arange(batch_size, device=device)  # which original row each active row is
    mask = attention_mask
    if tokens.is_encoder_decoder:
        if encoder_hidden is None:
            encoder_hidden = model.get_encoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        cache: Cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        step_ids = torch.full((batch_size, 1), tokens.decoder_start, dtype=torch.long, device=device)
    else:
        cache = DynamicCache()
        step_ids = input_ids
        positions = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)  # as generate() counts them
    for step in range(width):
        if tokens.is_encoder_decoder:
            output = model(
                encoder_outputs=BaseModelOutput(last_hidden_state=encoder_hidden), attention_mask=mask,
                decoder_input_ids=step_ids, past_key_values=cache, use_cache=True,
            )
        else:
            output = model(
                input_ids=step_ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                use_cache=True, logits_to_keep=1,
            )
        scores = warpers(step_ids, output.logits[:, -1].float())
        next_tokens = draw_categorical(torch.softmax(scores, dim=-1))
        responses[rows, step] = next_tokens
        finished = (next_tokens == tokens.eos) | (budget[rows] <= step + 1)
        if bool(finished.all()):
            return responses[:, : step + 1]
        if bool(finished.any()):
            keep = (~finished).nonzero().squeeze(1)
            rows, next_tokens, mask = rows[keep], next_tokens[keep], mask[keep]
            cache.batch_select_indices(keep)
            if tokens.is_encoder_decoder:
                encoder_hidden = encoder_hidden[keep]
            else:
                positions = positions[keep]
        step_ids = next_tokens[:, None]
        if not tokens.is_encoder_decoder:
            mask = torch.cat([mask, torch.ones_like(step_ids)], dim=1)
            positions = positions[:, -1:] + 1
    return responses


def draw_categorical(probs: torch.Tensor) -> torch.Tensor:
    """One index per row of ``probs`` [B, V], drawn with probability proportional to its entry.

    Inverse transform sampling: one uniform number per row, placed in the row's cumulative
    sum (float64, so entries far below float32's resolution keep their share). An index of
    probability 0 is never drawn. ``torch.multinomial`` draws an exponential variate for every
    vocabulary entry instead, which made it a tenth of a CPU decoding step.
    """
    cdf = probs.to(torch.float64).cumsum(dim=-1)
    uniform = torch.rand((probs.shape[0], 1), dtype=torch.float64, device=probs.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, uniform, right=True).clamp_(max=probs.shape[-1] - 1).squeeze(1)


def _sampling_warpers(generation: GenerationSettings | EvalSettings) -> LogitsProcessorList:
    """generate()'s own warpers, in its order, for the settings that are not a no-op."""
    warpers = LogitsProcessorList()
    if generation.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(generation.temperature))
    if generation.top_k > 0:
        warpers.append(TopKLogitsWarper(generation.top_k))
    if generation.top_p < 1.0:
        warpers.append(TopPLogitsWarper(generation.top_p))
    return warpers


class RewardModel:
    """A sequence classifier as PPO reward and as toxicity scorer.

    Two kinds are understood:

    * a classifier with named labels (the seeds' hate-speech RoBERTa): the reward is
      ``reward_label``'s logit on the response, the toxicity ``toxic_label``'s probability;
      labels are looked up by name in ``id2label``, never by a hard-coded index;
    * a model with a single output, trained from preference pairs (:mod:`tasks.rewards.reward_model`):
      it saw each pair as prompt + response, so it scores exactly that, and its one logit
      is the reward. It has no toxicity.

    Texts longer than ``max_length`` tokens lose their beginning, never the response at the end.
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
        self.tokenizer = load_reward_tokenizer(name, trust_remote_code)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            mirrored_model(name), use_safetensors=True, trust_remote_code=trust_remote_code
        ).to(self.device).eval()
        self.scalar = self.model.config.num_labels == 1
        self.reward_index = 0 if self.scalar else self.label_index(reward_label)
        self.toxic_label = toxic_label

    def label_index(self, label: str) -> int:
        if self.scalar:
            raise ValueError(f"model {self.name} has no label {label!r}; it has a single output "
                             "(a preference reward model)")
        by_name = {str(name).lower(): int(index) for index, name in self.model.config.id2label.items()}
        if label.lower() not in by_name:
            raise ValueError(f"model {self.name} has no label {label!r}; it has the labels {sorted(by_name)}")
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

    def reward(self, texts: list[str], prompts: list[str] | None = None) -> torch.Tensor:
        """One reward per response: the reward label's logit (the seeds' `nothate` logit) of the
        response, or a preference model's logit of prompt + response."""
        if self.scalar:
            if prompts is None or len(prompts) != len(texts):
                raise ValueError(f"the preference reward model {self.name} scores prompt + response: "
                                 "give one prompt per response")
            texts = [prompt + text for prompt, text in zip(prompts, texts, strict=True)]
        return self.logits(texts)[:, self.reward_index]

    def toxicity(self, texts: list[str]) -> torch.Tensor:
        """P(toxic label) per text."""
        index = self.label_index(self.toxic_label)
        return self.logits(texts).softmax(dim=-1)[:, index]


def load_reward_tokenizer(name: str, trust_remote_code: bool = False):
    """A reward model's tokenizer, truncating on the left: an over-long prompt + response keeps the response."""
    tokenizer = AutoTokenizer.from_pretrained(mirrored_model(name), trust_remote_code=trust_remote_code)
    tokenizer.truncation_side = "left"
    return tokenizer


def policy_loading(config: RunConfig) -> dict:
    """How the policy is loaded, as keyword arguments of ``load_policy`` and ``build_policy``."""
    return {
        "trust_remote_code": config.model.trust_remote_code,
        "family": config.model.policy_family,
        "load_in_4bit": config.model.load_in_4bit,
        "compute_dtype": config.model.bnb_4bit_compute_dtype,
        "eos_token": config.model.eos_token,
    }


def classifier(config: RunConfig, name: str, device: torch.device) -> RewardModel:
    """The classifier ``name`` (a reward or toxicity model) with the run's labels and batch size."""
    return RewardModel(
        name,
        reward_label=config.model.reward_label,
        toxic_label=config.model.toxic_label,
        batch_size=config.model.reward_batch_size,
        device=device,
        trust_remote_code=config.model.trust_remote_code,
    )
