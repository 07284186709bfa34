"""A simulated sales team for the demo: reps work promoted leads through the local CRM.

Demo support, like :mod:`nurture.dev.simulate`: nothing in the production path imports it.

Each promoted lead is picked up by a rep after a delay (most within the hour in office
hours, some the next day), then accepted (``sql``) or handed back (``recycled``); an
accepted lead may become an ``opportunity``, and an opportunity is won (``customer``) or
``lost``. Every draw is a seeded hash of (seed, lead, stage), so a run is reproducible,
and the odds of qualifying and winning rise with the lead's fit and its hidden
propensity, so the score back-test has something real to find. Moves are written as
stage changes pulled back from the CRM (cause ``crm pull via local``), stamped with the
simulated instant the rep acted, and a won customer answers an NPS survey a week later.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine, func, select

from nurture.crm.sync import cause_for
from nurture.store.db import session_scope
from nurture.store.models import Event, Lead, StageTransition
from nurture.store.sql import bulk_update, insert_for

__all__ = ["SalesResult", "work_pipeline"]

CONNECTOR = "local"
WORKED = ("mql", "sql", "opportunity")
NPS_AFTER = timedelta(days=7)


def _draw(seed: int, lead_id: int, what: str) -> float:
    """A uniform number in [0, 1) from (seed, lead, what): the same every run."""
    digest = hashlib.sha256(f"{seed}:{lead_id}:{what}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _pickup_delay(u: float) -> timedelta:
    """How long a promoted lead waits for a rep: 60% within the hour, the rest later."""
    if u < 0.6:
        return timedelta(minutes=5 + 55 * u / 0.6)
    if u < 0.9:
        return timedelta(hours=1 + 7 * (u - 0.6) / 0.3)
    return timedelta(hours=20 + 28 * (u - 0.9) / 0.1)


@dataclass(frozen=True)
class _Lead:
    id: int
    stage: str
    since: datetime
    fit: float
    behaviour: float
    propensity: float


def _odds(lead: _Lead) -> float:
    """How good a lead really is, 0 to 1: the hidden propensity, nudged by fit and behaviour."""
    return max(
        0.0,
        min(1.0, 0.6 * lead.propensity + lead.fit / 150 + min(lead.behaviour, 60) / 300),
    )


def _next(seed: int, lead: _Lead) -> tuple[str, timedelta]:
    """The stage a rep moves this lead to, and how long after it entered its stage."""
    odds = _odds(lead)
    u = _draw(seed, lead.id, lead.stage)
    wait = _draw(seed, lead.id, lead.stage + ":wait")
    if lead.stage == "mql":
        return ("sql" if u < 0.35 + 0.45 * odds else "recycled"), _pickup_delay(wait)
    if lead.stage == "sql":
        return ("opportunity" if u < 0.2 + 0.5 * odds else "lost"), timedelta(days=1 + 3 * wait)
    return ("customer" if u < 0.05 + 0.5 * odds else "lost"), timedelta(days=3 + 6 * wait)


@dataclass
class SalesResult:
    """What the sales team did in one pass."""

    moves: Counter[str] = field(default_factory=Counter)
    nps: int = 0


def work_pipeline(engine: Engine, now: datetime, *, seed: int = 7) -> SalesResult:
    """Move every worked lead whose rep acted by ``now``; customers answer NPS later.

    One query reads the leads in the worked stages with the time they entered it; the
    moves are one bulk insert of transitions and one bulk update of leads.
    """
    result = SalesResult()
    entered = (
        select(StageTransition.lead_id, func.max(StageTransition.occurred_at).label("at"))
        .group_by(StageTransition.lead_id)
        .subquery()
    )
    with session_scope(engine) as session:
        rows = session.execute(
            select(
                Lead.id,
                Lead.lifecycle_stage,
                entered.c.at,
                Lead.fit_score,
                Lead.behaviour_score,
                Lead.attributes,
            )
            .join(entered, entered.c.lead_id == Lead.id)
            .where(Lead.lifecycle_stage.in_(WORKED))
        ).all()
        transitions: list[dict[str, Any]] = []
        updates: list[dict[str, Any]] = []
        for lid, stage, since, fit, behaviour, attrs in rows:
            since = since if since.tzinfo else since.replace(tzinfo=now.tzinfo)
            propensity = (attrs or {}).get("propensity", 0.2)
            lead = _Lead(lid, stage, since, float(fit), float(behaviour), float(propensity))
            to, delay = _next(seed, lead)
            acted = since + delay
            if acted > now:
                continue
            transitions.append(
                {
                    "lead_id": lid,
                    "from_stage": stage,
                    "to_stage": to,
                    "occurred_at": acted,
                    "cause": cause_for(CONNECTOR),
                }
            )
            updates.append({"id": lid, "lifecycle_stage": to, "updated_at": now})
            result.moves[to] += 1
        if transitions:
            session.execute(insert_for(session, StageTransition), transitions)
            bulk_update(session, Lead, updates)
        result.nps = _answer_nps(session, now, seed)
    return result


def _answer_nps(session: Any, now: datetime, seed: int) -> int:
    """Customers a week past their win answer the NPS survey once (most of them happily)."""
    won = session.execute(
        select(StageTransition.lead_id, func.max(StageTransition.occurred_at))
        .join(Lead, Lead.id == StageTransition.lead_id)
        .where(
            StageTransition.to_stage == "customer",
            Lead.lifecycle_stage == "customer",
        )
        .group_by(StageTransition.lead_id)
    ).all()
    answered = set(session.scalars(select(Event.lead_id).where(Event.type == "nps").distinct()))
    events = []
    for lid, at in won:
        at = at if at.tzinfo else at.replace(tzinfo=now.tzinfo)
        when = at + NPS_AFTER
        if lid in answered or when > now:
            continue
        u = _draw(seed, lid, "nps")
        score = 10 if u < 0.45 else 9 if u < 0.7 else 8 if u < 0.85 else 6
        events.append(
            {
                "lead_id": lid,
                "type": "nps",
                "occurred_at": when,
                "payload": {"score": score},
                "external_id": f"demo-nps-{lid}",
            }
        )
    if events:
        session.execute(insert_for(session, Event), events)
    return len(events)
