"""Retention: raw event detail older than a configured age is removed.

Counts must stay true, so retention removes what no aggregate reads. For every event
older than the cutoff it:

* deletes the repeats: an open or click that neither scoring count uses (``counted_human``
  and ``counted_any`` false) and that an earlier event of the same delivery, type,
  human/machine class (and link, for clicks) already stands for. Reports count distinct
  deliveries and leads per type and class, and scores sum the counted events, so both
  read the same numbers before and after;
* strips what remains of its raw detail: the payload (IP address, user agent, bounce and
  reply details) and the external id.

Consent events are proof of consent and are kept whole, whatever their age.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Engine, Text, and_, cast, delete, exists, func, or_, select, update
from sqlalchemy.orm import aliased

from nurture.store.consent import CONSENT_EVENTS
from nurture.store.db import session_scope
from nurture.store.models import Event
from nurture.store.sql import affected, at


@dataclass
class RetentionResult:
    """What one retention pass did."""

    deleted: int = 0
    stripped: int = 0

    def as_dict(self) -> dict[str, int]:
        """JSON-ready counts."""
        return {"deleted": self.deleted, "stripped": self.stripped}


def apply_retention(engine: Engine, older_than: timedelta, now: datetime) -> RetentionResult:
    """Remove raw event detail older than ``now - older_than`` (see the module docstring)."""
    cutoff = at(now - older_than)
    earlier = aliased(Event)
    same_kind = and_(
        earlier.delivery_id == Event.delivery_id,
        earlier.type == Event.type,
        func.coalesce(earlier.engagement, "") == func.coalesce(Event.engagement, ""),
        or_(Event.type != "clicked", earlier.url == Event.url),
        earlier.id < Event.id,
    )
    result = RetentionResult()
    with session_scope(engine) as session:
        result.deleted = affected(
            session.execute(
                delete(Event)
                .where(
                    Event.occurred_at < cutoff,
                    Event.type.in_(["opened", "clicked"]),
                    Event.delivery_id.is_not(None),
                    Event.counted_human.is_(False),
                    Event.counted_any.is_(False),
                    exists(select(earlier.id).where(same_kind)),
                )
                .execution_options(synchronize_session=False)
            )
        )
        result.stripped = affected(
            session.execute(
                update(Event)
                .where(
                    Event.occurred_at < cutoff,
                    Event.type.not_in(CONSENT_EVENTS),
                    # Only rows with something left to strip: a rerun rewrites nothing.
                    or_(Event.external_id.is_not(None), func.length(cast(Event.payload, Text)) > 2),
                )
                .values(payload={}, external_id=None)
                .execution_options(synchronize_session=False)
            )
        )
    return result
