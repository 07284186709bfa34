"""SMTP faults: every reply a real server can throw at a tick, and a server that is down.

Each case checks the three promises: no duplicate delivery; nothing lost (every due message
is sent, or visibly failed, retrying or unknown with a reason); suppression intact.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from datetime import datetime, timedelta

import pytest
from sqlalchemy import Engine, select

from nurture.store.db import session_scope
from nurture.store.models import Delivery, Event, Lead, Suppression
from nurture.store.suppression import suppress
from nurture.tick import tick
from tests.helpers import add_leads, campaign, mailer, programme
from tests.servers import RecordingServer

ONE_STEP = campaign("""
name: faults
audience: {field: source, op: eq, value: website}
steps:
  - {id: hello, template: retail/welcome}
""")
LEADS = [f"lead{i}@example.com" for i in range(12)]
SUPPRESSED = "gone@example.com"


@pytest.fixture
def server() -> Iterator[RecordingServer]:
    srv = RecordingServer(pipelining=True).start()
    yield srv
    srv.stop()


def _setup(engine: Engine, now: datetime) -> None:
    add_leads(engine, now, *({"email": e} for e in [*LEADS, SUPPRESSED]))
    with session_scope(engine) as session:
        suppress(session, [SUPPRESSED], "unsubscribed", "test", now)


def _rows(engine: Engine) -> dict[str, tuple[str, str | None]]:
    with session_scope(engine) as session:
        return {
            email: (status, error)
            for email, status, error in session.execute(
                select(Lead.email, Delivery.status, Delivery.error).join(
                    Lead, Lead.id == Delivery.lead_id
                )
            ).all()
        }


def _check(engine: Engine, server: RecordingServer) -> dict[str, tuple[str, str | None]]:
    """The three promises, whatever the fault was."""
    received = Counter(server.handler.recipients())
    assert not received or max(received.values()) == 1, "a lead got the same step twice"
    rows = _rows(engine)
    assert set(rows) == set(LEADS), "every due lead has exactly one outbox row"
    for email, (status, error) in rows.items():
        assert status in {"sent", "failed", "unknown", "queued"}
        if status == "sent":
            assert received[email] == 1
        else:
            assert error, f"{email} is {status} without a reason"
            if status != "unknown":
                assert received[email] == 0
    assert SUPPRESSED not in received
    with session_scope(engine) as session:
        assert session.scalar(select(Suppression.id).where(Suppression.email == SUPPRESSED))
    return rows


def _run(engine: Engine, server: RecordingServer, now: datetime) -> None:
    m = mailer(f"smtp://127.0.0.1:{server.port}")
    try:
        tick(engine, now, programme(ONE_STEP), m, worker="faults")
    finally:
        m.sender.close()


@pytest.mark.parametrize("code", ["421 4.3.2 shutting down", "451 4.3.0 try again later",
                                  "452 4.2.2 mailbox full"])  # fmt: skip
def test_transient_replies_retry_and_deliver_once(
    engine: Engine, server: RecordingServer, now: datetime, code: str
) -> None:
    _setup(engine, now)
    refused: Counter[str] = Counter()

    def flaky(rcpt: str) -> str | None:
        # lead3 and lead7 are refused on every attempt of the first tick (3 per message).
        if rcpt in ("lead3@example.com", "lead7@example.com") and refused[rcpt] < 3:
            refused[rcpt] += 1
            return code
        return None

    server.handler.rcpt_hook = flaky
    _run(engine, server, now)
    rows = _check(engine, server)
    assert rows["lead3@example.com"][0] == rows["lead7@example.com"][0] == "queued"
    assert code[:3] in (rows["lead3@example.com"][1] or "")
    assert sum(1 for s, _ in rows.values() if s == "sent") == 10
    # The next tick, after the back-off, delivers them, once.
    _run(engine, server, now + timedelta(hours=1))
    rows = _check(engine, server)
    assert all(s == "sent" for s, _ in rows.values())


@pytest.mark.parametrize(
    ("code", "hard"),
    [("550 5.1.1 no such user", True), ("554 5.7.1 rejected as spam", False)],
)
def test_permanent_rejections_fail_visibly_and_hard_bounces_suppress(
    engine: Engine, server: RecordingServer, now: datetime, code: str, hard: bool
) -> None:
    _setup(engine, now)
    if hard:
        server.handler.rcpt_hook = lambda rcpt: code if rcpt == "lead5@example.com" else None
    else:
        server.handler.data_hook = lambda rcpt: code if rcpt == "lead5@example.com" else None
    _run(engine, server, now)
    rows = _check(engine, server)
    assert rows["lead5@example.com"][0] == "failed"
    assert code[:3] in (rows["lead5@example.com"][1] or "")
    with session_scope(engine) as session:
        suppressed = session.scalar(
            select(Suppression.reason).where(Suppression.email == "lead5@example.com")
        )
        bounces = session.scalars(select(Event.type).where(Event.type == "bounced")).all()
    assert (suppressed is not None) is hard
    assert len(bounces) == (1 if hard else 0)
    _run(engine, server, now + timedelta(days=1))  # never retried
    assert _check(engine, server)["lead5@example.com"][0] == "failed"


def test_connection_dropped_mid_data_is_unknown_and_never_resent(
    engine: Engine, server: RecordingServer, now: datetime
) -> None:
    _setup(engine, now)
    server.handler.drop_hook = lambda rcpt: rcpt == "lead4@example.com"
    _run(engine, server, now)
    rows = _check(engine, server)
    assert rows["lead4@example.com"][0] == "unknown"
    assert "after end of DATA" in (rows["lead4@example.com"][1] or "")
    server.handler.drop_hook = None
    _run(engine, server, now + timedelta(days=1))
    assert _check(engine, server)["lead4@example.com"][0] == "unknown"


def test_server_down_for_a_whole_tick_loses_nothing(
    engine: Engine, server: RecordingServer, now: datetime
) -> None:
    _setup(engine, now)
    server.stop()
    _run(engine, server, now)
    rows = _check(engine, server)
    assert all(s == "queued" for s, _ in rows.values())
    back = RecordingServer(pipelining=True, port=server.port).start()  # back, same port
    try:
        _run(engine, back, now + timedelta(hours=1))
        rows = _check(engine, back)
    finally:
        back.stop()
    assert all(s == "sent" for s, _ in rows.values())
