"""Clock jumps: a daylight-saving change and a tick skipped for a whole day."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, time, timedelta
from zoneinfo import ZoneInfo

from sqlalchemy import Engine, select

from nurture.store.db import session_scope
from nurture.store.models import Delivery, Lead
from nurture.tick import tick
from tests.helpers import add_leads, campaign, mailer, programme
from tests.servers import SmtpSink

DAILY = campaign("""
name: daily
audience: {field: source, op: eq, value: website}
send_window: {days: [mon, tue, wed, thu, fri, sat, sun], start: "09:00", end: "17:00"}
steps:
  - {id: one, template: retail/welcome}
  - {id: two, wait: 1d, template: retail/bestsellers}
  - {id: three, wait: 1d, template: retail/last_chance}
""")
ZONES = ["America/New_York", "Europe/Berlin", "Australia/Sydney", "Asia/Kolkata"]


def _sent(engine: Engine) -> list[tuple[str, str, str, datetime]]:
    with session_scope(engine) as session:
        return [
            (email, tz, step, sent_at)
            for email, tz, step, sent_at in session.execute(
                select(Lead.email, Lead.timezone, Delivery.step_id, Delivery.sent_at)
                .join(Lead, Lead.id == Delivery.lead_id)
                .where(Delivery.status == "sent")
            ).all()
        ]


def test_hourly_ticks_across_dst_changes_send_each_step_once_inside_the_window(
    engine: Engine, smtp_server: SmtpSink
) -> None:
    # New York springs forward on 2026-03-08, inside these four days of hourly ticks.
    start = datetime(2026, 3, 7, 0, 0, tzinfo=UTC)
    add_leads(engine, start, *({"email": f"{i}@example.com", "timezone": z}
                               for i, z in enumerate(ZONES)))  # fmt: skip
    m = mailer(smtp_server.url)
    prog = programme(DAILY)
    for hours in range(0, 24 * 4):
        tick(engine, start + timedelta(hours=hours), prog, m, worker="clock")
    m.sender.close()
    sent = _sent(engine)
    assert Counter((e, s) for e, _, s, _ in sent).most_common(1)[0][1] == 1
    assert len(sent) == len(ZONES) * 3
    for _, tz, _, at in sent:
        local = at.astimezone(ZoneInfo(tz)).time()
        assert time(9) <= local < time(17), (tz, at)
    assert Counter(smtp_server.recipients()) == Counter({f"{i}@example.com": 3 for i in range(4)})


def test_a_tick_skipped_for_a_day_catches_up_once(
    engine: Engine, smtp_server: SmtpSink, now: datetime
) -> None:
    add_leads(engine, now, {"email": "a@example.com"}, {"email": "b@example.com"})
    spec = DAILY.model_copy(update={"send_window": None})
    m = mailer(smtp_server.url)
    prog = programme(spec)
    tick(engine, now, prog, m, worker="clock")  # step one
    # The scheduler is down for two days: step two fell due a day ago. The next tick sends
    # it once (no burst of missed ticks), and step three waits a day from that send.
    late = now + timedelta(days=2, hours=3)
    assert tick(engine, late, prog, m, worker="clock").send.sent == 2
    assert tick(engine, late + timedelta(hours=23), prog, m, worker="clock").send.sent == 0
    assert tick(engine, late + timedelta(days=1), prog, m, worker="clock").send.sent == 2
    m.sender.close()
    assert Counter(smtp_server.recipients()) == {"a@example.com": 3, "b@example.com": 3}
