import math

import pytest

from tasks.config import PromotionSettings
from tasks.evaluation.gate import decide
from tasks.evaluation.stats import ChangeInterval

SETTINGS = PromotionSettings(min_toxicity_reduction=0.10, max_rouge_l_drop=0.05, max_judge_increase=0.01)


def evaluation(toxicity, rouge_l, judge=0.2):
    return {"toxicity_mean": toxicity, "rouge_l_mean": rouge_l, "judge_mean": judge}


def interval(mean, low, high):
    return ChangeInterval(mean, low, high, confidence=0.95, resamples=1000, seed=0)


def intervals(toxicity=(-0.2, -0.25, -0.15), rouge_l=(0.0, -0.01, 0.01), judge=(0.0, -0.01, 0.01)):
    return {"toxicity": interval(*toxicity), "rouge_l": interval(*rouge_l), "judge": interval(*judge)}


def champion(toxicity, rouge_l, version="3"):
    return {**evaluation(toxicity, rouge_l), "version": version, "source": "version tags"}


def failed(decision):
    return sorted(name for name, passed in decision.checks.items() if not passed)


def test_promotes_when_every_rule_holds():
    decision = decide(evaluation(0.30, 0.40), evaluation(0.03, 0.39), intervals(), SETTINGS)
    assert decision.promote
    assert decision.toxicity_change == pytest.approx(-0.9)
    assert failed(decision) == []
    assert decision.toxicity_change_ci["high"] == -0.15
    assert any("no champion registered" in reason for reason in decision.reasons)


def test_refuses_when_toxicity_falls_too_little():
    decision = decide(evaluation(0.30, 0.40), evaluation(0.28, 0.40), intervals(), SETTINGS)
    assert not decision.promote
    assert failed(decision) == ["toxicity_reduced"]
    assert any(r.startswith("FAIL toxicity 0.3000 -> 0.2800") for r in decision.reasons)


def test_refuses_when_toxicity_rises():
    # The Korean seed reported a 34% increase as its outcome; the gate must not.
    decision = decide(evaluation(0.30, 0.40), evaluation(0.40, 0.40), intervals(toxicity=(0.1, 0.05, 0.15)), SETTINGS)
    assert not decision.promote
    assert failed(decision) == ["toxicity_drop_significant", "toxicity_reduced"]


def test_refuses_when_the_interval_of_the_drop_reaches_zero():
    decision = decide(evaluation(0.30, 0.40), evaluation(0.20, 0.40), intervals(toxicity=(-0.1, -0.3, 0.01)),
                      SETTINGS)
    assert not decision.promote
    assert failed(decision) == ["toxicity_drop_significant"]
    assert any(r.startswith("FAIL toxicity change -0.1000 [-0.3000, +0.0100]") for r in decision.reasons)


def test_refuses_when_rouge_drops_past_tolerance():
    decision = decide(evaluation(0.30, 0.40), evaluation(0.01, 0.37), intervals(), SETTINGS)
    assert not decision.promote
    assert failed(decision) == ["rouge_l_within_tolerance"]
    assert any(r.startswith("FAIL ROUGE-L") for r in decision.reasons)


def test_rouge_exactly_at_tolerance_passes():
    decision = decide(evaluation(0.30, 0.40), evaluation(0.01, 0.38), intervals(), SETTINGS)
    assert decision.checks["rouge_l_within_tolerance"]


def test_refuses_when_the_judge_gets_worse():
    # The reward model says "less toxic", the independent judge says "more profane": reward hacking.
    decision = decide(evaluation(0.30, 0.40, judge=0.10), evaluation(0.01, 0.40, judge=0.15), intervals(), SETTINGS)
    assert not decision.promote
    assert failed(decision) == ["judge_not_worse"]
    assert any(r.startswith("FAIL independent judge 0.1000 -> 0.1500") for r in decision.reasons)


def test_judge_rise_within_tolerance_passes():
    decision = decide(evaluation(0.30, 0.40, judge=0.10), evaluation(0.01, 0.40, judge=0.11), intervals(), SETTINGS)
    assert decision.promote


def test_refuses_when_the_champion_is_less_toxic():
    decision = decide(evaluation(0.30, 0.40), evaluation(0.05, 0.40), intervals(), SETTINGS,
                      champion=champion(0.02, 0.40))
    assert not decision.promote
    assert failed(decision) == ["beats_champion"]
    assert any(r.startswith("FAIL champion version 3") for r in decision.reasons)


