"""Lifecycle stages, stage transitions and the promotion queue (an outbox to the CRM).

A stage change is always two set-based statements in one transaction: insert the
transitions for the leads that move, then move them. Promotions are queued once per
(lead, connector, stage) and pushed in the connector's batch size. A retryable failure
(network, 429, 5xx, a spent daily quota) only delays a promotion: it is retried with a
backoff capped at ``MAX_BACKOFF`` and parks only after ``PARK_AFTER`` of failures in a row,
never after a count of attempts. A fatal per-record error parks it at once. Parked
promotions are never dropped: :func:`parked_promotions` lists them and
:func:`requeue_parked` puts them back after a fix.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, Engine, and_, func, literal, select, update
from sqlalchemy.orm import Session

from nurture.crm import Connector, PromotionItem, PushResult
from nurture.journey.segments import RuleContext, compile_rule
from nurture.journey.sequences import CampaignRef
from nurture.spec.schema import PipelineSpec, ScoringSpec
from nurture.store.db import session_scope
from nurture.store.models import (
    Account,
    CrmLink,
    Enrollment,
    Lead,
    Promotion,
    PromotionStatus,
    ScoreSnapshot,
    StageTransition,
)
from nurture.store.sql import affected, at, bulk_update, insert_for, inserted, is_postgres


def earlier_stages(pipeline: PipelineSpec, stage: str) -> list[str]:
    """Stages before ``stage`` in funnel order (plus the side stage ``recycled``)."""
    order = pipeline.order()
    if stage not in order:
        return []
    return [*order[: order.index(stage)], "recycled"]


def move_leads(
    session: Session,
    where: ColumnElement[bool],
    to_stage: str,
    *,
    cause: str,
    now: datetime,
    campaign_id: int | None = None,
) -> int:
    """Move every lead matching ``where`` to ``to_stage``, recording one transition each."""
    moving = select(
        Lead.id,
        Lead.lifecycle_stage,
        literal(to_stage),
        at(now),
        literal(cause),
        literal(campaign_id),
    ).where(where, Lead.lifecycle_stage != to_stage)
    session.execute(
        insert_for(session, StageTransition).from_select(
            ["lead_id", "from_stage", "to_stage", "occurred_at", "cause", "campaign_id"], moving
        )
    )
    result = session.execute(
        update(Lead)
        .where(where, Lead.lifecycle_stage != to_stage)
        .values(lifecycle_stage=to_stage, updated_at=now)
        .execution_options(synchronize_session=False)
    )
    return affected(result)


def apply_stage_thresholds(
    engine: Engine, scoring: ScoringSpec, pipeline: PipelineSpec, now: datetime
) -> dict[str, int]:
    """Advance leads whose scores cross the configured stage thresholds (never backwards)."""
    moved: dict[str, int] = {}
    ctx = RuleContext(now=now)
    with session_scope(engine) as session:
        for threshold in scoring.stages:
            earlier = earlier_stages(pipeline, threshold.stage)
            if not earlier:
                continue
            cond = and_(Lead.lifecycle_stage.in_(earlier), compile_rule(threshold.when, ctx))
            moved[threshold.stage] = move_leads(
                session, cond, threshold.stage, cause="score threshold", now=now
            )
    return moved


def queue_promotions(
    engine: Engine, campaign: CampaignRef, pipeline: PipelineSpec, now: datetime
) -> int:
    """Queue every lead of this campaign that meets its promotion rule, once each."""
    promote = campaign.spec.promote
    if promote is None:
        return 0
    earlier = earlier_stages(pipeline, promote.to.stage)
    ctx = RuleContext(now=now, campaign_id=campaign.id)
    enrolled = select(Enrollment.lead_id).where(Enrollment.campaign_id == campaign.id)
    query = select(
        Lead.id,
        literal(campaign.id),
        literal(promote.to.connector),
        literal(promote.to.stage),
        literal(PromotionStatus.queued.value),
        literal(0),
        at(now),
        at(now),
    ).where(
        Lead.id.in_(enrolled),
        Lead.lifecycle_stage.in_(earlier) if earlier else literal(True),
        compile_rule(promote.when, ctx),
    )
    with session_scope(engine) as session:
        stmt = (
            insert_for(session, Promotion)
            .from_select(
                [
                    "lead_id",
                    "campaign_id",
                    "connector",
                    "stage",
                    "status",
                    "attempts",
                    "created_at",
                    "next_attempt_at",
                ],
                query,
            )
            .on_conflict_do_nothing(index_elements=["lead_id", "connector", "stage"])
        )
        return inserted(session, stmt, Promotion.id)


@dataclass
class PromotionReport:
    """Counts from one pass over the promotion queue."""

    pushed: int = 0
    retry: int = 0
    parked: int = 0
    by_connector: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    errors: list[str] = field(default_factory=list)
    paused: dict[str, datetime] = field(default_factory=dict)  # connector -> until


# A CRM outage shorter than this only delays promotions (NURTURE_CRM_PARK_AFTER).
PARK_AFTER = timedelta(days=7)
# The longest wait between two tries of a failing promotion.
MAX_BACKOFF = timedelta(hours=1)


def _claim_promotions(session: Session, connector: str, now: datetime, limit: int) -> list[Any]:
    query = (
        select(
            Promotion.id,
            Promotion.lead_id,
            Promotion.stage,
            Promotion.attempts,
            Promotion.failing_since,
            Promotion.campaign_id,
            Lead.email,
            Lead.first_name,
            Lead.last_name,
            Lead.source,
            Lead.behaviour_score,
            Lead.fit_score,
            Lead.grade,
            Lead.attributes,
            Account.name.label("company"),
            CrmLink.external_id,
        )
        .join(Lead, Lead.id == Promotion.lead_id)
        .outerjoin(Account, Account.id == Lead.account_id)
        .outerjoin(CrmLink, and_(CrmLink.lead_id == Lead.id, CrmLink.connector == connector))
        .where(
            Promotion.connector == connector,
            Promotion.status == PromotionStatus.queued.value,
            Promotion.next_attempt_at <= at(now),
        )
        .order_by(Promotion.next_attempt_at, Promotion.id)
        .limit(limit)
    )
    if is_postgres(session.get_bind()):  # type: ignore[arg-type]
        query = query.with_for_update(skip_locked=True, of=Promotion)
    return list(session.execute(query).all())


def _item(row: Any) -> PromotionItem:
    return PromotionItem(
        promotion_id=row.id,
        lead_id=row.lead_id,
        email=row.email,
        stage=row.stage,
        first_name=row.first_name,
        last_name=row.last_name,
        company=row.company,
        source=row.source,
        behaviour_score=row.behaviour_score,
        fit_score=row.fit_score,
        grade=row.grade,
        attributes=row.attributes or {},
        external_id=row.external_id,
    )


def process_promotions(
    engine: Engine,
    connectors: Mapping[str, Connector],
    pipeline: PipelineSpec,
    now: datetime,
    *,
    park_after: timedelta = PARK_AFTER,
) -> PromotionReport:
    """Push queued promotions through their connectors, batch by batch, and record results.

    Args:
        engine: The nurture database.
        connectors: The connectors to push through, by name.
        pipeline: The stages, for the moves that a successful push makes.
        now: The current instant (injected).
        park_after: How long a promotion may keep failing retryably before it parks.
    """
    report = PromotionReport()
    for name, connector in connectors.items():
        while True:
            with session_scope(engine) as session:
                rows = _claim_promotions(session, name, now, connector.batch_size)
                if not rows:
                    break
                try:
                    results = _push(connector, [_item(r) for r in rows])
                except _DailyLimit as exc:
                    until = _pause(session, name, now)
                    report.paused[name] = until
                    report.errors.append(f"{name}: paused until {until.isoformat()}: {exc}")
                    break
                _apply_results(session, name, rows, results, pipeline, now, park_after, report)
            if all(not r.ok for r in results) and report.retry:
                break  # the CRM is failing: leave the rest queued for the next tick
    return report


def backoff(attempts: int) -> timedelta:
    """The wait after the ``attempts``-th failed try: 2, 4, 8 ... minutes, at most an hour."""
    return min(timedelta(minutes=2 ** min(attempts, 16)), MAX_BACKOFF)


def _span(delta: timedelta) -> str:
    """``3 d 4 h`` / ``5 h 2 min`` / ``40 min``: a failure span for a parked reason."""
    minutes = int(delta.total_seconds() // 60)
    days, rest = divmod(minutes, 24 * 60)
    hours, minutes = divmod(rest, 60)
    if days:
        return f"{days} d {hours} h"
    return f"{hours} h {minutes} min" if hours else f"{minutes} min"


@dataclass(frozen=True)
class ParkedPromotion:
    """A parked promotion, as ``nurture crm parked`` lists it."""

    id: int
    connector: str
    lead_id: int
    email: str
    stage: str
    attempts: int
    reason: str
    queued_at: datetime
    parked_at: datetime | None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return {
            "id": self.id,
            "connector": self.connector,
            "lead_id": self.lead_id,
            "email": self.email,
            "stage": self.stage,
            "attempts": self.attempts,
            "reason": self.reason,
            "queued_at": self.queued_at.isoformat(),
            "parked_at": self.parked_at.isoformat() if self.parked_at else None,
        }


def _parked_where(connector: str | None, reason: str | None) -> list[ColumnElement[bool]]:
    where = [Promotion.status == PromotionStatus.parked.value]
    if connector:
        where.append(Promotion.connector == connector)
    if reason:
        where.append(Promotion.last_error.contains(reason, autoescape=True))
    return where


def parked_promotions(
    engine: Engine, *, connector: str | None = None, reason: str | None = None
) -> list[ParkedPromotion]:
    """Every parked promotion (of one connector, or whose reason contains ``reason``)."""
    query = (
        select(
            Promotion.id,
            Promotion.connector,
            Promotion.lead_id,
            Lead.email,
            Promotion.stage,
            Promotion.attempts,
            Promotion.last_error,
            Promotion.created_at,
            Promotion.parked_at,
        )
        .join(Lead, Lead.id == Promotion.lead_id)
        .where(*_parked_where(connector, reason))
        .order_by(Promotion.connector, Promotion.parked_at, Promotion.id)
    )
    with session_scope(engine) as session:
        return [
            ParkedPromotion(
                r.id,
                r.connector,
                r.lead_id,
                r.email,
                r.stage,
                r.attempts,
                r.last_error or "",
                r.created_at,
                r.parked_at,
            )
            for r in session.execute(query)
        ]


def requeue_parked(
    engine: Engine, now: datetime, *, connector: str | None = None, reason: str | None = None
) -> int:
    """Put parked promotions back in the queue, due at ``now``, with a fresh failure clock.

    Returns:
        How many promotions were requeued.
    """
    with session_scope(engine) as session:
        result = session.execute(
            update(Promotion)
            .where(*_parked_where(connector, reason))
            .values(
                status=PromotionStatus.queued.value,
                next_attempt_at=now,
                failing_since=None,
                parked_at=None,
            )
            .execution_options(synchronize_session=False)
        )
        return affected(result)


def parked_counts(engine: Engine) -> dict[str, int]:
    """How many promotions are parked, per connector (for alerts)."""
    query = (
        select(Promotion.connector, func.count())
        .where(Promotion.status == PromotionStatus.parked.value)
        .group_by(Promotion.connector)
    )
    with session_scope(engine) as session:
        return {name: int(n) for name, n in session.execute(query)}


class _DailyLimit(Exception):
    """The connector's daily quota is spent (e.g. Salesforce REQUEST_LIMIT_EXCEEDED)."""


