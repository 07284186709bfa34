"""The suppression list: addresses that must never get marketing mail (suppression wins)."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from sqlalchemy import Table
from sqlalchemy.orm import Session

from nurture.store.models import Suppression
from nurture.store.sql import insert_for

BATCH_SIZE = 1000


def suppress(
    session: Session, emails: Iterable[str], reason: str, source: str | None, now: datetime
) -> int:
    """Add addresses to the suppression list in bulk; existing entries are kept as they are.

    Returns:
        How many addresses were newly suppressed.
    """
    unique = list(dict.fromkeys(e.strip() for e in emails if e and e.strip()))
    if not unique:
        return 0
    table = Suppression.__table__
    assert isinstance(table, Table)
    added = 0
    for start in range(0, len(unique), BATCH_SIZE):
        chunk = unique[start : start + BATCH_SIZE]
        stmt = (
            insert_for(session, table)
            .on_conflict_do_nothing(index_elements=["email"])
            .returning(table.c.id)
        )
        rows = [
            {"email": e, "reason": reason[:32], "source": (source or None), "created_at": now}
            for e in chunk
        ]
        added += len(session.execute(stmt, rows).all())
    return added
