"""The policy PPO trains and its value head: a LoRA adapter on top of the SFT adapter.

The reference policy of the KL penalty is the same model with the PPO adapter switched
off (:func:`reference_policy`), so the weights exist once in memory.
"""


from __future__ import annotations

import copy
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from peft import (
    LoraConfig,
    PeftModel,
    TaskType,
    get_peft_model,
    prepare_model_for_kbit_training,
)
from peft.tuners.lora import Linear as LoraLinear
from safetensors.torch import load_file
from torch import nn
from transformers import PreTrainedTokenizerBase

from tasks.config import LoraSettings
from tasks.io.models import (
    load_base_policy,
    load_policy,
    load_tokenizer,
    policy_family,
)

if TYPE_CHECKING:
    pass

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Value head
# ---------------------------------------------------------------------------------------------


class ValueHead(nn.Module):
    """Scalar value per decoder position: Linear(hidden_size, 1) on the last decoder hidden state.

    ``init_std`` = 0 starts from zeros, so the first values are 0 and the first value-loss
    gradient never pushes on the shared trunk. ``dropout`` only acts in train mode, which
    :class:`PPOTrainer` does not use.
    """

    def __init__(self, hidden_size: int, init_std: float = 0.0, dropout: float = 0.0):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.summary = nn.Linear(hidden_size, 1)
        if init_std == 0:
            nn.init.zeros_(self.summary.weight)
        else:
            nn.init.normal_(self.summary.weight, std=init_std)
        nn.init.zeros_(self.summary.bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[B, T, hidden_size] -> [B, T] in the head's dtype (float32 even under a bf16 policy)."""
        hidden_states = hidden_states.to(self.summary.weight.dtype)
        return self.summary(self.dropout(hidden_states)).squeeze(-1)


def load_value_head(path: Path) -> ValueHead:
    """A value head saved by :meth:`PPOTrainer.save` (``value_head.safetensors``)."""
    state = load_file(str(path))
    head = ValueHead(state["summary.weight"].shape[1])
    head.load_state_dict(state)
    return head


# ---------------------------------------------------------------------------------------------
# Model building
# ---------------------------------------------------------------------------------------------

PPO_ADAPTER = "default"  # peft's default name: save_pretrained writes it at the folder's top level
SFT_ADAPTER = "sft"
CRITIC_ADAPTER = "critic"  # the critic's own LoRA adapter (ppo.critic = "adapter"), trained by the value loss only
TRAINED_ADAPTERS = (PPO_ADAPTER, CRITIC_ADAPTER)


def build_policy(
    policy_name: str,
    sft_adapter_dir: Path | None,
    lora: LoraSettings,
    device: str | torch.device,
    trust_remote_code: bool = False,
    family: str = "auto",
    load_in_4bit: bool = False,
    compute_dtype: str = "float16",
    merge_sft: bool | None = None,
    eos_token: str | None = None,
) -> tuple[PeftModel, PreTrainedTokenizerBase]:
    """The PPO policy: the base model (seq2seq or causal), the SFT adapter, a fresh LoRA adapter on top.

    By default the SFT adapter is merged into the weights (``merge_and_unload``), so disabling
    the PPO adapter gives the SFT policy. A 4-bit base (QLoRA) cannot take a merge: there the
    SFT adapter stays loaded as a frozen adapter named ``sft`` and the reference switches only
    the PPO adapter off (see :func:`reference_policy`). Either way the base weights exist once
    in memory and only the PPO adapter's parameters are trainable.
    """
    resolved = policy_family(policy_name, family, trust_remote_code)
    merge_sft = (not load_in_4bit) if merge_sft is None else merge_sft
    if load_in_4bit and merge_sft:
        raise ValueError("an SFT adapter cannot be merged into a 4-bit base; leave merge_sft unset")
    lora_config = LoraConfig(
        task_type=TaskType.SEQ_2_SEQ_LM if resolved == "seq2seq" else TaskType.CAUSAL_LM,
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules) if lora.target_modules else None,
    )
    if merge_sft or sft_adapter_dir is None:
        adapters = [Path(sft_adapter_dir)] if sft_adapter_dir is not None else []
        model, tokenizer = load_policy(
            policy_name, adapters, "cpu", trust_remote_code, resolved, load_in_4bit, compute_dtype, eos_token
        )
        if load_in_4bit:
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        policy = get_peft_model(model, lora_config, adapter_name=PPO_ADAPTER)
    else:
        tokenizer = load_tokenizer(policy_name, resolved, trust_remote_code, eos_token)
        model = load_base_policy(policy_name, resolved, load_in_4bit, compute_dtype, trust_remote_code)
        if load_in_4bit:
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        policy = PeftModel.from_pretrained(model, str(sft_adapter_dir), adapter_name=SFT_ADAPTER, is_trainable=False)
        policy.add_adapter(PPO_ADAPTER, lora_config)
        _activate_policy_adapters(policy)
        logger.info("SFT adapter %s kept as the frozen adapter %r", sft_adapter_dir, SFT_ADAPTER)
    if not is_quantized(policy):
        policy.to(device)
    trainable = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    total = sum(p.numel() for p in policy.parameters())
    logger.info(
        "PPO LoRA adapter on a %s policy: %d trainable of %d parameters (%.2f%%)",
        resolved, trainable, total, 100 * trainable / total,
    )
    return policy, tokenizer


def _frozen_adapters(policy: PeftModel) -> list[str]:
    return [name for name in policy.peft_config if name not in TRAINED_ADAPTERS]