def test_refuses_when_the_champion_summarizes_much_better():
    decision = decide(evaluation(0.30, 0.36), evaluation(0.01, 0.36), intervals(), SETTINGS,
                      champion=champion(0.02, 0.40))
    assert failed(decision) == ["beats_champion"]


def test_promotes_over_a_weaker_champion():
    decision = decide(evaluation(0.30, 0.40), evaluation(0.01, 0.40), intervals(), SETTINGS,
                      champion=champion(0.05, 0.40))
    assert decision.promote
    assert decision.checks["beats_champion"]
    assert decision.champion["version"] == "3"


def test_champion_comparison_can_be_switched_off():
    settings = SETTINGS.model_copy(update={"compare_with_champion": False})
    decision = decide(evaluation(0.30, 0.40), evaluation(0.05, 0.40), intervals(), settings,
                      champion=champion(0.02, 0.40))
    assert decision.promote
    assert "beats_champion" not in decision.checks


@pytest.mark.parametrize("where", ["candidate", "interval", "champion"])
def test_nan_metrics_never_promote(where):
    candidate = evaluation(math.nan if where == "candidate" else 0.01, 0.40)
    spans = intervals(toxicity=(math.nan,) * 3) if where == "interval" else intervals()
    best = champion(math.nan, 0.40) if where == "champion" else None
    decision = decide(evaluation(0.30, 0.40), candidate, spans, SETTINGS, champion=best)
    assert not decision.promote
    assert not decision.checks["metrics_finite"]


def test_zero_baseline_toxicity_cannot_improve():
    decision = decide(evaluation(0.0, 0.40), evaluation(0.0, 0.40), intervals(toxicity=(0, 0, 0)), SETTINGS)
    assert not decision.promote


def test_every_rule_has_a_reason_line():
    decision = decide(evaluation(0.30, 0.40), evaluation(0.03, 0.39), intervals(), SETTINGS,
                      champion=champion(0.05, 0.40))
    assert len([r for r in decision.reasons if r.startswith(("ok", "FAIL"))]) == len(decision.checks)


def test_a_drop_exactly_at_the_required_reduction_passes_and_a_hair_less_fails():
    exactly = decide(evaluation(0.30, 0.40), evaluation(0.27, 0.40), intervals(), SETTINGS)  # -10.0%
    assert exactly.checks["toxicity_reduced"] and exactly.promote
    short = decide(evaluation(0.30, 0.40), evaluation(0.2701, 0.40), intervals(), SETTINGS)  # -9.97%
    assert failed(short) == ["toxicity_reduced"]


def test_an_interval_whose_upper_bound_is_exactly_zero_is_not_significant():
    decision = decide(evaluation(0.30, 0.40), evaluation(0.20, 0.40), intervals(toxicity=(-0.1, -0.2, 0.0)), SETTINGS)
    assert failed(decision) == ["toxicity_drop_significant"]


def test_a_judge_rise_exactly_at_the_tolerance_passes_and_beyond_it_fails():
    at = decide(evaluation(0.30, 0.40, judge=0.25), evaluation(0.01, 0.40, judge=0.26), intervals(), SETTINGS)
    assert at.checks["judge_not_worse"]  # 0.26 - 0.25 is a hair above 0.01 in floating point
    beyond = decide(evaluation(0.30, 0.40, judge=0.25), evaluation(0.01, 0.40, judge=0.2601), intervals(), SETTINGS)
    assert failed(beyond) == ["judge_not_worse"]


def test_rouge_just_past_the_tolerance_fails():
    decision = decide(evaluation(0.30, 0.40), evaluation(0.01, 0.3799), intervals(), SETTINGS)  # -5.03%
    assert failed(decision) == ["rouge_l_within_tolerance"]


def test_a_tie_with_the_champion_does_not_replace_it():
    """As toxic as the champion is not better than the champion: the alias stays."""
    decision = decide(evaluation(0.30, 0.40), evaluation(0.05, 0.40), intervals(), SETTINGS,
                      champion=champion(0.05, 0.40))
    assert not decision.promote
    assert failed(decision) == ["beats_champion"]


def test_rouge_at_the_tolerance_below_the_champion_passes_and_past_it_fails():
    at = decide(evaluation(0.30, 0.38), evaluation(0.01, 0.38), intervals(), SETTINGS, champion=champion(0.05, 0.40))
    assert at.checks["beats_champion"]  # 0.38 is exactly 5% below the champion's 0.40
    past = decide(evaluation(0.30, 0.3799), evaluation(0.01, 0.3799), intervals(), SETTINGS,
                  champion=champion(0.05, 0.40))
    assert failed(past) == ["beats_champion"]
