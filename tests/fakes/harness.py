"""Helpers the CRM tests share: seeded promotions, recorded sleeps, crash injection."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, func, select

from nurture.crm import Connector, PromotionItem, PushResult, StageChange
from nurture.store.db import session_scope
from nurture.store.models import Account, CrmLink, Lead, Promotion
from nurture.store.sql import insert_for


class Sleeps:
    """A sleep function that records what it was asked to wait and returns at once."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)


def seed_promotions(
    engine: Engine, now: datetime, n: int, connector: str, stage: str = "mql"
) -> list[int]:
    """``n`` leads at stage ``lead`` with an account each, queued for ``connector``."""
    with session_scope(engine) as session:
        session.execute(
            insert_for(session, Account),
            [
                {"name": f"Company {i}", "domain": f"co{i}.example", "created_at": now,
                 "updated_at": now}
                for i in range(n)
            ],
        )  # fmt: skip
        accounts = dict(session.execute(select(Account.domain, Account.id)).all())
        session.execute(
            insert_for(session, Lead),
            [
                {
                    "email": f"Person{i}@co{i}.example"
                    if i % 7 == 0
                    else f"person{i}@co{i}.example",
                    "first_name": f"first{i}",
                    "last_name": f"Last{i}",
                    "account_id": accounts[f"co{i}.example"],
                    "source": "website",
                    "lifecycle_stage": "lead",
                    "attributes": {"industry": "SaaS"},
                    "created_at": now,
                    "updated_at": now,
                }
                for i in range(n)
            ],
        )
        ids = list(session.scalars(select(Lead.id).order_by(Lead.id)))
        session.execute(
            insert_for(session, Promotion),
            [
                {"lead_id": lid, "connector": connector, "stage": stage, "status": "queued",
                 "attempts": 0, "created_at": now, "next_attempt_at": now}
                for lid in ids
            ],
        )  # fmt: skip
        return ids


def counts(engine: Engine, connector: str) -> dict[str, Any]:
    """Promotion statuses, links and lead stages, for assertions."""
    with session_scope(engine) as session:
        return {
            "status": dict(
                session.execute(
                    select(Promotion.status, func.count())
                    .where(Promotion.connector == connector)
                    .group_by(Promotion.status)
                ).all()
            ),
            "links": session.scalar(
                select(func.count()).select_from(CrmLink).where(CrmLink.connector == connector)
            ),
            "stages": dict(
                session.execute(
                    select(Lead.lifecycle_stage, func.count()).group_by(Lead.lifecycle_stage)
                ).all()
            ),
        }


def links(engine: Engine, connector: str) -> dict[int, str]:
    """lead id -> external id."""
    with session_scope(engine) as session:
        return dict(
            session.execute(
                select(CrmLink.lead_id, CrmLink.external_id).where(CrmLink.connector == connector)
            ).all()
        )


class CrashAfter:
    """Wraps a connector and raises after its ``n``-th push reached the CRM (a crash
    between the CRM accepting a batch and our commit)."""

    def __init__(self, inner: Connector, n: int) -> None:
        self.inner, self.n = inner, n
        self.name, self.batch_size = inner.name, inner.batch_size
        self.pushes = 0

    def push(self, items: Sequence[PromotionItem]) -> list[PushResult]:
        results = self.inner.push(items)
        self.pushes += 1
        if self.pushes >= self.n:
            raise RuntimeError("worker killed after the CRM accepted the batch")
        return results

    def pull(self, since: datetime | None, now: datetime) -> list[StageChange]:
        return self.inner.pull(since, now)
