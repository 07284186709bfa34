"""The suppression list: addresses that must never get marketing mail (suppression wins)."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Sequence
from datetime import datetime

from sqlalchemy import Table, select
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


# --------------------------------------------------------------------------- erased people

TOMBSTONE_DOMAIN = "erased.invalid"
ERASED = "erased"  # the suppression reason of an erased person's keyed hash


def erased_address(email: str, key: str) -> str:
    """The tombstone address of ``email``: a keyed hash (HMAC-SHA256) in a reserved domain."""
    digest = hmac.new(key.encode(), email.strip().lower().encode(), hashlib.sha256).hexdigest()
    return f"erased+{digest}@{TOMBSTONE_DOMAIN}"


def resuppress(session: Session, emails: Iterable[str], keys: Sequence[str], now: datetime) -> int:
    """Suppress every address in ``emails`` whose keyed hash marks an erased person.

    Call it where new addresses arrive (import, capture): an erased person who comes back
    through a file or a form is never mailed again. Every key verifies (rotation).

    Returns:
        How many addresses were newly suppressed.
    """
    unique = list(dict.fromkeys(e.strip().lower() for e in emails if e))
    if not unique or not keys:
        return 0
    by_hash: dict[str, str] = {}
    for email in unique:
        for key in keys:
            by_hash[erased_address(email, key)] = email
    hits: set[str] = set()
    hashes = list(by_hash)
    for start in range(0, len(hashes), 500):
        part = hashes[start : start + 500]
        for (addr,) in session.execute(
            select(Suppression.email).where(Suppression.email.in_(part))
        ):
            hits.add(by_hash[addr])
    return suppress(session, sorted(hits), ERASED, "returned after erasure", now) if hits else 0
