"""Funnel figures, computed set-based in the database."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import Engine, and_, distinct, func, select

from nurture.db import session_scope
from nurture.models import (
    Campaign,
    Delivery,
    DeliveryStatus,
    Enrollment,
    Event,
    Lead,
    Promotion,
    PromotionStatus,
)

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

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return asdict(self)


def campaign_funnels(engine: Engine) -> list[CampaignFunnel]:
    """Per campaign: leads in the database, enrolled, sent, and distinct leads who engaged."""
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
        engaged: dict[tuple[int, str], int] = {
            (cid, etype): n
            for cid, etype, n in session.execute(
                select(Delivery.campaign_id, Event.type, func.count(distinct(Event.lead_id)))
                .join(Delivery, Delivery.id == Event.delivery_id)
                .where(Event.type.in_(["opened", "clicked", "replied"]))
                .group_by(Delivery.campaign_id, Event.type)
            ).all()
        }
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
        campaigns = session.execute(select(Campaign.id, Campaign.name).order_by(Campaign.name))
        return [
            CampaignFunnel(
                campaign=name,
                leads=int(total_leads),
                enrolled=int(enrolled.get(cid, 0)),
                sent=int(sent.get(cid, 0)),
                opened=int(engaged.get((cid, "opened"), 0)),
                clicked=int(engaged.get((cid, "clicked"), 0)),
                replied=int(engaged.get((cid, "replied"), 0)),
                mql=int(mql.get(cid, 0)),
                promoted=int(promoted.get(cid, 0)),
            )
            for cid, name in campaigns
        ]
