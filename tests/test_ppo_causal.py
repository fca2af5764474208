"""The PPO trainer on a causal (Llama-architecture) policy, the TinyLlama seed's family.

A tiny Llama (hidden size 32, one layer, grouped-query attention) with a word-level
vocabulary is taught for a fraction of a second to answer any prompt with "insult" in
about 40% of its words. Prompts have different lengths, so the left padding of the
batched rollout is exercised.
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, TaskType, get_peft_model
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from tasks.config import GenerationSettings, LoraSettings, PPOSettings
from tasks.io.models import pad_prompts, special_tokens
from tasks.rl.policy import ValueHead, build_policy, reference_policy
from tasks.rl.trainer import PPOTrainer

WORDS = ["insult"] + [f"w{i}" for i in range(1, 61)]
VOCAB = {"<unk>": 0, "<s>": 1, "</s>": 2} | {word: i + 3 for i, word in enumerate(WORDS)}
INSULT_ID, BOS, EOS = VOCAB["insult"], 1, 2


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.WordLevel(vocab=VOCAB, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    # Llama's convention: no pad token of its own; the trainer pads with EOS on the left.
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>", padding_side="left"
    )


def tiny_llama_config() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(VOCAB), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        bos_token_id=BOS, eos_token_id=EOS, tie_word_embeddings=False,
    )


@pytest.fixture(scope="module")
def insulting_llama_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config())
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(2)
    for _ in range(80):
        prompt = torch.randint(3, len(VOCAB), (32, 6), generator=generator)
        response = torch.randint(3, len(VOCAB), (32, 8), generator=generator)
        response[torch.rand(32, 8, generator=generator) < 0.4] = INSULT_ID
        response[:, -1] = EOS
        input_ids = torch.cat([torch.full((32, 1), BOS), prompt, response], dim=1)
        labels = input_ids.clone()
        labels[:, :7] = -100  # the loss covers the response only
        loss = model(input_ids=input_ids, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.state_dict()


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    tokenizer = tiny_tokenizer()
    generator = torch.Generator().manual_seed(1)
    lengths = torch.randint(3, 8, (32,), generator=generator).tolist()
    texts = [" ".join(WORDS[j] for j in torch.randint(1, len(WORDS), (n,), generator=generator).tolist())
             for n in lengths]
    return [tokenizer(text).input_ids for text in texts]


def avoid_insults(texts: list[str], prompts: list[str]) -> torch.Tensor:
    def share(text: str) -> float:
        words = text.split()
        return sum(word == "insult" for word in words) / len(words) if words else 1.0

    return torch.tensor([-share(text) for text in texts])


def make_trainer(state, **ppo_overrides) -> PPOTrainer:
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config())
    model.load_state_dict(state)
    lora = LoraConfig(task_type=TaskType.CAUSAL_LM, r=8, lora_alpha=16, lora_dropout=0.0)
    settings = {"learning_rate": 1e-2, "batch_size": 16, "mini_batch_size": 8, "ppo_epochs": 2,
                "init_kl_coef": 0.05, "target_kl": 4.0, "kl_ceiling": 40.0}
    return PPOTrainer(
        get_peft_model(model, lora), ValueHead(32), tiny_tokenizer(), avoid_insults,
        PPOSettings(**(settings | ppo_overrides)), GenerationSettings(min_new_tokens=6, max_new_tokens=10), "cpu",
    )


def test_prompts_are_left_padded_with_eos_for_a_causal_policy(insulting_llama_state):
    trainer = make_trainer(insulting_llama_state)
    assert trainer.tokens.decoder_start is None and trainer.tokens.pad == EOS
    ids, mask = pad_prompts([[1, 5, 6], [1, 7]], trainer.tokens)
    assert ids.tolist() == [[1, 5, 6], [EOS, 1, 7]]
    assert mask.tolist() == [[1, 1, 1], [0, 1, 1]]


@pytest.mark.parametrize("critic", ["head", "adapter"])
def test_rollout_logprobs_are_those_sampled_from_and_ignore_the_padding(
    insulting_llama_state, prompts, sampling_spy, critic
):
    trainer = make_trainer(insulting_llama_state, critic=critic)
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():  # a critic that gives non-zero values, from its own adapter's states if it has one
        trainer.value_head.summary.weight.copy_(torch.randn(trainer.value_head.summary.weight.shape,
                                                            generator=generator))
        for name, param in trainer.policy.named_parameters():
            if "lora_B.critic" in name:
                param.copy_(0.2 * torch.randn(param.shape, generator=generator))
    spy = sampling_spy(trainer.policy)
    rollout = trainer.rollout(prompts[:16])
    ids, mask = rollout.response_ids, rollout.response_mask
    lengths = mask.sum(1).long()
    assert len({len(p) for p in prompts[:16]}) > 1  # the batch really is left-padded
    assert any(rollout.ended) and bool((lengths <= rollout.length_budget).all())
    assert len(spy.steps) == int(lengths.max()) and spy.batch_sizes[0] == 16  # one decoding loop
    sampled = spy.logprobs(ids, lengths.tolist(), temperature=1.0)
    torch.testing.assert_close(sampled[mask.bool()], rollout.logprobs[mask.bool()], atol=1e-4, rtol=1e-4)

    # The prompt is context only: a sample scored alone gives the same log-probs and values
    # as inside the padded batch.
    row = min(range(16), key=lambda r: len(prompts[r]))
    alone_ids, alone_mask = pad_prompts([prompts[row]], trainer.tokens)
    with torch.no_grad():
        logprobs, values, _ = trainer._forward(alone_ids, alone_mask, ids[row : row + 1])
    valid = mask[row].bool()
    torch.testing.assert_close(logprobs[0][valid], rollout.logprobs[row][valid], atol=1e-5, rtol=1e-5)
    assert bool(values[0][valid].abs().min() > 0)
    torch.testing.assert_close(values[0][valid], rollout.values[row][valid], atol=1e-5, rtol=1e-5)
    # and at the start the reference (PPO adapter off) is the policy itself
    torch.testing.assert_close(rollout.ref_logprobs[mask.bool()], rollout.logprobs[mask.bool()])


def test_training_makes_the_causal_policy_stop_insulting(insulting_llama_state, prompts):
    trainer = make_trainer(insulting_llama_state)

    def insult_rate() -> float:
        rollouts = [trainer.rollout(prompts[i : i + 16]) for i in (0, 16)]
        insults = sum(((r.response_ids == INSULT_ID) * r.response_mask).sum().item() for r in rollouts)
        return insults / sum(r.response_mask.sum().item() for r in rollouts)

    torch.manual_seed(123)
    before = insult_rate()
    history = trainer.train(prompts, total_steps=25)
    torch.manual_seed(123)
    after = insult_rate()
    assert before > 0.3
    assert after < before / 2
    assert max(m["kl"] for m in history) < trainer.ppo.kl_ceiling


def test_build_policy_reads_a_causal_checkpoint_and_targets_llama_projections(tmp_path, insulting_llama_state):
    model = LlamaForCausalLM(tiny_llama_config())
    model.load_state_dict(insulting_llama_state)
    model.save_pretrained(tmp_path / "base")
    tiny_tokenizer().save_pretrained(tmp_path / "base")
    sft = LoraConfig(task_type=TaskType.CAUSAL_LM, r=4, lora_alpha=8, init_lora_weights=False)
    get_peft_model(model, sft).save_pretrained(tmp_path / "sft")

    policy, tokenizer = build_policy(str(tmp_path / "base"), tmp_path / "sft", LoraSettings(r=8, alpha=16), "cpu")
    assert tokenizer.padding_side == "left" and special_tokens(policy, tokenizer).pad == EOS
    trainable = [name for name, p in policy.named_parameters() if p.requires_grad]
    assert trainable and {name.split(".")[-4] for name in trainable} == {"q_proj", "v_proj"}
    inputs = torch.tensor([[BOS, 5, 6, 7]])
    policy.eval()
    with torch.no_grad(), reference_policy(policy):
        reference = policy(input_ids=inputs).logits
    with torch.no_grad():
        assert torch.equal(policy(input_ids=inputs).logits, reference)  # fresh PPO adapter: no change yet


def test_a_chat_models_end_of_turn_token_ends_its_responses(tmp_path, insulting_llama_state, prompts):
    """``model.eos_token`` (TinyLlama-Chat's ``<|im_end|>``): here "insult", which the tiny model says often."""
    model = LlamaForCausalLM(tiny_llama_config())
    model.load_state_dict(insulting_llama_state)
    model.save_pretrained(tmp_path / "base")
    tiny_tokenizer().save_pretrained(tmp_path / "base")
    lora = LoraSettings(r=8, alpha=16)
    with pytest.raises(ValueError, match="'<|im_end|>' is not a token"):
        build_policy(str(tmp_path / "base"), None, lora, "cpu", eos_token="<|im_end|>")

    policy, tokenizer = build_policy(str(tmp_path / "base"), None, lora, "cpu", eos_token="insult")
    assert special_tokens(policy, tokenizer).eos == INSULT_ID
    trainer = PPOTrainer(policy, ValueHead(32), tokenizer, avoid_insults, PPOSettings(batch_size=16),
                         GenerationSettings(min_new_tokens=6, max_new_tokens=10), "cpu")
    rollout = trainer.rollout(prompts[:16])
    lengths = rollout.response_mask.sum(dim=1).long()
    assert int(rollout.ended.sum()) >= 8  # about 40% of the tiny model's words are "insult"
    for row in range(16):
        response = rollout.response_ids[row, : lengths[row]].tolist()
        assert INSULT_ID not in response[:-1]  # nothing after the first end of turn is kept
        assert bool(rollout.ended[row]) == (response[-1] == INSULT_ID)
