"""Consent records per lead and topic, and the SQL that enforces them like suppression.

A campaign that declares ``topic: T`` enrolls and mails a lead only while the lead holds a
*granted* consent record for ``T`` (or for ``*``, every topic) whose lawful basis is one
that ``T`` accepts (``consent.yaml``), and no *withdrawn* record for ``T``. A lead with a
double opt-in still unconfirmed is enrolled nowhere. Both rules are checked when a lead
enters a campaign and again just before each claim (:func:`delivery_blocked`), as
suppression is, so a withdrawal between queueing and sending still wins.

Every change is also an event (``consent_granted`` / ``consent_withdrawn``) whose payload
carries the topic, basis, source, text version, IP and user agent: the history that proves
consent, while the ``consents`` row says what holds now.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from sqlalchemy import ColumnElement, Table, and_, delete, exists, insert, or_, select
from sqlalchemy.orm import Session

from nurture.spec.consent import ALL_TOPICS, BASES, ConsentSpec
from nurture.store.models import (
    Campaign,
    Consent,
    ConsentStatus,
    Delivery,
    Event,
    Lead,
    OptIn,
    TopicBasis,
)
from nurture.store.sql import insert_for

BATCH = 500
CONSENTS = cast(Table, Consent.__table__)
EVENTS = cast(Table, Event.__table__)
GRANTED_EVENT = "consent_granted"
WITHDRAWN_EVENT = "consent_withdrawn"
CONSENT_EVENTS = (GRANTED_EVENT, WITHDRAWN_EVENT)


class ConsentError(ValueError):
    """A consent record that cannot be stored: unknown basis or status, or a bad topic."""


@dataclass(frozen=True)
class ConsentIn:
    """One consent change for one lead and topic, with its proof."""

    lead_id: int
    topic: str
    basis: str
    status: str = ConsentStatus.granted.value
    source_kind: str = "import"  # form, import, touchpoint, preferences, confirmation, ...
    source: str | None = None
    text_version: str | None = None
    ip: str | None = None
    user_agent: str | None = None
    occurred_at: datetime | None = None  # when the person agreed; default: now

    def check(self) -> None:
        """Raise :class:`ConsentError` naming the first bad value."""
        if self.basis not in BASES:
            raise ConsentError(f"unknown lawful basis {self.basis!r}; expected one of {BASES}")
        if self.status not in (ConsentStatus.granted.value, ConsentStatus.withdrawn.value):
            raise ConsentError(f"unknown consent status {self.status!r}")
        if not self.topic or len(self.topic) > 64:
            raise ConsentError(f"bad topic {self.topic!r}")


def sync_topics(session: Session, spec: ConsentSpec) -> None:
    """Store which bases each topic accepts, so enrollment and claims can check in SQL."""
    wanted = {(t, b) for t, bases in spec.topic_bases().items() for b in bases}
    stored = {(t, b) for t, b in session.execute(select(TopicBasis.topic, TopicBasis.basis))}
    if wanted == stored:
        return
    session.execute(delete(TopicBasis))
    if wanted:
        session.execute(insert(TopicBasis), [{"topic": t, "basis": b} for t, b in sorted(wanted)])


def allows(lead_id: Any, topic: Any) -> ColumnElement[bool]:
    """SQL: the lead ``lead_id`` may be mailed under ``topic`` (both columns or literals)."""
    granted = exists(
        select(Consent.id)
        .join(TopicBasis, and_(TopicBasis.topic == topic, TopicBasis.basis == Consent.basis))
        .where(
            Consent.lead_id == lead_id,
            or_(Consent.topic == topic, Consent.topic == ALL_TOPICS),
            Consent.status == ConsentStatus.granted.value,
        )
        # Correlate to the enclosing query at any depth (an UPDATE's table included).
        .correlate_except(Consent, TopicBasis)
    )
    withdrawn = exists(
        select(Consent.id)
        .where(
            Consent.lead_id == lead_id,
            Consent.topic == topic,
            Consent.status == ConsentStatus.withdrawn.value,
        )
        .correlate_except(Consent)
    )
    return and_(granted, ~withdrawn)


def unconfirmed(lead_id: Any) -> ColumnElement[bool]:
    """SQL: the lead has a double opt-in that it has not confirmed yet."""
    return exists(
        select(OptIn.lead_id).where(
            OptIn.lead_id == lead_id, OptIn.confirmed_at.is_(None), OptIn.holds.is_(True)
        )
    )


def enroll_filters(topic: str | None) -> list[ColumnElement[bool]]:
    """The WHERE terms enrollment adds for a campaign with this topic (over ``Lead``)."""
    terms = [~unconfirmed(Lead.id)]
    if topic is not None:
        terms.append(allows(Lead.id, topic))
    return terms


def delivery_blocked() -> ColumnElement[bool]:
    """SQL over ``Delivery``: the lead lacks the consent its campaign's topic needs now."""
    no_consent = exists(
        select(Campaign.id).where(
            Campaign.id == Delivery.campaign_id,
            Campaign.topic.is_not(None),
            ~allows(Delivery.lead_id, Campaign.topic),
        )
    )
    return or_(no_consent, unconfirmed(Delivery.lead_id))


