"""The render pool: the same bytes as rendering inline, and every message sent once."""

from __future__ import annotations

import dataclasses
from collections import Counter
from datetime import datetime

from sqlalchemy import Engine, select

from nurture.db import session_scope
from nurture.delivery import RenderPool, _load, _render_one, send_due
from nurture.models import Delivery
from nurture.sequences import advance_due
from nurture.tick import enroll_campaign, prepare_campaigns
from tests.helpers import add_leads, campaign, mailer, programme
from tests.servers import SmtpSink

ONE = campaign("""
name: pool
audience: {field: source, op: eq, value: website}
steps:
  - {id: one, template: b2b/case_study_roi}
""")


def _queue(engine: Engine, now: datetime, n: int) -> None:
    add_leads(engine, now, *({"email": f"p{i}@example.com", "first_name": f"P{i}"}
                             for i in range(n)))  # fmt: skip
    (ref,) = prepare_campaigns(engine, programme(ONE), now)
    enroll_campaign(engine, ref, now)
    assert advance_due(engine, ref, now).queued == n


def test_pool_renders_byte_identical_messages(
    sqlite_engine: Engine, smtp_server: SmtpSink, now: datetime
) -> None:
    _queue(sqlite_engine, now, 12)
    m = mailer(smtp_server.url)
    with session_scope(sqlite_engine) as session:
        rows = _load(session, list(session.scalars(select(Delivery.id))))
    inline = [_render_one(m, row, now) for row in rows]
    pool = RenderPool(m, 2)
    try:
        pooled = [item for future in pool.submit(rows, now) for item in future.result()]
    finally:
        pool.close()
    m.sender.close()
    assert pooled == inline
    assert all(data for _, data, _ in pooled)


def test_send_due_with_a_pool_sends_everything_once(
    sqlite_engine: Engine, smtp_server: SmtpSink, now: datetime
) -> None:
    _queue(sqlite_engine, now, 30)
    m = dataclasses.replace(mailer(smtp_server.url), render_workers=2)
    report = send_due(sqlite_engine, now, m, worker="pool", chunk=7)
    m.sender.close()
    assert report.sent == 30 and report.claimed == 30
    assert Counter(smtp_server.recipients()) == {f"p{i}@example.com": 1 for i in range(30)}
