"""Team goals from ``pipeline.yaml``: the actual figure, the pace to the period's end, a verdict.

A goal is ``{metric, per, target}`` over a calendar period in UTC (day, ISO week, month,
quarter) that contains ``now``. Counts are projected linearly to the end of the period
(``actual / elapsed share``); rates (shares of captured leads) are judged as they stand.

Speed to lead has two clocks, both from ``leads.created_at`` (the capture):

- the first *automated* touch: the first sent delivery;
- the first *human* touch: the first stage change pulled back from a CRM (cause
  ``crm pull via <connector>``), i.e. a person working the lead in their CRM.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, func, select, true, type_coerce
from sqlalchemy.orm import Session

from nurture.crm.sync import cause_for
from nurture.journey.schedule import effective_zone, next_opening
from nurture.spec.schema import RATE_METRICS, CampaignSpec, GoalSpec
from nurture.store.models import (
    Account,
    Campaign,
    Delivery,
    DeliveryStatus,
    Enrollment,
    Lead,
    StageTransition,
    UTCDateTime,
)
from nurture.store.sql import at

__all__ = [
    "HOUR",
    "GoalRow",
    "Touches",
    "captured_in_window",
    "evaluate_goals",
    "first_touches",
    "human_touch_cause",
    "period_bounds",
]

HOUR = 3600.0


def human_touch_cause() -> Any:
    """SQL: the transition was pulled back from a CRM, so a person made it."""
    return StageTransition.cause.startswith(cause_for(""), autoescape=True)


@dataclass(frozen=True)
class Touches:
    """One captured lead: seconds from capture to its first email and first human touch."""

    lead_id: int
    created_at: datetime
    to_email: float | None
    to_human: float | None


def first_touches(session: Session, where: ColumnElement[bool] | None = None) -> list[Touches]:
    """Every lead matching ``where`` with its two speed-to-lead times; one query."""
    sent = (
        select(Delivery.lead_id, func.min(Delivery.sent_at).label("first_sent"))
        .where(Delivery.status == DeliveryStatus.sent.value, Delivery.sent_at.is_not(None))
        .group_by(Delivery.lead_id)
        .subquery()
    )
    human = (
        select(StageTransition.lead_id, func.min(StageTransition.occurred_at).label("first_human"))
        .where(human_touch_cause())
        .group_by(StageTransition.lead_id)
        .subquery()
    )
    rows = session.execute(
        select(
            Lead.id,
            Lead.created_at,
            type_coerce(sent.c.first_sent, UTCDateTime()),
            type_coerce(human.c.first_human, UTCDateTime()),
        )
        .outerjoin(sent, sent.c.lead_id == Lead.id)
        .outerjoin(human, human.c.lead_id == Lead.id)
        .where(where if where is not None else true())
    )
    return [
        Touches(
            int(lid),
            created,
            (email - created).total_seconds() if email is not None else None,
            (person - created).total_seconds() if person is not None else None,
        )
        for lid, created, email, person in rows
    ]


def captured_in_window(session: Session, lead_ids: list[int]) -> set[int]:
    """Which of these leads were captured inside the send window of their first campaign.

    Leads captured outside it wait for the window by design, so speed to lead is judged
    on the others. A lead never enrolled has no window and is left out; a campaign
    without a send window is always open. One query, then the window test per lead in
    Python (the same zone rules as the scheduler).
    """
    first = (
        select(Enrollment.lead_id, func.min(Enrollment.id).label("first_id"))
        .group_by(Enrollment.lead_id)
        .subquery()
    )
    inside: set[int] = set()
    specs: dict[int, CampaignSpec | None] = {}
    for start in range(0, len(lead_ids), 500):
        rows = session.execute(
            select(
                Lead.id,
                Lead.created_at,
                Lead.timezone,
                Account.timezone,
                Lead.country,
                Campaign.id,
                Campaign.spec,
            )
            .join(first, first.c.lead_id == Lead.id)
            .join(Enrollment, Enrollment.id == first.c.first_id)
            .join(Campaign, Campaign.id == Enrollment.campaign_id)
            .outerjoin(Account, Account.id == Lead.account_id)
            .where(Lead.id.in_(lead_ids[start : start + 500]))
        )
        for lid, created, ltz, atz, country, cid, raw in rows:
            if cid not in specs:
                try:
                    specs[cid] = CampaignSpec.model_validate(raw)
                except ValueError:  # a stored spec from an older version: no window known
                    specs[cid] = None
            spec = specs[cid]
            if spec is None:
                continue
            window = spec.send_window
            default = window.default_timezone if window else "UTC"
            zone = effective_zone(ltz, atz, country, default)
            if next_opening(created, zone, window) == created:
                inside.add(int(lid))
    return inside


def period_bounds(per: str, now: datetime) -> tuple[datetime, datetime]:
    """The calendar period (UTC) of kind ``per`` that contains ``now``: ``[start, end)``."""
    now = now.astimezone(UTC)
    day = now.replace(hour=0, minute=0, second=0, microsecond=0)
    if per == "day":
        return day, day + timedelta(days=1)
    if per == "week":
        start = day - timedelta(days=day.weekday())
        return start, start + timedelta(days=7)
    if per == "month":
        start = day.replace(day=1)
        end = (start + timedelta(days=32)).replace(day=1)
        return start, end
    if per == "quarter":
        start = day.replace(month=(day.month - 1) // 3 * 3 + 1, day=1)
        end = (start + timedelta(days=95)).replace(day=1)
        return start, end
    raise ValueError(f"unknown period {per!r}: expected day, week, month or quarter")


@dataclass(frozen=True)
class GoalRow:
    """One goal with its actual figure and pace in the period containing ``now``."""

    goal: str
    metric: str
    per: str
    period_start: datetime
    period_end: datetime
    target: float
    actual: float | None
    elapsed_share: float
    projected: float | None  # counts: at this pace by the period's end; rates: as now
    status: str  # met | on track | at risk | no data
    basis: int  # transitions counted, or leads captured for a rate

    @property
    def is_rate(self) -> bool:
        """Whether the figures are shares (0 to 1) rather than counts."""
        return self.metric in RATE_METRICS


def _verdict(goal: GoalSpec, actual: float | None, projected: float | None) -> str:
    if actual is None or projected is None:
        return "no data"
    if goal.metric in RATE_METRICS:
        return "on track" if actual >= goal.target else "at risk"
    if actual >= goal.target:
        return "met"
    return "on track" if projected >= goal.target else "at risk"


def _stage_entered(session: Session, stage: str, start: datetime, now: datetime) -> int:
    return int(
        session.scalar(
            select(func.count(func.distinct(StageTransition.lead_id))).where(
                StageTransition.to_stage == stage,
                StageTransition.occurred_at >= at(start),
                StageTransition.occurred_at <= at(now),
            )
        )
        or 0
    )


def evaluate_goals(session: Session, goals: list[GoalSpec], now: datetime) -> list[GoalRow]:
    """Each goal's actual figure, pace and verdict at ``now`` (team-wide, all campaigns)."""
    out: list[GoalRow] = []
    touches: dict[tuple[datetime, datetime], list[Touches]] = {}
    for goal in goals:
        start, end = period_bounds(goal.per, now)
        share = min(1.0, max((now - start) / (end - start), 1e-9))
        actual: float | None
        projected: float | None
        if goal.metric == "stage_entered":
            assert goal.stage is not None
            basis = _stage_entered(session, goal.stage, start, now)
            actual = float(basis)
            projected = actual / share
        else:
            key = (start, end)
            if key not in touches:
                touches[key] = first_touches(
                    session, (Lead.created_at >= at(start)) & (Lead.created_at <= at(now))
                )
            leads = touches[key]
            basis = len(leads)
            attr = "to_email" if goal.metric == "speed_to_lead_within_1h" else "to_human"
            within = sum(1 for t in leads if (v := getattr(t, attr)) is not None and v <= HOUR)
            actual = within / basis if basis else None
            projected = actual
        out.append(
            GoalRow(
                goal=goal.label,
                metric=goal.metric,
                per=goal.per,
                period_start=start,
                period_end=end,
                target=goal.target,
                actual=actual,
                elapsed_share=share,
                projected=projected,
                status=_verdict(goal, actual, projected),
                basis=basis,
            )
        )
    return out
