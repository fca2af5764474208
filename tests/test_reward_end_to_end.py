"""A reward model trained from preferences through Airflow, registered, and used as PPO's reward."""

import json

import mlflow
import pandas as pd
import pytest
from support import TEST_RUN

from tasks.config import RewardRunConfig
from tasks.local.demo import run_pipeline, run_reward_pipeline
from tasks.registry import tracking
from tasks.rewards.preferences import PreferenceError
from tasks.steps.context import StepContext

pytestmark = pytest.mark.slow

REWARD = RewardRunConfig.for_profile("demo").registered_model_name


@pytest.fixture(scope="module")
def registered_reward(demo):
    return run_reward_pipeline("airflow")


def test_reward_dag_registers_a_model_that_ranks_held_out_pairs(registered_reward):
    report = registered_reward
    assert report["decision"] == "register"
    assert report["accuracy"] > 0.9 and report["margin_mean"] > 0
    assert report["records"] == 500 and report["malformed_records"] == 0
    assert report["model_uri"] == f"models:/{REWARD}@champion"
    version = tracking.client().get_model_version_by_alias(REWARD, "champion")
    assert float(version.tags["heldout_accuracy"]) == pytest.approx(report["accuracy"], abs=1e-6)
    assert version.tags["preferences_source"] == "s3://detox-demo/preferences/rankings.jsonl"
    assert version.tags["airflow.dag_id"] == "reward_model_train"
    train_loss = tracking.client().get_metric_history(report["mlflow_run_id"], "train/loss")
    assert len(train_loss) >= 2 and train_loss[-1].value < train_loss[0].value

    # Another service loads it by alias and scores prompt + response.
    served = mlflow.pyfunc.load_model(f"models:/{REWARD}@champion")
    prompt = "\nSummarize the following conversation.\n\n#Person1#: Hi.\n#Person2#: Hello.\n\nSummary:\n"
    polite, rude = served.predict(pd.DataFrame({
        "prompt": [prompt, prompt],
        "response": ["#Person1# greets #Person2#.", "#Person1#, a stupid idiot, greets #Person2#."],
    }))
    assert polite > rude


def test_a_run_keeps_the_reward_version_it_started_with(registered_reward, tmp_path):
    """A retried ppo_train must not switch rewards when the alias moves or vanishes meanwhile."""
    from tasks.rewards.reward_model import resolve_reward_model

    uri = f"models:/{REWARD}@champion"
    folder, tags = resolve_reward_model(uri, tmp_path / "reward-model")
    version = tracking.client().get_model_version_by_alias(REWARD, "champion").version
    assert tags["reward.model_uri"] == f"models:/{REWARD}/{version}"
    tracking.client().delete_registered_model_alias(REWARD, "champion")
    try:
        assert resolve_reward_model(uri, tmp_path / "reward-model") == (folder, tags)
        with pytest.raises(ValueError, match="no version with alias 'champion'"):
            resolve_reward_model(uri, tmp_path / "another-run")
    finally:
        tracking.client().set_registered_model_alias(REWARD, "champion", version)


def test_detox_retrain_with_the_registered_reward_lowers_toxicity_under_the_judge(registered_reward):
    # 32 PPO steps (the demo runs 70). 16 were enough on the earlier hosts (the judge's drop about -38%,
    # its 95% interval's top about -0.05), not on an AVX-512 one: -12%, the interval's top +0.006.
    report = run_pipeline("airflow", {
        "ppo.steps": 32,
        **TEST_RUN,
        "model.reward_model_name": f"models:/{REWARD}@champion",
        "registered_model_name": "detox-summarizer-prefreward-demo",
    })
    assert report["judge_after"] < report["judge_before"]
    metrics = tracking.client().get_run(report["mlflow_run_id"]).data.metrics
    assert metrics["promotion/judge_change_ci_high"] < 0  # the independent judge's drop is significant
    assert report["toxicity_after"] < report["toxicity_before"]
    assert report["decision"] == "promote"
    tags = tracking.client().get_run(report["mlflow_run_id"]).data.tags
    version = tracking.client().get_model_version_by_alias(REWARD, "champion")
    assert tags["reward.model_uri"] == f"models:/{REWARD}/{version.version}"


def test_preferences_without_a_usable_pair_fail_before_training(demo, tmp_path):
    from tasks.steps import reward_model_train

    bad = tmp_path / "rankings.jsonl"
    bad.write_text("\n".join(json.dumps(record) for record in [
        {"prompt": "p", "responses": ["a", "b", "c"], "ranking": [1, 2]},
        {"prompt": "p", "responses": ["a", ""], "ranking": [1, 0]},
        {"prompt": "p", "responses": ["a", "b"], "ranking": [1, 1]},
    ]) + "\n")
    config = RewardRunConfig.for_profile("demo", {"data.source": str(bad)})
    ctx = StepContext(run_key="no-usable-pairs", dag_id="reward_model_train")
    with pytest.raises(PreferenceError, match=r"no usable preference pair.*line 1: 2 ranks for 3 responses.*"
                                              r"line 2: empty response text"):
        reward_model_train.load_preferences(config, ctx)
    assert not (config.run_dir(ctx.run_key) / "pairs").exists()
