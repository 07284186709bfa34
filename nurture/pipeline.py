"""Lifecycle stages, stage transitions and the promotion queue (an outbox to the CRM).

A stage change is always two set-based statements in one transaction: insert the
transitions for the leads that move, then move them. Promotions are queued once per
(lead, connector, stage) and pushed in the connector's batch size; a CRM outage delays a
promotion but never loses it, and a record that keeps failing is parked with its reason.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, Engine, and_, literal, select, update
from sqlalchemy.orm import Session

from nurture.crm import Connector, PromotionItem, PushResult
from nurture.db import is_postgres, session_scope
from nurture.models import (
    Account,
    CrmLink,
    Enrollment,
    Lead,
    Promotion,
    PromotionStatus,
    ScoreSnapshot,
    StageTransition,
)
from nurture.segments import RuleContext, compile_rule
from nurture.sequences import CampaignRef
from nurture.specs import PipelineSpec, ScoringSpec
from nurture.sql import affected, at, bulk_update, insert_for, inserted


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


def _claim_promotions(session: Session, connector: str, now: datetime, limit: int) -> list[Any]:
    query = (
        select(
            Promotion.id,
            Promotion.lead_id,
            Promotion.stage,
            Promotion.attempts,
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
    max_attempts: int = 8,
) -> PromotionReport:
    """Push queued promotions through their connectors, batch by batch, and record results."""
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
                _apply_results(session, name, rows, results, pipeline, now, max_attempts, report)
            if all(not r.ok for r in results) and report.retry:
                break  # the CRM is failing: leave the rest queued for the next tick
    return report


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
    max_attempts: int,
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
        elif res.retryable and attempts < max_attempts:
            backoff = timedelta(minutes=min(2**attempts, 24 * 60))
            later.append(
                {
                    "id": row.id,
                    "attempts": attempts,
                    "last_error": res.error,
                    "next_attempt_at": now + backoff,
                }
            )
            report.retry += 1
        else:
            later.append(
                {
                    "id": row.id,
                    "attempts": attempts,
                    "last_error": res.error,
                    "status": PromotionStatus.parked.value,
                }
            )
            report.parked += 1
            report.errors.append(f"{connector}: lead {row.lead_id}: {res.error}")
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
