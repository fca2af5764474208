"""PPO: the tensor functions on numbers worked out by hand, then the trainer on a tiny T5.

The tiny T5 (d_model 32, one layer each side, a 64-token word-level vocabulary) is built
from its config and first fine-tuned for a fraction of a second to say the word "insult"
in about 40% of its output, so PPO has something to unlearn.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration

import tasks.rl.trainer as ppo_module
from tasks.config import ConfigError, GenerationSettings, LoraSettings, PPOSettings
from tasks.io.models import draw_categorical
from tasks.rl.policy import (
    ValueHead,
    build_policy,
    critic_view,
    folded_adapters,
    load_value_head,
    reference_policy,
)
from tasks.rl.ppo_math import (
    AdaptiveKLController,
    FixedKLController,
    compute_gae,
    entropy_from_logits,
    explained_variance,
    kl_penalty,
    masked_mean,
    masked_var,
    per_token_rewards,
    policy_loss,
    token_logprobs,
    value_loss,
    whiten,
)
from tasks.rl.trainer import PPOTrainer, PPOTrainingError, latest_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------
# Tensor functions
# ---------------------------------------------------------------------------------------------


def test_masked_mean_and_var_ignore_masked_positions():
    values = torch.tensor([[1.0, 2.0, 99.0], [6.0, 99.0, 99.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    # valid values 1, 2, 6: mean 3, squared deviations 4 + 1 + 9 = 14
    assert masked_mean(values, mask).item() == pytest.approx(3.0)
    assert masked_mean(values, mask, dim=1).tolist() == pytest.approx([1.5, 6.0])
    assert masked_var(values, mask, unbiased=False).item() == pytest.approx(14 / 3)
    assert masked_var(values, mask).item() == pytest.approx(7.0)  # 14 / (3 - 1)
    with pytest.raises(ValueError, match="at least 2"):
        masked_var(values, torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]))


def test_whiten_by_hand():
    values = torch.tensor([[1.0, 2.0, 6.0, 99.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    # mean 3, unbiased variance 7: (v - 3) / sqrt(7), masked position set to 0
    expected = [-2 / math.sqrt(7), -1 / math.sqrt(7), 3 / math.sqrt(7), 0.0]
    assert whiten(values, mask)[0].tolist() == pytest.approx(expected, abs=1e-6)
    kept_mean = [e + 3 for e in expected[:3]] + [0.0]
    assert whiten(values, mask, shift_mean=False)[0].tolist() == pytest.approx(kept_mean, abs=1e-6)


def test_compute_gae_by_hand():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 99.0]])
    values = torch.tensor([[0.5, 0.6, 0.7], [1.0, 1.0, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    advantages, returns = compute_gae(rewards, values, mask, gamma=1.0, lam=0.95)
    # Row 0, scanning backwards, value past the end = 0:
    #   t=2: delta = 1 + 0   - 0.7 = 0.3  A2 = 0.3
    #   t=1: delta = 0 + 0.7 - 0.6 = 0.1  A1 = 0.1 + 0.95 * 0.3   = 0.385
    #   t=0: delta = 0 + 0.6 - 0.5 = 0.1  A0 = 0.1 + 0.95 * 0.385 = 0.46575
    #   returns = A + V = 0.96575, 0.985, 1.0
    # Row 1 ends after t=1, so the 5.0 value and 99 reward are never seen:
    #   t=1: delta = 2 + 0 - 1 = 1        A1 = 1
    #   t=0: delta = 0 + 1 - 1 = 0        A0 = 0 + 0.95 * 1 = 0.95
    #   returns = 1.95, 2.0, 0
    assert advantages[0].tolist() == pytest.approx([0.46575, 0.385, 0.3])
    assert returns[0].tolist() == pytest.approx([0.96575, 0.985, 1.0])
    assert advantages[1].tolist() == pytest.approx([0.95, 1.0, 0.0])
    assert returns[1].tolist() == pytest.approx([1.95, 2.0, 0.0])


def test_compute_gae_discounts_with_gamma():
    # gamma = 0.5, lam = 1: A_t is the discounted return minus V_t.
    rewards, values, mask = torch.tensor([[0.0, 4.0]]), torch.zeros(1, 2), torch.ones(1, 2)
    advantages, returns = compute_gae(rewards, values, mask, gamma=0.5, lam=1.0)
    assert advantages[0].tolist() == pytest.approx([2.0, 4.0])  # 0 + 0.5 * 4, 4
    assert returns[0].tolist() == pytest.approx([2.0, 4.0])


def test_compute_gae_with_gamma_below_one_by_hand():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 99.0]])
    values = torch.tensor([[0.5, 0.6, 0.7], [1.0, 1.0, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    advantages, returns = compute_gae(rewards, values, mask, gamma=0.9, lam=0.8)  # gamma * lam = 0.72
    # Row 0: t=2: delta = 1 + 0.9 * 0   - 0.7 = 0.3   A2 = 0.3
    #        t=1: delta = 0 + 0.9 * 0.7 - 0.6 = 0.03  A1 = 0.03 + 0.72 * 0.3   = 0.246
    #        t=0: delta = 0 + 0.9 * 0.6 - 0.5 = 0.04  A0 = 0.04 + 0.72 * 0.246 = 0.21712
    # Row 1 ends after t=1: t=1: delta = 2 + 0.9 * 0 - 1 = 1     A1 = 1
    #                       t=0: delta = 0 + 0.9 * 1 - 1 = -0.1  A0 = -0.1 + 0.72 * 1 = 0.62
    assert advantages[0].tolist() == pytest.approx([0.21712, 0.246, 0.3])
    assert returns[0].tolist() == pytest.approx([0.71712, 0.846, 1.0])
    assert advantages[1].tolist() == pytest.approx([0.62, 1.0, 0.0])
    assert returns[1].tolist() == pytest.approx([1.62, 2.0, 0.0])


def test_kl_penalty_estimators():
    logprobs, ref_logprobs = torch.log(torch.tensor([0.5, 0.25])), torch.log(torch.tensor([0.25, 0.5]))
    ln2 = math.log(2)
    assert kl_penalty(logprobs, ref_logprobs, "k1").tolist() == pytest.approx([ln2, -ln2])
    assert kl_penalty(logprobs, ref_logprobs, "abs").tolist() == pytest.approx([ln2, ln2])
    assert kl_penalty(logprobs, ref_logprobs, "mse").tolist() == pytest.approx([0.5 * ln2**2] * 2)
    # k3 = (q/p - 1) - log(q/p): q/p = 0.5 -> -0.5 + ln2; q/p = 2 -> 1 - ln2
    assert kl_penalty(logprobs, ref_logprobs, "k3").tolist() == pytest.approx([ln2 - 0.5, 1 - ln2])
    with pytest.raises(ValueError, match="unknown KL estimator"):
        kl_penalty(logprobs, ref_logprobs, "full")


def test_token_logprobs_and_entropy_by_hand():
    # One sample, two positions, vocabulary of 2: logits (0, ln 3) give p = (1/4, 3/4).
    logits = torch.tensor([[[0.0, math.log(3)], [math.log(3), 0.0]]], requires_grad=True)
    tokens = torch.tensor([[1, 1]])
    assert token_logprobs(logits, tokens)[0].tolist() == pytest.approx([math.log(0.75), math.log(0.25)])
    # temperature 2 halves the logits: p(1) = sqrt(3) / (1 + sqrt(3)) at the first position
    sqrt3 = math.sqrt(3)
    assert token_logprobs(logits, tokens, temperature=2.0)[0, 0].item() == pytest.approx(math.log(sqrt3 / (1 + sqrt3)))
    entropy = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert entropy_from_logits(logits)[0].tolist() == pytest.approx([entropy, entropy])
    # d log p(1) / d logits = onehot(1) - p: the gradient of the usual log_softmax + gather
    token_logprobs(logits, tokens)[0, 0].backward()
    assert logits.grad[0, 0].tolist() == pytest.approx([-0.25, 0.25])
    assert logits.grad[0, 1].tolist() == [0.0, 0.0]


def test_token_logprobs_match_log_softmax_on_a_batch():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=generator)
    tokens = torch.randint(0, 11, (3, 5), generator=generator)
    expected = torch.log_softmax(logits / 0.7, dim=-1).gather(2, tokens.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(token_logprobs(logits, tokens, temperature=0.7), expected)


def test_draw_categorical_follows_the_probabilities():
    probs = torch.tensor([[0.5, 0.3, 0.0, 0.2], [0.0, 0.0, 1.0, 0.0]]).repeat(10_000, 1)
    torch.manual_seed(0)
    drawn = draw_categorical(probs)
    first = torch.bincount(drawn[0::2], minlength=4) / 10_000
    # three standard errors of a share near 0.5 over 10 000 draws: 0.015
    assert first.tolist() == pytest.approx([0.5, 0.3, 0.0, 0.2], abs=0.015)
    assert (drawn[1::2] == 2).all()  # a certain token always; a zero-probability token never
    # unnormalised rows and entries below float32's resolution next to large ones
    tiny = torch.tensor([[1e-9, 2.0, 2.0]]).repeat(20_000, 1)
    counts = torch.bincount(draw_categorical(tiny), minlength=3)
    assert counts[0] == 0 and abs(int(counts[1]) - 10_000) < 450


def test_policy_loss_clipping_by_hand():
    # ratios 1.5, 0.5, 0.5 on valid tokens (and 3.0 on a masked one), cliprange 0.2
    ratio = torch.tensor([[1.5, 0.5, 0.5, 3.0]])
    logprobs = torch.log(ratio).requires_grad_()
    old_logprobs = torch.zeros(1, 4)
    advantages = torch.tensor([[1.0, 1.0, -2.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    pg_loss, clipfrac, approx_kl = policy_loss(logprobs, old_logprobs, advantages, mask, cliprange=0.2)
    # token 0: A=+1, r=1.5: pg_loss1 = -1.5, pg_loss2 = -1.2 -> max -1.2 (clipped)
    # token 1: A=+1, r=0.5: pg_loss1 = -0.5, pg_loss2 = -0.8 -> max -0.5 (not clipped)
    # token 2: A=-2, r=0.5: pg_loss1 =  1.0, pg_loss2 =  1.6 -> max  1.6 (clipped)
    # pg_loss = (-1.2 - 0.5 + 1.6) / 3 = -0.1 / 3; clipfrac = 2/3
    assert pg_loss.item() == pytest.approx(-0.1 / 3)
    assert clipfrac.item() == pytest.approx(2 / 3)
    # approx_kl = mean 0.5 * logratio^2 = 0.5 * (ln1.5^2 + 2 ln0.5^2) / 3
    assert approx_kl.item() == pytest.approx(0.5 * (math.log(1.5) ** 2 + 2 * math.log(0.5) ** 2) / 3)
    # Only the unclipped token moves the policy: d/dlogp (-A r) / 3 = -0.5 / 3 on token 1.
    pg_loss.backward()
    assert logprobs.grad[0].tolist() == pytest.approx([0.0, -0.5 / 3, 0.0, 0.0])


def test_value_loss_clipping_by_hand():
    old_values = torch.tensor([[0.0, 0.0, 0.0, 0.0]])
    values = torch.tensor([[1.0, 0.1, 0.5, 50.0]])
    returns = torch.tensor([[1.0, 1.0, -1.0, -50.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    vf_loss, vf_clipfrac = value_loss(values, old_values, returns, mask, cliprange_value=0.2)
    # token 0: V=1.0 clipped to 0.2: (1-1)^2 = 0,       (0.2-1)^2 = 0.64 -> 0.64 (clipped term wins)
    # token 1: V=0.1 inside the range:  (0.1-1)^2 = 0.81 both            -> 0.81
    # token 2: V=0.5 clipped to 0.2: (0.5+1)^2 = 2.25,  (0.2+1)^2 = 1.44 -> 2.25
    # vf_loss = 0.5 * (0.64 + 0.81 + 2.25) / 3; vf_clipfrac = 1/3
    assert vf_loss.item() == pytest.approx(0.5 * 3.7 / 3)
    assert vf_clipfrac.item() == pytest.approx(1 / 3)


def test_per_token_rewards_put_the_score_on_the_last_valid_token():
    logprobs = torch.full((2, 4), -1.0)
    ref_logprobs = torch.full((2, 4), -1.5)  # KL per token 0.5
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])  # row 0 ends early
    scores = torch.tensor([2.0, -1.0])
    rewards, non_score_reward = per_token_rewards(scores, logprobs, ref_logprobs, mask, kl_coef=0.1)
    # -0.1 * 0.5 = -0.05 on each valid token, the score added on the last valid one
    assert rewards[0].tolist() == pytest.approx([-0.05, 1.95, 0.0, 0.0])
    assert rewards[1].tolist() == pytest.approx([-0.05, -0.05, -0.05, -1.05])
    assert non_score_reward[0].tolist() == pytest.approx([-0.05, -0.05, 0.0, 0.0])
    with pytest.raises(ValueError, match="at least one valid token"):
        per_token_rewards(scores, logprobs, ref_logprobs, torch.tensor([[1.0, 0, 0, 0], [0, 0, 0, 0]]), 0.1)


def test_explained_variance():
    returns, mask = torch.tensor([[1.0, 2.0, 3.0, 99.0]]), torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    assert explained_variance(returns.clone(), returns, mask) == pytest.approx(1.0)
    assert explained_variance(torch.full_like(returns, 7.0), returns, mask) == pytest.approx(0.0)
    assert math.isnan(explained_variance(returns, torch.ones_like(returns), mask))


def test_adaptive_kl_controller_moves_towards_target():
    ctl = AdaptiveKLController(init_kl_coef=0.2, target=6.0, horizon=10_000)
    ctl.update(current_kl=12.0, n_steps=16)  # error 12/6 - 1 = 1 clipped to 0.2: 0.2 * (1 + 0.2 * 16 / 10000)
    assert ctl.value == pytest.approx(0.200064)
    ctl.update(current_kl=5.4, n_steps=100)  # error -0.1: * (1 - 0.1 * 100 / 10000) = * 0.999
    assert ctl.value == pytest.approx(0.200064 * 0.999)
    before = ctl.value
    ctl.update(current_kl=0.0, n_steps=10_000)  # error -1 clipped to -0.2: * 0.8
    assert ctl.value == pytest.approx(before * 0.8)

    restored = AdaptiveKLController(1.0, 1.0, 1)
    restored.load_state_dict(ctl.state_dict())
    assert (restored.value, restored.target, restored.horizon) == (ctl.value, 6.0, 10_000)
    with pytest.raises(ValueError):
        restored.load_state_dict(FixedKLController(0.1).state_dict())


def test_fixed_kl_controller_keeps_its_value():
    ctl = FixedKLController(0.05)
    ctl.update(current_kl=100.0, n_steps=1000)
    assert ctl.value == 0.05
    other = FixedKLController(1.0)
    other.load_state_dict(ctl.state_dict())
    assert other.value == 0.05


def test_value_head_init():
    hidden = torch.randn(2, 5, 32)
    assert ValueHead(32)(hidden).shape == (2, 5)
    assert torch.count_nonzero(ValueHead(32)(hidden)) == 0  # zero init: every value starts at 0
    torch.manual_seed(0)
    head = ValueHead(32, init_std=0.5)
    assert 0.3 < head.summary.weight.std().item() < 0.7


# ---------------------------------------------------------------------------------------------
# Trainer on a tiny T5
# ---------------------------------------------------------------------------------------------

WORDS = ["insult"] + [f"w{i}" for i in range(1, 61)]
VOCAB = {"<pad>": 0, "</s>": 1, "<unk>": 2} | {word: i + 3 for i, word in enumerate(WORDS)}
INSULT_ID = VOCAB["insult"]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.WordLevel(vocab=VOCAB, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )


def tiny_t5_config() -> T5Config:
    return T5Config(
        vocab_size=len(VOCAB),
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=1,
        num_decoder_layers=1,
        num_heads=4,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )


def insulting_t5_weights() -> dict[str, torch.Tensor]:
    """Weights of a tiny T5 taught to emit "insult" in ~40% of its tokens (about 0.5 s)."""
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(tiny_t5_config())
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(2)
    for _ in range(60):
        source = torch.randint(3, len(VOCAB), (32, 6), generator=generator)
        target = torch.randint(3, len(VOCAB), (32, 8), generator=generator)
        target[torch.rand(32, 8, generator=generator) < 0.4] = INSULT_ID
        target[:, -1] = 1
        loss = model(input_ids=source, labels=target).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.state_dict()


@pytest.fixture(scope="module")
def insulting_t5_state() -> dict[str, torch.Tensor]:
    return insulting_t5_weights()


def tiny_prompts() -> list[list[int]]:
    """32 prompts of 6 random words."""
    tokenizer = tiny_tokenizer()
    generator = torch.Generator().manual_seed(1)
    return [
        tokenizer(
            " ".join(WORDS[j] for j in torch.randint(1, len(WORDS), (6,), generator=generator).tolist())
        ).input_ids
        for _ in range(32)
    ]


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    return tiny_prompts()


def insult_share(text: str) -> float:
    words = text.split()
    return sum(word == "insult" for word in words) / len(words) if words else 1.0


def avoid_insults(texts: list[str], prompts: list[str] | None = None) -> torch.Tensor:
    """Reward: minus the share of words that are "insult" (an empty summary counts as all insult)."""
    return torch.tensor([-insult_share(text) for text in texts])


def make_trainer(
    state: dict[str, torch.Tensor], reward_fn=avoid_insults, accelerator=None, **ppo_overrides
) -> PPOTrainer:
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(tiny_t5_config())
    model.load_state_dict(state)
    lora = LoraConfig(
        task_type=TaskType.SEQ_2_SEQ_LM, r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q", "v"]
    )
    policy = get_peft_model(model, lora)
    settings = {
        "learning_rate": 1e-2,
        "batch_size": 16,
        "mini_batch_size": 8,
        "ppo_epochs": 2,
        "init_kl_coef": 0.05,
        "target_kl": 4.0,
        "kl_ceiling": 40.0,
    }
    ppo = PPOSettings(**(settings | ppo_overrides))
    generation = GenerationSettings(min_new_tokens=6, max_new_tokens=10)
    return PPOTrainer(policy, ValueHead(32), tiny_tokenizer(), reward_fn, ppo, generation, "cpu", accelerator)


def test_reference_equals_policy_before_any_update(insulting_t5_state, prompts):
    trainer = make_trainer(insulting_t5_state)
    rollout = trainer.rollout(prompts[:16])
    mask = rollout.response_mask.bool()
    # A fresh LoRA adapter has B = 0, so disabling it changes nothing: KL is 0 at step 0.
    torch.testing.assert_close(rollout.logprobs[mask], rollout.ref_logprobs[mask])
    assert torch.count_nonzero(rollout.values) == 0
    metrics = trainer.step(prompts[:16])
    assert abs(metrics["kl"]) < 1e-5
    assert metrics["kl_coef"] == pytest.approx(0.05)


def test_rollout_is_one_batched_decode_with_masks_up_to_eos(insulting_t5_state, prompts, sampling_spy):
    reward_batches: list[list[str]] = []
    prompt_batches: list[list[str]] = []

    def recording_reward(texts: list[str], prompts: list[str]) -> torch.Tensor:
        reward_batches.append(texts)
        prompt_batches.append(prompts)
        return avoid_insults(texts)

    trainer = make_trainer(insulting_t5_state, reward_fn=recording_reward)
    # A checkpoint's generation_config.json must not leak processors into PPO's sampling.
    trainer.policy.get_base_model().generation_config.no_repeat_ngram_size = 1
    trainer.policy.get_base_model().generation_config.repetition_penalty = 3.0
    trainer.generation.temperature = 0.7
    spy = sampling_spy(trainer.policy)
    rollout = trainer.rollout(prompts[:16])

    assert len(reward_batches) == 1 and reward_batches[0] == rollout.texts  # one reward call
    assert prompt_batches[0] == trainer.tokenizer.batch_decode(prompts[:16], skip_special_tokens=True)
    budget = rollout.length_budget
    assert budget.min() >= 6 and budget.max() <= 10
    ids, mask = rollout.response_ids, rollout.response_mask
    lengths = mask.sum(dim=1).long()
    assert torch.equal(mask, (torch.arange(ids.shape[1]) < lengths[:, None]).float())  # a prefix
    assert bool((lengths <= budget).all())
    for row in range(16):
        length = int(lengths[row])
        assert (ids[row, : length - 1] != 1).all()  # no EOS before the end of the mask
        if length < budget[row]:  # ended early: only an EOS can do that
            assert ids[row, length - 1] == 1
        assert (ids[row, length:] == 0).all()  # nothing after the end
        assert rollout.texts[row] == trainer.tokenizer.decode(ids[row, :length], skip_special_tokens=True)
    assert any(lengths < budget), "the tiny model should end some responses with EOS"

    # One decoding loop for the batch: a step per token of the longest response, finished rows dropped.
    assert len(spy.steps) == int(lengths.max()) and spy.batch_sizes[0] == 16
    assert spy.batch_sizes == sorted(spy.batch_sizes, reverse=True) and spy.batch_sizes[-1] < 16
    # PPO's log-probs are those of the distribution the sampler drew from.
    sampled = spy.logprobs(ids, lengths.tolist(), temperature=0.7)
    torch.testing.assert_close(sampled[mask.bool()], rollout.logprobs[mask.bool()], atol=1e-4, rtol=1e-4)


def test_training_makes_the_policy_stop_insulting(insulting_t5_state, prompts):
    trainer = make_trainer(insulting_t5_state)

    def insult_rate() -> float:
        rollouts = [trainer.rollout(prompts[i : i + 16]) for i in (0, 16)]
        insults = sum(((r.response_ids == INSULT_ID) * r.response_mask).sum().item() for r in rollouts)
        return insults / sum(r.response_mask.sum().item() for r in rollouts)

    torch.manual_seed(123)
    rate_before = insult_rate()
    seen: list[int] = []
    history = trainer.train(prompts, total_steps=30, on_step=lambda step, metrics: seen.append(step))
    torch.manual_seed(123)
    rate_after = insult_rate()

    assert seen == list(range(30))
    assert set(history[0]) >= {
        "reward_mean",
        "reward_std",
        "kl",
        "kl_coef",
        "entropy",
        "policy_loss",
        "value_loss",
        "clipfrac",
        "approx_kl",
        "returns_mean",
        "advantages_mean",
        "explained_variance",
        "response_length",
        "tokens_per_second",
        "non_score_reward",
    }
    reward_start = sum(m["reward_mean"] for m in history[:3]) / 3
    reward_end = sum(m["reward_mean"] for m in history[-5:]) / 5
    assert rate_before > 0.3
    assert rate_after < rate_before / 2
    assert reward_end > reward_start + 0.15
    assert max(m["kl"] for m in history) < trainer.ppo.kl_ceiling
    assert all(math.isfinite(m["policy_loss"]) and math.isfinite(m["value_loss"]) for m in history)


def test_nan_rewards_raise(insulting_t5_state, prompts):
    trainer = make_trainer(insulting_t5_state, reward_fn=lambda texts, prompts: torch.full((len(texts),), math.nan))
    with pytest.raises(PPOTrainingError, match="non-finite rewards"):
        trainer.train(prompts, total_steps=1)


def test_reward_of_the_wrong_shape_raises(insulting_t5_state, prompts):
    trainer = make_trainer(insulting_t5_state, reward_fn=lambda texts, prompts: torch.zeros(len(texts), 2))
    with pytest.raises(PPOTrainingError, match="shape"):
        trainer.step(prompts[:16])


def test_kl_past_the_ceiling_raises(insulting_t5_state, prompts):
    trainer = make_trainer(insulting_t5_state, kl_ceiling=1e-3)
    with pytest.raises(PPOTrainingError, match="kl_ceiling"):
        trainer.train(prompts, total_steps=5)


def test_a_policy_without_decoder_start_token_is_rejected():
    config = tiny_t5_config()
    del config.decoder_start_token_id  # transformers 5's T5Config() has none by default
    policy = get_peft_model(
        T5ForConditionalGeneration(config), LoraConfig(task_type=TaskType.SEQ_2_SEQ_LM, r=2)
    )
    with pytest.raises(ValueError, match="decoder_start_token_id"):
        PPOTrainer(
            policy, ValueHead(32), tiny_tokenizer(), avoid_insults, PPOSettings(), GenerationSettings(), "cpu"
        )


def test_bf16_autocast_is_refused_on_cpu(insulting_t5_state):
    with pytest.raises(ConfigError, match="ppo.mixed_precision 'bf16' needs a CUDA device"):
        make_trainer(insulting_t5_state, mixed_precision="bf16")


def test_a_policy_saved_in_bfloat16_trains_in_float32(tmp_path):
    model = T5ForConditionalGeneration(tiny_t5_config()).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "base16")
    tiny_tokenizer().save_pretrained(tmp_path / "base16")
    policy, _ = build_policy(str(tmp_path / "base16"), None, LoraSettings(r=2, alpha=4), "cpu")
    assert {param.dtype for param in policy.parameters()} == {torch.float32}


def test_empty_prompts_are_rejected(insulting_t5_state):
    trainer = make_trainer(insulting_t5_state)
    with pytest.raises(ValueError, match="no prompts"):
        trainer.train([], total_steps=1)
    with pytest.raises(ValueError, match="non-empty"):
        trainer.rollout([[5, 1], []])


def save_base_and_sft(tmp_path) -> PeftModel:
    """A tiny T5 in ``base/`` and an SFT adapter with a random non-zero update in ``sft/``."""
    torch.manual_seed(0)
    base = T5ForConditionalGeneration(tiny_t5_config())
    base.save_pretrained(tmp_path / "base")
    tiny_tokenizer().save_pretrained(tmp_path / "base")
    sft_lora = LoraConfig(
        task_type=TaskType.SEQ_2_SEQ_LM, r=4, lora_alpha=8, target_modules=["q", "v"], init_lora_weights=False
    )
    sft = get_peft_model(base, sft_lora)  # merging a non-zero update must change the outputs
    sft.save_pretrained(tmp_path / "sft")
    return sft


def test_build_policy_merges_sft_and_the_reference_is_the_sft_model(tmp_path, insulting_t5_state, prompts):
    sft = save_base_and_sft(tmp_path)
    inputs = {
        "input_ids": torch.tensor([prompts[0]]),
        "decoder_input_ids": torch.tensor([[0, 5, 9, 12]]),
    }
    sft.eval()
    with torch.no_grad():
        sft_logits = sft(**inputs).logits
        with sft.disable_adapter():
            base_logits = sft(**inputs).logits
    assert not torch.allclose(sft_logits, base_logits)

    lora = LoraSettings(r=8, alpha=16, dropout=0.0, target_modules=["q", "v"])
    policy, tokenizer = build_policy(str(tmp_path / "base"), tmp_path / "sft", lora, "cpu")
    assert isinstance(policy, PeftModel)
    assert tokenizer.convert_tokens_to_ids("insult") == INSULT_ID
    trainable = [name for name, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    # A (8x32) + B (32x8) on q and v of encoder self-, decoder self- and decoder cross-attention
    assert sum(p.numel() for p in policy.parameters() if p.requires_grad) == 6 * (8 * 32 + 32 * 8)
    policy.eval()
    with torch.no_grad():
        with policy.disable_adapter():
            reference_logits = policy(**inputs).logits
        policy_logits = policy(**inputs).logits
    torch.testing.assert_close(reference_logits, sft_logits, atol=1e-5, rtol=1e-5)  # reference = SFT
    torch.testing.assert_close(policy_logits, sft_logits, atol=1e-5, rtol=1e-5)  # fresh adapter: no change

    # save() writes safetensors that load() and load_value_head() read back into a fresh policy.
    def new_trainer(trained_policy: PeftModel, head: ValueHead) -> PPOTrainer:
        settings = PPOSettings(batch_size=4)
        generation = GenerationSettings(min_new_tokens=2, max_new_tokens=4)
        return PPOTrainer(trained_policy, head, tokenizer, avoid_insults, settings, generation, "cpu")

    trainer = new_trainer(policy, ValueHead(32, init_std=0.1))
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.fill_(0.05)  # as if trained
        trained_logits = policy(**inputs).logits
    assert not torch.allclose(trained_logits, sft_logits)
    trainer.kl_ctl.value, trainer.steps_done = 0.123, 7
    trainer.save(tmp_path / "ppo")
    assert (tmp_path / "ppo" / "adapter" / "adapter_model.safetensors").exists()
    head = load_value_head(tmp_path / "ppo" / "value_head.safetensors")
    torch.testing.assert_close(head.summary.weight, trainer.value_head.summary.weight)

    fresh_policy, _ = build_policy(str(tmp_path / "base"), tmp_path / "sft", lora, "cpu")
    fresh = new_trainer(fresh_policy, ValueHead(32))
    fresh.load(tmp_path / "ppo")
    assert (fresh.kl_ctl.value, fresh.steps_done) == (pytest.approx(0.123), 7)
    torch.testing.assert_close(fresh.value_head.summary.weight, trainer.value_head.summary.weight)
    fresh_policy.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh_policy(**inputs).logits, trained_logits)

    # A resume must train as the checkpoint did: other settings are refused by name (steps may grow).
    other = PPOTrainer(fresh_policy, ValueHead(32), tokenizer, avoid_insults,
                       PPOSettings(batch_size=4, target_kl=3.0, kl_horizon=500, steps=99),
                       GenerationSettings(min_new_tokens=2, max_new_tokens=4), "cpu")
    with pytest.raises(ConfigError, match=r"ppo.target_kl is 6.0 in the checkpoint but 3.0 now; "
                                          r"ppo.kl_horizon is 10000 in the checkpoint but 500 now\)") as refused:
        other.load(tmp_path / "ppo")
    assert "ppo.steps" not in str(refused.value)
    # A checkpoint written before the settings were recorded: its KL controller still tells.
    state_file = tmp_path / "ppo" / "trainer_state.json"
    state_file.write_text(json.dumps(json.loads(state_file.read_text()) | {"settings": None}))
    with pytest.raises(ConfigError, match=r"ppo.target_kl is 6.0 in the checkpoint but 3.0 now"):
        other.load(tmp_path / "ppo")


def test_folded_adapters_compute_the_same_function_and_put_the_weights_back(insulting_t5_state, prompts):
    trainer = make_trainer(insulting_t5_state)
    policy = trainer.policy
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.2)  # a trained adapter, so folding it in changes the weights
    inputs = {"input_ids": torch.tensor([prompts[0]]), "decoder_input_ids": torch.tensor([[0, 5, 9, 12]])}
    weights = {name: (p, p.detach().clone()) for name, p in policy.named_parameters() if "base_layer" in name}
    with torch.no_grad():
        expected = policy(**inputs).logits
        with folded_adapters(policy, policy.get_base_model().get_decoder()):  # the encoder keeps its adapters
            decoder_q = policy.get_base_model().get_decoder().block[0].layer[0].SelfAttention.q
            assert not any(p is decoder_q.base_layer.weight for p, _ in weights.values())  # a folded copy
            folded_decoder = policy(**inputs).logits
        with folded_adapters(policy, policy):
            folded_all = policy(**inputs).logits
    torch.testing.assert_close(folded_decoder, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(folded_all, expected, atol=1e-5, rtol=1e-5)
    for name, (param, saved) in weights.items():  # the same tensors, bit for bit
        assert dict(policy.named_parameters())[name] is param and torch.equal(param, saved), name
    assert all(p.requires_grad for name, p in policy.named_parameters() if "lora_" in name)
    with torch.no_grad(), reference_policy(policy):  # the reference is still the base
        reference = policy(**inputs).logits
    assert not torch.allclose(reference, expected)


def test_folded_adapters_put_every_requires_grad_flag_back(tmp_path, prompts):
    """peft's enable_adapters(True) marks every active adapter trainable; a frozen SFT adapter must stay frozen."""
    save_base_and_sft(tmp_path)
    lora = LoraSettings(r=8, alpha=16, dropout=0.0)
    policy, _ = build_policy(str(tmp_path / "base"), tmp_path / "sft", lora, "cpu", merge_sft=False)
    next(p for name, p in policy.named_parameters() if "lora_A.default" in name).requires_grad_(False)  # odd, kept
    flags = {name: param.requires_grad for name, param in policy.named_parameters()}
    assert any(".sft." in name for name in flags) and not any(flags[name] for name in flags if ".sft." in name)
    inputs = {"input_ids": torch.tensor([prompts[0]]), "decoder_input_ids": torch.tensor([[0, 5, 9, 12]])}
    with torch.no_grad(), folded_adapters(policy, policy):
        policy(**inputs)
    assert {name: param.requires_grad for name, param in policy.named_parameters()} == flags


