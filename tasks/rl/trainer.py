"""PPO with a KL penalty for a seq2seq or causal policy trained through a LoRA adapter.

The trainer reads top to bottom: rollout (sample, score, log-probs and values under the
policy and the reference), update (mini-batch epochs over the rollout), checkpointing.
Its math is :mod:`tasks.rl.ppo_math`, its model :mod:`tasks.rl.policy`.
"""


from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from peft import (
    PeftModel,
    get_peft_model_state_dict,
    set_peft_model_state_dict,
)
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase
from transformers.modeling_outputs import BaseModelOutput

from tasks.config import ConfigError, GenerationSettings, PPOSettings, check_batch_split
from tasks.io.fsutil import replace_dir
from tasks.io.models import (
    pad_prompts,
    sample,
    special_tokens,
)
from tasks.rl.policy import (
    CRITIC_ADAPTER,
    PPO_ADAPTER,
    ValueHead,
    add_critic_adapter,
    critic_view,
    disable_dropout,
    folded_adapters,
    is_quantized,
    reference_policy,
)
from tasks.rl.ppo_math import (
    AdaptiveKLController,
    FixedKLController,
    compute_gae,
    entropy_from_logits,
    explained_variance,
    masked_mean,
    per_token_rewards,
    policy_loss,
    token_logprobs,
    value_loss,
    whiten,
)

if TYPE_CHECKING:
    from accelerate import Accelerator

logger = logging.getLogger(__name__)

RewardFn = Callable[[list[str], list[str]], torch.Tensor]
"""(responses, prompts) -> one reward per response, a [B] tensor; both decoded, special tokens skipped."""


class PPOTrainingError(RuntimeError):
    """Training diverged: a non-finite reward or loss, or the policy drifted past the KL ceiling."""



# ---------------------------------------------------------------------------------------------
# Trainer
# ---------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class Responses:
    """One response sampled per prompt and its reward: what the seeds' generate-and-score loop
    produced, from one batched decode and one reward call.

    Token tensors are [B, T] on the trainer's device; ``response_ids`` holds the pad token
    wherever ``response_mask`` is 0.
    """

    prompt_ids: torch.Tensor  # [B, P] prompts: right-padded (seq2seq) or left-padded (causal)
    prompt_mask: torch.Tensor  # [B, P] attention mask of the prompts
    response_ids: torch.Tensor  # [B, T] sampled tokens (no decoder start token, no prompt)
    response_mask: torch.Tensor  # [B, T] float, 1 up to and including the first EOS / length budget
    length_budget: torch.Tensor  # [B] response length drawn per sample (the seeds' LengthSampler)
    texts: list[str]  # decoded responses, special tokens skipped
    rewards: torch.Tensor  # [B] reward_fn(texts), as the reward model gave them
    ended: torch.Tensor  # [B] bool, the response ended with EOS within its budget
    scores: torch.Tensor  # [B] the score PPO optimises: rewards minus the missing-EOS penalty


@dataclass(kw_only=True)
class Rollout(Responses):
    """The responses plus everything PPO needs from the sampling policy and the reference."""

    logprobs: torch.Tensor  # [B, T] log pi_old(token), logits / temperature
    ref_logprobs: torch.Tensor  # [B, T] same under the reference (PPO adapter off)
    values: torch.Tensor  # [B, T] the critic's values of the rollout
    entropy: torch.Tensor  # [B, T] entropy of pi_old at each position


CHECKPOINT_PREFIX = "step-"
CRITIC_ADAPTER_FILE = "critic_adapter.safetensors"
# PPO settings a resume may change: how long and where it trains, how it saves, not what it learns.
RESUMABLE_WITH_OTHER_VALUES = {
    "steps", "checkpoint_every", "keep_checkpoints", "num_processes", "gradient_accumulation_steps",
    "gradient_checkpointing", "mixed_precision",
}


