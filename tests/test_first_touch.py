"""The first-touch pass: a new lead's first step within minutes, once, inside its window."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import Engine, select

from nurture.first_touch import first_touch
from nurture.store.db import session_scope
from nurture.store.models import Delivery, Lead, OptIn
from nurture.tick import tick
from tests.helpers import TEMPLATES, add_leads, campaign, mailer, programme
from tests.servers import SmtpSink

SPEC = campaign("""
name: fast
audience: {field: source, op: eq, value: website}
send_window: {days: [mon, tue, wed, thu, fri], start: "09:00", end: "17:00"}
steps:
  - {id: welcome, template: b2b/welcome}
  - {id: follow-up, wait: 1d, template: b2b/breakup}
""")


def _sent(engine: Engine) -> list[tuple[str, str, datetime | None]]:
    with session_scope(engine) as session:
        return [
            (e, s, t)
            for e, s, t in session.execute(
                select(Lead.email, Delivery.step_id, Delivery.sent_at)
                .join(Lead, Lead.id == Delivery.lead_id)
                .where(Delivery.status == "sent")
                .order_by(Delivery.id)
            )
        ]


def test_new_leads_get_their_first_step_within_minutes_once(
    engine: Engine, smtp_server: SmtpSink, now: datetime
) -> None:
    prog, m = programme(SPEC), mailer(smtp_server.url)
    monday = now - timedelta(days=1)
    add_leads(engine, monday, {"email": "old@example.com"})
    tick(engine, monday, prog, m, worker="t")  # old lead: welcome yesterday, follow-up due now
    add_leads(engine, now - timedelta(minutes=3), {"email": "new@example.com"})

    result = first_touch(engine, now, prog, m, worker="t")
    assert result.enrolled == 1 and result.send.sent == 1
    assert _sent(engine)[-1] == ("new@example.com", "welcome", now)  # 3 minutes after capture
    # Targeted: the old lead's due follow-up is left to the regular tick.
    assert ("old@example.com", "follow-up") not in [(e, s) for e, s, _ in _sent(engine)]

    assert first_touch(engine, now + timedelta(minutes=1), prog, m, worker="t").send.sent == 0
    regular = tick(engine, now + timedelta(minutes=15), prog, m, worker="t")
    assert regular.send.sent == 1  # the follow-up; the new lead's welcome is not sent again
    emails = [(e, s) for e, s, _ in _sent(engine)]
    assert emails.count(("new@example.com", "welcome")) == 1
    assert ("old@example.com", "follow-up") in emails

    # Captured after hours: deferred to the window's opening, not sent at night.
    evening = now.replace(hour=20)
    add_leads(engine, evening, {"email": "late@example.com"})
    late = first_touch(engine, evening + timedelta(minutes=1), prog, m, worker="t")
    assert late.enrolled == 1 and late.send.sent == 0
    assert late.campaigns["fast"].deferred == 1
    smtp_server.wait_for(3)
    assert sorted(smtp_server.recipients()) == [
        "new@example.com",
        "old@example.com",
        "old@example.com",
    ]
    m.sender.close()


def test_a_lead_who_just_confirmed_gets_the_first_step_within_minutes(
    engine: Engine, smtp_server: SmtpSink, now: datetime
) -> None:
    """A double opt-in signup held for hours is new to the campaigns when it confirms."""
    prog, m = programme(SPEC), mailer(smtp_server.url)
    confirmed, held, _quiet = add_leads(
        engine,
        now - timedelta(hours=3),
        {"email": "confirmed@example.com"},
        {"email": "held@example.com"},
        {"email": "quiet@example.com"},
    )
    with session_scope(engine) as session:
        for lead_id, confirmed_at in ((confirmed, now - timedelta(minutes=2)), (held, None)):
            session.add(
                OptIn(
                    lead_id=lead_id,
                    source="website",
                    topics={},
                    requested_at=now - timedelta(hours=3),
                    confirmed_at=confirmed_at,
                    holds=True,
                )
            )
    result = first_touch(engine, now, prog, m, worker="t")
    # The confirmed lead: now. The held one may not be mailed; the quiet one, captured
    # before the lookback with nothing new, waits for the regular tick.
    assert (result.enrolled, result.send.sent) == (1, 1)
    assert [e for e, _, _ in _sent(engine)] == ["confirmed@example.com"]
    assert tick(engine, now + timedelta(minutes=15), prog, m, worker="t").send.sent == 1
    assert sorted(e for e, _, _ in _sent(engine)) == ["confirmed@example.com", "quiet@example.com"]
    m.sender.close()


def test_cli_first_touch(
    sqlite_engine: Engine, smtp_server: SmtpSink, tmp_path: Path, now: datetime
) -> None:
    folder = tmp_path / "campaigns"
    folder.mkdir()
    (folder / "fast.yaml").write_text(
        "name: fast\naudience: {field: source, op: eq, value: website}\n"
        "steps: [{id: welcome, template: b2b/welcome}]\n"
    )
    add_leads(sqlite_engine, now - timedelta(minutes=2), {"email": "cli@example.com"})
    base = {k: v for k, v in os.environ.items() if not k.startswith("NURTURE_")}
    env = {
        **base,
        "NURTURE_ENV": "development",
        "NURTURE_DATABASE_URL": sqlite_engine.url.render_as_string(hide_password=False),
        "NURTURE_SMTP_URL": smtp_server.url,
        "NURTURE_CAMPAIGNS": str(folder),
        "NURTURE_TEMPLATES": str(TEMPLATES),
    }
    args = ["tick", "--first-touch", "--now", now.isoformat(), "--json"]
    done = subprocess.run(
        [sys.executable, "-m", "nurture", *args],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"enrolled": 1, "sent": 1, "failed": 0}
    smtp_server.wait_for(1)
    assert smtp_server.recipients() == ["cli@example.com"]
