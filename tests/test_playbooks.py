"""The shipped lifecycle playbooks, each walked through with real leads, SMTP and database.

Every test loads the campaign from ``campaigns/`` exactly as a tick would (templates
checked), runs whole ticks at injected instants, and reads what was sent from the outbox
and the SMTP server.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, select

from nurture.config import PROJECT_ROOT
from nurture.outbox.delivery import Mailer
from nurture.spec.schema import CampaignSpec, load_campaign, template_exists
from nurture.store.db import session_scope
from nurture.store.models import Delivery, DeliveryStatus, Enrollment, Event, Lead, Suppression
from nurture.tick import tick
from tests.helpers import TEMPLATES, add_leads, mailer, programme
from tests.servers import SmtpSink

CAMPAIGNS = PROJECT_ROOT / "campaigns"


def playbook(name: str) -> CampaignSpec:
    """A shipped campaign, validated with its templates."""
    return load_campaign(CAMPAIGNS / f"{name}.yaml", template_exists(TEMPLATES))


def sent(engine: Engine) -> list[tuple[str, str, str]]:
    """(email, step, template) of every sent delivery, in order."""
    with session_scope(engine) as session:
        return [
            tuple(r)
            for r in session.execute(
                select(Lead.email, Delivery.step_id, Delivery.template)
                .join(Lead, Lead.id == Delivery.lead_id)
                .where(Delivery.status == DeliveryStatus.sent.value)
                .order_by(Delivery.id)
            ).all()
        ]


def add_event(
    engine: Engine, email: str, kind: str, at: datetime, url: str | None = None, **payload: Any
) -> None:
    """Record one event for the lead with this email (a person's, as the tracker would)."""
    with session_scope(engine) as session:
        lead_id = session.scalar(select(Lead.id).where(Lead.email == email))
        assert lead_id is not None
        session.add(Event(lead_id=lead_id, type=kind, occurred_at=at, url=url, payload=payload))


def run(engine: Engine, at: datetime, spec: CampaignSpec, m: Mailer) -> None:
    tick(engine, at, programme(spec), m, worker="t")


@pytest.fixture
def m(smtp_server: SmtpSink) -> Any:
    out = mailer(smtp_server.url)
    yield out
    out.sender.close()


def test_re_engagement_checks_in_then_sunsets_the_silent(
    engine: Engine, smtp_server: SmtpSink, m: Mailer, now: datetime
) -> None:
    spec = playbook("re-engagement")
    old = now - timedelta(days=70)
    add_leads(
        engine,
        old,
        {"email": "silent@example.com", "lifecycle_stage": "lead"},
        {"email": "woken@example.com", "lifecycle_stage": "lead"},
        {"email": "active@example.com", "lifecycle_stage": "lead"},  # opened last week
        {"email": "customer@example.com", "lifecycle_stage": "customer"},
    )
    add_leads(engine, now - timedelta(days=10), {"email": "new@example.com"})  # too recent
    add_event(engine, "active@example.com", "opened", now - timedelta(days=7))
    add_event(engine, "silent@example.com", "opened", now - timedelta(days=61))  # too long ago

    run(engine, now, spec, m)  # Tuesday 10:00: the check-in
    assert sorted(e for e, _, _ in sent(engine)) == ["silent@example.com", "woken@example.com"]

    week = now + timedelta(days=7)
    add_event(engine, "woken@example.com", "opened", now + timedelta(days=1))
    run(engine, week, spec, m)  # only the still-silent lead gets the last call
    assert sent(engine)[2:] == [("silent@example.com", "last-call", "lifecycle/reengage_last_call")]

    run(engine, week + timedelta(days=7), spec, m)  # no answer to either: sunset
    with session_scope(engine) as session:
        suppressed = session.execute(select(Suppression.email, Suppression.reason)).all()
        status = dict(
            session.execute(
                select(Lead.email, Enrollment.status).join(Lead, Lead.id == Enrollment.lead_id)
            ).all()
        )
    assert suppressed == [("silent@example.com", "sunset")]
    assert status == {"silent@example.com": "completed", "woken@example.com": "completed"}
    assert len(sent(engine)) == 3  # the sunset sends nothing
    smtp_server.wait_for(3)


def test_recycled_nurture_cools_off_then_promotes_on_intent(
    engine: Engine, smtp_server: SmtpSink, m: Mailer, now: datetime
) -> None:
    spec = playbook("recycled-nurture")
    add_leads(
        engine,
        now - timedelta(days=90),
        {"email": "lost@example.com", "lifecycle_stage": "lost"},
        {"email": "recycled@example.com", "lifecycle_stage": "recycled"},
        {"email": "open@example.com", "lifecycle_stage": "opportunity"},
    )
    run(engine, now, spec, m)
    assert sent(engine) == []  # two weeks of cooling off first
    later = now + timedelta(days=14)
    run(engine, later, spec, m)
    assert sorted(sent(engine)) == [
        ("lost@example.com", "check-in", "lifecycle/recycled_checkin"),
        ("recycled@example.com", "check-in", "lifecycle/recycled_checkin"),
    ]
    # A click on the pilot link is buying intent: the lead is promoted back to the pipeline.
    pilot = "https://lumen.example.com/pilot?utm_source=nurture"
    add_event(engine, "recycled@example.com", "clicked", later + timedelta(hours=2), url=pilot)
    add_event(
        engine, "lost@example.com", "clicked", later + timedelta(hours=2), url="https://x.example/"
    )
    run(engine, later + timedelta(hours=3), spec, m)
    with session_scope(engine) as session:
        stages = dict(session.execute(select(Lead.email, Lead.lifecycle_stage)).all())
    assert stages["recycled@example.com"] == "mql"
    assert stages["lost@example.com"] == "lost"
    run(engine, later + timedelta(days=21), spec, m)  # the promoted lead has exited
    assert sent(engine)[2:] == [("lost@example.com", "whats-new", "lifecycle/recycled_whats_new")]


def test_customer_onboarding_branches_on_setup(
    engine: Engine, smtp_server: SmtpSink, m: Mailer, now: datetime
) -> None:
    spec = playbook("customer-onboarding")
    add_leads(
        engine,
        now,
        {"email": "keen@example.com", "lifecycle_stage": "customer"},
        {"email": "stuck@example.com", "lifecycle_stage": "customer"},
        {"email": "prospect@example.com", "lifecycle_stage": "sql"},
    )
    run(engine, now, spec, m)
    run(engine, now + timedelta(days=2), spec, m)  # Thursday: the setup guide
    add_event(engine, "keen@example.com", "clicked", now + timedelta(days=2, hours=1))
    run(engine, now + timedelta(days=7), spec, m)  # next Tuesday: tips or help
    assert sorted(sent(engine)) == [
        ("keen@example.com", "first-value", "lifecycle/onboarding_tips"),
        ("keen@example.com", "setup", "lifecycle/onboarding_setup"),
        ("keen@example.com", "welcome", "lifecycle/onboarding_welcome"),
        ("stuck@example.com", "first-value", "lifecycle/onboarding_help"),
        ("stuck@example.com", "setup", "lifecycle/onboarding_setup"),
        ("stuck@example.com", "welcome", "lifecycle/onboarding_welcome"),
    ]
    smtp_server.wait_for(6)
    assert "prospect@example.com" not in smtp_server.recipients()


def test_upsell_and_cross_sell_by_account_and_products(
    engine: Engine, smtp_server: SmtpSink, m: Mailer, now: datetime
) -> None:
    spec = playbook("upsell-cross-sell")
    add_leads(
        engine,
        now,
        {
            "email": "big-starter@example.com",
            "lifecycle_stage": "customer",
            "attributes": {"plan": "starter", "employees": 400, "products": ["dashboards"]},
        },
        {
            "email": "no-forecast@example.com",
            "lifecycle_stage": "customer",
            "attributes": {"plan": "growth", "employees": 80, "products": ["dashboards"]},
        },
        {
            "email": "has-all@example.com",
            "lifecycle_stage": "customer",
            "attributes": {"plan": "growth", "products": ["dashboards", "forecasting"]},
        },
        {"email": "prospect@example.com", "lifecycle_stage": "opportunity"},
    )
    run(engine, now, spec, m)
    with session_scope(engine) as session:
        enrolled = set(
            session.scalars(select(Lead.email).join(Enrollment, Enrollment.lead_id == Lead.id))
        )
    assert enrolled == {"big-starter@example.com", "no-forecast@example.com"}
    assert sent(engine) == []  # the onboarding month comes first
    offer = now + timedelta(days=30)  # Thursday
    run(engine, offer, spec, m)
    assert sorted(sent(engine)) == [
        ("big-starter@example.com", "offer", "lifecycle/upsell_plan"),
        ("no-forecast@example.com", "offer", "lifecycle/cross_sell_forecasting"),
    ]
    add_event(engine, "big-starter@example.com", "clicked", offer + timedelta(hours=1))
    run(engine, offer + timedelta(days=7), spec, m)
    assert sent(engine)[2:] == [
        ("no-forecast@example.com", "follow-up", "lifecycle/expansion_followup")
    ]


def test_referral_request_asks_promoters_and_stops_for_detractors(
    engine: Engine, smtp_server: SmtpSink, m: Mailer, now: datetime
) -> None:
    spec = playbook("referral-request")
    add_leads(
        engine,
        now - timedelta(days=40),
        {"email": "fan@example.com", "lifecycle_stage": "customer"},
        {"email": "passive@example.com", "lifecycle_stage": "customer"},
        {"email": "fickle@example.com", "lifecycle_stage": "customer"},
    )
    add_event(engine, "fan@example.com", "nps", now - timedelta(hours=1), score=10)
    add_event(engine, "passive@example.com", "nps", now - timedelta(hours=1), score=8)
    add_event(engine, "fickle@example.com", "nps", now - timedelta(hours=1), score=9)
    run(engine, now, spec, m)
    with session_scope(engine) as session:
        enrolled = set(
            session.scalars(select(Lead.email).join(Enrollment, Enrollment.lead_id == Lead.id))
        )
    assert enrolled == {"fan@example.com", "fickle@example.com"}
    add_event(engine, "fickle@example.com", "nps", now + timedelta(days=1), score=4)
    run(engine, now + timedelta(days=3), spec, m)  # Friday: the ask, to the fan only
    assert sent(engine) == [("fan@example.com", "ask", "lifecycle/referral_ask")]
    run(engine, now + timedelta(days=13), spec, m)  # no click: one reminder
    assert sent(engine)[1:] == [("fan@example.com", "reminder", "lifecycle/referral_reminder")]
    with session_scope(engine) as session:
        reasons = dict(
            session.execute(
                select(Lead.email, Enrollment.exit_reason).join(Lead, Lead.id == Enrollment.lead_id)
            ).all()
        )
    assert reasons == {"fan@example.com": None, "fickle@example.com": "exit_when"}


@pytest.mark.parametrize(
    ("fragment", "message"),
    [
        (
            "branch: [{when: {event: opened}, end: true},"
            " {otherwise: {suppress: true, end: true}}]",
            "expected exactly one of template, variants, goto, end: true or suppress: true",
        ),
        (
            "branch: [{when: {event: nps, payload: {key: a.b, op: gte, value: 9}}, end: true}]",
            "bad payload key 'a.b'",
        ),
        (
            "branch: [{when: {event: nps, payload: {key: score, op: gte, value: high}},"
            " end: true}]",
            "gte needs a number or an ISO date, got 'high'",
        ),
        (
            "branch: [{when: {field: created_at, op: lte, value: 60 days ago}, end: true}]",
            "or a relative time like '60d ago', got '60 days ago'",
        ),
    ],
)
def test_playbook_rules_report_bad_input(fragment: str, message: str) -> None:
    import yaml
    from pydantic import ValidationError

    text = (
        "name: x\naudience: {field: source, op: eq, value: web}\n"
        f"steps:\n  - id: a\n    {fragment}\n"
    )
    with pytest.raises(ValidationError, match=re.escape(message)):
        CampaignSpec.model_validate(yaml.safe_load(text))