def _pause(session: Session, connector: str, now: datetime) -> datetime:
    """Defer every queued promotion of ``connector`` to the next UTC day, costing no attempt."""
    day = now.astimezone(UTC).date() + timedelta(days=1)
    until = datetime.combine(day, datetime.min.time(), tzinfo=UTC)
    session.execute(
        update(Promotion)
        .where(
            Promotion.connector == connector,
            Promotion.status == PromotionStatus.queued.value,
            Promotion.next_attempt_at < at(until),
        )
        .values(next_attempt_at=until)
        .execution_options(synchronize_session=False)
    )
    return until


def _push(connector: Connector, items: list[PromotionItem]) -> list[PushResult]:
    from nurture.crm import FatalConnectorError, RetriableConnectorError

    try:
        return connector.push(items)
    except RetriableConnectorError as exc:
        if getattr(exc, "pause_until_next_day", False):
            raise _DailyLimit(str(exc)) from exc
        return [PushResult(i.promotion_id, False, error=str(exc), retryable=True) for i in items]
    except FatalConnectorError as exc:
        return [PushResult(i.promotion_id, False, error=str(exc), retryable=False) for i in items]


def _apply_results(
    session: Session,
    connector: str,
    rows: list[Any],
    results: list[PushResult],
    pipeline: PipelineSpec,
    now: datetime,
    park_after: timedelta,
    report: PromotionReport,
) -> None:
    by_id = {r.id: r for r in rows}
    done: list[dict[str, Any]] = []
    later: list[dict[str, Any]] = []
    links: list[dict[str, Any]] = []
    promoted_by_stage: dict[tuple[str, int | None], list[int]] = defaultdict(list)
    for res in results:
        row = by_id[res.promotion_id]
        attempts = row.attempts + 1
        if res.ok:
            done.append(
                {
                    "id": row.id,
                    "status": PromotionStatus.done.value,
                    "attempts": attempts,
                    "done_at": now,
                    "last_error": None,
                    "failing_since": None,
                }
            )
            if res.external_id:
                links.append(
                    {
                        "lead_id": row.lead_id,
                        "connector": connector,
                        "object_type": res.object_type,
                        "external_id": res.external_id,
                        "created_at": now,
                        "updated_at": now,
                    }
                )
            promoted_by_stage[(row.stage, row.campaign_id)].append(row.lead_id)
            report.pushed += 1
            report.by_connector[connector] += 1
            continue
        failing_since = row.failing_since or now
        if res.retryable and now - failing_since < park_after:
            later.append(
                {
                    "id": row.id,
                    "attempts": attempts,
                    "last_error": res.error,
                    "next_attempt_at": now + backoff(attempts),
                    "failing_since": failing_since,
                }
            )
            report.retry += 1
            continue
        reason = res.error or "failed"
        if res.retryable:
            reason = f"still failing after {_span(now - failing_since)}: {reason}"
        later.append(
            {
                "id": row.id,
                "attempts": attempts,
                "last_error": reason,
                "status": PromotionStatus.parked.value,
                "failing_since": failing_since,
                "parked_at": now,
            }
        )
        report.parked += 1
        report.errors.append(f"{connector}: lead {row.lead_id}: {reason}")
    bulk_update(session, Promotion, done + later)
    if links:
        session.execute(
            insert_for(session, CrmLink).on_conflict_do_nothing(
                index_elements=["connector", "object_type", "lead_id"]
            ),
            links,
        )
    for (stage, campaign_id), lead_ids in promoted_by_stage.items():
        earlier = earlier_stages(pipeline, stage)
        cond = and_(Lead.id.in_(lead_ids), Lead.lifecycle_stage.in_(earlier))
        move_leads(
            session,
            cond,
            stage,
            cause=f"promoted via {connector}",
            now=now,
            campaign_id=campaign_id,
        )
        session.execute(
            insert_for(session, ScoreSnapshot).from_select(
                ["lead_id", "computed_at", "behaviour", "fit", "grade"],
                select(Lead.id, at(now), Lead.behaviour_score, Lead.fit_score, Lead.grade).where(
                    Lead.id.in_(lead_ids)
                ),
            )
        )