class PPOTrainer:
    """PPO with a per-token KL penalty for a LoRA-adapted policy, seq2seq or causal.

    ``reward_fn`` maps decoded responses and their prompts to one score each (a [B] tensor),
    in one call per rollout: a classifier reward reads the responses, a preference reward
    model prompt + response (:class:`tasks.io.models.RewardModel`). The reference
    policy is ``policy`` with its PPO adapter switched off (:func:`reference_policy`).
    The policy stays in eval mode and its dropout modules (LoRA's included) are switched
    off, so the first mini-batch's ratio is exactly 1 (Huang et al.). With
    ``ppo.gradient_checkpointing`` the update runs in train mode, the only mode in which
    transformers checkpoints; dropout stays off.

    With an ``accelerator`` of several processes (:mod:`tasks.rl.workers`) training is data
    parallel: each process takes its share of every batch (the same prompts, in the same
    order, as one process would), samples with its own random stream, and applies the mean of
    all processes' gradients. ``ppo.mini_batch_size`` counts samples over all processes, so the
    number of optimizer steps does not depend on the number of processes (Huang et al.'s
    ``nminibatches``). The KL that steers the coefficient and the ceiling, the whitening of the
    advantages and the token mean of the losses are the whole batch's, so the update is the one
    a single process would make on the whole batch; the metrics cover the whole batch.

    The critic (``ppo.critic``) is either the value head alone on the policy's detached last hidden
    state (``head``), or the value head on the states of the critic's own LoRA adapter on the same
    base weights (``adapter``, :func:`~tasks.rl.policy.critic_view`), which costs one more forward
    and backward pass per mini-batch. The value loss never moves the PPO adapter. The critic is its
    own parameter group (``ppo.value_learning_rate``), and the policy's and the critic's gradients
    are clipped separately. With ``ppo.mixed_precision='bf16'`` (CUDA) the
    policy's forward passes run under bfloat16 autocast; the weights, the optimizer, the log-probs
    and the values stay float32.
    """

    def __init__(
        self,
        policy: PeftModel,
        value_head: ValueHead,
        tokenizer: PreTrainedTokenizerBase,
        reward_fn: RewardFn,
        ppo: PPOSettings,
        generation: GenerationSettings,
        device: str | torch.device,
        accelerator: Accelerator | None = None,
    ):
        self.device = torch.device(device)
        # Data parallelism (tasks.rl.workers): every process holds the whole policy, samples its
        # share of each batch, and the gradients are averaged before each optimizer step.
        self.accelerator = accelerator
        self.rank = accelerator.process_index if accelerator is not None else 0
        self.processes = accelerator.num_processes if accelerator is not None else 1
        check_batch_split(ppo, self.processes)
        if ppo.mixed_precision != "no" and self.device.type != "cuda":
            raise ConfigError(f"ppo.mixed_precision '{ppo.mixed_precision}' needs a CUDA device, and this trainer "
                              f"runs on {self.device}: set ppo.mixed_precision to 'no'")
        # This process's rows of each mini-batch, and of each micro-batch within it.
        self.mini_batch_rows = ppo.mini_batch_size // self.processes
        self.micro_batch_rows = self.mini_batch_rows // ppo.gradient_accumulation_steps
        self.policy = policy if is_quantized(policy) else policy.to(self.device)
        self.value_head = value_head.to(self.device)
        self.tokenizer = tokenizer
        self.reward_fn = reward_fn
        self.ppo = ppo
        self.generation = generation

        self.tokens = special_tokens(policy, tokenizer)
        self.has_critic_adapter = ppo.critic == "adapter"
        if self.has_critic_adapter:
            add_critic_adapter(self.policy)
        disable_dropout(self.policy)  # the critic adapter's LoRA dropout too
        if ppo.gradient_checkpointing:
            # Non-reentrant checkpointing needs no input that requires grad, so frozen embeddings are fine.
            self.policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

        critic_marker = f".{CRITIC_ADAPTER}."
        adapter_params = [p for n, p in policy.named_parameters() if p.requires_grad and critic_marker not in n]
        if not adapter_params:
            raise ValueError("the policy has no trainable parameters: pass a model with a LoRA adapter")
        critic_params = [p for n, p in policy.named_parameters() if p.requires_grad and critic_marker in n]
        critic_params += list(self.value_head.parameters())
        self.trainable_params = adapter_params + critic_params
        # Two groups: the critic is far from the policy's adapter in how fast it can and must move.
        # eps=1e-5 as in CleanRL and Huang et al.'s reference runs.
        self.optimizer = torch.optim.Adam(
            [
                {"params": adapter_params, "lr": ppo.learning_rate, "name": "policy"},
                {"params": critic_params, "lr": ppo.value_learning_rate, "name": "value"},
            ],
            eps=1e-5,
        )
        self.kl_ctl: AdaptiveKLController | FixedKLController = (
            AdaptiveKLController(ppo.init_kl_coef, ppo.target_kl, ppo.kl_horizon)
            if ppo.adaptive_kl
            else FixedKLController(ppo.init_kl_coef)
        )
        self.generator = torch.Generator().manual_seed(ppo.seed)
        self.steps_done = 0
        self.history: list[dict[str, float]] = []  # metrics of every step, across resumes
        self._prompt_order: list[int] = []  # prompts still to visit in this pass over the data
        self._restored = False

    # -- forward passes --------------------------------------------------------------------

    def _autocast(self) -> AbstractContextManager:
        """bfloat16 autocast of the policy's forward passes under ``ppo.mixed_precision='bf16'``."""
        if self.ppo.mixed_precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def _response_mask(self, response_ids: torch.Tensor, length_budget: torch.Tensor) -> torch.Tensor:
        """1 on tokens up to and including the first EOS, and within each sample's length budget."""
        positions = torch.arange(response_ids.shape[1], device=response_ids.device)
        is_eos = response_ids == self.tokens.eos
        first_eos = torch.where(is_eos.any(dim=1), is_eos.int().argmax(dim=1), response_ids.shape[1])
        length = torch.minimum(first_eos + 1, length_budget.to(response_ids.device))
        return (positions[None, :] < length[:, None]).float()

    def _logits_and_states(
        self,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        response_ids: torch.Tensor,
        encoder_hidden: torch.Tensor | None = None,
        need_logits: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Under teacher forcing: for each response token, the logits that predict it and the last
        hidden state they come from, [B, T, V] and [B, T, H]. Without ``need_logits`` a causal model
        computes the logits of the last position only (the others are not returned then).

        Seq2seq: the decoder reads ``[start, r_0 .. r_{T-2}]``; ``encoder_hidden``, when given,
        is this policy's encoding of the prompts and saves encoding them again. Causal: the model reads the
        left-padded prompt followed by the response, and response token ``t`` is predicted at
        column ``P - 1 + t``; positions count only real tokens, as ``generate`` counts them.
        Either way the model is causal over the response, so the padding after a response's
        end cannot change the positions before it; the losses mask those positions out.
        """
        if self.tokens.is_encoder_decoder:
            start = torch.full_like(response_ids[:, :1], self.tokens.decoder_start)
            prompt = (
                {"input_ids": prompt_ids}
                if encoder_hidden is None
                else {"encoder_outputs": BaseModelOutput(last_hidden_state=encoder_hidden)}
            )
            with self._autocast():
                output = self.policy(
                    **prompt,
                    attention_mask=prompt_mask,
                    decoder_input_ids=torch.cat([start, response_ids[:, :-1]], dim=1),
                    output_hidden_states=True,
                    use_cache=False,
                )
            return output.logits, output.decoder_hidden_states[-1]
        prompt_length, response_length = prompt_ids.shape[1], response_ids.shape[1]
        attention_mask = torch.cat([prompt_mask, torch.ones_like(response_ids)], dim=1)
        with self._autocast():
            output = self.policy(
                input_ids=torch.cat([prompt_ids, response_ids], dim=1),
                attention_mask=attention_mask,
                position_ids=(attention_mask.cumsum(dim=1) - 1).clamp(min=0),
                output_hidden_states=True,
                use_cache=False,
                # no vocabulary-wide logits over the prompt, nor over the response for the critic
                logits_to_keep=response_length + 1 if need_logits else 1,
            )
        return output.logits[:, :-1], output.hidden_states[-1][:, prompt_length - 1 : -1]

    def _forward(
        self,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        response_ids: torch.Tensor,
        with_entropy: bool = False,
        encoder_hidden: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Log-probs of ``response_ids`` under teacher forcing, the values, optionally the entropy, all
        in float32 (outside the autocast of the policy's forward pass)."""
        logprobs, logits, hidden = self._policy_logprobs(prompt_ids, prompt_mask, response_ids, encoder_hidden)
        with self._critic_view():
            values = self._values(prompt_ids, prompt_mask, response_ids, hidden)
        entropy = entropy_from_logits(logits, self.generation.temperature) if with_entropy else None
        return logprobs, values, entropy

    def _policy_logprobs(
        self,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        response_ids: torch.Tensor,
        encoder_hidden: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The policy's log-probs of ``response_ids`` [B, T], and the logits and last hidden state
        they come from (:meth:`_logits_and_states`)."""
        logits, hidden = self._logits_and_states(prompt_ids, prompt_mask, response_ids, encoder_hidden)
        # Log-probs of the distribution that was sampled: logits / temperature (Huang et al.).
        return token_logprobs(logits, response_ids, self.generation.temperature), logits, hidden

    def _critic_view(self) -> AbstractContextManager:
        """The adapters the critic computes with: :func:`~tasks.rl.policy.critic_view` with the
        critic's own adapter, else the policy's (nothing to switch)."""
        return critic_view(self.policy) if self.has_critic_adapter else nullcontext()

    def _values(
        self,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        response_ids: torch.Tensor,
        policy_hidden: torch.Tensor,
    ) -> torch.Tensor:
        """The critic's value of each response position, [B, T] float32; inside :meth:`_critic_view`."""
        if not self.has_critic_adapter:
            # The value head reads detached features: its regression error must not move the
            # PPO adapter, or the critic's gradients (larger than the policy's early on) drag the
            # policy away from the reference with no gain in reward.
            return self.value_head(policy_hidden.detach())
        # The critic's own features: the same base weights under the critic's adapter, which
        # sees the prefix the policy saw and learns what predicts the return. A separate pass
        # (the encoder's too), so the value loss reaches the critic's adapter and not the policy's.
        _, hidden = self._logits_and_states(prompt_ids, prompt_mask, response_ids, need_logits=False)
        return self.value_head(hidden)

    # -- rollout ---------------------------------------------------------------------------

    def generate_and_score(self, prompt_input_ids: list[list[int]]) -> Responses:
        """Sample one response per prompt in one batched decode and score them in one batched
        reward call: the seeds' per-prompt generate-and-score loop, batched.

        Each sample gets its own length budget in [min_new_tokens, max_new_tokens] (the seeds'
        LengthSampler) without a per-sample ``generate``: the batch decodes together and each
        row leaves the batch at its EOS or its budget (:func:`tasks.io.models.sample`).
        """
        return self._generate_and_score(prompt_input_ids)[0]

    def _generate_and_score(self, prompt_input_ids: list[list[int]]) -> tuple[Responses, torch.Tensor | None]:
        """:meth:`generate_and_score`, and the policy's encoding of the prompts (seq2seq; else None)."""
        self.policy.eval()
        self.value_head.eval()
        prompt_ids, prompt_mask = pad_prompts(prompt_input_ids, self.tokens, self.device)
        batch_size = prompt_ids.shape[0]
        # Drawn for the whole batch on every process (each keeps its share), so that the
        # trainer's generator, which also orders the prompts, stays the same everywhere.
        length_budget = torch.randint(
            self.generation.min_new_tokens,
            self.generation.max_new_tokens + 1,
            (batch_size * self.processes,),
            generator=self.generator,
        )[self.rank :: self.processes]
        # The prompts are encoded once, for the sampler and for the policy's log-probs in
        # rollout() (the reference, whose encoder lacks the PPO adapter, encodes them for itself).
        encoder_hidden = None
        if self.tokens.is_encoder_decoder:
            with torch.no_grad(), self._autocast():
                encoder_hidden = self.policy.get_encoder()(
                    input_ids=prompt_ids, attention_mask=prompt_mask
                ).last_hidden_state
        # The decoding loop runs the policy with its adapters folded into its weights; the
        # log-probs PPO uses are computed by the unfolded policy in rollout(), so the first
        # mini-batch's ratio stays exactly 1.
        decoding_modules = (
            self.policy.get_base_model().get_decoder() if self.tokens.is_encoder_decoder else self.policy
        )
        with folded_adapters(self.policy, decoding_modules), self._autocast():
            sampled = sample(
                self.policy, prompt_ids, prompt_mask, self.generation, int(length_budget.max()), self.tokens,
                length_budget, encoder_hidden,
            )
        # A normal tensor again: the sampler runs in inference mode, and inference tensors
        # cannot take part in the training forward pass.
        response_ids = sampled.clone()
        response_mask = self._response_mask(response_ids, length_budget)
        response_ids = response_ids.masked_fill(response_mask == 0, self.tokens.pad)
        texts = self.tokenizer.batch_decode(response_ids.tolist(), skip_special_tokens=True)
        prompts = self.tokenizer.batch_decode(prompt_input_ids, skip_special_tokens=True)

        rewards = self.reward_fn(texts, prompts)
        rewards = torch.as_tensor(rewards, dtype=torch.float32).to(self.device)
        if rewards.shape != (batch_size,):
            raise PPOTrainingError(f"reward_fn returned shape {tuple(rewards.shape)}, expected ({batch_size},)")
        if not torch.isfinite(rewards).all():
            bad = int((~torch.isfinite(rewards)).sum())
            raise PPOTrainingError(f"reward_fn returned {bad} non-finite rewards (NaN or inf) of {batch_size}")
        ended = ((response_ids == self.tokens.eos) & (response_mask == 1)).any(dim=1)
        scores = rewards
        if self.ppo.missing_eos_penalty is not None:
            scores = rewards - self.ppo.missing_eos_penalty * (~ended).float()
        responses = Responses(
            prompt_ids=prompt_ids,
            prompt_mask=prompt_mask,
            response_ids=response_ids,
            response_mask=response_mask,
            length_budget=length_budget,
            texts=texts,
            rewards=rewards,
            ended=ended,
            scores=scores,
        )
        return responses, encoder_hidden

    def rollout(self, prompt_input_ids: list[list[int]]) -> Rollout:
        """:meth:`generate_and_score`, then the sampling policy's log-probs, values and entropy and
        the reference's log-probs of the responses, a mini-batch at a time."""
        responses, encoder_hidden = self._generate_and_score(prompt_input_ids)
        chunks: list[tuple[torch.Tensor, ...]] = []
        with torch.no_grad():
            for start in range(0, len(responses.texts), self.mini_batch_rows):
                rows = slice(start, start + self.mini_batch_rows)
                args = (responses.prompt_ids[rows], responses.prompt_mask[rows], responses.response_ids[rows])
                encoded = encoder_hidden[rows] if encoder_hidden is not None else None
                logprobs, values, entropy = self._forward(*args, with_entropy=True, encoder_hidden=encoded)
                with reference_policy(self.policy):
                    ref_logprobs, _, _ = self._forward(*args)
                chunks.append((logprobs, ref_logprobs, values, entropy))
        logprobs, ref_logprobs, values, entropy = (torch.cat(parts) for parts in zip(*chunks, strict=True))
        return Rollout(
            **vars(responses), logprobs=logprobs, ref_logprobs=ref_logprobs, values=values, entropy=entropy
        )

    # -- one PPO step ----------------------------------------------------------------------

    def step(self, prompt_input_ids: list[list[int]]) -> dict[str, float]:
        """Rollout, rewards with the KL penalty, GAE, then ``ppo_epochs`` of clipped updates."""
        ppo = self.ppo
        started = time.perf_counter()
        rollout = self.rollout(prompt_input_ids)
        mask = rollout.response_mask
        batch_size = mask.shape[0]

        # Rewards: -beta * KL per token, score at the last token (Ziegler et al., eq. 2).
        kl_coef = self.kl_ctl.value
        rewards, non_score_reward = per_token_rewards(
            rollout.scores, rollout.logprobs, rollout.ref_logprobs, mask, kl_coef
        )
        sequence_kl = ((rollout.logprobs - rollout.ref_logprobs) * mask).sum(dim=1)
        # Over the whole batch, so every process steers the KL coefficient (and stops) alike.
        mean_kl = float(self._over_processes(sequence_kl.mean(), "mean"))
        if not math.isfinite(mean_kl):
            raise PPOTrainingError(f"KL to the reference is not finite ({mean_kl}) at step {self.steps_done}")
        if mean_kl > ppo.kl_ceiling:
            raise PPOTrainingError(
                f"mean KL to the reference {mean_kl:.2f} nats exceeds kl_ceiling {ppo.kl_ceiling} at step "
                f"{self.steps_done}: the policy drifted too far (lower learning_rate or raise init_kl_coef)"
            )

        old_values = rollout.values * mask
        advantages, returns = compute_gae(rewards, old_values, mask, ppo.gamma, ppo.lam)
        raw_advantages_mean = float(masked_mean(advantages, mask))
        advantages = self._whiten(advantages, mask)

        # Optimise: ppo_epochs passes over shuffled mini-batches, each one optimizer step made of
        # gradient_accumulation_steps micro-batches in every process.
        self.policy.train(ppo.gradient_checkpointing)
        losses: dict[str, list[float]] = {
            "policy_loss": [],
            "value_loss": [],
            "clipfrac": [],
            "approx_kl": [],
            "value_clipfrac": [],
            "grad_norm_policy": [],
            "grad_norm_value": [],
        }
        for _epoch in range(ppo.ppo_epochs):
            order = torch.randperm(batch_size, generator=self.generator).to(self.device)
            for start in range(0, batch_size, self.mini_batch_rows):
                mini_batch = order[start : start + self.mini_batch_rows]
                # The losses are means over the mini-batch's tokens in all processes: each micro-batch's
                # mean is weighted by its share of those tokens (times the processes, whose gradients
                # are averaged), so neither accumulation nor the number of processes changes the gradient.
                mini_batch_tokens = float(self._over_processes(mask[mini_batch].sum(), "sum"))
                self.optimizer.zero_grad(set_to_none=True)
                for micro_start in range(0, len(mini_batch), self.micro_batch_rows):
                    mb = mini_batch[micro_start : micro_start + self.micro_batch_rows]
                    args = (rollout.prompt_ids[mb], rollout.prompt_mask[mb], rollout.response_ids[mb])
                    new_logprobs, _, hidden = self._policy_logprobs(*args)
                    pg_loss, clipfrac, approx_kl = policy_loss(
                        new_logprobs, rollout.logprobs[mb], advantages[mb], mask[mb], ppo.cliprange
                    )
                    share = float(mask[mb].sum()) * self.processes / mini_batch_tokens
                    # Each loss goes backward under the adapters it was computed with: with gradient
                    # checkpointing the backward pass recomputes the forward under the active ones.
                    with self._critic_view():
                        new_values = self._values(*args, hidden)
                        vf_loss, vf_clipfrac = value_loss(
                            new_values, old_values[mb], returns[mb], mask[mb], ppo.cliprange_value
                        )
                        if not (torch.isfinite(pg_loss) and torch.isfinite(vf_loss)):
                            raise PPOTrainingError(
                                f"non-finite loss at step {self.steps_done}: "
                                f"policy loss {pg_loss.item()}, value loss {vf_loss.item()}"
                            )
                        (ppo.vf_coef * vf_loss * share).backward()
                    (pg_loss * share).backward()
                    losses["policy_loss"].append(pg_loss.item())
                    losses["value_loss"].append(vf_loss.item())
                    losses["clipfrac"].append(clipfrac.item())
                    losses["approx_kl"].append(approx_kl.item())
                    losses["value_clipfrac"].append(vf_clipfrac.item())
                self._average_gradients()
                # Per group: the critic's large early gradients must not shrink the policy's step.
                for group in self.optimizer.param_groups:
                    norm = nn.utils.clip_grad_norm_(group["params"], ppo.max_grad_norm)
                    losses[f"grad_norm_{group['name']}"].append(float(norm))  # before clipping
                self.optimizer.step()
        self.policy.eval()

        self.kl_ctl.update(mean_kl, batch_size * self.processes)
        self.steps_done += 1
        elapsed = time.perf_counter() - started
        metrics = {
            "reward_mean": float(rollout.rewards.mean()),
            "reward_std": float(rollout.rewards.std()) if batch_size > 1 else 0.0,
            "score_mean": float(rollout.scores.mean()),
            "eos_share": float(rollout.ended.float().mean()),
            "kl": mean_kl,
            "kl_coef": kl_coef,
            "entropy": float(masked_mean(rollout.entropy, mask)),
            **{name: sum(vals) / len(vals) for name, vals in losses.items()},
            "returns_mean": float(masked_mean(returns, mask)),
            "advantages_mean": raw_advantages_mean,  # before whitening, which makes it 0
            "explained_variance": explained_variance(old_values, returns, mask),
            # root mean square error of the rollout's values against the returns, in reward units
            "value_error": float(masked_mean((old_values - returns) ** 2, mask).sqrt()),
            "response_length": float(mask.sum(dim=1).mean()),
            "tokens_per_second": float(mask.sum()) / elapsed,  # response tokens per second of the whole step
            "non_score_reward": float(non_score_reward.sum(dim=1).mean()),
        }
        if self.processes > 1:
            metrics = self._combine_metrics(metrics, rollout.rewards)
        return metrics

    # -- data parallelism ------------------------------------------------------------------

    def _over_processes(self, value: torch.Tensor, reduction: Literal["mean", "sum"]) -> torch.Tensor:
        """``value``'s mean or sum over the processes (itself when there is one)."""
        if self.processes == 1:
            return value
        return self.accelerator.reduce(value.detach().reshape(-1).clone(), reduction=reduction).reshape(value.shape)

    def _whiten(self, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """:func:`whiten` over the whole batch: the mean and variance of every process's masked values."""
        if self.processes == 1:
            return whiten(values, mask)
        mask = mask.to(values.dtype)
        count, total = self._over_processes(torch.stack([mask.sum(), (values * mask).sum()]), "sum")
        mean = total / count
        variance = self._over_processes(((values - mean) ** 2 * mask).sum(), "sum") / (count - 1)
        return (values - mean) * torch.rsqrt(variance + 1e-8) * mask

    def _average_gradients(self) -> None:
        """Every process applies the mean of all processes' gradients (one all-reduce of the
        flattened adapter and value-head gradients, a few MB), so the replicas stay identical."""
        if self.processes == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.trainable_params]
        averaged = self._over_processes(torch.cat([grad.reshape(-1) for grad in grads]), "mean")
        for param, chunk in zip(self.trainable_params, averaged.split([g.numel() for g in grads]), strict=True):
            param.grad = chunk.view_as(param).clone()

    def _check_replicas(self) -> None:
        """Averaged gradients keep every process's weights identical; fail loudly if they are not."""
        if self.processes == 1:
            return
        local = torch.stack([param.detach().double().sum() for param in self.trainable_params])
        everyone = self.accelerator.gather(local[None]).cpu()
        if not torch.equal(everyone, everyone[:1].expand_as(everyone)):
            raise PPOTrainingError("the training processes ended with different weights: their gradients "
                                   "were not averaged")

    def _combine_metrics(self, metrics: dict[str, float], rewards: torch.Tensor) -> dict[str, float]:
        """The whole batch's metrics from every process's: means of the per-process values, the
        reward's mean and spread over all samples, the throughput summed."""
        names = list(metrics)
        local = torch.tensor([metrics[name] for name in names], dtype=torch.float64, device=self.device)
        combined = dict(zip(names, self._over_processes(local, "mean").tolist(), strict=True))
        everyone = self.accelerator.gather(rewards)
        combined["reward_mean"], combined["reward_std"] = float(everyone.mean()), float(everyone.std())
        combined["tokens_per_second"] *= self.processes
        return combined

    # -- training loop ---------------------------------------------------------------------

    def train(
        self,
        prompts: list[list[int]],
        total_steps: int,
        on_step: Callable[[int, dict[str, float]], None] | None = None,
        checkpoint_dir: Path | None = None,
        on_checkpoint: Callable[[Path], None] | None = None,
    ) -> list[dict[str, float]]:
        """Train until ``total_steps`` PPO steps are done, over batches of ``ppo.batch_size`` prompts
        reshuffled each pass; returns :attr:`history`, the metrics of every step.

        After :meth:`load_checkpoint` only the remaining steps run, and the run continues
        exactly where the checkpoint left it (weights, optimizer, KL coefficient, data order,
        random state). With ``checkpoint_dir`` a checkpoint is written every
        ``ppo.checkpoint_every`` steps and after the last one; ``on_checkpoint(path)`` runs after
        each. ``on_step(step, metrics)`` runs after every step with the 0-based step index.
        Raises :class:`PPOTrainingError` when training diverges.
        """
        if not prompts:
            raise ValueError("no prompts to train on")
        if self.steps_done > total_steps:
            raise ValueError(f"already {self.steps_done} steps done, more than the {total_steps} asked for")
        if not self._restored and self.steps_done == 0:
            # The sampler draws from the global RNG; each process draws its own responses.
            torch.manual_seed(self.ppo.seed + self.rank)
        main = self.rank == 0
        progress = tqdm(range(self.steps_done, total_steps), desc="ppo", unit="step",
                        initial=self.steps_done, total=total_steps, disable=not main)
        for _ in progress:
            batch: list[list[int]] = []
            while len(batch) < self.ppo.batch_size:
                if not self._prompt_order:
                    self._prompt_order = torch.randperm(len(prompts), generator=self.generator).tolist()
                batch.append(prompts[self._prompt_order.pop()])
            metrics = self.step(batch[self.rank :: self.processes])  # every process, its share
            step = self.steps_done - 1
            self.history.append(metrics)
            progress.set_postfix(reward=f"{metrics['reward_mean']:.3f}", kl=f"{metrics['kl']:.2f}")
            logger.log(
                logging.INFO if main else logging.DEBUG,
                "ppo step %d: reward %.4f kl %.3f kl_coef %.4f policy_loss %.4f value_loss %.4f",
                step,
                metrics["reward_mean"],
                metrics["kl"],
                metrics["kl_coef"],
                metrics["policy_loss"],
                metrics["value_loss"],
            )
            if on_step is not None:
                on_step(step, metrics)
            if checkpoint_dir is not None and (
                self.steps_done % self.ppo.checkpoint_every == 0 or self.steps_done == total_steps
            ):
                path = self.save_checkpoint(checkpoint_dir)
                if on_checkpoint is not None:
                    on_checkpoint(path)
        self._check_replicas()
        return self.history

    # -- persistence -----------------------------------------------------------------------

    def save(self, out_dir: Path) -> None:
        """Write the inference artifacts: ``adapter/`` (safetensors, the PPO adapter only),
        ``value_head.safetensors``, ``critic_adapter.safetensors`` (with ``ppo.critic='adapter'``)
        and ``trainer_state.json``."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        self.policy.save_pretrained(str(out_dir / "adapter"), safe_serialization=True, selected_adapters=[PPO_ADAPTER])
        _save_tensors(self.value_head.state_dict(), out_dir / "value_head.safetensors")
        if self.has_critic_adapter:
            _save_tensors(get_peft_model_state_dict(self.policy, adapter_name=CRITIC_ADAPTER),
                          out_dir / CRITIC_ADAPTER_FILE)
        state = {
            "steps_done": self.steps_done,
            "kl_controller": self.kl_ctl.state_dict(),
            "prompt_order": self._prompt_order,
            "settings": self._training_settings(),
        }
        (out_dir / "trainer_state.json").write_text(json.dumps(state, indent=2))

    def _training_settings(self) -> dict[str, dict[str, Any]]:
        """The settings a resumed run must share with the checkpoint it continues."""
        return {
            "ppo": self.ppo.model_dump(mode="json", exclude=RESUMABLE_WITH_OTHER_VALUES),
            "generation": self.generation.model_dump(mode="json"),
        }

    def _check_resumable(self, state: dict[str, Any], path: Path) -> None:
        """Refuse to continue a checkpoint trained with other PPO or rollout settings, naming them: the
        checkpoint's KL controller would otherwise silently replace the configured target and horizon,
        and a run would mix two trainings under one name."""
        saved = state.get("settings")
        if saved is None:  # written before the settings were recorded: its KL controller tells some
            kl = state["kl_controller"]
            saved = {"ppo": {"adaptive_kl": kl["kind"] == "adaptive"}}
            if kl["kind"] == "adaptive":
                saved["ppo"] |= {"target_kl": kl["target"], "kl_horizon": kl["horizon"]}
        current = self._training_settings()
        differ = [
            f"{section}.{name} is {value!r} in the checkpoint but {current[section].get(name)!r} now"
            for section, fields in saved.items()
            for name, value in fields.items()
            if current.get(section, {}).get(name) != value
        ]
        if differ:
            raise ConfigError(
                f"cannot resume from {path}: it was trained with other settings ({'; '.join(differ)}). Set them "
                "back to the checkpoint's values to continue it, or start a new run to train with the new ones"
            )

    def load(self, out_dir: Path) -> None:
        """Restore what :meth:`save` wrote (adapter weights, value head, KL coefficient, step count).

        Raises :class:`~tasks.config.ConfigError`, before anything is restored, when the checkpoint was
        trained with other settings (all of ``ppo`` but :data:`RESUMABLE_WITH_OTHER_VALUES`, and
        ``generation``)."""
        out_dir = Path(out_dir)
        state = json.loads((out_dir / "trainer_state.json").read_text())
        self._check_resumable(state, out_dir)
        self._load_adapter(out_dir / "adapter" / "adapter_model.safetensors", PPO_ADAPTER)
        self.value_head.load_state_dict(
            load_file(str(out_dir / "value_head.safetensors"), device=str(self.device))
        )
        if self.has_critic_adapter:
            self._load_adapter(out_dir / CRITIC_ADAPTER_FILE, CRITIC_ADAPTER)
        self.kl_ctl.load_state_dict(state["kl_controller"])
        self.steps_done = int(state["steps_done"])
        self._prompt_order = [int(i) for i in state.get("prompt_order", [])]

    def _load_adapter(self, path: Path, adapter_name: str) -> None:
        """The weights of one of the policy's adapters from a safetensors file :meth:`save` wrote."""
        result = set_peft_model_state_dict(self.policy, load_file(str(path)), adapter_name=adapter_name)
        if getattr(result, "unexpected_keys", None):
            raise ValueError(f"{path} does not fit the policy's {adapter_name!r} adapter: {result.unexpected_keys[:5]}")

    def save_checkpoint(self, checkpoint_dir: Path) -> Path:
        """Everything a resume needs, as ``<checkpoint_dir>/step-NNNNNN``: :meth:`save`'s files plus
        the optimizer, the random states and the metrics so far.

        The checkpoint is written under a temporary name and renamed into place, so a process
        killed mid-write leaves no folder that :func:`latest_checkpoint` would pick. Only the
        ``ppo.keep_checkpoints`` newest are kept. With several processes every one of them
        calls this; the first writes the checkpoint, with every process's random state, and the
        others wait until it is in place.
        """
        checkpoint_dir = Path(checkpoint_dir)
        final = checkpoint_dir / f"{CHECKPOINT_PREFIX}{self.steps_done:06d}"
        random_states = self._random_states()
        if self.rank != 0:
            self._wait_for_everyone()
            return final
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=checkpoint_dir))
        try:
            self.save(staging)
            torch.save({"optimizer": self.optimizer.state_dict(), "random_states": random_states},
                       staging / "training_state.pt")
            (staging / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in self.history))
            replace_dir(staging, final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        for old in _checkpoints(checkpoint_dir)[: -self.ppo.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in checkpoint_dir.glob(f".{CHECKPOINT_PREFIX}*"):  # left by a process killed mid-write
            shutil.rmtree(stale, ignore_errors=True)
        logger.info("checkpoint after step %d written to %s", self.steps_done, final)
        self._wait_for_everyone()
        return final

    def _random_states(self) -> list[dict[str, torch.Tensor]]:
        """The random states of every process, in process order (a collective call)."""
        state = {"torch": torch.get_rng_state(), "trainer": self.generator.get_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
        if self.processes == 1:
            return [state]
        from accelerate.utils import gather_object

        return gather_object([state])

    def _wait_for_everyone(self) -> None:
        if self.processes > 1:
            self.accelerator.wait_for_everyone()

    def load_checkpoint(self, path: Path) -> None:
        """Continue from a checkpoint of :meth:`save_checkpoint`: the next :meth:`train` call goes
        on exactly as the interrupted run would have."""
        path = Path(path)
        self.load(path)
        state = torch.load(path / "training_state.pt", map_location=self.device, weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        random_states = state["random_states"]
        self.generator.set_state(random_states[0]["trainer"].cpu())  # the same in every process
        if len(random_states) == self.processes:
            random_state = random_states[self.rank]
            torch.set_rng_state(random_state["torch"].cpu())
            if "cuda" in random_state and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(list(random_state["cuda"].cpu()))
        else:
            logger.warning("checkpoint %s was written by %d processes, this run has %d: sampling continues "
                           "from fresh seeds", path, len(random_states), self.processes)
            torch.manual_seed(self.ppo.seed + self.rank + 7919 * self.steps_done)
        self.history = checkpoint_history(path)
        if len(self.history) != self.steps_done:
            raise ValueError(f"checkpoint {path} has metrics for {len(self.history)} of {self.steps_done} steps")
        self._restored = True
        logger.info("resumed PPO from %s after step %d", path, self.steps_done)


def checkpoint_history(path: Path) -> list[dict[str, float]]:
    """The metrics of every step up to the checkpoint ``path``."""
    lines = (Path(path) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def checkpoint_step(path: Path) -> int:
    """The number of steps done when the checkpoint ``.../step-NNNNNN`` was written."""
    return int(Path(path).name[len(CHECKPOINT_PREFIX):])


def _checkpoints(checkpoint_dir: Path) -> list[Path]:
    """Complete checkpoints in ``checkpoint_dir``, oldest first (temporary folders are skipped)."""
    if not Path(checkpoint_dir).is_dir():
        return []
    found = [
        path for path in Path(checkpoint_dir).iterdir()
        if path.is_dir() and path.name.startswith(CHECKPOINT_PREFIX) and path.name[len(CHECKPOINT_PREFIX):].isdigit()
    ]
    return sorted(found, key=checkpoint_step)


def _save_tensors(state: dict[str, torch.Tensor], path: Path) -> None:
    """A state dict as a safetensors file, on the CPU and contiguous as safetensors needs."""
    save_file({name: tensor.detach().contiguous().cpu() for name, tensor in state.items()}, str(path))


def latest_checkpoint(checkpoint_dir: Path) -> Path | None:
    """The newest complete checkpoint in ``checkpoint_dir``, or None."""
    found = _checkpoints(checkpoint_dir)
    return found[-1] if found else None
