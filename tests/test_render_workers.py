"""Render worker processes: the same bytes as composing inline, failures surface, and a
tick that renders in them sends every message once."""

from __future__ import annotations

import dataclasses
import os
import signal
import time
from collections import Counter
from datetime import datetime

import pytest
from nurture.outbox.claim import _load
from sqlalchemy import Engine, select

from nurture.journey.sequences import advance_due
from nurture.message.compose import compose
from nurture.message.render_workers import RenderWorkerError, RenderWorkers
from nurture.outbox.delivery import send_due
from nurture.store.db import session_scope
from nurture.store.models import Delivery
from nurture.tick import enroll_campaign, prepare_campaigns
from tests.helpers import add_leads, campaign, mailer, programme
from tests.servers import SmtpSink

ONE = campaign("""
name: workers
audience: {field: source, op: eq, value: website}
steps:
  - {id: one, template: b2b/case_study_roi}
""")


def _rows(engine: Engine, now: datetime, n: int) -> list[object]:
    add_leads(engine, now, *({"email": f"w{i}@example.com", "first_name": f"W{i}"}
                             for i in range(n)))  # fmt: skip
    (ref,) = prepare_campaigns(engine, programme(ONE), now)
    enroll_campaign(engine, ref, now)
    assert advance_due(engine, ref, now).queued == n
    with session_scope(engine) as session:
        return list(_load(session, list(session.scalars(select(Delivery.id)))))


def test_workers_compose_byte_identical_messages_in_order(
    sqlite_engine: Engine, smtp_server: SmtpSink, now: datetime
) -> None:
    rows = _rows(sqlite_engine, now, 13)
    m = mailer(smtp_server.url)
    inline = [compose(m, row, now) for row in rows]
    workers = RenderWorkers(m, 3)
    try:
        first = [item for f in workers.submit(rows, now) for item in f.result(timeout=60)]
        # A second round on the same children, and a chunk smaller than the worker count.
        second = [item for f in workers.submit(rows[:2], now) for item in f.result(timeout=60)]
    finally:
        workers.close()
    m.sender.close()
    assert first == inline
    assert second == inline[:2]
    assert all(data for _, data, _ in first)
    assert all(w.process.returncode == 0 for w in workers.workers)


def test_a_bad_template_is_a_reason_not_a_crash(
    sqlite_engine: Engine, smtp_server: SmtpSink, now: datetime
) -> None:
    rows = _rows(sqlite_engine, now, 2)
    broken = [{**dict(r._mapping), "template": "b2b/no_such_template"} for r in rows]  # type: ignore[attr-defined]
    m = mailer(smtp_server.url)
    workers = RenderWorkers(m, 1)
    try:
        (future,) = workers.submit(broken, now)
        results = future.result(timeout=60)
    finally:
        workers.close()
    m.sender.close()
    assert [(data, reason is not None and "no_such_template" in reason)
            for _, data, reason in results] == [(None, True), (None, True)]  # fmt: skip


def test_a_killed_worker_fails_its_futures(
    sqlite_engine: Engine, smtp_server: SmtpSink, now: datetime
) -> None:
    rows = _rows(sqlite_engine, now, 4)
    m = mailer(smtp_server.url)
    workers = RenderWorkers(m, 1)
    try:
        (warm,) = workers.submit(rows, now)
        warm.result(timeout=60)
        os.kill(workers.workers[0].process.pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while workers.workers[0].process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        (future,) = workers.submit(rows, now)
        with pytest.raises(RenderWorkerError, match="exited with code -9"):
            future.result(timeout=60)
    finally:
        workers.close()
    m.sender.close()


def test_send_due_with_workers_sends_everything_once(
    sqlite_engine: Engine, smtp_server: SmtpSink, now: datetime
) -> None:
    _rows(sqlite_engine, now, 30)
    m = dataclasses.replace(mailer(smtp_server.url), render_workers=2)
    report = send_due(sqlite_engine, now, m, worker="pool", chunk=7)
    m.sender.close()
    assert report.sent == 30 and report.claimed == 30
    assert Counter(smtp_server.recipients()) == {f"w{i}@example.com": 1 for i in range(30)}


def test_render_processes_default_to_the_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    from nurture import config

    monkeypatch.delenv("NURTURE_RENDER_WORKERS", raising=False)
    for cores, expected in ((None, 0), (1, 0), (2, 2), (16, 4)):
        monkeypatch.setattr(config.os, "cpu_count", lambda cores=cores: cores)
        assert config.Settings().render_processes() == expected
    monkeypatch.setenv("NURTURE_RENDER_WORKERS", "0")
    assert config.Settings().render_processes() == 0
    monkeypatch.setenv("NURTURE_RENDER_WORKERS", "3")
    assert config.Settings().render_processes() == 3


def test_send_batch_renders_in_workers_and_gives_back_a_batch_they_lose(
    sqlite_engine: Engine, smtp_server: SmtpSink, now: datetime
) -> None:
    from nurture.outbox.delivery import send_batch
    from nurture.store.models import DeliveryStatus

    _rows(sqlite_engine, now, 12)
    m = mailer(smtp_server.url)
    workers = RenderWorkers(m, 2)
    try:
        report = send_batch(sqlite_engine, now, m, worker="w", limit=5, workers=workers)
        assert report.sent == 5
        for w in workers.workers:
            os.kill(w.process.pid, signal.SIGKILL)
            w.process.wait(30)
        with pytest.raises(RenderWorkerError):
            send_batch(sqlite_engine, now, m, worker="w", limit=5, workers=workers)
    finally:
        workers.close()
    m.sender.close()
    with session_scope(sqlite_engine) as session:
        statuses = Counter(session.scalars(select(Delivery.status)))
    # The lost batch was never sent: it is queued again, not stuck in sending.
    assert statuses == {DeliveryStatus.sent.value: 5, DeliveryStatus.queued.value: 7}
    assert len(smtp_server.recipients()) == 5
