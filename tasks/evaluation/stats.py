"""Paired bootstrap confidence intervals for the change of a per-sample metric.

Baseline and candidate are scored on the same prompts with the same sampling seeds, so
sample ``i`` of one pairs with sample ``i`` of the other. Resampling the pairs (not the
two columns independently) keeps that pairing, and the interval is for the mean of
the per-sample differences ``after - before``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class ChangeInterval:
    """Mean change ``after - before`` with a percentile bootstrap interval."""

    mean: float
    low: float
    high: float
    confidence: float
    resamples: int
    seed: int

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self, digits: int = 4) -> str:
        return (f"{self.mean:+.{digits}f} [{self.low:+.{digits}f}, {self.high:+.{digits}f}] "
                f"({self.confidence:.0%} CI)")


def paired_bootstrap(
    before: np.ndarray | list[float],
    after: np.ndarray | list[float],
    resamples: int = 2000,
    seed: int = 0,
    confidence: float = 0.95,
) -> ChangeInterval:
    """Percentile bootstrap interval of ``mean(after - before)`` over resampled pairs.

    Deterministic for a given ``seed``. A NaN anywhere makes every figure NaN, so the
    promotion gate sees it instead of an interval computed on part of the data.
    """
    before = np.asarray(before, dtype=np.float64)
    after = np.asarray(after, dtype=np.float64)
    if before.shape != after.shape or before.ndim != 1:
        raise ValueError(f"paired samples must be two 1-D arrays of one length, got {before.shape} and {after.shape}")
    if len(before) == 0:
        raise ValueError("paired bootstrap needs at least one pair")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie strictly between 0 and 1, got {confidence}")
    if resamples < 1:
        raise ValueError(f"resamples must be positive, got {resamples}")
    differences = after - before
    if not np.isfinite(differences).all():
        return ChangeInterval(math.nan, math.nan, math.nan, confidence, resamples, seed)

    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    # Chunks bound the index matrix to a few million entries for large evaluations.
    chunk = max(1, 4_000_000 // len(differences))
    for start in range(0, resamples, chunk):
        count = min(chunk, resamples - start)
        indices = rng.integers(0, len(differences), size=(count, len(differences)))
        means[start : start + count] = differences[indices].mean(axis=1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return ChangeInterval(float(differences.mean()), float(low), float(high), confidence, resamples, seed)
