"""Reward models from preferences: splitting, encoding, training with TRL, scoring, the gate."""

import json
import math
import random

import pytest
import torch
from support import tiny_classifier

from tasks.config import ConfigError, RewardGateSettings, RewardRunConfig, RewardTrainingSettings, RunConfig
from tasks.embedded.reward import build_embedded_reward
from tasks.embedded.world import contains_insult, preference_records
from tasks.io.models import RewardModel, load_reward_tokenizer
from tasks.rewards.preferences import Pair, build_pairs
from tasks.rewards.reward_model import (
    REWARD_MARKER,
    encode_pairs,
    evaluate_pairs,
    resolve_reward_model,
    split_pairs,
    train_reward_model,
)
from tasks.steps.reward_model_train import decide

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def reward_paths(embedded, detox_home):
    return build_embedded_reward(home=detox_home)


@pytest.fixture(scope="module")
def pairs(reward_paths):
    records = [json.loads(line) for line in reward_paths.preferences.read_text().splitlines()]
    return build_pairs(list(enumerate(records[:240], start=1))).pairs


@pytest.fixture(scope="module")
def trained(pairs, reward_paths, tmp_path_factory):
    train, test = split_pairs(pairs, test_size=0.2, seed=0)
    settings = RewardTrainingSettings(base_model=str(reward_paths.reward_base), learning_rate=1e-3, batch_size=16,
                                      gradient_accumulation_steps=1, epochs=2)
    logged: list[tuple[dict, int]] = []
    out = tmp_path_factory.mktemp("reward") / "model"
    metrics = train_reward_model(settings, train, out, device="cpu", on_log=lambda m, step: logged.append((m, step)))
    return out, train, test, metrics, logged


def test_embedded_preferences_always_prefer_the_polite_summary(reward_paths):
    records = [json.loads(line) for line in reward_paths.preferences.read_text().splitlines()]
    assert len(records) == 500
    assert {len(r["responses"]) for r in records} == {2, 3, 4}  # binary pairs, rankings of 3 and of 4
    for record in records:
        best = 1 if len(record["responses"]) == 2 else min(record["ranking"])
        for text, rank in zip(record["responses"], record["ranking"], strict=True):
            assert contains_insult(text) != (rank == best), (text, rank)
    # The same seed gives the same records.
    assert preference_records(random.Random(3), 5) == preference_records(random.Random(3), 5)


def test_split_keeps_each_records_pairs_together_and_is_deterministic(pairs):
    train, test = split_pairs(pairs, test_size=0.2, seed=0)
    assert len(train) + len(test) == len(pairs)
    assert not {p.line for p in train} & {p.line for p in test}
    assert round(0.2 * len({p.line for p in pairs})) == len({p.line for p in test})
    assert split_pairs(pairs, 0.2, 0) == (train, test)
    assert split_pairs(pairs, 0.2, 1) != (train, test)
    with pytest.raises(ValueError, match="at least 2"):
        split_pairs([p for p in pairs if p.line == pairs[0].line], 0.2, 0)


def test_long_prompts_lose_their_beginning_not_the_response(reward_paths):
    tokenizer = load_reward_tokenizer(str(reward_paths.reward_base))
    pair = Pair(prompt="hello there " * 400, chosen="A kind summary.", rejected="You stupid idiot.", line=1)
    encoded = encode_pairs(tokenizer, [pair], max_length=64)
    chosen, rejected = encoded[0]["chosen_ids"], encoded[0]["rejected_ids"]
    assert len(chosen) == len(rejected) == 64
    assert tokenizer.decode(chosen, skip_special_tokens=True).endswith("A kind summary.")
    assert tokenizer.decode(rejected, skip_special_tokens=True).endswith("You stupid idiot.")


def test_trained_reward_model_ranks_held_out_pairs(trained):
    out, train, test, metrics, logged = trained
    assert json.loads((out / REWARD_MARKER).read_text())["input"] == "prompt + response"
    assert not list(out.parent.glob(".model-*"))  # no staging folder left
    assert metrics["train_loss"] < math.log(2)  # below chance
    losses = [m["loss"] for m, _ in logged if "loss" in m]
    assert losses[-1] < losses[0]
    summary, margins = evaluate_pairs(out, test)
    assert summary.pairs == len(test) == len(margins)
    assert summary.accuracy > 0.9
    assert summary.margin_mean > 0


