"""Pure statistics for reports: percentiles, the two-proportion z-test, AUC.

No I/O and no scipy: the normal distribution comes from :func:`math.erfc`, and its
inverse (for confidence intervals) from bisection on it, which is exact to 1e-12.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100) with linear interpolation between order statistics.

    This is the "linear" method of numpy and PostgreSQL's ``percentile_cont``.
    Returns None for no values.
    """
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q must be within 0..100, got {q}")
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def normal_sf(z: float) -> float:
    """Upper tail of the standard normal: P(Z > z)."""
    return 0.5 * math.erfc(z / math.sqrt(2))


def normal_ppf(p: float) -> float:
    """The standard normal quantile: the z with P(Z <= z) = p (0 < p < 1)."""
    if not 0 < p < 1:
        raise ValueError(f"probability must be within (0, 1), got {p}")
    lo, hi = -40.0, 40.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if 1 - normal_sf(mid) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-13:
            break
    return (lo + hi) / 2


@dataclass(frozen=True)
class ProportionTest:
    """A two-sided two-proportion z-test of ``a`` against ``b``.

    ``z`` and ``p_value`` use the pooled standard error (the null hypothesis says the
    rates are equal); the confidence interval of ``diff = rate_a - rate_b`` uses the
    unpooled (Wald) standard error.
    """

    successes_a: int
    trials_a: int
    successes_b: int
    trials_b: int
    rate_a: float
    rate_b: float
    diff: float
    z: float
    p_value: float
    ci_low: float
    ci_high: float
    confidence: float

    @property
    def significant(self) -> bool:
        """Whether the difference is significant at ``1 - confidence``."""
        return self.p_value < 1 - self.confidence

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return {**asdict(self), "significant": self.significant}


def two_proportion_test(
    successes_a: int, trials_a: int, successes_b: int, trials_b: int, confidence: float = 0.95
) -> ProportionTest:
    """Compare two rates, e.g. the click rates of two variants.

    Args:
        successes_a: Successes (e.g. clicks) of group a.
        trials_a: Trials (e.g. delivered messages) of group a; must be positive.
        successes_b: Successes of group b.
        trials_b: Trials of group b; must be positive.
        confidence: Level of the confidence interval; ``1 - confidence`` is alpha.

    Returns:
        The test. When both groups have the same rate of 0 or 1 the standard error is 0:
        then z is 0 and the p-value is 1, as there is no evidence of a difference.
    """
    for name, s, n in (("a", successes_a, trials_a), ("b", successes_b, trials_b)):
        if n <= 0 or not 0 <= s <= n:
            raise ValueError(f"group {name}: need 0 <= successes <= trials and trials > 0")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be within (0, 1), got {confidence}")
    p1, p2 = successes_a / trials_a, successes_b / trials_b
    pooled = (successes_a + successes_b) / (trials_a + trials_b)
    se0 = math.sqrt(pooled * (1 - pooled) * (1 / trials_a + 1 / trials_b))
    z = (p1 - p2) / se0 if se0 > 0 else 0.0
    p_value = min(1.0, 2 * normal_sf(abs(z)))
    se = math.sqrt(p1 * (1 - p1) / trials_a + p2 * (1 - p2) / trials_b)
    half = normal_ppf(1 - (1 - confidence) / 2) * se
    return ProportionTest(
        successes_a,
        trials_a,
        successes_b,
        trials_b,
        p1,
        p2,
        p1 - p2,
        z,
        p_value,
        p1 - p2 - half,
        p1 - p2 + half,
        confidence,
    )


def auc(scores: Sequence[float], labels: Sequence[bool]) -> float | None:
    """Area under the ROC curve via the Mann-Whitney rank statistic (ties get mid-ranks).

    It is the probability that a random positive scores above a random negative (ties
    count one half). Returns None unless there is at least one positive and one negative.
    """
    if len(scores) != len(labels):
        raise ValueError("scores and labels differ in length")
    n_pos = sum(1 for flag in labels if flag)
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    ranks = [0.0] * len(scores)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and scores[order[j + 1]] == scores[order[i]]:
            j += 1
        mid = (i + j) / 2 + 1  # ranks are 1-based
        for k in range(i, j + 1):
            ranks[order[k]] = mid
        i = j + 1
    rank_sum = sum(r for r, flag in zip(ranks, labels, strict=True) if flag)
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
