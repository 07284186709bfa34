"""Observed engagement and exit rates per step, for ``nurture plan --rates history``.

One grouped query over the campaign's deliveries sent in the window counts, per step and
variant, the messages sent and how many of them were opened, clicked or replied to by a
person (one per delivery, rule 8) and how many leads left the campaign after that message
and before any other (exits for any reason: rule, suppression, stage). A step or variant
with fewer than ``min_sends`` messages borrows the step's, then the campaign's pooled
rates, else it assumes no engagement and no exits; the plan says which was used.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, case, exists, func, literal, select
from sqlalchemy.orm import Session, aliased

from nurture.journey.schedule import variant_label
from nurture.spec.rules import MACHINE
from nurture.spec.schema import CampaignSpec, Step
from nurture.store.models import Delivery, DeliveryStatus, Enrollment, EnrollmentStatus, Event

KINDS = ("opened", "clicked", "replied")


@dataclass(frozen=True)
class Observed:
    """Counts behind one set of rates."""

    sends: int = 0
    opened: int = 0
    clicked: int = 0
    replied: int = 0
    exited: int = 0

    def __add__(self, other: Observed) -> Observed:
        return Observed(
            self.sends + other.sends,
            self.opened + other.opened,
            self.clicked + other.clicked,
            self.replied + other.replied,
            self.exited + other.exited,
        )

    def rate(self, kind: str) -> float:
        """The share of sends with ``kind`` (opened, clicked, replied, exited)."""
        return getattr(self, kind) / self.sends if self.sends else 0.0


@dataclass(frozen=True)
class UsedRate:
    """The rates the forecast uses for one step (and variant), and where they came from."""

    step: str
    variant: str | None
    source: str  # variant | step | campaign | none
    sample: int  # the sends the rates were measured on
    own_sends: int  # this step's (variant's) own sends in the window
    rates: dict[str, float] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        """JSON-friendly fields."""
        return {
            "step": self.step,
            "variant": self.variant,
            "source": self.source,
            "sample": self.sample,
            "own_sends": self.own_sends,
            **{k: round(v, 4) for k, v in self.rates.items()},
        }


def _engaged(kind: str) -> ColumnElement[Any]:
    human = Event.engagement.is_distinct_from(MACHINE)
    found = exists(
        select(literal(1)).where(
            Event.delivery_id == Delivery.id,
            Event.type == kind,
            human if kind != "replied" else literal(True),
        )
    )
    return func.sum(case((found, 1), else_=0))


def observed(
    session: Session, campaign_id: int, since: datetime, until: datetime
) -> dict[tuple[str, str | None], Observed]:
    """Per (step, variant): the sends in ``[since, until)`` and what followed them."""
    later = aliased(Delivery)
    left = (Enrollment.status == EnrollmentStatus.exited.value) & ~exists(
        select(literal(1)).where(
            later.enrollment_id == Delivery.enrollment_id, later.queued_at > Delivery.queued_at
        )
    )
    query = (
        select(
            Delivery.step_id,
            Delivery.variant,
            func.count(),
            *[_engaged(k) for k in KINDS],
            func.sum(case((left, 1), else_=0)),
        )
        .join(Enrollment, Enrollment.id == Delivery.enrollment_id)
        .where(
            Delivery.campaign_id == campaign_id,
            Delivery.status == DeliveryStatus.sent.value,
            Delivery.sent_at >= since,
            Delivery.sent_at < until,
        )
        .group_by(Delivery.step_id, Delivery.variant)
    )
    return {
        (step, variant): Observed(*(int(x or 0) for x in counts))
        for step, variant, *counts in session.execute(query)
    }


def _pick(
    own: Observed, step: Observed, campaign: Observed, min_sends: int, is_variant: bool
) -> tuple[str, Observed]:
    if own.sends >= min_sends:
        return ("variant" if is_variant else "step"), own
    if is_variant and step.sends >= min_sends:
        return "step", step
    if campaign.sends >= min_sends:
        return "campaign", campaign
    return "none", Observed()


def used_rates(
    spec: CampaignSpec, seen: dict[tuple[str, str | None], Observed], min_sends: int
) -> list[UsedRate]:
    """The rates each step of ``spec`` (each variant, when it has them) is forecast with."""
    total = sum(seen.values(), Observed())
    out: list[UsedRate] = []
    for step in spec.steps:
        mine = [o for (s, _), o in seen.items() if s == step.id]
        pooled = sum(mine, Observed())
        labels: list[str | None] = [*_variant_labels(step)] or [None]
        for label in labels:
            own = seen.get((step.id, label), Observed()) if label else pooled
            source, basis = _pick(own, pooled, total, min_sends, label is not None)
            rates = {k: basis.rate(k) for k in (*KINDS, "exited")}
            out.append(UsedRate(step.id, label, source, basis.sends, own.sends, rates))
    return out


def _variant_labels(step: Step) -> list[str]:
    variants = step.variants or []
    return [variant_label(i, v) for i, v in enumerate(variants)]


def step_rates(step: Step, used: list[UsedRate]) -> dict[str, float]:
    """One step's rates: its variants' mixed by weight, else its own."""
    mine = [u for u in used if u.step == step.id]
    if not mine:
        return dict.fromkeys((*KINDS, "exited"), 0.0)
    if step.variants and len(mine) == len(step.variants):
        weights = [v.weight for v in step.variants]
        whole = sum(weights) or 1.0
        return {
            k: sum(w * u.rates[k] for w, u in zip(weights, mine, strict=True)) / whole
            for k in (*KINDS, "exited")
        }
    return dict(mine[0].rates)