# ---------------------------------------------------------------------------------------------
# Checkpoints, gradient accumulation, the missing-EOS penalty, a frozen SFT adapter
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("critic", ["head", "adapter"])
def test_a_resumed_run_continues_exactly_where_the_checkpoint_left_it(tmp_path, insulting_t5_state, prompts, critic):
    straight = make_trainer(insulting_t5_state, checkpoint_every=2, critic=critic)
    expected = straight.train(prompts, total_steps=5, checkpoint_dir=tmp_path / "straight")
    # keep_checkpoints=2: steps 4 and 5 (the last step always gets one) are left
    assert sorted(p.name for p in (tmp_path / "straight").iterdir()) == ["step-000004", "step-000005"]

    interrupted = make_trainer(insulting_t5_state, checkpoint_every=2, critic=critic)
    saved: list[str] = []
    interrupted.train(prompts, total_steps=3, checkpoint_dir=tmp_path / "resumed",
                      on_checkpoint=lambda path: saved.append(path.name))
    assert saved == ["step-000002", "step-000003"]
    # A process killed while writing the next checkpoint leaves only a hidden staging folder.
    (tmp_path / "resumed" / ".step-000004-abc").mkdir()
    assert latest_checkpoint(tmp_path / "resumed").name == "step-000003"

    torch.manual_seed(999)  # whatever the new process's global RNG holds, the checkpoint's wins
    resumed = make_trainer(insulting_t5_state, checkpoint_every=2, critic=critic)
    resumed.load_checkpoint(latest_checkpoint(tmp_path / "resumed"))
    assert resumed.steps_done == 3 and len(resumed.history) == 3
    history = resumed.train(prompts, total_steps=5, checkpoint_dir=tmp_path / "resumed")

    assert len(history) == 5
    for step, (got, want) in enumerate(zip(history, expected, strict=True)):
        for key in ("reward_mean", "kl", "kl_coef", "policy_loss", "value_loss"):
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-7), (step, key)
    for got, want in zip(resumed.trainable_params, straight.trainable_params, strict=True):  # the critic's too
        torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="more than"):
        resumed.train(prompts, total_steps=4)


