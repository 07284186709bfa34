"""Sequences on a real database and SMTP server: windows, throttles, suppression, re-entry."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import Engine, select

from nurture.config import Throttle
from nurture.journey.sequences import advance_due
from nurture.outbox.claim import Budget
from nurture.outbox.delivery import Pacer
from nurture.store.db import session_scope
from nurture.store.models import Enrollment, Lead
from nurture.store.suppression import suppress
from nurture.tick import enroll_campaign, prepare_campaigns, tick
from tests.helpers import add_leads, campaign, mailer, programme
from tests.servers import SmtpSink

WINDOWED = campaign("""
name: windowed
audience: {field: source, op: eq, value: website}
send_window: {days: [mon, tue, wed, thu, fri], start: "09:00", end: "17:30", default_timezone: UTC}
steps:
  - {id: welcome, template: b2b/welcome}
  - {id: follow-up, wait: 1d, template: b2b/breakup}
""")


class FakePacer(Pacer):
    """A pacer whose clock only moves when it sleeps."""

    def __init__(self, per_second: float) -> None:
        self.clock = 0.0
        super().__init__(per_second, monotonic=lambda: self.clock, sleep=self._sleep)

    def _sleep(self, seconds: float) -> None:
        self.clock += seconds


def test_send_window_waits_for_local_morning_across_dst(
    engine: Engine, smtp_server: SmtpSink
) -> None:
    # Sunday 2026-03-08 is the US spring-forward. A New York lead enrolled then is due at once,
    # but the window opens at 09:00 EDT on Monday (13:00 UTC). A Berlin lead (no zone of its
    # own, country DE) opens at 09:00 CET = 08:00 UTC.
    sunday = datetime(2026, 3, 8, 12, 0, tzinfo=UTC)
    add_leads(
        engine,
        sunday,
        {"email": "ny@example.com", "timezone": "America/New_York"},
        {"email": "de@example.com", "country": "DE"},
    )
    prog, m = programme(WINDOWED), mailer(smtp_server.url)
    first = tick(engine, sunday, prog, m, worker="t")
    assert first.send.sent == 0 and first.campaigns["windowed"].deferred == 2
    with session_scope(engine) as session:
        due = dict(
            session.execute(
                select(Lead.email, Enrollment.due_at).join(Lead, Lead.id == Enrollment.lead_id)
            ).all()
        )
    assert due["ny@example.com"] == datetime(2026, 3, 9, 13, 0, tzinfo=UTC)
    assert due["de@example.com"] == datetime(2026, 3, 9, 8, 0, tzinfo=UTC)

    monday_3am_ny = datetime(2026, 3, 9, 7, 0, tzinfo=UTC)  # 03:00 EDT, 08:00 CET
    assert tick(engine, monday_3am_ny, prog, m, worker="t").send.sent == 0
    monday_9am_de = datetime(2026, 3, 9, 8, 0, tzinfo=UTC)
    assert tick(engine, monday_9am_de, prog, m, worker="t").send.sent == 1
    assert tick(engine, datetime(2026, 3, 9, 13, 0, tzinfo=UTC), prog, m, worker="t").send.sent == 1
    smtp_server.wait_for(2)
    assert smtp_server.recipients() == ["de@example.com", "ny@example.com"]
    m.sender.close()


def test_throttles_hold_and_the_rest_waits_in_due_order(
    engine: Engine, smtp_server: SmtpSink, now: datetime
) -> None:
    leads = [{"email": f"p{i}@big.example"} for i in range(6)]
    leads += [{"email": f"q{i}@small{i}.example"} for i in range(4)]
    add_leads(engine, now, *leads)
    prog, m = programme(WINDOWED.model_copy(update={"send_window": None})), mailer(smtp_server.url)
    # Per tick of 10 s: 6 messages overall, 2 per domain. Real-time pacing runs on a fake
    # clock here (it is tested on its own below); it must have asked to sleep 10 s.
    throttle = Throttle(per_second=0.6, per_domain_per_second=0.2, tick_seconds=10)
    pacer = FakePacer(0.6)
    first = tick(engine, now, prog, m, worker="t", throttle=throttle, batch_size=3, pacer=pacer)
    assert pacer.clock == pytest.approx(10.0)
    assert first.send.sent == 6
    by_domain = Counter(r.split("@")[1] for r in smtp_server.recipients())
    assert by_domain["big.example"] == 2
    assert max(by_domain.values()) <= 2
    pacer = FakePacer(0.6)
    second = tick(
        engine, now + timedelta(minutes=15), prog, m, worker="t", throttle=throttle, pacer=pacer
    )
    assert second.send.sent == 2  # big.example's next two; the small domains were all done
    third = tick(
        engine, now + timedelta(minutes=30), prog, m, worker="t", throttle=throttle, pacer=pacer
    )
    assert third.send.sent == 2
    assert Counter(smtp_server.recipients()).most_common(1)[0][1] == 1
    m.sender.close()


def test_budget_and_pacer_are_exact() -> None:
    budget = Budget.for_tick(Throttle(per_second=1, per_domain_per_second=0.5, tick_seconds=4))
    assert (budget.total, budget.per_domain) == (4, 2)
    picked = budget.pick([(1, "a"), (2, "a"), (3, "a"), (4, "b"), (5, "c"), (6, "d")], 10)
    assert picked == [1, 2, 4, 5]
    assert budget.room(10) == 0 and budget.saturated() == ["a"]
    assert Budget().pick([(1, "a"), (2, "a")], 1) == [1]

    clock = [0.0]
    slept: list[float] = []

    def sleep(s: float) -> None:
        slept.append(s)
        clock[0] += s

    pacer = Pacer(10, monotonic=lambda: clock[0], sleep=sleep)
    for _ in range(5):
        pacer.after(10)  # 10 messages sent instantly each time: 1 s of budget each
    assert clock[0] == 5.0 and slept == [1.0] * 5


def test_suppression_wins_over_any_campaign(
    engine: Engine, smtp_server: SmtpSink, now: datetime
) -> None:
    add_leads(engine, now, {"email": "ok@example.com"}, {"email": "gone@example.com"})
    with session_scope(engine) as session:
        suppress(session, ["gone@example.com"], "unsubscribed", "test", now)
    prog = programme(WINDOWED.model_copy(update={"send_window": None}))
    m = mailer(smtp_server.url)
    tick(engine, now, prog, m, worker="t")
    assert smtp_server.recipients() == ["ok@example.com"]

    # A suppression that lands after a step was queued still stops it at send time.
    add_leads(engine, now, {"email": "later@example.com"})
    (ref,) = prepare_campaigns(engine, prog, now)
    enroll_campaign(engine, ref, now)
    assert advance_due(engine, ref, now).queued == 1
    with session_scope(engine) as session:
        suppress(session, ["later@example.com"], "complained", "test", now)
    again = tick(engine, now, prog, m, worker="t")
    assert again.send.sent == 0 and again.send.skipped == 1
    # And the next steps never go out either: the enrollment exits as suppressed.
    later = tick(engine, now + timedelta(days=1), prog, m, worker="t")
    assert later.send.sent == 1  # only ok@ gets the follow-up
    assert later.campaigns["windowed"].exited == 1
    assert smtp_server.recipients() == ["ok@example.com", "ok@example.com"]
    m.sender.close()


def test_reentry_after_cooldown(engine: Engine, smtp_server: SmtpSink, now: datetime) -> None:
    spec = campaign("""
name: again
audience: {field: source, op: eq, value: website}
reentry: {after: 10d}
steps:
  - {id: only, template: retail/welcome}
""")
    add_leads(engine, now, {"email": "r@example.com"})
    prog, m = programme(spec), mailer(smtp_server.url)
    assert tick(engine, now, prog, m, worker="t").enrolled == 1
    assert tick(engine, now + timedelta(days=5), prog, m, worker="t").enrolled == 0
    assert tick(engine, now + timedelta(days=11), prog, m, worker="t").enrolled == 1
    with session_scope(engine) as session:
        cycles = sorted(session.scalars(select(Enrollment.cycle)))
    assert cycles == [1, 2]
    assert smtp_server.recipients() == ["r@example.com", "r@example.com"]
    m.sender.close()