def _activate_policy_adapters(policy: PeftModel, trained: str = PPO_ADAPTER) -> None:
    """Frozen adapters and ``trained`` (the PPO adapter, or the critic's) on; the PPO and critic
    adapters trainable, the frozen ones not, whichever is on (peft's ``set_adapter`` marks only
    the active adapters trainable)."""
    frozen = _frozen_adapters(policy)
    policy.base_model.set_adapter([*frozen, trained])
    if frozen:
        policy.set_requires_grad(frozen, requires_grad=False)
    trained_present = [name for name in TRAINED_ADAPTERS if name in policy.peft_config]
    policy.set_requires_grad(trained_present, requires_grad=True)


def add_critic_adapter(policy: PeftModel) -> None:
    """A second trainable adapter, :data:`CRITIC_ADAPTER`, configured like the PPO adapter, unless the policy
    has one: the critic's own features on the shared base weights. It starts as the SFT model (LoRA's B is
    zero) and is active only inside :func:`critic_view`, so the policy, its sampler and the reference never
    see it."""
    if CRITIC_ADAPTER in policy.peft_config:
        return
    policy.add_adapter(CRITIC_ADAPTER, copy.deepcopy(policy.peft_config[PPO_ADAPTER]))
    _activate_policy_adapters(policy)


@contextmanager
def critic_view(policy: PeftModel) -> Iterator[None]:
    """Inside the block ``policy`` computes the critic's features: the frozen adapters and the critic's
    adapter on, the PPO adapter off. Both trained adapters stay trainable."""
    _activate_policy_adapters(policy, CRITIC_ADAPTER)
    try:
        yield
    finally:
        _activate_policy_adapters(policy)


@contextmanager
def reference_policy(policy: PeftModel) -> Iterator[None]:
    """Inside the block ``policy`` is the reference of the KL penalty: the PPO adapter (and the critic's)
    off.

    With the SFT adapter merged that is ``disable_adapter()``; with a frozen SFT adapter
    (4-bit bases) the SFT adapter alone stays active. Either way the trained adapters are
    trainable again after the block (peft's ``enable_adapters`` marks only the active ones).
    """
    frozen = _frozen_adapters(policy)
    try:
        if frozen:
            policy.base_model.set_adapter(frozen, inference_mode=True)
            yield
        else:
            with policy.disable_adapter():
                yield
    finally:
        _activate_policy_adapters(policy)


@contextmanager
def folded_adapters(policy: PeftModel, modules: nn.Module) -> Iterator[None]:
    """Inside the block the LoRA layers under ``modules`` run as plain linear layers whose weight
    is a copy with the active adapters folded in, ``W + scaling * B @ A``: one matmul per layer
    instead of three plus the adapter's bookkeeping (about 15% of a decoding step of the demo
    policy on a CPU; on a GPU, kernel launches saved at every step).

    The original weight tensors are put back untouched when the block ends (peft's
    ``merge_adapter``/``unmerge_adapter`` would add and subtract the update in place, and
    rounding would move the reference's weights a little every step). The copies cost the
    memory of the adapted weights under ``modules`` (for a seq2seq sampler, the decoder's) for the
    duration of the block. Layers outside ``modules``, and layers whose adapters are switched off
    (:func:`reference_policy`), are left as they are. Nothing is folded on a quantized base, or
    when a layer is not a plain LoRA linear layer (DoRA and other variants, a LoRA bias).

    The sum is taken in float32 and rounded once to the weight's dtype, so a low-precision weight
    does not lose the update's small entries. Every ``requires_grad`` flag under ``modules`` comes
    back as it was: peft's ``enable_adapters`` marks every active adapter trainable, a frozen SFT
    adapter's too.
    """
    layers = [module for module in modules.modules() if isinstance(module, LoraLinear)]
    if is_quantized(policy) or any(
        type(layer) is not LoraLinear or layer.lora_variant or any(layer.lora_bias.values()) for layer in layers
    ):
        yield
        return
    requires_grad = {param: param.requires_grad for layer in layers for param in layer.parameters()}
    folded_layers: list[tuple[LoraLinear, nn.Parameter]] = []
    try:
        with torch.no_grad():
            for layer in layers:
                active = [name for name in layer.active_adapters if name in layer.lora_A]
                if layer.disable_adapters or not active:
                    continue
                base = layer.get_base_layer()
                folded = base.weight.detach().to(torch.float32, copy=True)
                for name in active:
                    folded += _lora_delta(layer, name)
                folded_layers.append((layer, base.weight))
                base.weight = nn.Parameter(folded.to(base.weight.dtype), requires_grad=False)
                layer.enable_adapters(False)  # the layer now runs its base layer alone
        yield
    finally:
        for layer, weight in folded_layers:
            layer.get_base_layer().weight = weight
            layer.enable_adapters(True)
        for param, flag in requires_grad.items():
            param.requires_grad_(flag)


def _lora_delta(layer: LoraLinear, name: str) -> torch.Tensor:
    """``scaling * B @ A`` of one adapter of a LoRA linear layer, in float32, shaped like the base weight
    (peft's ``get_delta_weight``, which computes in the adapter's dtype)."""
    delta = (layer.lora_B[name].weight.float() @ layer.lora_A[name].weight.float()) * layer.scaling[name]
    return delta.T if layer.fan_in_fan_out else delta


def disable_dropout(model: nn.Module) -> None:
    """Dropout off for good, whatever the mode: ``nn.Dropout`` modules (LoRA's included) and the
    probabilities attention layers pass to functional dropout (T5's ``dropout``, Llama's
    ``attention_dropout``)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        for name in ("dropout", "attention_dropout", "dropout_rate"):
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)


def is_quantized(model: nn.Module) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(base, "hf_quantizer", None) is not None


