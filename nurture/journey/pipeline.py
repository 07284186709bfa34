"""Lifecycle stages, stage transitions, and queueing promotions.

A stage change is always two set-based statements in one transaction: insert the
transitions for the leads that move, then move them. Promotions are queued here once per
(lead, connector, stage); :mod:`nurture.crm.promotions` pushes them to the CRM.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import ColumnElement, Engine, and_, func, literal, or_, select, update
from sqlalchemy.orm import Session

from nurture.journey.segments import RuleContext, compile_rule
from nurture.journey.sequences import CampaignRef
from nurture.spec.rules import MACHINE
from nurture.spec.schema import PipelineSpec, ScoringSpec
from nurture.store.db import session_scope
from nurture.store.models import (
    Enrollment,
    Event,
    Lead,
    Promotion,
    PromotionStatus,
    StageTransition,
)
from nurture.store.sql import affected, at, insert_for, inserted

RECYCLED = "recycled"  # the side stage of leads sales handed back


def earlier_stages(pipeline: PipelineSpec, stage: str) -> list[str]:
    """Stages before ``stage`` in funnel order (plus the side stage ``recycled``)."""
    order = pipeline.order()
    if stage not in order:
        return []
    return [*order[: order.index(stage)], RECYCLED]


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
    """Advance leads whose scores cross the configured stage thresholds (never backwards).

    A ``recycled`` lead (handed back by sales) crosses only after it engages again: a
    scored event after it entered ``recycled``. The score it brought with it does not
    send it straight back up the funnel.
    """
    moved: dict[str, int] = {}
    ctx = RuleContext(now=now)
    with session_scope(engine) as session:
        for threshold in scoring.stages:
            earlier = earlier_stages(pipeline, threshold.stage)
            if not earlier:
                continue
            before = [stage for stage in earlier if stage != RECYCLED]
            cond = and_(
                or_(
                    Lead.lifecycle_stage.in_(before),
                    and_(Lead.lifecycle_stage == RECYCLED, engaged_since_recycled(scoring)),
                ),
                compile_rule(threshold.when, ctx),
            )
            moved[threshold.stage] = move_leads(
                session, cond, threshold.stage, cause="score threshold", now=now
            )
    return moved


def engaged_since_recycled(scoring: ScoringSpec) -> ColumnElement[bool]:
    """Whether the lead has a positively scored event after it last entered ``recycled``
    (or after it was created, for a lead imported as recycled); machine opens and clicks
    count only where the scoring counts them."""
    recycled_at = (
        select(func.max(StageTransition.occurred_at))
        .where(StageTransition.lead_id == Lead.id, StageTransition.to_stage == RECYCLED)
        .scalar_subquery()
    )
    scored = sorted(kind for kind, points in scoring.points.items() if points > 0)
    events = select(Event.id).where(
        Event.lead_id == Lead.id,
        Event.type.in_(scored),
        Event.occurred_at > func.coalesce(recycled_at, Lead.created_at),
    )
    if not scoring.count_machine_engagement:
        events = events.where(or_(Event.engagement.is_(None), Event.engagement != MACHINE))
    return events.exists()


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
