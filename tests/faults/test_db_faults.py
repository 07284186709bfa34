"""Database faults mid-tick: SQLite locked by another writer, PostgreSQL restarted.

The tick keeps the promises: no duplicate delivery, every due message sent (or visibly
queued, failed or unknown with a reason), suppression intact.
"""

from __future__ import annotations

import sqlite3
import threading
from collections import Counter
from datetime import datetime
from pathlib import Path

from sqlalchemy import Engine, func, select

from nurture.db import make_engine, session_scope, upgrade
from nurture.events import suppress
from nurture.models import Delivery
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


def test_sqlite_locked_by_another_writer_mid_tick(
    tmp_path: Path, smtp_server: SmtpSink, now: datetime
) -> None:
    path = tmp_path / "nurture.db"
    # A short busy timeout, so the lock (held 2 s) outlasts it and writes really fail.
    engine = make_engine(f"sqlite:///{path}", sqlite_busy_seconds=0.3)
    upgrade(engine)
    _setup(engine, now)
    released = threading.Event()

    def hold_lock() -> None:
        other = sqlite3.connect(path, timeout=30, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # take the write lock
        released.wait(2.0)
        other.execute("COMMIT")
        other.close()

    locker: list[threading.Thread] = []

    def on_data(envelope: object) -> None:
        if not locker and len(smtp_server.raw) >= 5:
            locker.append(threading.Thread(target=hold_lock))
            locker[0].start()
        return None

    smtp_server.data_hook = on_data
    _tick(engine, smtp_server, now)
    assert locker, "the lock was taken mid-tick"
    locker[0].join()
    _check(engine, smtp_server)


def test_postgresql_restarted_mid_tick(
    pg_cluster: PostgresCluster, smtp_server: SmtpSink, now: datetime
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
    _tick(engine, smtp_server, now)
    assert restarts, "the server was restarted mid-tick"
    restarts[0].join()
    _check(engine, smtp_server)
    engine.dispose()
