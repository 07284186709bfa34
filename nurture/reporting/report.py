"""Funnel figures and the analytics report: stages, transitions, speed to lead, A/B, health."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import yaml
from sqlalchemy import (
    ColumnElement,
    Engine,
    and_,
    case,
    distinct,
    exists,
    func,
    literal,
    or_,
    select,
    type_coerce,
    union_all,
)
from sqlalchemy.orm import Session

from nurture.reporting.analytics import ProportionTest, auc, percentile, two_proportion_test
from nurture.reporting.goals import GoalRow, captured_in_window, evaluate_goals, first_touches
from nurture.spec.rules import HUMAN, MACHINE
from nurture.spec.schema import PipelineSpec
from nurture.store.db import session_scope
from nurture.store.models import (
    Campaign,
    CampaignVersion,
    Delivery,
    DeliveryStatus,
    Enrollment,
    Event,
    Lead,
    Promotion,
    PromotionStatus,
    ScoreSnapshot,
    StageTransition,
    UTCDateTime,
)
from nurture.store.sql import at

QUALIFIED_STAGES = ("mql", "sql", "opportunity", "customer")


@dataclass(frozen=True)
class CampaignFunnel:
    """One campaign's funnel: how many leads got how far."""

    campaign: str
    leads: int
    enrolled: int
    sent: int
    opened: int
    clicked: int
    replied: int
    mql: int
    promoted: int
    # Distinct leads with a machine open / click (gateways, privacy proxies), shown apart.
    machine_opened: int = 0
    machine_clicked: int = 0
    # Enrolled leads that ever reached each sales stage (or a later one).
    sql: int = 0
    opportunity: int = 0
    customer: int = 0

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return asdict(self)


def _engaged_counts(column: Any, count_machine: bool) -> tuple[Any, Any]:
    """``COUNT(DISTINCT column)`` over the engaged rows and over the machine ones.

    Engaged: people's events (and every event type that is never machine, e.g. replies;
    rows never classified count as people's), or all of them with ``count_machine``.
    """
    machine = Event.engagement == MACHINE
    counted = column if count_machine else case((machine, None), else_=column)
    return (
        func.count(distinct(counted)),
        func.count(distinct(case((machine, column), else_=None))),
    )


def campaign_funnels(engine: Engine, *, count_machine: bool = False) -> list[CampaignFunnel]:
    """Per campaign: leads in the database, enrolled, sent, and distinct leads who engaged.

    ``opened`` and ``clicked`` count people only, and ``machine_opened`` /
    ``machine_clicked`` the leads with machine engagement; with ``count_machine`` the
    former count both.
    """
    with session_scope(engine) as session:
        total_leads = session.scalar(select(func.count(Lead.id))) or 0
        enrolled = dict(
            session.execute(
                select(Enrollment.campaign_id, func.count(distinct(Enrollment.lead_id))).group_by(
                    Enrollment.campaign_id
                )
            ).all()
        )
        sent = dict(
            session.execute(
                select(Delivery.campaign_id, func.count(Delivery.id))
                .where(Delivery.status == DeliveryStatus.sent.value)
                .group_by(Delivery.campaign_id)
            ).all()
        )
        engaged: dict[tuple[int, str, str], int] = {}
        for cid, etype, n, machines in session.execute(
            select(Delivery.campaign_id, Event.type, *_engaged_counts(Event.lead_id, count_machine))
            .join(Delivery, Delivery.id == Event.delivery_id)
            .where(Event.type.in_(["opened", "clicked", "replied"]))
            .group_by(Delivery.campaign_id, Event.type)
        ):
            engaged[(cid, etype, HUMAN)] = int(n)
            engaged[(cid, etype, MACHINE)] = int(machines)
        mql = dict(
            session.execute(
                select(Enrollment.campaign_id, func.count(distinct(Lead.id)))
                .join(Lead, Lead.id == Enrollment.lead_id)
                .where(Lead.lifecycle_stage.in_(QUALIFIED_STAGES))
                .group_by(Enrollment.campaign_id)
            ).all()
        )
        promoted = dict(
            session.execute(
                select(Promotion.campaign_id, func.count(Promotion.id))
                .where(and_(Promotion.status == PromotionStatus.done.value))
                .group_by(Promotion.campaign_id)
            ).all()
        )
        sales = _sales_reached(session)
        campaigns = session.execute(select(Campaign.id, Campaign.name).order_by(Campaign.name))
        return [
            CampaignFunnel(
                campaign=name,
                leads=int(total_leads),
                enrolled=int(enrolled.get(cid, 0)),
                sent=int(sent.get(cid, 0)),
                opened=int(engaged.get((cid, "opened", HUMAN), 0)),
                clicked=int(engaged.get((cid, "clicked", HUMAN), 0)),
                replied=int(engaged.get((cid, "replied", HUMAN), 0)),
                mql=int(mql.get(cid, 0)),
                promoted=int(promoted.get(cid, 0)),
                machine_opened=int(engaged.get((cid, "opened", MACHINE), 0)),
                machine_clicked=int(engaged.get((cid, "clicked", MACHINE), 0)),
                **{stage: sales.get((cid, stage), 0) for stage in SALES_STAGES},
            )
            for cid, name in campaigns
        ]


SALES_STAGES = ("sql", "opportunity", "customer")


