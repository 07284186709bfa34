"""The emergency stop and campaign schedules: pause/resume at claim time, starts_at/ends_at,
stop_at and send_at anchors, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import Engine, select, update

from nurture.cli import cli
from nurture.cli.common import console
from nurture.config import get_settings
from nurture.errors import NurtureError
from nurture.journey.pauses import pause, pause_history, paused_campaigns, resume
from nurture.journey.sequences import advance_due, enroll, sync_campaigns
from nurture.outbox.delivery import send_due
from nurture.spec.schema import SpecErrors, load_campaign
from nurture.store.db import session_scope
from nurture.store.models import Delivery, Enrollment, Lead
from nurture.tick import tick
from tests.helpers import add_leads, campaign, mailer, programme
from tests.servers import SmtpSink

WELCOME = campaign("""
name: welcome
audience: {field: source, op: eq, value: website}
steps:
  - {id: hello, template: b2b/welcome}
  - {id: again, wait: 1d, template: b2b/breakup}
""")


def _queue(engine: Engine, now: datetime, spec=WELCOME) -> int:  # type: ignore[no-untyped-def]
    """Store the campaign, enroll and queue the first step; return the campaign id."""
    with session_scope(engine) as session:
        (ref,) = sync_campaigns(session, [spec], now)
        enroll(session, ref, now)
    advance_due(engine, ref, now)
    return ref.id


def _statuses(engine: Engine) -> list[str]:
    with session_scope(engine) as session:
        return sorted(session.scalars(select(Delivery.status)))


def test_a_pause_keeps_queued_mail_queued_and_resume_sends_it(
    engine: Engine, smtp_server: SmtpSink, now: datetime
) -> None:
    add_leads(engine, now, {"email": "a@x.example"}, {"email": "b@y.example"})
    _queue(engine, now)
    assert _statuses(engine) == ["queued", "queued"]
    with session_scope(engine) as session:
        info, new = pause(session, "welcome", "  wrong price in the hero image ", now, by="ops")
    assert new and info.reason == "wrong price in the hero image" and info.paused_by == "ops"
    m = mailer(smtp_server.url)
    try:
        held = send_due(engine, now + timedelta(minutes=1), m, worker="t")
        assert held.claimed == 0 and held.sent == 0
        assert _statuses(engine) == ["queued", "queued"]
        assert smtp_server.count() == 0
        # A tick while paused neither sends nor moves anyone on, and says why.
        result = tick(engine, now + timedelta(days=2), programme(WELCOME), m, worker="t")
        assert result.send.sent == 0 and result.campaigns["welcome"].queued == 0
        assert result.held["welcome"].endswith("wrong price in the hero image")
        assert result.details()["held"] == result.held
        with session_scope(engine) as session:
            assert set(session.scalars(select(Enrollment.step_id))) == {"again"}
            again, new_again = pause(session, "welcome", "second press", now)
            assert not new_again and again.reason == "wrong price in the hero image"
            ended = resume(session, "welcome", now + timedelta(days=2), by="ops")
            assert ended is not None and ended.resumed_at == now + timedelta(days=2)
            assert paused_campaigns(session) == {}
            assert resume(session, "welcome", now) is None  # not paused any more
        resumed = tick(engine, now + timedelta(days=2), programme(WELCOME), m, worker="t")
        # The held first step and the now-due second step both go out: 2 leads x 2 steps.
        assert resumed.send.sent == 4 and resumed.held == {}
        smtp_server.wait_for(4)
    finally:
        m.sender.close()
    with session_scope(engine) as session:
        history = pause_history(session, "welcome")
    assert [(p.reason, p.resumed_by) for p in history] == [("wrong price in the hero image", "ops")]


def test_pause_refuses_unknown_campaigns_and_empty_reasons(engine: Engine, now: datetime) -> None:
    _queue(engine, now)
    with session_scope(engine) as session:
        with pytest.raises(NurtureError, match=r"unknown campaign 'welcom'.*welcome"):
            pause(session, "welcom", "typo", now)
        with pytest.raises(NurtureError, match="needs a reason"):
            pause(session, "welcome", "   ", now)
        with pytest.raises(NurtureError, match="at most"):
            pause(session, "welcome", "x" * 5000, now)
        assert paused_campaigns(session) == {}


def test_pause_only_holds_its_own_campaign(
    engine: Engine, smtp_server: SmtpSink, now: datetime
) -> None:
    other = campaign(WELCOME.model_dump_json(by_alias=True).replace('"welcome"', '"other"'))
    add_leads(engine, now, {"email": "a@x.example"})
    _queue(engine, now)
    _queue(engine, now, other)
    with session_scope(engine) as session:
        pause(session, "welcome", "hold", now)
    m = mailer(smtp_server.url)
    try:
        report = send_due(engine, now, m, worker="t")
    finally:
        m.sender.close()
    assert report.sent == 1
    with session_scope(engine) as session:
        rows = dict(
            session.execute(
                select(Delivery.status, Delivery.campaign_id).order_by(Delivery.campaign_id)
            ).all()
        )
    assert set(rows) == {"queued", "sent"}


SCHEDULED = """
name: launch
audience: {field: source, op: eq, value: website}
starts_at: "2026-03-04 00:00"
ends_at: 2026-03-06
stop_at: "2026-03-10T12:00:00+01:00"
steps:
  - {id: hello, template: b2b/welcome}
  - {id: webinar, template: b2b/demo_offer, send_at: "2026-03-05 09:00"}
  - {id: late, wait: 1d, template: b2b/breakup}
