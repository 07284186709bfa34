"""``nurture plan --rates history``: the forecast uses each step's observed rates, falls
back (and says so) where a step has too few sends, and bad options exit 1."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import Engine, select, update

from nurture.cli import cli
from nurture.config import get_settings
from nurture.engagement.events import EventIn, record_events
from nurture.journey.sequences import advance_due, enroll, sync_campaigns
from nurture.planning.plan import build_plan, plan_markdown
from nurture.store.db import session_scope
from nurture.store.models import Delivery, Enrollment
from tests.helpers import TEMPLATES, add_leads, campaign

SPEC = """
name: rated
audience: {field: source, op: eq, value: website}
steps:
  - {id: welcome, template: b2b/welcome}
  - id: follow
    wait: 1d
    branch:
      - when: {event: opened, since_step: welcome}
        template: b2b/demo_offer
      - otherwise: {end: true}
"""
BROWSER = {"user_agent": "Mozilla/5.0 (Windows NT 10.0; Win64; x64) Firefox/120.0"}


def _history(engine: Engine, now: datetime) -> None:
    """100 welcomes sent 3 days ago: 30 opened by people (one also by a gateway), 5 more
    opened only by a machine, and 10 leads left the campaign after it."""
    then = now - timedelta(days=3)
    add_leads(engine, then, *({"email": f"old{i}@x.example"} for i in range(100)))
    with session_scope(engine) as session:
        (ref,) = sync_campaigns(session, [campaign(SPEC)], then)
    with session_scope(engine) as session:
        assert enroll(session, ref, then) == 100
    advance_due(engine, ref, then)
    with session_scope(engine) as session:
        session.execute(update(Delivery).values(status="sent", sent_at=then))
        ids = sorted(session.scalars(select(Delivery.id)))
        assert len(ids) == 100
        opened = [
            EventIn(type="opened", occurred_at=then + timedelta(hours=2), delivery_id=d,
                    payload=BROWSER)
            for d in ids[:30]
        ]  # fmt: skip
        machine = [
            EventIn(type="opened", occurred_at=then + timedelta(seconds=1), delivery_id=d,
                    payload={"user_agent": "Mozilla/5.0 (compatible; GoogleImageProxy)",
                             "prefetch": True})
            for d in ids[25:35]
        ]  # fmt: skip
        record_events(session, opened + machine, now=then + timedelta(hours=3))
        # The history is over: these leads are done, 10 of them by an exit.
        enrolled = sorted(session.scalars(select(Enrollment.id)))
        session.execute(update(Enrollment).values(status="completed", step_id=None, due_at=None))
        session.execute(
            update(Enrollment).where(Enrollment.id.in_(enrolled[90:])).values(status="exited")
        )


def _fresh(engine: Engine, now: datetime) -> None:
    add_leads(engine, now, *({"email": f"new{i}@x.example"} for i in range(200)))


def test_history_rates_drive_the_branch_and_exits(engine: Engine, now: datetime) -> None:
    _history(engine, now)
    _fresh(engine, now)
    spec = campaign(SPEC)
    none = build_plan(engine, [(None, spec)], now, days=3, include_unchanged=True)
    (flat,) = none.campaigns
    assert flat.forecast == {"welcome": [200, 0, 0], "follow": [0, 0, 0]}  # nobody opens
    plan = build_plan(engine, [(None, spec)], now, days=3, include_unchanged=True, rates="history")
    (cp,) = plan.campaigns
    welcome = next(r for r in cp.rates if r.step == "welcome")
    # People's opens only: 30 of 100 (machine-only opens do not count), 10 exits.
    assert (welcome.source, welcome.sample, welcome.own_sends) == ("step", 100, 100)
    assert welcome.rates["opened"] == pytest.approx(0.30)
    assert welcome.rates["exited"] == pytest.approx(0.10)
    # 200 welcomes; 90% stay, and 30% of those opened: 54 demo offers the next day.
    assert cp.forecast == {"welcome": [200, 0, 0], "follow": [0, 54, 0]}
    follow = next(r for r in cp.rates if r.step == "follow")
    assert (follow.source, follow.own_sends, follow.sample) == ("campaign", 0, 100)
    assert any("rates for follow: 0 sends" in n and "overall rates" in n for n in cp.notes)
    data = plan.as_json()
    assert data["rates"] == {"mode": "history", "since_days": 90.0, "min_sends": 50}
    used = {r["step"]: r for r in data["campaigns"][0]["rates"]}
    assert used["welcome"]["opened"] == 0.3 and used["welcome"]["sample"] == 100
    md = plan_markdown(plan)
    assert "| welcome | - | step | 100 | 30.0% | 0.0% | 0.0% | 10.0% |" in md
    assert "Forecast, observed rates: **254 messages** in 3 days" in md


def test_too_few_sends_fall_back_to_no_engagement_and_say_so(engine: Engine, now: datetime) -> None:
    _history(engine, now)
    _fresh(engine, now)
    plan = build_plan(
        engine,
        [(None, campaign(SPEC))],
        now,
        days=3,
        include_unchanged=True,
        rates="history",
        min_sends=150,
    )
    (cp,) = plan.campaigns
    assert {r.source for r in cp.rates} == {"none"}
    assert cp.forecast == {"welcome": [200, 0, 0], "follow": [0, 0, 0]}
    assert any(
        n == "rates for welcome: 100 sends in 90d, fewer than 150; forecast with no engagement "
        "and no exits"
        for n in cp.notes
    ), cp.notes
    # History older than --since is not used either.
    short = build_plan(
        engine,
        [(None, campaign(SPEC))],
        now,
        days=3,
        include_unchanged=True,
        rates="history",
        since=timedelta(days=1),
    )
    assert short.campaigns[0].rates[0].own_sends == 0


def _run(args: list[str], engine: Engine, folder: Path) -> Result:
    env = {
        "NURTURE_DATABASE_URL": engine.url.render_as_string(hide_password=False),
        "NURTURE_CAMPAIGNS": str(folder),
        "NURTURE_TEMPLATES": str(TEMPLATES),
    }
    get_settings.cache_clear()
    try:
        return CliRunner().invoke(cli, args, env=env, catch_exceptions=False)
    finally:
        get_settings.cache_clear()


def test_cli_rates_history_and_bad_options(engine: Engine, tmp_path: Path, now: datetime) -> None:
    _history(engine, now)
    _fresh(engine, now)
    folder = tmp_path / "campaigns"
    folder.mkdir()
    (folder / "rated.yaml").write_text(SPEC)
    at = ["--now", now.isoformat(), "--days", "3", "--all"]
    out = _run(["plan", *at, "--rates", "history", "--since", "30d", "--json"], engine, folder)
    assert out.exit_code == 0, out.output
    (c,) = json.loads(out.output)["campaigns"]
    assert c["forecast"]["by_step"]["follow"] == [0, 54, 0]
    md = _run(["plan", *at, "--rates", "history", "--markdown"], engine, folder)
    assert md.exit_code == 0 and "Rates observed over the last 90 days" in md.output
    for bad, says in (
        (["--rates", "foo"], "--rates must be one of none, history, not 'foo'"),
        (["--since", "abc"], "--since 'abc' is not a duration"),
        (["--min-sends", "x"], "--min-sends 'x' must be a whole number"),
    ):
        res = _run(["plan", *at, *bad], engine, folder)
        assert res.exit_code == 1, (bad, res.output)
        assert says in res.output, res.output
        assert len(res.output.strip().splitlines()) == 1
