"""Sales alerts: queued once per transition and rule, delivered to a real local webhook
receiver with who the lead is, why they qualified and the CRM link; retried, then parked."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from datetime import datetime, timedelta

import pytest
from sqlalchemy import Engine, select

from nurture.crm.alerts import (
    AlertError,
    AlertMessage,
    WebhookNotifier,
    alerts_for,
    parse_webhooks,
    pending,
    queue_alerts,
    send_alerts,
)
from nurture.dev.webhook_receiver import WebhookSink
from nurture.journey.pipeline import move_leads
from nurture.spec.schema import AlertSpec, PipelineSpec, ScoringSpec, load_pipeline
from nurture.store.db import session_scope
from nurture.store.models import Alert, CrmLink, Event, Lead, StageTransition
from nurture.tick import tick
from tests.helpers import add_leads, campaign, mailer, programme
from tests.servers import SmtpSink

SCORING = ScoringSpec.model_validate(
    {
        "fit": [
            {
                "name": "decision maker",
                "when": {"field": "attributes.title", "op": "eq", "value": "CEO"},
                "points": 25,
            }
        ],
    }
)
PIPELINE = PipelineSpec(
    alerts=[
        AlertSpec(
            stages=["mql"],
            to="sales",
            by_owner={"alice": "alice-dm"},
            link="https://crm.example/{connector}/leads/{external_id}",
        ),
        AlertSpec(stages=["customer"], to="cs"),
    ]
)


@pytest.fixture
def sink() -> Iterator[WebhookSink]:
    server = WebhookSink().start()
    yield server
    server.stop()


def _notifier(sink: WebhookSink) -> WebhookNotifier:
    return WebhookNotifier(
        {"sales": sink.url + "/sales", "cs": sink.url + "/cs", "alice-dm": sink.url + "/alice"}
    )


def _qualify(engine: Engine, now: datetime, email: str, owner: str | None = None) -> int:
    [lead_id] = add_leads(
        engine,
        now - timedelta(days=3),
        {
            "email": email,
            "first_name": "Ada <b>",
            "last_name": "*Bold*",
            "lifecycle_stage": "lead",
            "attributes": {"title": "CEO"},
        },
    )
    with session_scope(engine) as session:
        lead = session.get(Lead, lead_id)
        assert lead is not None
        lead.owner = owner
        session.add_all(
            Event(lead_id=lead_id, type=t, occurred_at=now - timedelta(hours=h))
            for t, h in (("clicked", 5), ("clicked", 4), ("replied", 3), ("opened", 6))
        )
        session.add(
            CrmLink(
                lead_id=lead_id,
                connector="local",
                object_type="lead",
                external_id=f"local-{lead_id}",
                created_at=now,
                updated_at=now,
            )
        )
        move_leads(session, Lead.id == lead_id, "mql", cause="promoted via local", now=now)
    return lead_id


def test_an_alert_reaches_the_receiver_once_with_who_why_and_link(
    engine: Engine, sink: WebhookSink, now: datetime
) -> None:
    lead_id = _qualify(engine, now, "ada@acme.example")
    _qualify(engine, now, "owned@acme.example", owner="alice")
    report = alerts_for(engine, PIPELINE, SCORING, _notifier(sink), now)
    assert (report.queued, report.sent, report.parked) == (2, 2, 0)
    by_path = dict(sink.received)
    assert set(by_path) == {"/sales", "/alice"}  # the owner's own channel wins
    body = by_path["/sales"]
    alert = body["alert"]
    assert alert["email"] == "ada@acme.example" and alert["stage"] == "mql"
    assert alert["crm"]["url"] == f"https://crm.example/local/leads/local-{lead_id}"
    assert [e["type"] for e in alert["score"]["events"]] == ["replied", "clicked", "opened"]
    assert alert["score"]["events"][1]["count"] == 2
    assert alert["score"]["fit_rules"] == [{"name": "decision maker", "points": 25.0}]
    text = body["text"]
    assert "ada@acme.example" in text and "decision maker (+25)" in text
    assert f"https://crm.example/local/leads/local-{lead_id}" in text
    # Lead-typed text is inert: no HTML or markdown reaches the channel as markup.
    assert "<b>" not in text and "*Bold*" not in text and "\\*Bold\\*" in text
    assert len(text.splitlines()) <= 8  # one screen
    # Later ticks send nothing again, and a stage the rules do not name sends nothing.
    with session_scope(engine) as session:
        move_leads(session, Lead.id == lead_id, "sql", cause="crm pull via local", now=now)
    again = alerts_for(engine, PIPELINE, SCORING, _notifier(sink), now + timedelta(minutes=15))
    assert (again.queued, again.sent) == (0, 0)
    assert sink.count == 2
    assert pending(engine) == {"sent": 2}


def test_failures_retry_with_backoff_then_park(
    engine: Engine, sink: WebhookSink, now: datetime
) -> None:
    _qualify(engine, now, "flaky@acme.example")
    sink.fail_next(503)
    first = alerts_for(engine, PIPELINE, SCORING, _notifier(sink), now)
    assert (first.sent, first.retry) == (0, 1) and sink.count == 0
    # Not due again before its backoff.
    assert alerts_for(engine, PIPELINE, SCORING, _notifier(sink), now).retry == 0
    later = alerts_for(engine, PIPELINE, SCORING, _notifier(sink), now + timedelta(minutes=5))
    assert later.sent == 1 and sink.count == 1

    _qualify(engine, now, "gone@acme.example")
    sink.fail_next(404)  # the webhook was deleted: fatal, parked at once with its reason
    report = alerts_for(engine, PIPELINE, SCORING, _notifier(sink), now + timedelta(minutes=6))
    assert report.parked == 1 and "HTTP 404" in report.errors[0]

    _qualify(engine, now + timedelta(hours=1), "down@acme.example")
    t = now + timedelta(hours=1)
    sink.fail_next(*[500] * 40)
    for step in range(0, 26 * 60, 60):  # a day of 5xx: retried hourly, then parked
        alerts_for(engine, PIPELINE, SCORING, _notifier(sink), t + timedelta(minutes=step))
    with session_scope(engine) as session:
        rows = session.execute(select(Alert.status, Alert.last_error, Alert.attempts)).all()
    parked = [r for r in rows if r.status == "parked"]
    assert len(parked) == 2
    assert any("HTTP 500" in (r.last_error or "") and r.attempts > 20 for r in parked)


def test_unreachable_webhook_is_retryable() -> None:
    from nurture.crm.alerts import AlertMessage

    hook = WebhookNotifier({"*": "http://127.0.0.1:9/none"}, timeout=2)
    with pytest.raises(AlertError) as info:
        hook.send("any", AlertMessage("t", "x", {}))
    assert info.value.retryable
    with pytest.raises(AlertError, match="no webhook for channel 'x'"):
        WebhookNotifier({"sales": "http://127.0.0.1:9"}).send("x", AlertMessage("t", "x", {}))


def test_history_is_not_news(engine: Engine, sink: WebhookSink, now: datetime) -> None:
    # Transitions older than a day when alerts are switched on are not announced.
    _qualify(engine, now - timedelta(days=3), "old@acme.example")
    assert queue_alerts(engine, PIPELINE, now) == 0


def test_tick_delivers_alerts_for_promoted_leads(
    engine: Engine, sink: WebhookSink, smtp_server: SmtpSink, now: datetime
) -> None:
    spec = campaign("""
