import math

import pytest

from tasks.config import PromotionSettings
from tasks.promotion import decide

SETTINGS = PromotionSettings(min_toxicity_reduction=0.10, max_rouge_l_drop=0.05)


def evaluation(toxicity, rouge_l):
    return {"toxicity_mean": toxicity, "rouge_l_mean": rouge_l}


def test_promotes_when_toxicity_falls_and_rouge_holds():
    decision = decide(evaluation(0.30, 0.40), evaluation(0.03, 0.39), SETTINGS)
    assert decision.promote
    assert decision.toxicity_change == pytest.approx(-0.9)
    assert all(decision.checks.values())


def test_refuses_when_toxicity_falls_too_little():
    decision = decide(evaluation(0.30, 0.40), evaluation(0.28, 0.40), SETTINGS)
    assert not decision.promote
    assert not decision.checks["toxicity_improved"]
    assert any(r.startswith("FAIL toxicity") for r in decision.reasons)


def test_refuses_when_toxicity_rises():
    # The Korean seed reported a 34% increase as its outcome; the gate must not.
    decision = decide(evaluation(0.30, 0.40), evaluation(0.40, 0.40), SETTINGS)
    assert not decision.promote


def test_refuses_when_rouge_drops_past_tolerance():
    decision = decide(evaluation(0.30, 0.40), evaluation(0.01, 0.37), SETTINGS)
    assert not decision.promote
    assert decision.checks["toxicity_improved"]
    assert not decision.checks["rouge_l_within_tolerance"]
    assert any(r.startswith("FAIL ROUGE-L") for r in decision.reasons)


def test_rouge_exactly_at_tolerance_passes():
    decision = decide(evaluation(0.30, 0.40), evaluation(0.01, 0.38), SETTINGS)
    assert decision.checks["rouge_l_within_tolerance"]


def test_nan_metrics_never_promote():
    decision = decide(evaluation(0.30, 0.40), evaluation(math.nan, 0.40), SETTINGS)
    assert not decision.promote
    assert not decision.checks["metrics_finite"]


def test_zero_baseline_toxicity_cannot_improve():
    decision = decide(evaluation(0.0, 0.40), evaluation(0.0, 0.40), SETTINGS)
    assert not decision.promote
