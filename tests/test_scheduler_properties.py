"""Property: whatever the tick times, no step is ever sent twice, steps go in order, waits
are respected, every send lands inside the lead's send window, and every step that is due
at a tick inside the window is sent at that tick."""

from __future__ import annotations

import tempfile
from collections import defaultdict
from datetime import UTC, datetime, time, timedelta
from zoneinfo import ZoneInfo

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from nurture.store.db import make_engine, session_scope, upgrade
from nurture.store.models import Delivery, Lead
from nurture.tick import tick
from tests.helpers import add_leads, campaign, mailer, programme
from tests.servers import SmtpSink

SPEC = campaign("""
name: props
audience: {field: source, op: eq, value: website}
send_window: {days: [mon, tue, wed, thu, fri], start: "08:00", end: "18:00"}
steps:
  - {id: a, template: retail/welcome}
  - {id: b, wait: 1d, template: retail/bestsellers}
  - {id: c, wait: 2d, template: retail/last_chance}
""")
WAITS = {"b": timedelta(days=1), "c": timedelta(days=2)}
ZONES = ["America/Los_Angeles", "Europe/London", "Asia/Tokyo"]
START = datetime(2026, 3, 2, 0, 0, tzinfo=UTC)


@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(st.integers(0, 14 * 24 * 4), min_size=3, max_size=20))
def test_random_tick_times(smtp_server: SmtpSink, quarter_hours: list[int]) -> None:
    instants = [START + timedelta(minutes=15 * q) for q in sorted(set(quarter_hours))]
    with tempfile.TemporaryDirectory() as tmp:
        engine = make_engine(f"sqlite:///{tmp}/n.db")
        upgrade(engine)
        add_leads(engine, START, *({"email": f"{z}@example.com", "timezone": z} for z in ZONES))
        m = mailer(smtp_server.url, connections=1)
        for q in sorted(set(quarter_hours)):
            tick(engine, START + timedelta(minutes=15 * q), programme(SPEC), m, worker="prop")
            # The same instant twice changes nothing.
            assert tick(engine, START + timedelta(minutes=15 * q), programme(SPEC), m,
                        worker="prop").send.sent == 0  # fmt: skip
        m.sender.close()
        with session_scope(engine) as session:
            rows = session.execute(
                select(Lead.email, Lead.timezone, Delivery.step_id, Delivery.sent_at)
                .join(Lead, Lead.id == Delivery.lead_id)
                .where(Delivery.status == "sent")
            ).all()
        engine.dispose()
    sent: dict[str, dict[str, datetime]] = defaultdict(dict)
    for email, tz, step, at in rows:
        assert step not in sent[email], "a step was sent twice"
        sent[email][step] = at
        local = at.astimezone(ZoneInfo(tz))
        assert local.weekday() < 5 and time(8) <= local.time() < time(18), (tz, at)
    for steps in sent.values():
        order = [s for s in ("a", "b", "c") if s in steps]
        assert order == ["a", "b", "c"][: len(order)], "steps out of order"
        for prev, step in (("a", "b"), ("b", "c")):
            if step in steps:
                assert steps[step] - steps[prev] >= WAITS[step]
    # Liveness: a step that is due at a tick whose instant is inside the lead's window is
    # sent at that very tick (a scheduler that never sends fails here).
    for zone in ZONES:
        steps = sent[f"{zone}@example.com"]
        expected: dict[str, datetime] = {}
        due = instants[0]  # enrolled at the first tick, step a due at once
        for step in ("a", "b", "c"):
            due_tick = next((t for t in instants if t >= due and _open(t, zone)), None)
            if due_tick is None:
                break
            expected[step] = due_tick
            if step != "c":
                due = due_tick + WAITS[{"a": "b", "b": "c"}[step]]
        assert steps == expected, (zone, instants)


def _open(at: datetime, zone: str) -> bool:
    local = at.astimezone(ZoneInfo(zone))
    return local.weekday() < 5 and time(8) <= local.time() < time(18)