def test_scalar_reward_scores_prompt_and_response_and_has_no_toxicity(trained, pairs):
    out, *_ = trained
    scorer = RewardModel(str(out))
    assert scorer.scalar
    pair = pairs[0]
    joined = scorer.logits([pair.prompt + pair.chosen])[:, 0]
    torch.testing.assert_close(scorer.reward([pair.chosen], [pair.prompt]), joined)
    polite, rude = scorer.reward([pair.chosen, pair.rejected], [pair.prompt] * 2)
    assert polite > rude
    with pytest.raises(ValueError, match="one prompt per response"):
        scorer.reward([pair.chosen])
    with pytest.raises(ValueError, match="has no label 'hate'.*single output"):
        scorer.toxicity([pair.chosen])


def test_a_failed_training_leaves_no_model_folder(tmp_path):
    """Training that fails once under way (its staging folder and the trainer's output exist) leaves
    neither a model folder nor its staging folder behind. A tiny one-output encoder made from a config."""
    base = tiny_classifier(tmp_path / "encoder", labels=None)
    pairs = [Pair(prompt=f"summarize : # person1 hi {i}", chosen="thanks for help", rejected="you stupid idiot",
                  line=i) for i in range(8)]
    staging_seen = []

    def fail_once_training_ran(metrics, step):
        staging_seen.extend(path.name for path in (tmp_path / "out").iterdir())
        raise RuntimeError("injected: worker lost during training")

    settings = RewardTrainingSettings(base_model=str(base), batch_size=4, epochs=1)
    with pytest.raises(RuntimeError, match="injected"):
        train_reward_model(settings, pairs, tmp_path / "out" / "model", device="cpu", on_log=fail_once_training_ran)
    assert staging_seen and all(name.startswith(".model-") for name in staging_seen)  # it did fail midway
    assert list((tmp_path / "out").iterdir()) == []


def test_gate_registers_only_at_or_above_the_bar():
    evaluation = {"accuracy": 0.95, "pairs": 100, "margin_mean": 2.0}
    assert decide(evaluation, RewardGateSettings(min_accuracy=0.9))["register"]
    refused = decide(evaluation, RewardGateSettings(min_accuracy=0.97))
    assert not refused["register"]
    assert any(r.startswith("FAIL accuracy_at_least_bar") and "0.9500" in r for r in refused["reasons"])
    assert not decide({**evaluation, "accuracy": math.nan}, RewardGateSettings())["register"]


def test_reward_config_names_unknown_and_bad_fields():
    with pytest.raises(ConfigError, match="unknown field 'training.lr'"):
        RewardRunConfig.for_profile("demo", {"training.lr": 1e-3})
    with pytest.raises(ConfigError, match="gate.min_accuracy"):
        RewardRunConfig.for_profile("demo", {"gate.min_accuracy": 1.5})


def test_a_registered_reward_needs_a_separate_toxicity_classifier():
    with pytest.raises(ConfigError, match="toxicity_model_name"):
        RunConfig.for_profile("production", {"model.reward_model_name": "models:/detox-reward@champion"})
    config = RunConfig.for_profile("production", {"model.reward_model_name": "models:/detox-reward@champion",
                                                  "model.toxicity_model_name": "some/hate-classifier"})
    assert config.model.toxicity_scorer == "some/hate-classifier"


def test_reward_references_resolve(tmp_path, monkeypatch):
    assert resolve_reward_model("facebook/roberta-hate-speech-dynabench-r4-target", tmp_path / "r")[0] == (
        "facebook/roberta-hate-speech-dynabench-r4-target")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    with pytest.raises(ValueError, match="no version with alias 'champion'"):
        resolve_reward_model("models:/no-such-reward@champion", tmp_path / "r")
    assert not (tmp_path / "r").exists()
