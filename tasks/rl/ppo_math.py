"""The PPO math, pure functions on tensors, written to be checked line by line against the papers:

* Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences"
  (per-token KL penalty, adaptive KL controller);
* Huang et al. 2023, "The N Implementation Details of RLHF with PPO"
  (score at the last response token, whitened advantages, clipped value loss,
  dropout off, temperature-scaled log-probs);
* CleanRL's ``ppo.py`` for the names (``logratio``, ``ratio``, ``pg_loss1/2``,
  ``approx_kl``, ``clipfrac``).

Shapes: ``B`` samples, ``T`` response tokens. A ``mask`` is 1.0 on response tokens
(up to and including the first EOS) and 0.0 on padding; every masked function ignores
the positions where it is 0. The trainer that uses them is :mod:`tasks.rl.trainer`.
"""


from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    pass

logger = logging.getLogger(__name__)

KLEstimator = Literal["k1", "abs", "mse", "k3"]


# ---------------------------------------------------------------------------------------------
# Pure tensor functions
# ---------------------------------------------------------------------------------------------


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``values`` over the positions where ``mask`` is 1 (over ``dim``, or over all)."""
    mask = mask.to(values.dtype)
    if dim is None:
        return (values * mask).sum() / mask.sum()
    return (values * mask).sum(dim) / mask.sum(dim)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``values`` over the masked positions; ``unbiased`` applies Bessel's correction."""
    mean = masked_mean(values, mask)
    variance = masked_mean((values - mean) ** 2, mask)
    if unbiased:
        count = mask.sum()
        if count < 2:
            raise ValueError(f"unbiased variance needs at least 2 masked values, got {int(count)}")
        variance = variance * count / (count - 1)
    return variance


def whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Scale ``values`` to unit variance over the mask, and to zero mean when ``shift_mean``.

    With ``shift_mean=False`` the mean is kept, only the spread is normalised. Positions
    outside the mask come back as 0.
    """
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask.to(values.dtype)


def compute_gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized Advantage Estimation (Schulman et al. 2016) by a reverse scan over tokens.

    ``delta_t = r_t + gamma * V_{t+1} - V_t`` and ``A_t = delta_t + gamma * lam * A_{t+1}``,
    with ``V`` and ``A`` taken as 0 past the last valid token (the episode ends there,
    no bootstrapping). Returns ``(advantages, returns)`` with ``returns = advantages + values``,
    both [B, T] and 0 outside the mask.
    """
    mask = mask.to(values.dtype)
    rewards, values = rewards * mask, values * mask
    num_tokens = rewards.shape[1]
    lastgaelam = torch.zeros_like(rewards[:, 0])
    advantages_reversed = []
    for t in reversed(range(num_tokens)):
        nextvalues = values[:, t + 1] if t < num_tokens - 1 else torch.zeros_like(values[:, t])
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = (delta + gamma * lam * lastgaelam) * mask[:, t]
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], dim=1)
    returns = (advantages + values) * mask
    return advantages, returns