def as_if_trained(trainer: PPOTrainer) -> PPOTrainer:
    """Non-zero LoRA B matrices and value head (the same for every trainer of the same state), so the
    policy differs from the reference and the values from 0."""
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in trainer.policy.named_parameters():
            if "lora_B" in name:
                param.copy_(0.2 * torch.randn(param.shape, generator=generator))
        weight = trainer.value_head.summary.weight
        weight.copy_(torch.randn(weight.shape, generator=generator))
    return trainer


def freeze_rollout(trainer: PPOTrainer, rollout) -> None:
    """Every step() of ``trainer`` trains on ``rollout`` instead of sampling."""
    trainer.rollout = lambda batch: rollout


def test_a_step_at_learning_rate_zero_matches_an_independent_computation(insulting_t5_state, prompts, monkeypatch):
    """step() on a frozen rollout with every learning rate at 0, against the per-token rewards, returns,
    whitened advantages and losses worked out here with loops over Python floats."""
    trainer = as_if_trained(make_trainer(insulting_t5_state, mini_batch_size=8, ppo_epochs=2, gamma=0.9))
    rollout = trainer.rollout(prompts[:16])
    freeze_rollout(trainer, rollout)
    for group in trainer.optimizer.param_groups:
        group["lr"] = 0.0
    calls: list[dict] = []
    real_policy_loss, real_value_loss = ppo_module.policy_loss, ppo_module.value_loss

    def recording_policy_loss(logprobs, old_logprobs, advantages, mask, cliprange):
        calls.append({"logprobs": logprobs.detach().clone(), "old_logprobs": old_logprobs, "advantages": advantages})
        return real_policy_loss(logprobs, old_logprobs, advantages, mask, cliprange)

    def recording_value_loss(values, old_values, returns, mask, cliprange_value):
        calls[-1] |= {"values": values.detach().clone(), "returns": returns}
        return real_value_loss(values, old_values, returns, mask, cliprange_value)

    monkeypatch.setattr(ppo_module, "policy_loss", recording_policy_loss)
    monkeypatch.setattr(ppo_module, "value_loss", recording_value_loss)
    metrics = trainer.step(prompts[:16])

    beta, gamma, lam = 0.05, 0.9, 0.95
    logprobs, ref_logprobs = rollout.logprobs.tolist(), rollout.ref_logprobs.tolist()
    values, scores = rollout.values.tolist(), rollout.scores.tolist()
    lengths = [int(n) for n in rollout.response_mask.sum(dim=1).tolist()]
    assert any(logprobs[b][0] != ref_logprobs[b][0] for b in range(16))  # the policy is not the reference
    advantages, returns = [], []
    for b, n in enumerate(lengths):
        rewards = [-beta * (logprobs[b][t] - ref_logprobs[b][t]) for t in range(n)]  # Ziegler et al.
        rewards[-1] += scores[b]
        row, advantage = [0.0] * n, 0.0
        for t in reversed(range(n)):
            next_value = values[b][t + 1] if t + 1 < n else 0.0
            advantage = rewards[t] + gamma * next_value - values[b][t] + gamma * lam * advantage
            row[t] = advantage
        advantages.append(row)
        returns.append([a + v for a, v in zip(row, values[b], strict=False)])
    flat = [a for row in advantages for a in row]
    mean = sum(flat) / len(flat)
    std = math.sqrt(sum((a - mean) ** 2 for a in flat) / (len(flat) - 1))
    whitened = [[(a - mean) / std for a in row] for row in advantages]

    assert len(calls) == 2 * 2  # epochs x mini-batches
    expected_pg, expected_vf = [], []
    for call in calls:
        rows = [next(b for b in range(16) if torch.equal(rollout.logprobs[b], old)) for old in call["old_logprobs"]]
        # lr 0: the weights never move, so every ratio is exactly 1 (and so in the first epoch)
        assert torch.equal(call["logprobs"], call["old_logprobs"])
        tokens = sum(lengths[b] for b in rows)
        for i, b in enumerate(rows):
            n = lengths[b]
            assert call["advantages"][i, :n].tolist() == pytest.approx(whitened[b], abs=1e-5)
            assert call["returns"][i, :n].tolist() == pytest.approx(returns[b], abs=1e-5)
        expected_pg.append(-sum(a for b in rows for a in whitened[b]) / tokens)
        expected_vf.append(0.5 * sum((v - r) ** 2 for b in rows
                                     for v, r in zip(values[b], returns[b], strict=False)) / tokens)
    assert metrics["clipfrac"] == 0.0 and metrics["approx_kl"] == 0.0
    assert metrics["policy_loss"] == pytest.approx(sum(expected_pg) / 4, abs=1e-6)
    assert metrics["value_loss"] == pytest.approx(sum(expected_vf) / 4, rel=1e-5)
    kl = [sum(logprobs[b][t] - ref_logprobs[b][t] for t in range(n)) for b, n in enumerate(lengths)]
    assert metrics["kl"] == pytest.approx(sum(kl) / 16, abs=1e-5)
    assert metrics["value_error"] == pytest.approx(
        math.sqrt(sum((v - r) ** 2 for b in range(16) for v, r in zip(values[b], returns[b], strict=False))
                  / sum(lengths)), rel=1e-5)