def _sales_reached(session: Session) -> dict[tuple[int, str], int]:
    """(campaign, stage) -> enrolled leads that reached the stage or a later one; one query."""
    counts = []
    for i, stage in enumerate(SALES_STAGES):
        later = list(SALES_STAGES[i:])
        counts.append(
            func.count(distinct(case((_reached(later), Lead.id), else_=None))).label(stage)
        )
    rows = session.execute(
        select(Enrollment.campaign_id, *counts)
        .join(Lead, Lead.id == Enrollment.lead_id)
        .group_by(Enrollment.campaign_id)
    ).all()
    return {
        (int(row[0]), stage): int(row[i + 1])
        for row in rows
        for i, stage in enumerate(SALES_STAGES)
    }


# --- the analytics report (issue 7) ------------------------------------------------------------
#
# Counts are set-based SQL (GROUP BY over the whole table). Percentiles (median, p90 of time
# in stage and of speed to lead) are computed in Python over the rows of ONE query that
# returns the timestamps: exact on both dialects and fine at this scale (one row per stay).

BY_CHOICES = ("touchpoint", "campaign", "variant", "owner")
ENGAGEMENT = ("opened", "clicked", "replied", "unsubscribed", "bounced")
_MACHINE_FIELDS = ("machine_opened", "machine_clicked")
CAPTURE = "(capture)"


@dataclass(frozen=True)
class Period:
    """A half-open window ``[since, until)``; None leaves that side open."""

    since: datetime | None = None
    until: datetime | None = None

    def holds(self, col: Any) -> ColumnElement[bool]:
        """SQL: the timestamp ``col`` lies inside the window."""
        conds: list[ColumnElement[bool]] = [col.is_not(None)]
        if self.since is not None:
            conds.append(col >= at(self.since))
        if self.until is not None:
            conds.append(col < at(self.until))
        return and_(*conds)


@dataclass(frozen=True)
class StageRow:
    """One stage over the period."""

    stage: str
    label: str
    entered: int
    exited_forward: int
    dropped: int
    still_in_stage: int
    next_stage: str | None
    conversion_to_next: float | None  # of those who entered in the period
    completed_stays: int
    median_hours: float | None
    p90_hours: float | None


@dataclass(frozen=True)
class TransitionCount:
    """How many leads moved from one stage to another in the period."""

    from_stage: str
    to_stage: str
    count: int


@dataclass(frozen=True)
class SpeedToLead:
    """Time from capture (``leads.created_at``) to the first sent delivery."""

    captured: int
    contacted: int
    within_hour: int
    share_within_hour: float | None
    median_minutes: float | None
    p90_minutes: float | None


@dataclass(frozen=True)
class StepRow:
    """One campaign step (or one variant of it): sends and distinct deliveries engaged."""

    campaign: str
    step: str
    variant: str | None
    template: str
    sent: int
    delivered: int
    opened: int
    clicked: int
    replied: int
    unsubscribed: int
    bounced: int
    # Deliveries with a machine open / click (a delivery may have both kinds).
    machine_opened: int = 0
    machine_clicked: int = 0

    def rate(self, metric: str) -> float | None:
        """``metric`` per delivered message."""
        return getattr(self, metric) / self.delivered if self.delivered else None


@dataclass(frozen=True)
class GroupRow:
    """Leads captured in the period, grouped by touchpoint, campaign, variant or owner."""

    key: str
    captured: int
    contacted: int
    share_within_hour: float | None
    median_minutes_to_lead: float | None
    qualified: int  # reached mql or a later stage
    won: int
    qualified_rate: float | None


@dataclass(frozen=True)
class ABResult:
    """The A/B test of one step: the leader against the runner-up on ``metric``."""

    campaign: str
    step: str
    metric: str
    variants: list[StepRow]
    leader: str | None
    runner_up: str | None
    test: ProportionTest | None
    winner: str | None
    verdict: str
    promotion: str | None  # the YAML change to make, when there is a winner


@dataclass(frozen=True)
class HealthRow:
    """A campaign's health, judged from its version history against data per version."""

    campaign: str
    status: str  # humming | experimenting | thrashing
    explanation: str
    version: int
    versions: int
    sends_per_version: dict[int, int]


@dataclass(frozen=True)
class GradeRow:
    """Win rate of the leads promoted with one grade."""

    grade: str
    leads: int
    won: int
    win_rate: float


@dataclass(frozen=True)
class BackTest:
    """How well the score at promotion time predicted won deals."""

    promoted: int
    won: int
    auc: float | None
    by_grade: list[GradeRow]