def kl_penalty(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: KLEstimator = "k1"
) -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from the sampled tokens' log-probs.

    ``k1``: log p - log q (unbiased, can be negative); ``abs``: its absolute value;
    ``mse``: 0.5 * (log p - log q)^2; ``k3``: (q/p - 1) - log(q/p), unbiased and
    non-negative (joschu.net/blog/kl-approx.html).
    """
    logratio = logprobs - ref_logprobs
    if estimator == "k1":
        return logratio
    if estimator == "abs":
        return logratio.abs()
    if estimator == "mse":
        return 0.5 * logratio**2
    if estimator == "k3":
        return torch.expm1(-logratio) + logratio
    raise ValueError(f"unknown KL estimator {estimator!r}: expected 'k1', 'abs', 'mse' or 'k3'")


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``log softmax(logits / temperature)`` at ``tokens``: [B, T, V] logits, [B, T] tokens -> [B, T].

    Computed as ``logit[token] - logsumexp(logits)``, one sample at a time, in float32. The
    vocabulary-wide temporaries (the scaled logits, their exponentials, the backward pass's
    softmax) then exist for one sample, never for the whole batch, and no [B, T, V]
    log-softmax is kept for the backward pass: with a 32k vocabulary these dominate the
    update's memory. TRL's ``selective_log_softmax`` does the same.
    """
    rows = []
    for row_logits, row_tokens in zip(logits, tokens, strict=True):
        row_logits = row_logits.float()
        if temperature != 1.0:
            row_logits = row_logits / temperature
        picked = torch.gather(row_logits, -1, row_tokens.unsqueeze(-1)).squeeze(-1)
        rows.append(picked - torch.logsumexp(row_logits, dim=-1))
    return torch.stack(rows)


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of ``softmax(logits / temperature)`` at each position, [B, T, V] -> [B, T], one
    sample at a time (as :func:`token_logprobs`); for logging, so no gradient."""
    rows = []
    with torch.no_grad():
        for row_logits in logits:
            logprobs = F.log_softmax(row_logits.float() / temperature, dim=-1)
            rows.append(-(logprobs.exp() * logprobs).sum(dim=-1))
    return torch.stack(rows)


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cliprange: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate objective, as a loss to minimise, averaged over masked tokens.

    Returns ``(pg_loss, clipfrac, approx_kl)``: ``clipfrac`` is the share of tokens where
    the clipped term is the active one, ``approx_kl`` = mean 0.5 * logratio^2, an estimate
    of KL(old || new) (joschu.net/blog/kl-approx.html; Huang et al. log the same).
    """
    logratio = logprobs - old_logprobs
    ratio = torch.exp(logratio)
    pg_loss1 = -advantages * ratio
    pg_loss2 = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    pg_loss = masked_mean(torch.max(pg_loss1, pg_loss2), mask)
    clipfrac = masked_mean((pg_loss2 > pg_loss1).to(logprobs.dtype), mask)
    approx_kl = masked_mean(0.5 * logratio**2, mask)
    return pg_loss, clipfrac, approx_kl


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    cliprange_value: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss: 0.5 * mean of max((V - R)^2, (V_clipped - R)^2) over masked tokens.

    ``V_clipped`` keeps the new prediction within ``cliprange_value`` of the rollout's.
    Returns ``(vf_loss, vf_clipfrac)``.
    """
    v_clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    v_loss_unclipped = (values - returns) ** 2
    v_loss_clipped = (v_clipped - returns) ** 2
    vf_loss = 0.5 * masked_mean(torch.max(v_loss_unclipped, v_loss_clipped), mask)
    vf_clipfrac = masked_mean((v_loss_clipped > v_loss_unclipped).to(values.dtype), mask)
    return vf_loss, vf_clipfrac


def per_token_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    kl_estimator: KLEstimator = "k1",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ziegler et al.'s reward: ``-kl_coef * KL`` on every token, plus the score on the last one.

    ``scores`` [B] land on each row's last valid response token. Returns
    ``(rewards, non_score_reward)``, both [B, T] and 0 outside the mask.
    """
    mask = mask.to(logprobs.dtype)
    lengths = mask.sum(dim=1)
    if bool((lengths == 0).any()):
        raise ValueError("every response needs at least one valid token")
    non_score_reward = -kl_coef * kl_penalty(logprobs, ref_logprobs, kl_estimator) * mask
    positions = torch.arange(mask.shape[1], device=mask.device)
    last_index = (mask * positions).argmax(dim=1)  # last position where the mask is 1
    rewards = non_score_reward.clone()
    rewards[torch.arange(mask.shape[0], device=mask.device), last_index] += scores.to(rewards.dtype)
    return rewards, non_score_reward


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(returns - values) / Var(returns) over masked tokens; NaN when returns are constant.

    1 is a perfect value function, 0 no better than a constant, negative worse.
    """
    var_returns = masked_var(returns, mask, unbiased=False)
    if var_returns == 0:
        return math.nan
    return float(1.0 - masked_var(returns - values, mask, unbiased=False) / var_returns)


# ---------------------------------------------------------------------------------------------
# KL controllers
# ---------------------------------------------------------------------------------------------


class AdaptiveKLController:
    """Ziegler et al. 2019, section 2.2: steer the KL coefficient towards a target KL.

    ``e = clip(KL / target - 1, -0.2, 0.2)`` and ``beta <- beta * (1 + e * n_steps / horizon)``.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        self.value = init_kl_coef
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        """Move the coefficient after ``n_steps`` samples whose mean sequence KL was ``current_kl``."""
        proportional_error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "adaptive", "value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "adaptive":
            raise ValueError(f"not an adaptive KL controller state: {state!r}")
        self.value, self.target, self.horizon = (
            float(state["value"]),
            float(state["target"]),
            int(state["horizon"]),
        )


class FixedKLController:
    """A constant KL coefficient; ``update`` does nothing."""

    def __init__(self, kl_coef: float):
        self.value = kl_coef

    def update(self, current_kl: float, n_steps: int) -> None:
        """Keep the coefficient."""

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "fixed", "value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "fixed":
            raise ValueError(f"not a fixed KL controller state: {state!r}")
        self.value = float(state["value"])