@pytest.mark.parametrize("critic", ["head", "adapter"])
def test_gradient_accumulation_gives_the_gradient_of_the_whole_mini_batch(insulting_t5_state, prompts, critic):
    rollout = as_if_trained(make_trainer(insulting_t5_state, critic=critic)).rollout(prompts[:16])
    assert len(set(rollout.response_mask.sum(dim=1).tolist())) > 1  # micro-batches of unequal token counts

    def gradients(accumulation: int) -> tuple[list[torch.Tensor], list[int]]:
        # one optimizer step; no clipping, which would hide a gradient k times too large
        trainer = as_if_trained(make_trainer(insulting_t5_state, mini_batch_size=16, ppo_epochs=1, max_grad_norm=1e9,
                                             gradient_accumulation_steps=accumulation, critic=critic))
        freeze_rollout(trainer, rollout)
        forward_rows: list[int] = []
        steps: list[list[torch.Tensor]] = []
        real_forward, real_step = trainer._logits_and_states, trainer.optimizer.step

        def counting_forward(prompt_ids, *args, **kwargs):
            forward_rows.append(prompt_ids.shape[0])
            return real_forward(prompt_ids, *args, **kwargs)

        def recording_step(*args, **kwargs):
            steps.append([param.grad.clone() for param in trainer.trainable_params])
            return real_step(*args, **kwargs)

        trainer._logits_and_states, trainer.optimizer.step = counting_forward, recording_step
        trainer.step(prompts[:16])
        assert len(steps) == 1
        return steps[0], forward_rows

    whole, whole_rows = gradients(1)
    accumulated, accumulated_rows = gradients(4)
    passes = 2 if critic == "adapter" else 1  # the critic's adapter makes a forward pass of its own
    assert whole_rows == [16] * passes and accumulated_rows == [4] * 4 * passes
    assert all(bool(grad.abs().sum() > 0) for grad in whole)
    for got, want in zip(accumulated, whole, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
    with pytest.raises(ValueError, match="mini_batch_size 8 cannot be split into ppo.gradient_accumulation_steps=3"):
        PPOSettings(mini_batch_size=8, gradient_accumulation_steps=3)


def test_missing_eos_penalty_lowers_only_the_scores_of_unfinished_responses(insulting_t5_state, prompts):
    def rollout_with(penalty):
        trainer = make_trainer(insulting_t5_state, missing_eos_penalty=penalty)
        torch.manual_seed(5)
        return trainer.rollout(prompts[:16])

    plain, penalised = rollout_with(None), rollout_with(2.0)
    assert plain.texts == penalised.texts  # same samples
    assert bool(plain.ended.any()) and bool((~plain.ended).any())
    torch.testing.assert_close(plain.scores, plain.rewards)
    torch.testing.assert_close(penalised.scores, plain.rewards - 2.0 * (~plain.ended).float())
    ended = plain.response_mask.sum(1).long() - 1
    assert torch.equal(plain.ended, plain.response_ids.gather(1, ended[:, None]).squeeze(1) == 1)


@pytest.mark.parametrize("critic", ["head", "adapter"])
def test_a_frozen_sft_adapter_stays_frozen_and_is_the_reference(tmp_path, insulting_t5_state, prompts, critic):
    """The 4-bit (QLoRA) layout, on CPU without quantization: SFT as a frozen adapter, PPO's on top."""
    save_base_and_sft(tmp_path)
    lora = LoraSettings(r=8, alpha=16, dropout=0.0)
    merged, _ = build_policy(str(tmp_path / "base"), tmp_path / "sft", lora, "cpu")
    policy, tokenizer = build_policy(str(tmp_path / "base"), tmp_path / "sft", lora, "cpu", merge_sft=False)
    assert set(policy.peft_config) == {"sft", "default"}
    trainable = {name for name, p in policy.named_parameters() if p.requires_grad}
    assert trainable and all(".default." in name for name in trainable)

    inputs = {"input_ids": torch.tensor([prompts[0]]), "decoder_input_ids": torch.tensor([[0, 5, 9, 12]])}
    merged.eval()
    policy.eval()
    with torch.no_grad():
        sft_logits = merged(**inputs).logits
        for name, param in policy.named_parameters():
            if "lora_B.default" in name:
                param.fill_(0.05)  # as if trained
        trained_logits = policy(**inputs).logits
        with reference_policy(policy):
            reference_logits = policy(**inputs).logits
        assert torch.equal(policy(**inputs).logits, trained_logits)  # both adapters back on
    torch.testing.assert_close(reference_logits, sft_logits, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(trained_logits, sft_logits)
    assert {name for name, p in policy.named_parameters() if p.requires_grad} == trainable

    with torch.no_grad(), folded_adapters(policy, policy):  # both adapters folded into the copies
        torch.testing.assert_close(policy(**inputs).logits, trained_logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(policy(**inputs).logits, trained_logits)

    trainer = PPOTrainer(policy, ValueHead(32), tokenizer, avoid_insults, PPOSettings(batch_size=4, critic=critic),
                         GenerationSettings(min_new_tokens=2, max_new_tokens=4), "cpu")
    if critic == "adapter":  # the critic's adapter works on top of the frozen SFT adapter, as the policy's does
        assert set(policy.peft_config) == {"sft", "default", "critic"}
        trainable |= {name.replace(".default.", ".critic.") for name in trainable}
        with torch.no_grad(), critic_view(policy):
            torch.testing.assert_close(policy(**inputs).logits, sft_logits, atol=1e-5, rtol=1e-5)  # its B is 0
    trainer.step(prompts[:4])  # sampling folds both adapters; the SFT adapter stays frozen
    assert {name for name, p in policy.named_parameters() if p.requires_grad} == trainable
    trainer.save(tmp_path / "ppo")
    saved = json.loads((tmp_path / "ppo" / "adapter" / "adapter_config.json").read_text())
    assert saved["r"] == 8  # the PPO adapter alone, at the folder's top level
    assert not (tmp_path / "ppo" / "adapter" / "sft").exists()


# ---------------------------------------------------------------------------------------------
# The critic's own adapter (ppo.critic = "adapter")
# ---------------------------------------------------------------------------------------------


def test_the_critic_adapter_moves_the_values_and_never_the_policy(insulting_t5_state, prompts):
    trainer = as_if_trained(make_trainer(insulting_t5_state, critic="adapter"))  # both adapters non-zero
    assert set(trainer.policy.peft_config) == {"default", "critic"}
    trainable = {name for name, p in trainer.policy.named_parameters() if p.requires_grad}
    assert {name.split(".")[-2] for name in trainable} == {"default", "critic"}  # lora_A.<adapter>.weight
    rollout = trainer.rollout(prompts[:16])
    # peft marks only active adapters trainable when it switches them; the reference pass must not stick
    assert {name for name, p in trainer.policy.named_parameters() if p.requires_grad} == trainable
    args = (rollout.prompt_ids, rollout.prompt_mask, rollout.response_ids)
    with torch.no_grad():
        for name, param in trainer.policy.named_parameters():
            if "lora_B.critic" in name:
                param.mul_(3.0)
        logprobs, values, _ = trainer._forward(*args)
        with reference_policy(trainer.policy):
            ref_logprobs, _, _ = trainer._forward(*args)
    mask = rollout.response_mask.bool()
    # The policy, its sampler and the reference do not see the critic's adapter; the values do.
    torch.testing.assert_close(logprobs[mask], rollout.logprobs[mask])
    torch.testing.assert_close(ref_logprobs[mask], rollout.ref_logprobs[mask])
    assert not torch.allclose(values[mask], rollout.values[mask])
    plain = make_trainer(insulting_t5_state)  # a policy that never had a critic adapter, same PPO adapter
    weights = dict(trainer.policy.named_parameters())
    with torch.no_grad():
        for name, param in plain.policy.named_parameters():
            param.copy_(weights[name])
        plain_logprobs, _, _ = plain._forward(*args)
    torch.testing.assert_close(plain_logprobs[mask], rollout.logprobs[mask])


def test_the_value_loss_trains_the_critic_adapter_and_the_policy_loss_the_policy_adapter(insulting_t5_state, prompts):
    rollout = as_if_trained(make_trainer(insulting_t5_state, critic="adapter")).rollout(prompts[:16])

    def first_gradients(vf_coef: float) -> dict[str, torch.Tensor]:
        trainer = as_if_trained(make_trainer(insulting_t5_state, critic="adapter", vf_coef=vf_coef,
                                             mini_batch_size=16, ppo_epochs=1, max_grad_norm=1e9))
        trainer.rollout(prompts[:16])  # a real rollout first: its reference pass switches adapters off and on
        freeze_rollout(trainer, rollout)
        names = {id(param): name for name, param in trainer.policy.named_parameters()}
        names |= {id(param): f"value_head.{name}" for name, param in trainer.value_head.named_parameters()}
        grads: dict[str, torch.Tensor] = {}
        real_step = trainer.optimizer.step

        def recording_step(*args, **kwargs):
            grads.update({names[id(p)]: torch.zeros_like(p) if p.grad is None else p.grad.clone()
                          for p in trainer.trainable_params})
            return real_step(*args, **kwargs)

        trainer.optimizer.step = recording_step
        trainer.step(prompts[:16])
        return grads

    with_values, without_values = first_gradients(1.0), first_gradients(0.0)
    policy = [name for name in with_values if ".default." in name]
    critic = [name for name in with_values if ".critic." in name or name.startswith("value_head.")]
    assert policy and any(".critic." in name for name in critic) and len(policy) + len(critic) == len(with_values)
    for name in policy:  # the value loss does not reach the policy's adapter
        assert bool(with_values[name].abs().sum() > 0), name
        torch.testing.assert_close(with_values[name], without_values[name], rtol=1e-5, atol=1e-8)
    for name in critic:  # the value loss alone trains the critic: its adapter and its head
        assert bool(with_values[name].abs().sum() > 0), name
        assert not bool(without_values[name].abs().sum() > 0), name


def test_the_critic_adapter_is_saved_apart_and_a_resume_without_it_is_refused(tmp_path, insulting_t5_state, prompts):
    trainer = as_if_trained(make_trainer(insulting_t5_state, critic="adapter"))
    trainer.save(tmp_path / "ppo")
    policy_adapter = load_file(str(tmp_path / "ppo" / "adapter" / "adapter_model.safetensors"))
    assert policy_adapter and not any("critic" in name for name in policy_adapter)  # what serving merges
    assert not (tmp_path / "ppo" / "adapter" / "critic").exists()
    critic = load_file(str(tmp_path / "ppo" / "critic_adapter.safetensors"))
    assert critic and all("lora_" in name for name in critic)

    fresh = make_trainer(insulting_t5_state, critic="adapter")
    fresh.load(tmp_path / "ppo")
    rollout = trainer.rollout(prompts[:8])
    with torch.no_grad():
        args = (rollout.prompt_ids, rollout.prompt_mask, rollout.response_ids)
        torch.testing.assert_close(fresh._forward(*args)[1], trainer._forward(*args)[1])  # the same values
    with pytest.raises(ConfigError, match="ppo.critic is 'adapter' in the checkpoint but 'head' now"):
        make_trainer(insulting_t5_state).load(tmp_path / "ppo")


@pytest.mark.parametrize("critic", ["head", "adapter"])
def test_gradient_checkpointing_changes_memory_not_the_result(insulting_t5_state, prompts, critic):
    def two_steps(**overrides):
        trainer = make_trainer(insulting_t5_state, critic=critic, **overrides)
        history = trainer.train(prompts, total_steps=2)
        assert not trainer.policy.training  # back in eval mode after the update
        return history, [p.detach().clone() for p in trainer.trainable_params]

    plain, plain_weights = two_steps()
    checkpointed, checkpointed_weights = two_steps(gradient_checkpointing=True)
    for got, want in zip(checkpointed, plain, strict=True):
        assert got["policy_loss"] == pytest.approx(want["policy_loss"], rel=1e-4, abs=1e-6)
        assert got["value_loss"] == pytest.approx(want["value_loss"], rel=1e-4, abs=1e-6)
    for got, want in zip(checkpointed_weights, plain_weights, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)

