"""bulk_update: rows by primary key, one statement for rows that set the same values."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine, event, select

from nurture.store.db import session_scope
from nurture.store.models import Lead
from nurture.store.sql import IN_SLICE, bulk_update
from tests.helpers import add_leads


def _updates(engine: Engine, rows: list[dict[str, Any]]) -> list[bool]:
    """Run bulk_update; whether each UPDATE it issued was an executemany."""
    seen: list[bool] = []

    def capture(_c: Any, _cur: Any, sql: str, _p: Any, _ctx: Any, many: bool) -> None:
        if sql.lstrip().upper().startswith("UPDATE"):
            seen.append(many)

    event.listen(engine, "before_cursor_execute", capture)
    try:
        with session_scope(engine) as session:
            bulk_update(session, Lead, rows)
    finally:
        event.remove(engine, "before_cursor_execute", capture)
    return seen


def _leads(engine: Engine) -> dict[int, Lead]:
    with session_scope(engine) as session:
        return {lead.id: lead for lead in session.scalars(select(Lead))}


def test_alike_rows_take_one_statement_and_distinct_rows_one_executemany(
    engine: Engine, now: datetime
) -> None:
    ids = add_leads(engine, now, *({"email": f"p{i}@example.com"} for i in range(7)))
    later = now + timedelta(hours=1)
    rows: list[dict[str, Any]] = [
        {"id": i, "lifecycle_stage": "mql", "updated_at": later} for i in ids[:4]
    ]
    rows += [{"id": ids[4], "lifecycle_stage": "sql", "updated_at": later}]
    rows += [{"id": ids[5], "lifecycle_stage": "lead", "updated_at": now}]
    rows += [{"id": ids[6], "first_name": "Zoë", "country": None}]
    many = _updates(engine, rows)
    # One set-based UPDATE for the four alike rows, one executemany for the two single rows
    # setting the same columns, one plain UPDATE for the row setting other columns.
    assert sorted(many) == [False, False, True]
    got = _leads(engine)
    assert [got[i].lifecycle_stage for i in ids[:6]] == ["mql"] * 4 + ["sql", "lead"]
    assert [got[i].updated_at for i in ids[:6]] == [later] * 5 + [now]
    assert got[ids[6]].first_name == "Zoë" and got[ids[6]].country is None
    assert got[ids[6]].lifecycle_stage == "subscriber"  # untouched column


def test_unhashable_values_and_long_id_lists(engine: Engine, now: datetime) -> None:
    count = IN_SLICE + 5
    ids = add_leads(engine, now, *({"email": f"q{i}@example.com"} for i in range(count)))
    rows: list[dict[str, Any]] = [{"id": i, "source": "social"} for i in ids[:-2]]
    rows += [{"id": ids[-2], "attributes": {"type": "b2b", "tags": ["a"]}}]
    rows += [{"id": ids[-1], "attributes": {"type": "b2c"}}, {"id": ids[0]}]
    many = _updates(engine, rows)
    assert many.count(False) == 2  # the long list is sliced
    got = _leads(engine)
    assert {got[i].source for i in ids[:-2]} == {"social"}
    assert got[ids[-2]].attributes == {"type": "b2b", "tags": ["a"]}
    assert got[ids[-1]].attributes == {"type": "b2c"} and got[ids[-1]].source == "website"
