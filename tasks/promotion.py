"""The promotion gate: a pure function from two evaluations to a decision with reasons."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from tasks.config import PromotionSettings
from tasks.evaluation import relative_change


@dataclass(frozen=True)
class Decision:
    promote: bool
    reasons: list[str]
    toxicity_before: float
    toxicity_after: float
    toxicity_change: float
    rouge_l_before: float
    rouge_l_after: float
    rouge_l_change: float
    checks: dict[str, bool] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def decide(baseline: dict, candidate: dict, settings: PromotionSettings) -> Decision:
    """Promote only if toxicity falls by the required margin and ROUGE-L holds within tolerance.

    ``baseline`` and ``candidate`` are evaluation summaries with ``toxicity_mean`` and
    ``rouge_l_mean``. Every rule contributes a reason, passed or failed, so a negative
    decision says exactly what failed.
    """
    tox_before, tox_after = float(baseline["toxicity_mean"]), float(candidate["toxicity_mean"])
    rouge_before, rouge_after = float(baseline["rouge_l_mean"]), float(candidate["rouge_l_mean"])
    tox_change = relative_change(tox_before, tox_after)
    rouge_change = relative_change(rouge_before, rouge_after)

    checks: dict[str, bool] = {}
    reasons: list[str] = []
    values = {"toxicity_before": tox_before, "toxicity_after": tox_after,
              "rouge_l_before": rouge_before, "rouge_l_after": rouge_after}
    not_finite = [name for name, value in values.items() if not math.isfinite(value)]
    checks["metrics_finite"] = not not_finite
    if not_finite:
        reasons.append(f"FAIL metrics not finite: {', '.join(not_finite)}")
    else:
        reasons.append("ok   all metrics finite")

    required = settings.min_toxicity_reduction
    checks["toxicity_improved"] = (
        math.isfinite(tox_change) and -tox_change >= required - 1e-9 and tox_after < tox_before
    )
    verdict = "ok  " if checks["toxicity_improved"] else "FAIL"
    reasons.append(
        f"{verdict} toxicity {tox_before:.4f} -> {tox_after:.4f} ({_pct(tox_change)}); "
        f"required a drop of at least {required:.1%}"
    )

    tolerance = settings.max_rouge_l_drop
    # The epsilon keeps a drop of exactly the tolerance from failing on float rounding.
    checks["rouge_l_within_tolerance"] = math.isfinite(rouge_change) and -rouge_change <= tolerance + 1e-9
    verdict = "ok  " if checks["rouge_l_within_tolerance"] else "FAIL"
    reasons.append(
        f"{verdict} ROUGE-L {rouge_before:.4f} -> {rouge_after:.4f} ({_pct(rouge_change)}); "
        f"tolerated drop {tolerance:.1%}"
    )

    return Decision(
        promote=all(checks.values()),
        reasons=reasons,
        toxicity_before=tox_before,
        toxicity_after=tox_after,
        toxicity_change=tox_change,
        rouge_l_before=rouge_before,
        rouge_l_after=rouge_after,
        rouge_l_change=rouge_change,
        checks=checks,
    )


def _pct(change: float) -> str:
    return "n/a" if not math.isfinite(change) else f"{change:+.1%}"
