"""Claiming due deliveries: in due order, under the tick's budget, with ``SKIP LOCKED`` on
PostgreSQL; loading what composing needs; giving back what never reached the wire.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import (
    Engine,
    and_,
    exists,
    select,
    update,
)
from sqlalchemy.orm import Session

from nurture.config import Throttle
from nurture.journey.pauses import held_campaign_ids
from nurture.store.consent import delivery_blocked
from nurture.store.db import db_retrying, session_scope
from nurture.store.models import (
    Account,
    Campaign,
    Delivery,
    DeliveryStatus,
    Enrollment,
    EnrollmentStatus,
    Lead,
    Suppression,
)
from nurture.store.sql import affected, at, id_in, is_postgres, unindexed


def skip_blocked(engine: Engine, now: datetime) -> int:
    """Skip queued deliveries to suppressed addresses, exited enrollments or leads without the
    consent their campaign's topic needs (suppression and consent win)."""
    with session_scope(engine) as session:
        suppressed = exists(
            select(Suppression.id)
            .join(Lead, Lead.email == Suppression.email)
            .where(Lead.id == Delivery.lead_id)
        )
        exited = exists(
            select(Enrollment.id).where(
                Enrollment.id == Delivery.enrollment_id,
                Enrollment.status == EnrollmentStatus.exited.value,
            )
        )
        result = session.execute(
            update(Delivery)
            .where(
                Delivery.status == DeliveryStatus.queued.value,
                suppressed | exited | delivery_blocked(),
            )
            .values(
                status=DeliveryStatus.skipped.value,
                error="suppressed, exited or without consent",
                updated_at=now,
            )
        )
        return affected(result)


@dataclass
class Budget:
    """How much one tick may still send, overall and per recipient domain."""

    total: int | None = None
    per_domain: int | None = None
    used_total: int = 0
    used: dict[str, int] = field(default_factory=dict)

    @classmethod
    def for_tick(cls, throttle: Throttle) -> Budget:
        """A fresh budget for one tick under ``throttle``."""
        total, per_domain = throttle.caps()
        return cls(total=total, per_domain=per_domain)

    def room(self, limit: int) -> int:
        """How many more messages may be claimed now, at most ``limit``."""
        return limit if self.total is None else max(0, min(limit, self.total - self.used_total))

    def saturated(self) -> list[str]:
        """Domains whose budget is spent."""
        if self.per_domain is None:
            return []
        return [d for d, n in self.used.items() if n >= self.per_domain]

    def pick(self, candidates: list[tuple[int, str]], limit: int) -> list[int]:
        """Take candidates in due order while the budgets allow, and charge them."""
        picked: list[int] = []
        room = self.room(limit)
        for delivery_id, domain in candidates:
            if len(picked) >= room:
                break
            if self.per_domain is not None and self.used.get(domain, 0) >= self.per_domain:
                continue
            picked.append(delivery_id)
            self.used[domain] = self.used.get(domain, 0) + 1
            self.used_total += 1
        return picked


def _claim(
    session: Session, now: datetime, worker: str, limit: int, wall: datetime, budget: Budget
) -> list[int]:
    room = budget.room(limit)
    if room == 0:
        return []
    candidates = (
        select(Delivery.id, Delivery.domain)
        .where(Delivery.status == DeliveryStatus.queued.value, Delivery.due_at <= at(now))
        .order_by(Delivery.due_at, Delivery.id)
        # With a per-domain cap, look further ahead so one busy domain cannot starve the rest.
        .limit(room if budget.per_domain is None else room * 4)
    )
    # The emergency stop and stop_at: a held campaign's mail stays queued, none of it claimed.
    held = held_campaign_ids(session, now)
    if held:
        candidates = candidates.where(Delivery.campaign_id.not_in(held))
    full = budget.saturated()
    if full:
        candidates = candidates.where(Delivery.domain.not_in(full))
    if is_postgres(session):
        candidates = candidates.with_for_update(skip_locked=True)
    ids = budget.pick([(i, d) for i, d in session.execute(candidates).all()], limit)
    if not ids:
        return []
    # The status guard makes the claim safe on SQLite too, whose writers are serialised.
    # It must not pick the access path: the ids go through the primary key (see unindexed).
    claimed = session.scalars(
        update(Delivery)
        .where(
            id_in(session, Delivery.id, ids),
            unindexed(Delivery.status) == DeliveryStatus.queued.value,
        )
        .values(
            status=DeliveryStatus.claimed.value,
            claimed_by=worker,
            claimed_at=wall,
            attempts=Delivery.attempts + 1,
            updated_at=wall,
        )
        .returning(Delivery.id)
        .execution_options(synchronize_session=False)  # nothing of it is loaded here
    )
    return list(claimed)


def claim_and_load(
    engine: Engine, now: datetime, worker: str, limit: int, wall: datetime, budget: Budget
) -> tuple[list[int], list[Any]]:
    """Claim a chunk and read what rendering needs, riding out a locked or restarting
    database. Nothing was sent yet, so a retry is always safe.

    Claim and load are one transaction: an attempt that fails after its claim (the server
    restarting between the two) leaves no rows claimed behind it, and its budget charge is
    undone before the next attempt.
    """
    spent = (budget.used_total, dict(budget.used))
    for attempt in db_retrying():
        with attempt:
            budget.used_total, budget.used = spent[0], dict(spent[1])
            with session_scope(engine) as session:
                ids = _claim(session, now, worker, limit, wall, budget)
                return ids, (load_deliveries(session, ids) if ids else [])
    raise AssertionError("db_retrying re-raises its last error")


def load_deliveries(session: Session, ids: list[int]) -> list[Any]:
    """What composing deliveries ``ids`` needs: the row, its lead, campaign and From."""
    return list(
        session.execute(
            select(
                Delivery.id,
                Delivery.lead_id,
                Delivery.step_id,
                Delivery.template,
                Delivery.variant,
                Delivery.message_id,
                Delivery.attempts,
                Campaign.name.label("campaign"),
                # The campaign's own `from:`, when it has one (the spec as stored JSON).
                Campaign.spec["from"].as_string().label("campaign_from"),
                Lead.email,
                Lead.first_name,
                Lead.last_name,
                Lead.attributes,
                Lead.source,
                Lead.country,
                Lead.lifecycle_stage,
                Account.name.label("company"),
            )
            .join(Lead, Lead.id == Delivery.lead_id)
            .join(Campaign, Campaign.id == Delivery.campaign_id)
            .outerjoin(Account, Account.id == Lead.account_id)
            .where(id_in(session, Delivery.id, ids))
            .order_by(Delivery.id)
        ).all()
    )


def queued_due_count(engine: Engine, now: datetime) -> int:
    """How many deliveries are queued and due."""
    from sqlalchemy import func

    with session_scope(engine) as session:
        return int(
            session.scalar(
                select(func.count(Delivery.id)).where(
                    and_(Delivery.status == DeliveryStatus.queued.value, Delivery.due_at <= at(now))
                )
            )
            or 0
        )
