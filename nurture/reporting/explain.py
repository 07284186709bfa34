"""Why a lead has its scores: the events, fit rules and account contacts behind them.

Every item is computed with the same SQL expressions as :func:`nurture.engagement.scoring.score_all`
(same points, same decay, same rules), so the items add up to the exact scores at ``now``: the
stored ones, as of the last scoring run, to within ``SCORE_TOLERANCE`` (0.005 points).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from nurture.engagement.scoring import (
    account_weights,
    counted_column,
    decay_factor_expr,
    fit_rule_exprs,
    grade_for,
    points_expr,
    scored_events_filter,
)
from nurture.errors import NurtureError
from nurture.spec.rules import MACHINE
from nurture.spec.schema import ScoringSpec
from nurture.store.db import session_scope
from nurture.store.models import Account, Event, Lead
from nurture.store.sql import at

__all__ = [
    "AccountContact",
    "EventItem",
    "ExcludedEvent",
    "Explanation",
    "FitItem",
    "LeadNotFound",
    "explain_lead",
]


class LeadNotFound(NurtureError, LookupError):
    """No lead has this email address."""


@dataclass(frozen=True)
class EventItem:
    """One event's contribution to the behaviour score."""

    type: str
    occurred_at: datetime
    points: float
    decay: float
    decayed: float


@dataclass(frozen=True)
class ExcludedEvent:
    """An open or click that adds nothing to the behaviour score, and why."""

    type: str
    occurred_at: datetime
    url: str | None
    engagement: str | None
    reason: str


@dataclass(frozen=True)
class FitItem:
    """One matched fit rule."""

    name: str
    points: float


@dataclass(frozen=True)
class AccountContact:
    """One contact of the lead's account and what it adds to the account score."""

    lead_id: int
    email: str
    total: float
    rank: int
    weight: float
    contribution: float


@dataclass
class Explanation:
    """The scores of one lead, item by item, beside what is stored."""

    lead_id: int
    email: str
    now: datetime
    events: list[EventItem] = field(default_factory=list)
    excluded: list[ExcludedEvent] = field(default_factory=list)
    fit_rules: list[FitItem] = field(default_factory=list)
    grade: str = "F"
    stored_behaviour: float = 0.0
    stored_fit: float = 0.0
    stored_grade: str | None = None
    account_id: int | None = None
    account_name: str | None = None
    account_method: str = ""
    account_contacts: list[AccountContact] = field(default_factory=list)
    stored_account_score: float | None = None

    @property
    def behaviour(self) -> float:
        """Sum of the events' decayed points."""
        return sum(e.decayed for e in self.events)

    @property
    def fit(self) -> float:
        """Sum of the matched fit rules' points."""
        return sum(r.points for r in self.fit_rules)

    @property
    def account_score(self) -> float | None:
        """The account score the contacts roll up to (None without an account)."""
        if self.account_id is None:
            return None
        if self.account_method == "max":
            return max((c.total for c in self.account_contacts), default=0.0)
        return sum(c.contribution for c in self.account_contacts)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready data, with the totals."""
        data = asdict(self)
        data["now"] = self.now.isoformat()
        for item in (*data["events"], *data["excluded"]):
            item["occurred_at"] = item["occurred_at"].isoformat()
        data["behaviour"] = self.behaviour
        data["fit"] = self.fit
        data["account_score"] = self.account_score
        return data


def explain_lead(engine: Engine, email: str, spec: ScoringSpec, now: datetime) -> Explanation:
    """Explain the scores of the lead with this email (exact, else case-insensitive) at ``now``.

    Raises:
        LeadNotFound: no lead has this address.
    """
    with session_scope(engine) as session:
        lead = session.scalars(select(Lead).where(Lead.email == email.strip())).first()
        if lead is None:
            lead = session.scalars(
                select(Lead).where(func.lower(Lead.email) == email.strip().lower()).limit(1)
            ).first()
        if lead is None:
            raise LeadNotFound(f"no lead with email {email!r}")
        out = Explanation(
            lead_id=lead.id,
            email=lead.email,
            now=now,
            stored_behaviour=lead.behaviour_score,
            stored_fit=lead.fit_score,
            stored_grade=lead.grade,
            account_id=lead.account_id,
            account_method=spec.account.method,
        )
        points = points_expr(spec)
        decay = decay_factor_expr(spec, now, session)
        rows = session.execute(
            select(Event.type, Event.occurred_at, points, decay)
            .where(Event.lead_id == lead.id, scored_events_filter(spec, now))
            .order_by(Event.occurred_at, Event.id)
        )
        for etype, occurred, pts, factor in rows:
            pts, factor = float(pts), float(factor)
            decayed = pts if spec.half_life is None else pts * factor
            out.events.append(EventItem(etype, occurred, pts, factor, decayed))
        out.excluded = _excluded(session, lead.id, spec, now)

        fits = fit_rule_exprs(spec, now)
        if fits:
            matched = session.execute(select(*fits).where(Lead.id == lead.id)).one()
            for index, (rule, value) in enumerate(zip(spec.fit, matched, strict=True)):
                if float(value) != 0.0:
                    out.fit_rules.append(FitItem(rule.name or f"fit[{index}]", float(value)))
        out.grade = grade_for(spec, out.fit)

        if lead.account_id is not None:
            account = session.get(Account, lead.account_id)
            if account is not None:
                out.account_name = account.name
                out.stored_account_score = account.score
            contacts = session.execute(
                select(Lead.id, Lead.email, Lead.behaviour_score + Lead.fit_score)
                .where(Lead.account_id == lead.account_id)
                .order_by((Lead.behaviour_score + Lead.fit_score).desc(), Lead.id)
            ).all()
            weights = account_weights(spec.account)
            for rank, (cid, cemail, total) in enumerate(contacts, start=1):
                total = float(total)
                if weights is None:
                    weight = 1.0 if spec.account.method == "sum" or rank == 1 else 0.0
                else:
                    weight = weights[rank - 1] if rank <= len(weights) else 0.0
                if weight:
                    out.account_contacts.append(
                        AccountContact(cid, cemail, total, rank, weight, total * weight)
                    )
    return out


def _excluded(
    session: Session, lead_id: int, spec: ScoringSpec, now: datetime
) -> list[ExcludedEvent]:
    """The lead's opens and clicks with points that scoring leaves out, with the reason."""
    counted = counted_column(spec)
    rows = session.execute(
        select(Event.type, Event.occurred_at, Event.url, Event.engagement, Event.engagement_reason)
        .where(
            Event.lead_id == lead_id,
            Event.occurred_at <= at(now),
            Event.type.in_(list(spec.points)),
            counted.is_(False),
        )
        .order_by(Event.occurred_at, Event.id)
    )
    out = []
    for etype, occurred, url, engagement, why in rows:
        if engagement == MACHINE and not spec.count_machine_engagement:
            reason = f"machine: {why or 'unknown'}"
        elif etype == "clicked":
            reason = "repeat: one click per link per delivery counts"
        else:
            reason = "repeat: one open per delivery counts"
        out.append(ExcludedEvent(etype, occurred, url, engagement, reason))
    return out