name: hot
audience: {field: source, op: eq, value: website}
steps: [{id: welcome, template: b2b/welcome}]
promote: {when: {score: fit, op: gte, value: 20}, to: {connector: local, stage: mql}}
""")
    add_leads(engine, now, {"email": "hot@acme.example", "attributes": {"title": "CEO"}})
    prog = programme(spec, scoring=SCORING)
    prog = type(prog)(prog.campaigns, prog.scoring, PIPELINE, prog.templates)
    m = mailer(smtp_server.url)
    result = tick(engine, now, prog, m, worker="t", notifier=_notifier(sink))
    m.sender.close()
    assert result.promotions.pushed == 1 and result.alerts.sent == 1
    assert sink.received[0][1]["alert"]["crm"]["external_id"].startswith("local-")


def test_alert_rules_in_pipeline_yaml(tmp_path: object) -> None:
    from pathlib import Path

    path = Path(str(tmp_path)) / "pipeline.yaml"
    path.write_text("alerts:\n  - {stages: [mql, won], to: sales, link: crm.example/x}\n")
    with pytest.raises(Exception) as info:
        load_pipeline(path)
    assert "alerts.0.link: expected an http(s) URL" in str(info.value)
    path.write_text("alerts:\n  - {stages: [mql, won], to: sales}\n")
    with pytest.raises(Exception) as info:
        load_pipeline(path)
    assert "alerts.0.stages.1: unknown stage 'won'" in str(info.value)
    assert parse_webhooks("sales=https://a.example/x, https://b.example/y") == {
        "sales": "https://a.example/x",
        "*": "https://b.example/y",
    }
    with pytest.raises(ValueError, match="expected name=https://"):
        parse_webhooks("sales=ftp://x")
    assert StageTransition  # the table alerts are built from


@pytest.mark.slow
def test_prefect_notification_block_delivers_to_the_receiver(
    harness: None, sink: WebhookSink, sqlite_engine: Engine, now: datetime
) -> None:
    from prefect.blocks.notifications import CustomWebhookNotificationBlock

    from nurture.flows.alerts import BlockNotifier

    CustomWebhookNotificationBlock(
        name="sales",
        url=sink.url + "/prefect",
        json_data={"text": "{{subject}}\n{{body}}"},
        allow_private_urls=True,
    ).save("sales-alerts", overwrite=True)
    pipeline = PipelineSpec(alerts=[AlertSpec(stages=["mql"], to="custom-webhook/sales-alerts")])
    _qualify(sqlite_engine, now, "block@acme.example")
    report = alerts_for(sqlite_engine, pipeline, SCORING, BlockNotifier(), now)
    assert report.sent == 1, report.errors
    [(path, body)] = sink.received
    assert path == "/prefect" and "block@acme.example" in body["text"]
    # A channel naming no block is a configuration error: parked with the reason.
    missing = PipelineSpec(
        alerts=[
            AlertSpec(stages=["mql"], to="custom-webhook/nope"),
            AlertSpec(stages=["mql"], to="nope"),
        ]
    )
    _qualify(sqlite_engine, now, "other@acme.example")
    report = alerts_for(sqlite_engine, missing, SCORING, BlockNotifier(), now)
    assert report.parked == 3  # both leads under the bad second rule, "other" under the first
    assert "no notification block 'custom-webhook/nope'" in report.errors[0]
    assert "expected a notification block as <block type slug>/<name>" in report.errors[1]


class _DiesAfter(WebhookNotifier):
    """Sends like the webhook notifier, then dies (as a killed process would) on call n."""

    def __init__(self, sink: WebhookSink, n: int) -> None:
        super().__init__({"sales": sink.url + "/sales"})
        self.left = n

    def send(self, channel: str, message: AlertMessage) -> None:
        if self.left == 0:
            raise KeyboardInterrupt("killed")
        self.left -= 1
        super().send(channel, message)


def test_a_sender_dying_mid_way_repeats_at_most_one_batch_and_loses_none(
    engine: Engine, sink: WebhookSink, now: datetime
) -> None:
    emails = [f"lead{i}@acme.example" for i in range(25)]
    for email in emails:
        _qualify(engine, now, email)
    queue_alerts(engine, PIPELINE, now)
    with pytest.raises(KeyboardInterrupt):
        send_alerts(engine, PIPELINE, SCORING, _DiesAfter(sink, 14), now, batch=10)
    # The first batch's ten committed; the four sent from the second did not.
    assert pending(engine) == {"sent": 10, "queued": 15}
    report = send_alerts(engine, PIPELINE, SCORING, _notifier(sink), now, batch=10)
    assert report.sent == 15 and pending(engine) == {"sent": 25}
    counts = Counter(body["alert"]["email"] for _, body in sink.received)
    assert set(counts) == set(emails)  # none lost
    assert sum(counts.values()) - len(emails) == 4 <= 10  # repeats: within the open batch
