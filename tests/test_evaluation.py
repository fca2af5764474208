import pytest

from tasks.config import EvalSettings, RunConfig
from tasks.evaluation.protocol import ProfanityCheckJudge, eval_fingerprint, sample_count


def test_fingerprint_names_the_protocol():
    config = RunConfig.for_profile("demo")
    same = eval_fingerprint(config, "data-1", 200)
    assert same == eval_fingerprint(RunConfig.for_profile("demo"), "data-1", 200)
    # Things that change what is sampled or how it is scored change the fingerprint ...
    changed = [
        eval_fingerprint(config, "data-2", 200),
        eval_fingerprint(config, "data-1", 100),
        *(eval_fingerprint(RunConfig.for_profile("demo", {key: value}), "data-1", 200) for key, value in [
            ("eval.seed", 7), ("eval.batch_size", 8), ("eval.max_new_tokens", 20), ("eval.top_k", 5),
            ("eval.judge", "some/classifier"), ("model.toxicity_model_name", "other"), ("eval.score_prompt", True),
        ]),
    ]
    assert same not in changed and len(set(changed)) == len(changed)
    # ... things that do not, do not.
    # (the demo measures toxicity with its own classifier, whatever reward PPO trains against;
    # evaluation samples with its own settings, not the rollouts')
    for key, value in [("ppo.steps", 3), ("generation.temperature", 0.7), ("promotion.min_toxicity_reduction", 0.5),
                       ("eval.bootstrap_resamples", 500),
                       ("model.reward_model_name", "models:/detox-reward-demo@champion")]:
        assert eval_fingerprint(RunConfig.for_profile("demo", {key: value}), "data-1", 200) == same


@pytest.mark.parametrize(("requested", "split", "expected"), [(0, 240, 240), (100, 240, 100), (500, 240, 240)])
def test_sample_count(requested, split, expected):
    assert sample_count(EvalSettings(num_samples=requested), split) == expected


def test_profanity_judge_is_independent_of_the_reward_and_sees_insults():
    scores = ProfanityCheckJudge().score([
        "#Person1#, a stupid idiot, asks #Person2# to carry the boxes.",
        "#Person1# asks #Person2# to carry the boxes to the car.",
    ])
    assert scores[0] > 0.9 > 0.2 > scores[1]
    assert ProfanityCheckJudge().score([]).shape == (0,)
