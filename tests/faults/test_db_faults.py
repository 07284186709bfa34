"""Database faults mid-tick: SQLite locked by another writer, PostgreSQL restarted.

The tick keeps the promises: no duplicate delivery, every due message sent (or visibly
queued, failed or unknown with a reason), suppression intact.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
from collections import Counter
from datetime import datetime
from pathlib import Path

import pytest
from sqlalchemy import Engine, func, select

from nurture.store.db import make_engine, session_scope, upgrade
from nurture.store.models import Delivery
from nurture.store.suppression import suppress
from nurture.tick import tick
from tests.helpers import add_leads, campaign, mailer, programme
from tests.servers import PostgresCluster, SmtpSink

ONE_STEP = campaign("""
name: db-faults
audience: {field: source, op: eq, value: website}
steps:
  - {id: hello, template: retail/welcome}
""")
LEADS = 60


def _setup(engine: Engine, now: datetime) -> None:
    add_leads(engine, now, *({"email": f"l{i}@example.com"} for i in range(LEADS)),
              {"email": "gone@example.com"})  # fmt: skip
    with session_scope(engine) as session:
        suppress(session, ["gone@example.com"], "unsubscribed", "test", now)


def _check(engine: Engine, sink: SmtpSink) -> Counter[str]:
    received = Counter(sink.recipients())
    assert max(received.values()) == 1, "a lead got the same step twice"
    assert "gone@example.com" not in received
    with session_scope(engine) as session:
        statuses = Counter(
            dict(
                session.execute(
                    select(Delivery.status, func.count(Delivery.id)).group_by(Delivery.status)
                ).all()
            )
        )
    assert sum(statuses.values()) == LEADS
    assert statuses["sent"] == len(received) == LEADS
    return statuses


def _tick(engine: Engine, sink: SmtpSink, now: datetime) -> None:
    m = mailer(sink.url)
    try:
        tick(engine, now, programme(ONE_STEP), m, worker="db-faults", batch_size=10)
    finally:
        m.sender.close()


# Another process takes SQLite's write lock, says so, holds it 2 s, and lets go.
_HOLD_LOCK = """
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], timeout=30, isolation_level=None)
db.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
time.sleep(2.0)
db.execute("COMMIT")
"""


def _retries(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "nurture.store.db" and "retrying" in r.getMessage()
    ]


def test_sqlite_locked_by_another_process_mid_tick(
    tmp_path: Path, smtp_server: SmtpSink, now: datetime, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "nurture.db"
    # A short busy timeout, so the lock (held 2 s) outlasts it and writes really fail.
    engine = make_engine(f"sqlite:///{path}", sqlite_busy_seconds=0.3)
    upgrade(engine)
    _setup(engine, now)
    lockers: list[subprocess.Popen[str]] = []

    def on_data(envelope: object) -> None:
        if not lockers and len(smtp_server.raw) >= 5:
            proc = subprocess.Popen(
                [sys.executable, "-c", _HOLD_LOCK, str(path)], stdout=subprocess.PIPE, text=True
            )
            lockers.append(proc)
            # Answer this message only once the lock is held: its outcome must wait for it.
            assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
        return None

    smtp_server.data_hook = on_data
    caplog.set_level(logging.WARNING, logger="nurture.store.db")
    _tick(engine, smtp_server, now)
    assert lockers, "the lock was taken mid-tick"
    assert lockers[0].wait(timeout=30) == 0
    retried = _retries(caplog)
    assert retried and all("locked" in m for m in retried), retried
    _check(engine, smtp_server)


def test_postgresql_restarted_mid_tick(
    pg_cluster: PostgresCluster,
    smtp_server: SmtpSink,
    now: datetime,
    caplog: pytest.LogCaptureFixture,
) -> None:
    pg_cluster.execute("CREATE DATABASE restart_test TEMPLATE nurture_template")
    engine = make_engine(pg_cluster.url("restart_test"))
    _setup(engine, now)
    restarts: list[threading.Thread] = []

    def on_data(envelope: object) -> None:
        if not restarts and len(smtp_server.raw) >= 15:
            restarts.append(threading.Thread(target=pg_cluster.restart))
            restarts[0].start()
        elif len(smtp_server.raw) == LEADS - 1:
            # Hold the last reply until the server is back: the restart then falls inside
            # the sending phase however slow the machine is, which is what this tests.
            restarts[0].join()
        return None

    smtp_server.data_hook = on_data
    caplog.set_level(logging.WARNING, logger="nurture.store.db")
    _tick(engine, smtp_server, now)
    assert restarts, "the server was restarted mid-tick"
    restarts[0].join()
    assert _retries(caplog), "no write met the restart"
    _check(engine, smtp_server)
    engine.dispose()