"""


def test_enrollment_window_and_stop_at(
    engine: Engine, smtp_server: SmtpSink, now: datetime
) -> None:
    spec = campaign(SCHEDULED)
    assert spec.starts_at == datetime(2026, 3, 4, tzinfo=UTC)
    assert spec.ends_at == datetime(2026, 3, 6, tzinfo=UTC)
    assert spec.stop_at == datetime(2026, 3, 10, 11, tzinfo=UTC)
    add_leads(engine, now, {"email": "a@x.example", "timezone": "UTC"})
    m = mailer(smtp_server.url)
    prog = programme(spec)
    try:
        assert tick(engine, now, prog, m, worker="t").enrolled == 0  # before starts_at
        first = tick(engine, datetime(2026, 3, 4, 10, tzinfo=UTC), prog, m, worker="t")
        assert first.enrolled == 1 and first.send.sent == 1
        add_leads(engine, now, {"email": "late@x.example", "timezone": "UTC"})
        closed = datetime(2026, 3, 6, 10, tzinfo=UTC)
        assert tick(engine, closed, prog, m, worker="t").enrolled == 0  # past ends_at
        # stop_at: the last step is queued before it, then held for good from it on.
        with session_scope(engine) as session:
            session.execute(update(Enrollment).values(due_at=datetime(2026, 3, 10, 10, tzinfo=UTC)))
        queued_only = tick(engine, datetime(2026, 3, 10, 10, 59, tzinfo=UTC), prog, m, worker="t")
        assert queued_only.send.sent == 1  # 'late' goes out before stop_at
        with session_scope(engine) as session:
            session.execute(
                update(Delivery).where(Delivery.step_id == "late").values(status="queued")
            )
        stopped = tick(engine, datetime(2026, 3, 10, 11, tzinfo=UTC), prog, m, worker="t")
        assert stopped.send.sent == 0 and stopped.send.claimed == 0
        assert stopped.held == {"launch": "stopped at 2026-03-10T11:00:00+00:00 (stop_at)"}
    finally:
        m.sender.close()


def test_send_at_is_local_time_in_each_leads_zone_and_passed_anchors_are_skipped(
    engine: Engine, now: datetime
) -> None:
    spec = campaign(SCHEDULED.replace('starts_at: "2026-03-04 00:00"\n', ""))
    add_leads(
        engine,
        now,
        {"email": "ny@x.example", "timezone": "America/New_York"},
        {"email": "be@x.example", "timezone": "Europe/Berlin"},
    )
    with session_scope(engine) as session:
        (ref,) = sync_campaigns(session, [spec], now)
        enroll(session, ref, now)
    advance_due(engine, ref, now)  # sends 'hello' and moves both to 'webinar'
    with session_scope(engine) as session:
        due = dict(
            session.execute(
                select(Lead.email, Enrollment.due_at)
                .join(Lead, Lead.id == Enrollment.lead_id)
                .where(Enrollment.step_id == "webinar")
            ).all()
        )
    assert due == {
        "ny@x.example": datetime(2026, 3, 5, 14, tzinfo=UTC),  # 09:00 EST
        "be@x.example": datetime(2026, 3, 5, 8, tzinfo=UTC),  # 09:00 CET
    }
    # A lead who reaches the step after its anchor has passed skips it.
    add_leads(engine, now, {"email": "late@x.example", "timezone": "UTC"})
    late = datetime(2026, 3, 5, 12, tzinfo=UTC)
    with session_scope(engine) as session:
        assert enroll(session, ref, late) == 1
    result = advance_due(engine, ref, late)
    assert dict(result.by_step) == {"hello": 1, "webinar": 1}  # only Berlin's anchor is due
    with session_scope(engine) as session:
        late_row = session.execute(
            select(Enrollment.step_id, Enrollment.due_at)
            .join(Lead, Lead.id == Enrollment.lead_id)
            .where(Lead.email == "late@x.example")
        ).one()
    assert late_row == ("late", late + timedelta(days=1))


@pytest.mark.parametrize(
    ("text", "where", "message"),
    [
        ('starts_at: "2026-03-05"\nends_at: "2026-03-04"\n', "ends_at", "after starts_at"),
        ('starts_at: "2026-03-05"\nstop_at: "2026-03-01"\n', "stop_at", "after starts_at"),
        ('stop_at: "next tuesday"\n', "stop_at", "expected a time like"),
    ],
)
def test_schedule_errors_name_file_line_and_key(
    tmp_path: Path, text: str, where: str, message: str
) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        "name: c\naudience: {field: source, op: eq, value: web}\n"
        + text
        + "steps:\n  - {id: a, template: b2b/welcome}\n"
    )
    with pytest.raises(SpecErrors) as err:
        load_campaign(path)
    (e,) = err.value.errors
    line = next(i for i, t in enumerate(path.read_text().splitlines(), 1) if t.startswith(where))
    assert (e.key, e.line) == (where, line) and message in e.message


@pytest.mark.parametrize(
    ("step", "message"),
    [
        ('{id: b, template: b2b/welcome, send_at: "10 Dec 09:00"}', "expected a local time"),
        ('{id: b, template: b2b/welcome, send_at: "2026-02-30 09:00"}', "invalid local time"),
        ('{id: b, template: b2b/welcome, wait: 2d, send_at: "2026-12-10 09:00"}', "not both"),
        ('{id: b, template: b2b/welcome, send_at: "2026-12-01 09:00"}', "before the send_at"),
    ],
)
def test_send_at_errors(tmp_path: Path, step: str, message: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        "name: c\naudience: {field: source, op: eq, value: web}\nsteps:\n"
        '  - {id: a, template: b2b/welcome, send_at: "2026-12-05 09:00"}\n'
        f"  - {step}\n"
    )
    with pytest.raises(SpecErrors) as err:
        load_campaign(path)
    (e,) = err.value.errors
    assert e.line == 5 and e.key.startswith("steps.1") and message in e.message, e


def _run(args: list[str], env: dict[str, str]) -> Result:
    get_settings.cache_clear()
    try:
        return CliRunner().invoke(cli, args, env=env, catch_exceptions=False)
    finally:
        get_settings.cache_clear()


def test_cli_pause_resume_and_list(
    engine: Engine, tmp_path: Path, now: datetime, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(console, "width", 250)  # one table row per line
    folder = tmp_path / "campaigns"
    folder.mkdir()
    (folder / "launch.yaml").write_text(SCHEDULED)
    _queue(engine, now, campaign(SCHEDULED))
    env = {
        "NURTURE_DATABASE_URL": engine.url.render_as_string(hide_password=False),
        "NURTURE_CAMPAIGNS": str(folder),
    }
    at = "2026-03-04T10:00:00+00:00"
    listed = _run(["campaigns", "list", "--json", "--now", at], env)
    (row,) = json.loads(listed.output)["campaigns"]
    assert (row["state"], row["paused"], row["stop_at"]) == (
        "live",
        None,
        "2026-03-10T11:00:00+00:00",
    )
    assert row["send_at"] == {"webinar": "2026-03-05 09:00"}
    paused = _run(["campaigns", "pause", "launch", "--reason", "legal [hold]", "--json"], env)
    assert paused.exit_code == 0, paused.output
    assert json.loads(paused.output)["reason"] == "legal [hold]"
    table = _run(["campaigns", "list", "--now", at], env)
    assert "paused" in table.output and "legal [hold]" in table.output
    assert "stops 2026-03-10T11:00:00+00:00" in table.output
    (row,) = json.loads(_run(["campaigns", "list", "--json"], env).output)["campaigns"]
    assert row["state"] == "paused" and row["paused"]["reason"] == "legal [hold]"
    report = json.loads(_run(["report", "--json"], env).output)
    assert report["paused"]["launch"]["reason"] == "legal [hold]"
    resumed = json.loads(_run(["campaigns", "resume", "launch", "--json"], env).output)
    assert resumed["resumed"] is True and resumed["pause"]["reason"] == "legal [hold]"
    unknown = CliRunner().invoke(cli, ["campaigns", "pause", "nope", "--reason", "x"], env=env)
    assert unknown.exit_code != 0


def test_the_tick_artifact_shows_held_campaigns(now: datetime) -> None:
    from nurture.flows.artifacts import tick_health
    from nurture.tick import TickResult

    text = tick_health(TickResult(now=now, held={"welcome": "paused since x: bad | link"}))
    assert "**Held campaigns**" in text
    assert "- **welcome**: paused since x: bad \\| link" in text
    assert "Held campaigns" not in tick_health(TickResult(now=now))