@dataclass(frozen=True)
class Report:
    """Everything ``nurture report`` shows."""

    campaign: str | None
    period: Period
    by: str
    stages: list[StageRow]
    transitions: list[TransitionCount]
    speed_to_lead: SpeedToLead
    steps: list[StepRow]
    touchpoints: list[GroupRow]
    breakdown: list[GroupRow]
    ab_tests: list[ABResult]
    health: list[HealthRow]
    backtest: BackTest
    # Whether opens and clicks by machines count as engagement (they are shown apart).
    count_machine: bool = False
    # Capture to the first human touch (a stage change pulled back from the CRM).
    speed_to_human: SpeedToLead | None = None
    # Speed to lead of the leads captured inside their first campaign's send window.
    speed_in_window: SpeedToLead | None = None
    goals: list[GoalRow] = field(default_factory=list)
    as_of: datetime | None = None  # the instant goals are paced at

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly form (times as ISO strings)."""
        out = asdict(self)
        out["period"] = {
            "since": self.period.since.isoformat() if self.period.since else None,
            "until": self.period.until.isoformat() if self.period.until else None,
        }
        out["as_of"] = self.as_of.isoformat() if self.as_of else None
        out["goals"] = [
            {
                **asdict(g),
                "period_start": g.period_start.isoformat(),
                "period_end": g.period_end.isoformat(),
            }
            for g in self.goals
        ]
        out["ab_tests"] = [
            {**asdict(ab), "test": ab.test.as_dict() if ab.test else None} for ab in self.ab_tests
        ]
        return out


def _rank(col: Any, order: list[str]) -> Any:
    return case({s: i for i, s in enumerate(order)}, value=col, else_=-1)


def _scope(campaign_id: int | None) -> ColumnElement[bool]:
    """Leads in the report: all, or those ever enrolled in one campaign."""
    if campaign_id is None:
        return literal(True)
    return Lead.id.in_(select(Enrollment.lead_id).where(Enrollment.campaign_id == campaign_id))


def _stays(scope: ColumnElement[bool]) -> Any:
    """One row per stay of a lead in a stage: entered_at, the stage before and after, exited_at.

    A lead enters its first stage at ``created_at`` (capture has no transition row): that
    stage is the ``from_stage`` of its first transition, else its current stage.
    """
    t = StageTransition
    first_from = (
        select(t.from_stage)
        .where(t.lead_id == Lead.id)
        .order_by(t.occurred_at, t.id)
        .limit(1)
        .correlate(Lead)
        .scalar_subquery()
    )
    initial = select(
        Lead.id.label("lead_id"),
        literal(CAPTURE).label("prev"),
        func.coalesce(first_from, Lead.lifecycle_stage).label("stage"),
        Lead.created_at.label("entered_at"),
        literal(0).label("seq"),
    ).where(scope)
    moves = select(
        t.lead_id, func.coalesce(t.from_stage, CAPTURE), t.to_stage, t.occurred_at, t.id
    ).where(t.lead_id.in_(select(Lead.id).where(scope)))
    u = union_all(initial, moves).subquery("u")
    window: dict[str, Any] = {"partition_by": u.c.lead_id, "order_by": (u.c.entered_at, u.c.seq)}
    return select(
        u.c.lead_id,
        u.c.prev,
        u.c.stage,
        type_coerce(u.c.entered_at, UTCDateTime()).label("entered_at"),
        func.lead(u.c.stage).over(**window).label("next_stage"),
        type_coerce(func.lead(u.c.entered_at).over(**window), UTCDateTime()).label("exited_at"),
    ).subquery("stays")


def _hours(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds / 3600, 4)


def _minutes(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds / 60, 4)


def _stage_rows(
    session: Session, stays: Any, pipeline: PipelineSpec, period: Period
) -> list[StageRow]:
    order = pipeline.order()
    s = stays.c
    forward = and_(_rank(s.stage, order) >= 0, _rank(s.next_stage, order) > _rank(s.stage, order))
    if period.until is None:
        still = s.exited_at.is_(None)
        exited_by_end = s.exited_at.is_not(None)
    else:
        end = at(period.until)
        still = and_(s.entered_at < end, or_(s.exited_at.is_(None), s.exited_at >= end))
        exited_by_end = s.exited_at < end

    def total(cond: ColumnElement[bool]) -> Any:
        return func.coalesce(func.sum(case((cond, 1), else_=0)), 0)

    counts = {
        row.stage: row
        for row in session.execute(
            select(
                s.stage,
                total(period.holds(s.entered_at)).label("entered"),
                total(and_(period.holds(s.exited_at), forward)).label("forward"),
                total(and_(period.holds(s.exited_at), s.next_stage == "lost")).label("dropped"),
                total(still).label("still"),
                total(and_(period.holds(s.entered_at), exited_by_end, forward)).label("conv"),
            ).group_by(s.stage)
        )
    }
    # Percentiles in Python over one query's timestamps (see the note at the top).
    durations: dict[str, list[float]] = defaultdict(list)
    for stage, entered_at, exited_at in session.execute(
        select(s.stage, s.entered_at, s.exited_at).where(period.holds(s.exited_at))
    ):
        durations[stage].append((exited_at - entered_at).total_seconds())
    labels = {st.id: st.label or st.id for st in [*pipeline.stages, *pipeline.side_stages]}
    names = [*order, *(st.id for st in pipeline.side_stages)]
    names += sorted(set(counts) - set(names))
    rows = []
    for i, stage in enumerate(names):
        c = counts.get(stage)
        entered = int(c.entered) if c else 0
        nxt = order[i + 1] if i + 1 < len(order) else None
        times = durations.get(stage, [])
        rows.append(
            StageRow(
                stage=stage,
                label=labels.get(stage, stage),
                entered=entered,
                exited_forward=int(c.forward) if c else 0,
                dropped=int(c.dropped) if c else 0,
                still_in_stage=int(c.still) if c else 0,
                next_stage=nxt,
                conversion_to_next=(int(c.conv) / entered if c and entered and nxt else None),
                completed_stays=len(times),
                median_hours=_hours(percentile(times, 50)),
                p90_hours=_hours(percentile(times, 90)),
            )
        )
    return rows


def _transitions(session: Session, stays: Any, period: Period) -> list[TransitionCount]:
    s = stays.c
    rows = session.execute(
        select(s.prev, s.stage, func.count())
        .where(period.holds(s.entered_at))
        .group_by(s.prev, s.stage)
        .order_by(s.prev, s.stage)
    )
    return [TransitionCount(a, b, int(n)) for a, b, n in rows]


def _reached(stages: list[str]) -> ColumnElement[bool]:
    """The lead is in, or has ever moved into, one of ``stages``."""
    moved = exists(
        select(StageTransition.id).where(
            StageTransition.lead_id == Lead.id, StageTransition.to_stage.in_(stages)
        )
    )
    return or_(Lead.lifecycle_stage.in_(stages), moved)


def _won_stage(pipeline: PipelineSpec) -> str:
    terminal = [s.id for s in pipeline.stages if s.terminal]
    return terminal[0] if terminal else pipeline.order()[-1]


@dataclass(frozen=True)
class _Captured:
    lead_id: int
    seconds_to_lead: float | None
    qualified: bool
    won: bool


def _captured(
    session: Session, scope: ColumnElement[bool], pipeline: PipelineSpec, period: Period
) -> list[_Captured]:
    """Leads captured in the period, with their speed to lead; one query."""
    first = (
        select(Delivery.lead_id, func.min(Delivery.sent_at).label("first_sent"))
        .where(Delivery.status == DeliveryStatus.sent.value, Delivery.sent_at.is_not(None))
        .group_by(Delivery.lead_id)
        .subquery()
    )
    order = pipeline.order()
    qualified = order[order.index("mql") :] if "mql" in order else order[1:]
    rows = session.execute(
        select(
            Lead.id,
            Lead.created_at,
            type_coerce(first.c.first_sent, UTCDateTime()),
            _reached(qualified),
            _reached([_won_stage(pipeline)]),
        )
        .outerjoin(first, first.c.lead_id == Lead.id)
        .where(scope, period.holds(Lead.created_at))
    )
    return [
        _Captured(
            int(lid),
            (sent - created).total_seconds() if sent is not None else None,
            bool(q),
            bool(w),
        )
        for lid, created, sent, q, w in rows
    ]


def _speed(leads: list[_Captured]) -> SpeedToLead:
    return _speed_of(len(leads), [c.seconds_to_lead for c in leads])


def _speed_to_human(session: Session, scope: ColumnElement[bool], period: Period) -> SpeedToLead:
    touches = first_touches(session, and_(scope, period.holds(Lead.created_at)))
    return _speed_of(len(touches), [t.to_human for t in touches])


def _speed_in_window(session: Session, leads: list[_Captured]) -> SpeedToLead:
    inside = captured_in_window(session, [c.lead_id for c in leads])
    return _speed([c for c in leads if c.lead_id in inside])


def _speed_of(captured: int, seconds: list[float | None]) -> SpeedToLead:
    times = [t for t in seconds if t is not None]
    within = sum(1 for t in times if t <= 3600)
    return SpeedToLead(
        captured=captured,
        contacted=len(times),
        within_hour=within,
        share_within_hour=within / captured if captured else None,
        median_minutes=_minutes(percentile(times, 50)),
        p90_minutes=_minutes(percentile(times, 90)),
    )


def _group_keys(session: Session, by: str, scope: ColumnElement[bool]) -> dict[int, list[str]]:
    if by == "touchpoint":
        q = select(Lead.id, Lead.source).where(scope)
    elif by == "owner":
        q = select(Lead.id, func.coalesce(Lead.owner, "(none)")).where(scope)
    elif by == "campaign":
        q = (
            select(Enrollment.lead_id, Campaign.name)
            .join(Campaign, Campaign.id == Enrollment.campaign_id)
            .join(Lead, Lead.id == Enrollment.lead_id)
            .where(scope)
            .distinct()
        )
    elif by == "variant":
        q = (
            select(
                Delivery.lead_id,
                Campaign.name + "/" + Delivery.step_id + "/" + Delivery.variant,
            )
            .join(Campaign, Campaign.id == Delivery.campaign_id)
            .join(Lead, Lead.id == Delivery.lead_id)
            .where(scope, Delivery.variant.is_not(None))
            .distinct()
        )
    else:
        raise ValueError(f"--by must be one of {', '.join(BY_CHOICES)}, got {by!r}")
    keys: dict[int, list[str]] = defaultdict(list)
    for lid, key in session.execute(q):
        keys[int(lid)].append(str(key))
    return keys


def _groups(leads: list[_Captured], keys: dict[int, list[str]]) -> list[GroupRow]:
    members: dict[str, list[_Captured]] = defaultdict(list)
    for c in leads:
        for key in keys.get(c.lead_id, []):
            members[key].append(c)
    rows = []
    for key in sorted(members):
        group = members[key]
        speed = _speed(group)
        qualified = sum(c.qualified for c in group)
        rows.append(
            GroupRow(
                key=key,
                captured=len(group),
                contacted=speed.contacted,
                share_within_hour=speed.share_within_hour,
                median_minutes_to_lead=speed.median_minutes,
                qualified=qualified,
                won=sum(c.won for c in group),
                qualified_rate=qualified / len(group),
            )
        )
    return rows


def _variant_rows(
    session: Session, campaign_id: int | None, period: Period, count_machine: bool = False
) -> tuple[list[StepRow], dict[int, str], dict[str, list[str]]]:
    """Sends and engaged deliveries per (campaign, step, variant), sent in the period.

    Engagement counts people's opens and clicks (unless ``count_machine``); deliveries
    with a machine open or click are counted apart.
    """
    sent_in = and_(
        Delivery.status == DeliveryStatus.sent.value,
        period.holds(Delivery.sent_at),
        Delivery.campaign_id == campaign_id if campaign_id is not None else literal(True),
    )
    key = (Delivery.campaign_id, Delivery.step_id, Delivery.variant)
    sent = {
        (cid, step, var): (int(n), tpl)
        for cid, step, var, n, tpl in session.execute(
            select(*key, func.count(Delivery.id), func.min(Delivery.template))
            .where(sent_in)
            .group_by(*key)
        )
    }
    engaged: dict[tuple[Any, ...], int] = {}
    for cid, step, var, etype, n, machines in session.execute(
        select(*key, Event.type, *_engaged_counts(Delivery.id, count_machine))
        .join(Event, Event.delivery_id == Delivery.id)
        .where(sent_in, Event.type.in_(ENGAGEMENT))
        .group_by(*key, Event.type)
    ):
        engaged[(cid, step, var, etype, HUMAN)] = int(n)
        engaged[(cid, step, var, etype, MACHINE)] = int(machines)
    names: dict[int, str] = {}
    step_order: dict[str, list[str]] = {}
    for cid, name, spec in session.execute(select(Campaign.id, Campaign.name, Campaign.spec)):
        names[int(cid)] = name
        step_order[name] = [s.get("id") for s in (spec or {}).get("steps", [])]
    rows = []
    for (cid, step, var), (n, tpl) in sent.items():
        e = {t: engaged.get((cid, step, var, t, HUMAN), 0) for t in ENGAGEMENT}
        rows.append(
            StepRow(
                names[cid],
                step,
                var,
                tpl,
                n,
                n - e["bounced"],
                **e,
                machine_opened=engaged.get((cid, step, var, "opened", MACHINE), 0),
                machine_clicked=engaged.get((cid, step, var, "clicked", MACHINE), 0),
            )
        )

    def position(r: StepRow) -> tuple[str, int, str, str]:
        steps = step_order.get(r.campaign, [])
        return (
            r.campaign,
            steps.index(r.step) if r.step in steps else 999,
            r.step,
            r.variant or "",
        )

    rows.sort(key=position)
    return rows, names, step_order


def _step_totals(rows: list[StepRow]) -> list[StepRow]:
    totals: dict[tuple[str, str], StepRow] = {}
    for r in rows:
        k = (r.campaign, r.step)
        prev = totals.get(k)
        if prev is None:
            totals[k] = StepRow(
                r.campaign,
                r.step,
                None,
                r.template,
                r.sent,
                r.delivered,
                r.opened,
                r.clicked,
                r.replied,
                r.unsubscribed,
                r.bounced,
                r.machine_opened,
                r.machine_clicked,
            )
        else:
            totals[k] = StepRow(
                r.campaign,
                r.step,
                None,
                prev.template if prev.template == r.template else "(variants)",
                *(
                    getattr(prev, f) + getattr(r, f)
                    for f in ("sent", "delivered", *ENGAGEMENT, *_MACHINE_FIELDS)
                ),
            )
    return list(totals.values())


def _promotion_yaml(spec: dict[str, Any] | None, step: str, winner: StepRow, why: str) -> str:
    steps = (spec or {}).get("steps", [])
    current = next((s for s in steps if s.get("id") == step), {"id": step})
    changed = {k: v for k, v in current.items() if k != "variants" and v is not None}
    changed["template"] = winner.template
    text = yaml.safe_dump([changed], sort_keys=False, default_flow_style=False).rstrip()
    return f"# step {step}: keep variant {winner.variant!r} ({why})\n{text}"


def _ab_tests(
    rows: list[StepRow], specs: dict[str, dict[str, Any]], metric: str, alpha: float
) -> list[ABResult]:
    steps: dict[tuple[str, str], list[StepRow]] = defaultdict(list)
    for r in rows:
        if r.variant is not None:
            steps[(r.campaign, r.step)].append(r)
    results = []
    for (campaign, step), variants in steps.items():
        ranked = sorted(
            (v for v in variants if v.delivered), key=lambda v: v.rate(metric) or 0, reverse=True
        )
        if len(ranked) < 2:
            results.append(
                ABResult(
                    campaign,
                    step,
                    metric,
                    variants,
                    None,
                    None,
                    None,
                    None,
                    "not enough data: fewer than two variants delivered",
                    None,
                )
            )
            continue
        a, b = ranked[0], ranked[1]
        test = two_proportion_test(
            getattr(a, metric), a.delivered, getattr(b, metric), b.delivered, 1 - alpha
        )
        winner = a.variant if test.p_value < alpha and test.diff > 0 else None
        why = (
            f"{metric} {test.rate_a:.1%} vs {test.rate_b:.1%}, p={test.p_value:.3g}, "
            f"95% CI of the difference {test.ci_low:+.1%} to {test.ci_high:+.1%}"
            if alpha == 0.05
            else f"{metric} {test.rate_a:.1%} vs {test.rate_b:.1%}, p={test.p_value:.3g}"
        )
        verdict = (
            f"{winner} wins: {why}"
            if winner
            else f"no significant difference yet (alpha {alpha}): {why}"
        )
        promotion = _promotion_yaml(specs.get(campaign), step, a, why) if winner else None
        results.append(
            ABResult(
                campaign,
                step,
                metric,
                variants,
                a.variant,
                b.variant,
                test,
                winner,
                verdict,
                promotion,
            )
        )
    return results


def _health(session: Session, campaign_id: int | None, min_sends: int) -> list[HealthRow]:
    v = CampaignVersion
    in_version = and_(
        Delivery.campaign_id == v.campaign_id,
        Delivery.queued_at >= v.created_at,
        or_(v.retired_at.is_(None), Delivery.queued_at < v.retired_at),
    )
    rows = session.execute(
        select(v.campaign_id, v.version, v.retired_at, func.count(Delivery.id))
        .outerjoin(Delivery, in_version)
        .where(v.campaign_id == campaign_id if campaign_id is not None else literal(True))
        .group_by(v.campaign_id, v.version, v.retired_at)
        .order_by(v.campaign_id, v.version)
    )
    history: dict[int, list[tuple[int, bool, int]]] = defaultdict(list)
    for cid, version, retired, n in rows:
        history[int(cid)].append((int(version), retired is not None, int(n)))
    out = []
    for cid, name, spec, version in session.execute(
        select(Campaign.id, Campaign.name, Campaign.spec, Campaign.version).order_by(Campaign.name)
    ):
        if campaign_id is not None and cid != campaign_id:
            continue
        versions = history.get(int(cid), [])
        sends = {ver: n for ver, _, n in versions}
        short = [(ver, n) for ver, retired, n in versions if retired and n < min_sends]
        current = sends.get(version, 0)
        ab_steps = [
            s.get("id") for s in (spec or {}).get("steps", []) if len(s.get("variants") or []) > 1
        ]
        if len(short) >= 2:
            status = "thrashing"
            listed = ", ".join(f"v{ver} at {n}" for ver, n in short)
            why = (
                f"{len(short)} of {len(versions)} versions were retired before {min_sends} sends "
                f"({listed}); let a version gather data before changing it"
            )
        elif ab_steps or current < min_sends or short:
            status = "experimenting"
            parts = [
                f"version {version} has {current} of {min_sends} sends"
                if current < min_sends
                else f"version {version} has {current} sends"
            ]
            if ab_steps:
                parts.append(f"A/B test on {', '.join(ab_steps)}")
            if short:
                parts.append(f"v{short[0][0]} was retired at {short[0][1]} sends")
            why = "; ".join(parts)
        else:
            status = "humming"
            why = (
                f"version {version} has {current} sends and every earlier version reached "
                f"{min_sends} sends before it changed"
            )
        out.append(HealthRow(name, status, f"{status}: {why}", version, len(versions), sends))
    return out


def _backtest(
    session: Session, scope: ColumnElement[bool], pipeline: PipelineSpec, period: Period
) -> BackTest:
    """Score at promotion (the snapshot written when the promotion was done) against wins."""
    snap = ScoreSnapshot
    at_promotion = (
        select(func.min(snap.id))
        .join(
            Promotion,
            and_(
                Promotion.lead_id == snap.lead_id,
                Promotion.status == PromotionStatus.done.value,
                Promotion.done_at == snap.computed_at,
            ),
        )
        .where(period.holds(snap.computed_at))
        .group_by(snap.lead_id)
    )
    rows = session.execute(
        select(snap.behaviour + snap.fit, snap.grade, _reached([_won_stage(pipeline)]))
        .join(Lead, Lead.id == snap.lead_id)
        .where(snap.id.in_(at_promotion), scope)
    ).all()
    scores = [float(s) for s, _, _ in rows]
    won = [bool(w) for _, _, w in rows]
    grades: dict[str, list[bool]] = defaultdict(list)
    for _, grade, w in rows:
        grades[grade or "-"].append(bool(w))
    return BackTest(
        promoted=len(rows),
        won=sum(won),
        auc=auc(scores, won),
        by_grade=[
            GradeRow(g, len(ws), sum(ws), sum(ws) / len(ws)) for g, ws in sorted(grades.items())
        ],
    )


def build_report(
    engine: Engine,
    pipeline: PipelineSpec,
    *,
    campaign: str | None = None,
    period: Period | None = None,
    by: str = "touchpoint",
    metric: str = "clicked",
    alpha: float = 0.05,
    min_sends: int = 100,
    count_machine: bool = False,
    now: datetime | None = None,
) -> Report:
    """Compute the whole analytics report.

    Args:
        engine: The database.
        pipeline: The stage model (``pipeline.yaml``).
        campaign: Only leads ever enrolled in this campaign (and its sends).
        period: The window; stage counts, transitions, sends and back-test use it.
        by: Breakdown of captured leads: touchpoint, campaign, variant or owner.
        metric: The A/B metric per delivered message: opened, clicked or replied.
        alpha: Significance level of the A/B tests.
        min_sends: Sends a campaign version should gather before it changes (health).
        count_machine: Count machine opens and clicks (security gateways, privacy
            proxies) as engagement in the steps and A/B tests; by default only people's
            count, and the machines' are shown apart.
        now: The instant the goals of ``pipeline.yaml`` are paced at (their current
            period); default the period's end, else the wall clock.

    Raises:
        ValueError: an unknown campaign, ``by`` or ``metric``.
    """
    period = period or Period()
    as_of = now or period.until or datetime.now(UTC)
    if by not in BY_CHOICES:
        raise ValueError(f"--by must be one of {', '.join(BY_CHOICES)}, got {by!r}")
    if metric not in ("opened", "clicked", "replied"):
        raise ValueError(f"metric must be opened, clicked or replied, got {metric!r}")
    with session_scope(engine) as session:
        campaign_id = None
        if campaign is not None:
            campaign_id = session.scalar(select(Campaign.id).where(Campaign.name == campaign))
            if campaign_id is None:
                known = ", ".join(session.scalars(select(Campaign.name).order_by(Campaign.name)))
                raise ValueError(f"unknown campaign {campaign!r} (known: {known or 'none'})")
        scope = _scope(campaign_id)
        stays = _stays(scope)
        captured = _captured(session, scope, pipeline, period)
        variant_rows, _, _ = _variant_rows(session, campaign_id, period, count_machine)
        specs: dict[str, dict[str, Any]] = dict(
            (name, spec) for name, spec in session.execute(select(Campaign.name, Campaign.spec))
        )
        return Report(
            campaign=campaign,
            period=period,
            by=by,
            stages=_stage_rows(session, stays, pipeline, period),
            transitions=_transitions(session, stays, period),
            speed_to_lead=_speed(captured),
            steps=_step_totals(variant_rows),
            touchpoints=_groups(captured, _group_keys(session, "touchpoint", scope)),
            breakdown=_groups(captured, _group_keys(session, by, scope)),
            ab_tests=_ab_tests(variant_rows, specs, metric, alpha),
            health=_health(session, campaign_id, min_sends),
            backtest=_backtest(session, scope, pipeline, period),
            count_machine=count_machine,
            speed_to_human=_speed_to_human(session, scope, period),
            speed_in_window=_speed_in_window(session, captured),
            goals=evaluate_goals(session, pipeline.goals, as_of),
            as_of=as_of,
        )


# --- tables: one description shared by the markdown, HTML and terminal outputs -----------------


@dataclass(frozen=True)
class Table:
    """A titled table of display strings."""

    title: str
    columns: list[str]
    rows: list[list[str]]
    note: str = ""


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"


def _num(x: float | None, unit: str = "") -> str:
    return "-" if x is None else f"{x:,.1f}{unit}"


def report_tables(report: Report) -> list[Table]:
    """The report as display tables, in reading order."""
    s = report.speed_to_lead
    tables = [
        Table(
            "Stages",
            [
                "stage",
                "entered",
                "exited forward",
                "dropped (lost)",
                "still in stage",
                "conversion to next",
                "median h",
                "p90 h",
            ],
            [
                [
                    r.label,
                    str(r.entered),
                    str(r.exited_forward),
                    str(r.dropped),
                    str(r.still_in_stage),
                    f"{_pct(r.conversion_to_next)} -> {r.next_stage}"
                    if r.conversion_to_next is not None
                    else "-",
                    _num(r.median_hours),
                    _num(r.p90_hours),
                ]
                for r in report.stages
            ],
            "Conversion: of the leads that entered the stage in the period, the share that moved "
            "to a later stage by its end. Time in stage over stays that ended in the period.",
        ),
        Table(
            "Stage transitions",
            ["from", "to", "leads"],
            [[t.from_stage, t.to_stage, str(t.count)] for t in report.transitions],
        ),
        Table(
            "Speed to lead",
            ["captured", "contacted", "within 1 h", "share within 1 h", "median min", "p90 min"],
            [
                [
                    str(s.captured),
                    str(s.contacted),
                    str(s.within_hour),
                    _pct(s.share_within_hour),
                    _num(s.median_minutes),
                    _num(s.p90_minutes),
                ]
            ],
            "Capture (lead created) to the first sent email; the share is of all captured leads.",
        ),
        *_human_tables(report),
        Table(
            "Campaign steps",
            [
                "campaign",
                "step",
                "sent",
                "delivered",
                "opened",
                "clicked",
                "replied",
                "unsubscribed",
                "bounced",
                "machine opens",
                "machine clicks",
            ],
            [
                [
                    r.campaign,
                    r.step,
                    str(r.sent),
                    str(r.delivered),
                    str(r.opened),
                    str(r.clicked),
                    str(r.replied),
                    str(r.unsubscribed),
                    str(r.bounced),
                    str(r.machine_opened),
                    str(r.machine_clicked),
                ]
                for r in report.steps
            ],
            "Deliveries sent in the period; engagement counts distinct deliveries with the event; "
            "delivered = sent minus bounced. "
            + (
                "Opens and clicks include machines'; machine columns count deliveries a "
                "security gateway or privacy proxy opened or clicked."
                if report.count_machine
                else "Opened and clicked count people only; machine columns count deliveries "
                "a security gateway or privacy proxy opened or clicked (not in the A/B tests)."
            ),
        ),
    ]
    group_cols = [
        "captured",
        "contacted",
        "within 1 h",
        "median min",
        "qualified",
        "qualified rate",
        "won",
    ]

    def group_rows(rows: list[GroupRow]) -> list[list[str]]:
        return [
            [
                g.key,
                str(g.captured),
                str(g.contacted),
                _pct(g.share_within_hour),
                _num(g.median_minutes_to_lead),
                str(g.qualified),
                _pct(g.qualified_rate),
                str(g.won),
            ]
            for g in rows
        ]

    tables.append(Table("Touchpoints", ["touchpoint", *group_cols], group_rows(report.touchpoints)))
    if report.by != "touchpoint":
        tables.append(
            Table(f"By {report.by}", [report.by, *group_cols], group_rows(report.breakdown))
        )
    ab_rows = []
    for ab in report.ab_tests:
        for v in ab.variants:
            ab_rows.append(
                [
                    ab.campaign,
                    ab.step,
                    v.variant or "-",
                    v.template,
                    str(v.delivered),
                    _pct(v.rate("opened")),
                    _pct(v.rate("clicked")),
                    _pct(v.rate("replied")),
                    "winner" if v.variant == ab.winner else "",
                ]
            )
    tables.append(
        Table(
            "A/B tests",
            [
                "campaign",
                "step",
                "variant",
                "template",
                "delivered",
                "open rate",
                "click rate",
                "reply rate",
                "",
            ],
            ab_rows,
            " | ".join(f"{ab.campaign}/{ab.step}: {ab.verdict}" for ab in report.ab_tests),
        )
    )
    tables.append(
        Table(
            "Campaign health",
            ["campaign", "status", "version", "explanation"],
            [[h.campaign, h.status, str(h.version), h.explanation] for h in report.health],
        )
    )
    b = report.backtest
    tables.append(
        Table(
            "Score back-test",
            ["grade at promotion", "promoted", "won", "win rate"],
            [[g.grade, str(g.leads), str(g.won), _pct(g.win_rate)] for g in b.by_grade],
            f"AUC of the score (behaviour + fit) at promotion for predicting won deals: "
            f"{'-' if b.auc is None else f'{b.auc:.3f}'} over {b.promoted} promoted leads, "
            f"{b.won} won.",
        )
    )
    return tables


def _speed_cells(s: SpeedToLead) -> list[str]:
    return [
        str(s.captured),
        str(s.contacted),
        str(s.within_hour),
        _pct(s.share_within_hour),
        _num(s.median_minutes),
        _num(s.p90_minutes),
    ]


def _goal_figure(g: GoalRow, value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.0%}" if g.is_rate else f"{value:,.0f}"


def _human_tables(report: Report) -> list[Table]:
    """Speed to a person and the goals, after the speed to lead table."""
    out: list[Table] = []
    if report.speed_in_window is not None:
        out.append(
            Table(
                "Speed to lead inside the send window",
                [
                    "captured",
                    "contacted",
                    "within 1 h",
                    "share within 1 h",
                    "median min",
                    "p90 min",
                ],
                [_speed_cells(report.speed_in_window)],
                "The leads captured while their first campaign's send window was open (in "
                "their own time zone); the others wait for the window by design.",
            )
        )
    if report.speed_to_human is not None:
        out.append(
            Table(
                "Speed to a person",
                ["captured", "touched", "within 1 h", "share within 1 h", "median min", "p90 min"],
                [_speed_cells(report.speed_to_human)],
                "Capture to the first human touch: the first stage change made in the CRM "
                "and pulled back (a rep accepting, qualifying or closing the lead).",
            )
        )
    if report.goals:
        as_of = report.as_of.isoformat(timespec="minutes") if report.as_of else "now"
        out.append(
            Table(
                "Goals",
                ["goal", "period", "target", "actual", "pace", "elapsed", "status"],
                [
                    [
                        g.goal,
                        f"{g.period_start:%Y-%m-%d} to {g.period_end:%Y-%m-%d}",
                        _goal_figure(g, g.target),
                        _goal_figure(g, g.actual),
                        _goal_figure(g, g.projected),
                        _pct(g.elapsed_share),
                        g.status,
                    ]
                    for g in report.goals
                ],
                f"As of {as_of}. Pace: a count projected to the period's end at its current "
                "rate; a share as it stands (of the leads captured in the period).",
            )
        )
    return out


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def report_markdown(report: Report) -> str:
    """The report as GitHub-flavoured markdown (for terminals, Prefect artifacts, chat)."""
    since = report.period.since.isoformat() if report.period.since else "the start"
    until = report.period.until.isoformat() if report.period.until else "now"
    scope = f"campaign {report.campaign}" if report.campaign else "all campaigns"
    out = [f"# Nurture report: {scope}, {since} to {until}", ""]
    for table in report_tables(report):
        out += [f"## {table.title}", ""]
        if table.rows:
            out.append("| " + " | ".join(_md_cell(c) for c in table.columns) + " |")
            out.append("|" + "|".join("---" for _ in table.columns) + "|")
            out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in table.rows]
        else:
            out.append("_no data in this period_")
        if table.note:
            out += ["", _md_cell(table.note)]
        out.append("")
    promotions = [ab.promotion for ab in report.ab_tests if ab.promotion]
    if promotions:
        out += ["## Winners to promote", "", "```yaml", *promotions, "```", ""]
    return "\n".join(out)
