"""Small dialect-portable SQL helpers: upserts and time arithmetic."""

from __future__ import annotations

from datetime import datetime
from typing import Any
from typing import cast as typing_cast

from sqlalchemy import ColumnElement, Engine, Float, cast, func, literal, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import CursorResult, Result
from sqlalchemy.orm import Session

from nurture.models import UTCDateTime


def dialect_name(bind: Session | Engine) -> str:
    """``sqlite`` or ``postgresql``."""
    engine = bind.get_bind() if isinstance(bind, Session) else bind
    return engine.dialect.name


def insert_for(bind: Session | Engine, table: Any) -> postgresql.Insert | sqlite.Insert:
    """A dialect ``INSERT`` that supports ``on_conflict_do_nothing/do_update``."""
    if dialect_name(bind) == "postgresql":
        return postgresql.insert(table)
    return sqlite.insert(table)


def at(value: datetime) -> ColumnElement[datetime]:
    """A bound timestamp literal stored the same way as our columns (naive UTC)."""
    return literal(value, UTCDateTime())


def unindexed(column: Any) -> ColumnElement[Any]:
    """``column`` as an expression no index can serve (``column || ''``), on either dialect.

    For a guard such as ``id IN (...) AND status = 'queued'``: without statistics SQLite
    takes any equality on an indexed column for selective, so it walks every queued row
    through the status index instead of looking up the few ids by primary key. That made
    each outbox claim cost O(queue) and a tick O(n^2).
    """
    return typing_cast(ColumnElement[Any], column.concat(""))


def seconds_between(bind: Session | Engine, later: Any, earlier: Any) -> ColumnElement[float]:
    """``later - earlier`` in seconds, as a float SQL expression on either dialect."""
    if dialect_name(bind) == "postgresql":
        return cast(func.extract("epoch", later - earlier), Float)
    return (func.julianday(later) - func.julianday(earlier)) * 86400.0


def bulk_update(session: Session, model: Any, rows: list[dict[str, Any]]) -> None:
    """Executemany ``UPDATE`` by primary key; rows are grouped by the columns they set."""
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(sorted(row)), []).append(row)
    for group in groups.values():
        session.execute(update(model), group)


def affected(result: Result[Any]) -> int:
    """Rows affected by an UPDATE or DELETE.

    Not for INSERT: psycopg 3 under SQLAlchemy 2.1 reports -1 there. Count an insert with
    :func:`inserted` instead.
    """
    return max(int(typing_cast(CursorResult[Any], result).rowcount or 0), 0)


def inserted(
    session: Session, stmt: Any, key: Any, rows: list[dict[str, Any]] | None = None
) -> int:
    """Execute an INSERT (optionally executemany over ``rows``) and count the rows it added."""
    result = (
        session.execute(stmt.returning(key), rows) if rows else session.execute(stmt.returning(key))
    )
    return len(result.all())