def record_consents(session: Session, changes: Sequence[ConsentIn], now: datetime) -> int:
    """Store consent changes (upsert per lead and topic) and write one event per change.

    A record that repeats what is stored (same status and basis) changes nothing and writes
    no event, so importing the same file twice leaves one history.

    Returns:
        How many records changed.

    Raises:
        ConsentError: a change has an unknown basis or status; nothing of the call is stored.
    """
    for change in changes:
        change.check()
    latest: dict[tuple[int, str], ConsentIn] = {}
    for change in changes:  # the last change per (lead, topic) in one call wins
        latest[(change.lead_id, change.topic)] = change
    changed = 0
    items = list(latest.values())
    for start in range(0, len(items), BATCH):
        chunk = items[start : start + BATCH]
        lead_ids = sorted({c.lead_id for c in chunk})
        stored = {
            (lid, topic): (status, basis)
            for lid, topic, status, basis in session.execute(
                select(Consent.lead_id, Consent.topic, Consent.status, Consent.basis).where(
                    Consent.lead_id.in_(lead_ids)
                )
            )
        }
        todo = [c for c in chunk if stored.get((c.lead_id, c.topic)) != (c.status, c.basis)]
        if not todo:
            continue
        rows = [
            {
                "lead_id": c.lead_id,
                "topic": c.topic,
                "basis": c.basis,
                "status": c.status,
                "source_kind": c.source_kind[:32],
                "source": (c.source or None) and c.source[:255],
                "text_version": (c.text_version or None) and c.text_version[:64],
                "ip": (c.ip or None) and c.ip[:64],
                "user_agent": (c.user_agent or None) and c.user_agent[:512],
                "recorded_at": c.occurred_at or now,
            }
            for c in todo
        ]
        stmt = insert_for(session, CONSENTS)  # Core: the ORM bulk path costs 3x
        stmt = stmt.on_conflict_do_update(
            index_elements=["lead_id", "topic"],
            set_={
                k: getattr(stmt.excluded, k)
                for k in (
                    "basis",
                    "status",
                    "source_kind",
                    "source",
                    "text_version",
                    "ip",
                    "user_agent",
                    "recorded_at",
                )
            },
        )
        session.execute(stmt, rows)
        session.execute(
            insert(EVENTS),
            [
                {
                    "lead_id": r["lead_id"],
                    "type": GRANTED_EVENT
                    if r["status"] == ConsentStatus.granted.value
                    else WITHDRAWN_EVENT,
                    "occurred_at": r["recorded_at"],
                    "payload": {
                        k: r[k]
                        for k in ("topic", "basis", "source_kind", "source", "text_version", "ip")
                        if r[k] is not None
                    }
                    | ({"user_agent": r["user_agent"]} if r["user_agent"] else {}),
                    "counted_human": True,
                    "counted_any": True,
                }
                for r in rows
            ],
        )
        changed += len(todo)
    return changed


def consents_of(session: Session, lead_ids: Iterable[int]) -> dict[int, dict[str, dict[str, Any]]]:
    """Each lead's current consent records by topic (for export and the preference centre)."""
    out: dict[int, dict[str, dict[str, Any]]] = {}
    ids = list(lead_ids)
    for start in range(0, len(ids), BATCH):
        for row in session.scalars(
            select(Consent).where(Consent.lead_id.in_(ids[start : start + BATCH]))
        ):
            out.setdefault(row.lead_id, {})[row.topic] = {
                "basis": row.basis,
                "status": row.status,
                "source_kind": row.source_kind,
                "source": row.source,
                "text_version": row.text_version,
                "ip": row.ip,
                "user_agent": row.user_agent,
                "recorded_at": row.recorded_at.isoformat(),
            }
    return out


def split_topics(value: str) -> list[str]:
    """Topics from one import cell: separated by ``;``, ``,``, ``|`` or spaces."""
    out = []
    for part in value.replace(";", " ").replace(",", " ").replace("|", " ").split():
        topic = part.strip().lower()
        if topic and topic not in out:
            out.append(topic)
    return out
