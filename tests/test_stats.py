import math

import numpy as np
import pytest

from tasks.evaluation.stats import paired_bootstrap


def test_constant_difference_has_a_zero_width_interval():
    before = np.array([0.2, 0.5, 0.9, 0.1])
    interval = paired_bootstrap(before, before - 0.1, resamples=500, seed=3)
    assert interval.mean == pytest.approx(-0.1)
    assert interval.low == pytest.approx(-0.1)
    assert interval.high == pytest.approx(-0.1)


def test_two_pairs_worked_by_hand():
    # Differences [0, 1]: a resample's mean is 0, 0.5 or 1 with probabilities 1/4, 1/2, 1/4,
    # so the 2.5% and 97.5% quantiles are 0 and 1.
    interval = paired_bootstrap([0.0, 0.0], [0.0, 1.0], resamples=4000, seed=0)
    assert interval.mean == 0.5
    assert (interval.low, interval.high) == (0.0, 1.0)


def test_width_matches_the_normal_approximation():
    rng = np.random.default_rng(7)
    before = rng.uniform(0, 1, 400)
    after = before + rng.normal(-0.1, 0.2, 400)
    interval = paired_bootstrap(before, after, resamples=4000, seed=1)
    expected_half_width = 1.96 * np.std(after - before, ddof=1) / math.sqrt(400)
    assert (interval.high - interval.low) / 2 == pytest.approx(expected_half_width, rel=0.15)
    assert interval.low < interval.mean < interval.high


@pytest.mark.parametrize(("confidence", "z"), [(0.95, 1.959964), (0.90, 1.644854)])
def test_the_interval_has_the_confidence_it_reports(confidence, z):
    """Against the normal approximation, which 2000 pairs make tight: a 90% interval reported as
    95% is 16% too narrow, well outside the 5% the bootstrap's own noise allows here."""
    rng = np.random.default_rng(3)
    differences = rng.normal(-0.05, 0.3, 2000)
    interval = paired_bootstrap(np.zeros(2000), differences, resamples=4000, seed=2, confidence=confidence)
    expected_half_width = z * np.std(differences, ddof=1) / math.sqrt(2000)
    assert interval.confidence == confidence
    assert (interval.high - interval.low) / 2 == pytest.approx(expected_half_width, rel=0.05)
    assert interval.low + interval.high == pytest.approx(2 * interval.mean, abs=0.1 * expected_half_width)
    assert f"({confidence:.0%} CI)" in interval.describe()


def test_the_default_interval_is_95_percent():
    rng = np.random.default_rng(4)
    differences = rng.normal(0.0, 1.0, 2000)
    interval = paired_bootstrap(np.zeros(2000), differences, resamples=4000, seed=5)
    assert interval.confidence == 0.95
    assert (interval.high - interval.low) / 2 == pytest.approx(1.959964 * np.std(differences, ddof=1) / math.sqrt(2000),
                                                               rel=0.05)


def test_pairing_detects_a_small_consistent_drop():
    # Samples vary a lot between prompts but every prompt gets a little better: only the
    # paired interval sees it.
    rng = np.random.default_rng(0)
    before = rng.uniform(0, 1, 200)
    interval = paired_bootstrap(before, before - 0.01 + rng.normal(0, 0.001, 200), seed=0)
    assert interval.high < 0


def test_same_seed_same_interval_other_seed_other_interval():
    rng = np.random.default_rng(5)
    before, after = rng.uniform(size=50), rng.uniform(size=50)
    first = paired_bootstrap(before, after, resamples=1000, seed=11)
    assert first == paired_bootstrap(before, after, resamples=1000, seed=11)
    assert first.seed == 11 and first.resamples == 1000 and first.confidence == 0.95
    assert (first.low, first.high) != (lambda i: (i.low, i.high))(paired_bootstrap(before, after, 1000, seed=12))


def test_nan_makes_the_interval_nan():
    interval = paired_bootstrap([0.1, 0.2], [0.1, math.nan])
    assert math.isnan(interval.mean) and math.isnan(interval.low) and math.isnan(interval.high)


@pytest.mark.parametrize(
    ("before", "after", "kwargs", "message"),
    [
        ([0.1, 0.2], [0.1], {}, "one length"),
        ([], [], {}, "at least one pair"),
        ([0.1], [0.2], {"confidence": 1.0}, "confidence"),
    ],
)
def test_bad_input_is_named(before, after, kwargs, message):
    with pytest.raises(ValueError, match=message):
        paired_bootstrap(before, after, **kwargs)
