"""``nurture replay``: the stored version over its own history reproduces what was sent; a
changed copy shows what it would have sent instead; the live database is never touched."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from pathlib import Path

from click.testing import CliRunner, Result
from sqlalchemy import Engine, func, select

from nurture.cli import cli
from nurture.config import get_settings
from nurture.engagement.events import EventIn, record_events
from nurture.store.db import session_scope
from nurture.store.models import Delivery, Event, Lead
from nurture.store.suppression import suppress
from nurture.tick import tick
from tests.helpers import TEMPLATES, add_leads, campaign, mailer, programme
from tests.servers import SmtpSink

SPEC = """
name: replayed
audience: {field: source, op: eq, value: website}
steps:
  - {id: welcome, template: b2b/welcome}
  - id: case-study
    wait: 1d
    variants:
      - {name: roi, template: b2b/case_study_roi}
      - {name: story, template: b2b/case_study_story}
  - id: demo-offer
    wait: 1d
    branch:
      - when: {event: clicked, since_step: case-study}
        template: b2b/demo_offer
      - otherwise: {goto: breakup}
  - {id: breakup, wait: 1d, template: b2b/breakup}
exit_when: {event: replied, this_campaign: true}
"""
EVERY = timedelta(hours=6)


def _delivery(engine: Engine, email: str, step: str) -> int:
    with session_scope(engine) as session:
        found = session.scalar(
            select(Delivery.id)
            .join(Lead, Lead.id == Delivery.lead_id)
            .where(Lead.email == email, Delivery.step_id == step)
        )
    assert found is not None, (email, step)
    return found


def _history(engine: Engine, smtp_url: str, now: datetime) -> datetime:
    """Five days of real ticks every 6 hours, with clicks, a reply, a late lead and an
    unsubscribe recorded between them. Returns the last tick's instant."""
    add_leads(engine, now, *({"email": f"l{i}@x.example"} for i in range(8)))
    prog = programme(campaign(SPEC))
    m = mailer(smtp_url)
    t = now
    try:
        for k in range(21):
            t = now + k * EVERY
            if k == 5:  # a lead created mid-way
                add_leads(engine, t - timedelta(hours=1), {"email": "late@x.example"})
            if k == 6:  # clicks on the case study (sent at k=4), a reply to the welcome
                with session_scope(engine) as session:
                    record_events(
                        session,
                        [
                            EventIn(type="clicked", occurred_at=t - timedelta(hours=2),
                                    delivery_id=_delivery(engine, f"l{i}@x.example", "case-study"),
                                    url="https://example.com/case")
                            for i in (1, 2, 3)
                        ]
                        + [EventIn(type="replied", occurred_at=t - timedelta(hours=3),
                                   delivery_id=_delivery(engine, "l4@x.example", "welcome"))],
                        now=t,
                    )  # fmt: skip
            if k == 7:
                with session_scope(engine) as session:
                    suppress(session, ["l5@x.example"], "unsubscribed", "test", t - EVERY / 2)
            tick(engine, t, prog, m, worker="t")
    finally:
        m.sender.close()
    return t


def _run(args: list[str], env: dict[str, str]) -> Result:
    get_settings.cache_clear()
    try:
        return CliRunner().invoke(cli, args, env=env, catch_exceptions=False)
    finally:
        get_settings.cache_clear()


def test_replay_of_the_stored_version_reproduces_what_was_sent(
    engine: Engine, smtp_server: SmtpSink, now: datetime, tmp_path: Path
) -> None:
    until = _history(engine, smtp_server.url, now)
    with session_scope(engine) as session:
        before = (
            session.scalar(select(func.count(Delivery.id))),
            session.scalar(select(func.count(Event.id))),
        )
    folder = tmp_path / "campaigns"
    folder.mkdir()
    env = {
        "NURTURE_DATABASE_URL": engine.url.render_as_string(hide_password=False),
        "NURTURE_CAMPAIGNS": str(folder),
        "NURTURE_TEMPLATES": str(TEMPLATES),
    }
    args = ["replay", "replayed", "--since", "5d", "--until", until.isoformat(), "--every", "6h"]
    out = _run([*args, "--json"], env)
    assert out.exit_code == 0, out.output
    data = json.loads(out.output)
    steps = {(r["step"], r["variant"]): (r["replayed"], r["actual"]) for r in data["steps"]}
    assert all(r == a for r, a in steps.values()), steps
    # What makes this a test: branches, an exit, a late lead and an unsubscribe all show.
    assert steps[("welcome", None)] == (9, 9)
    assert steps[("demo-offer", None)] == (3, 3)  # the three who clicked
    assert steps[("breakup", None)][1] == 9 - 1 - 1  # not the one who replied nor l5
    assert data["ticks"] == 21 and data["version"] == "v1 (stored)"
    # A working copy without the branch: everyone left gets the demo offer instead.
    (folder / "replayed.yaml").write_text(
        SPEC.replace(
            "    branch:\n      - when: {event: clicked, since_step: case-study}\n"
            "        template: b2b/demo_offer\n      - otherwise: {goto: breakup}\n",
            "    template: b2b/demo_offer\n",
        )
    )
    changed = json.loads(_run([*args, "--campaigns", str(folder), "--json"], env).output)
    rows = {(r["step"], r["variant"]): (r["replayed"], r["actual"]) for r in changed["steps"]}
    assert rows[("demo-offer", None)] == (7, 3)
    human = _run([*args, "--campaigns", str(folder)], env)
    assert human.exit_code == 0 and "demo-offer" in human.output
    # The live database was only read.
    with session_scope(engine) as session:
        after = (
            session.scalar(select(func.count(Delivery.id))),
            session.scalar(select(func.count(Event.id))),
        )
    assert after == before
