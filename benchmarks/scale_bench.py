"""Scale: the same tick at growing lead counts; the cost per lead should stay flat.

The harness runs :func:`benchmarks.tick_bench.run` once per point, each in a process of its
own (so each point's peak memory is its own), and :func:`summarise` compares the cost per
lead of the whole tick (enroll + queue + send) across the points. Target: the largest
cost per lead within 1.5x the smallest.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

TARGET = 1.5
POINTS = (10_000, 100_000, 1_000_000)


def points_for(size: int) -> list[int]:
    """The scale points up to ``size`` (always including ``size`` itself)."""
    return sorted({p for p in POINTS if p <= size} | {size})


def summarise(ticks: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Cost per lead at each point, and the spread between the cheapest and dearest."""
    per_lead = {t["leads"]: t["tick_s"] / t["leads"] * 1e6 for t in ticks}
    spread = max(per_lead.values()) / min(per_lead.values()) if per_lead else 0.0
    return {
        "us_per_lead": {n: round(us, 1) for n, us in sorted(per_lead.items())},
        "spread": round(spread, 3),
        "points": len(per_lead),
        "target": TARGET,
        "ok": len(per_lead) > 1 and spread <= TARGET,
    }
