"""The tick's cost per lead stays flat: no outbox statement walks the whole queue per chunk."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, event, func, select

from nurture.dev.synthetic import generate, insert_leads
from nurture.journey.sequences import CampaignRef, advance_due, enroll, sync_campaigns
from nurture.outbox.delivery import send_due
from nurture.store.db import session_scope
from nurture.store.models import Delivery, DeliveryStatus
from tests.helpers import campaign, mailer
from tests.servers import SmtpSink

ONE_STEP = """
name: scale-one-step
audience: {field: lifecycle_stage, op: in, value: [subscriber, lead]}
steps:
  - id: welcome
    template: b2b/welcome
"""


@contextmanager
def _statements(engine: Engine) -> Iterator[list[tuple[str, Any]]]:
    seen: list[tuple[str, Any]] = []

    def capture(_conn: Any, _cursor: Any, sql: str, params: Any, _ctx: Any, many: bool) -> None:
        seen.append((sql, params[0] if many else params))

    event.listen(engine, "before_cursor_execute", capture)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", capture)


def _queue(engine: Engine, now: datetime, leads: int) -> int:
    insert_leads(engine, list(generate(leads, seed=3)), now)
    with session_scope(engine) as session:
        (ref,) = sync_campaigns(session, [campaign(ONE_STEP)], now)
        enroll(session, CampaignRef(ref.id, ref.spec), now)
    return advance_due(engine, ref, now, batch_size=100).queued


def test_outbox_statements_find_claimed_rows_by_primary_key(
    sqlite_engine: Engine, smtp_server: SmtpSink, now: datetime
) -> None:
    queued = _queue(sqlite_engine, now, 400)
    assert queued == 400
    m = mailer(smtp_server.url)
    try:
        with _statements(sqlite_engine) as seen:
            report = send_due(sqlite_engine, now, m, worker="scale:1:x", chunk=100)
    finally:
        m.sender.close()
    assert report.sent == 400
    by_id = [(sql, p) for sql, p in seen if "deliveries" in sql and "deliveries.id IN" in sql]
    claims = [sql for sql, _ in by_id if sql.lstrip().startswith("UPDATE")]
    assert len(claims) >= 4  # one claim per chunk
    with sqlite_engine.connect() as conn:
        for sql, params in by_id:
            plan = " | ".join(
                row[-1] for row in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + sql, params)
            )
            # Walking the status index would visit every queued row: O(queue) per chunk.
            assert "ix_deliveries_status" not in plan, (sql, plan)
            assert "PRIMARY KEY" in plan, (sql, plan)


def test_every_queued_row_is_claimed_once_and_sent(
    engine: Engine, smtp_server: SmtpSink, now: datetime
) -> None:
    _queue(engine, now, 250)
    m = mailer(smtp_server.url)
    try:
        report = send_due(engine, now, m, worker="scale:1:y", chunk=100)
    finally:
        m.sender.close()
    assert report.claimed == report.sent == 250
    with session_scope(engine) as session:
        counts = dict(
            session.execute(
                select(Delivery.status, func.count(Delivery.id)).group_by(Delivery.status)
            ).all()
        )
        attempts = set(session.scalars(select(Delivery.attempts).distinct()))
    assert counts == {DeliveryStatus.sent.value: 250}
    assert attempts == {1}  # each row claimed exactly once
    assert sorted(smtp_server.recipients()) == sorted(set(smtp_server.recipients()))
    assert smtp_server.count() == 250
