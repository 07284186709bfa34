"""End to end: a tick enrolls, sends over a real SMTP server, scores and promotes."""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import Engine, func, select

from nurture.engagement.events import EventIn, record_events
from nurture.spec.schema import ScoringSpec
from nurture.store.db import session_scope
from nurture.store.models import Delivery, Enrollment, Lead, Promotion, StageTransition
from nurture.tick import tick
from tests.helpers import add_leads, campaign, mailer, programme
from tests.servers import SmtpSink

B2B = campaign("""
name: b2b-test
audience:
  all:
    - {field: attributes.type, op: eq, value: b2b}
steps:
  - {id: welcome, template: b2b/welcome}
  - id: case-study
    wait: 2d
    variants:
      - {name: roi, template: b2b/case_study_roi}
      - {name: story, template: b2b/case_study_story}
  - id: demo-offer
    wait: 3d
    branch:
      - when: {event: clicked, since_step: case-study}
        template: b2b/demo_offer
      - otherwise: {goto: breakup}
  - {id: breakup, wait: 5d, template: b2b/breakup}
exit_when: {event: replied, this_campaign: true}
promote:
  when: {score: behaviour, op: gte, value: 4}
  to: {connector: local, stage: mql}
""")


def _sent(engine: Engine) -> list[tuple[str, str]]:
    with session_scope(engine) as session:
        return sorted(
            session.execute(
                select(Lead.email, Delivery.step_id)
                .join(Lead, Lead.id == Delivery.lead_id)
                .where(Delivery.status == "sent")
            ).all()
        )


def test_tick_sends_each_step_once_to_the_right_leads(
    engine: Engine, smtp_server: SmtpSink, now: datetime
) -> None:
    add_leads(
        engine,
        now,
        {"email": "ada@acme.example", "first_name": "Ada", "attributes": {"type": "b2b"}},
        {"email": "ben@globex.example", "first_name": "Ben", "attributes": {"type": "b2b"}},
        {"email": "cy@shop.example", "attributes": {"type": "retail"}},
    )
    prog = programme(B2B)
    m = mailer(smtp_server.url)
    first = tick(engine, now, prog, m, worker="test")
    assert first.summary() == {"enrolled": 2, "sent": 2, "failed": 0, "promoted": 0}
    smtp_server.wait_for(2)
    assert sorted(smtp_server.recipients()) == ["ada@acme.example", "ben@globex.example"]
    subjects = {r: str(msg["Subject"]) for r, msg in smtp_server.messages}
    assert all(s for s in subjects.values())
    # The message that Ada got greets Ada, and carries a one-click unsubscribe header.
    ada = next(msg for r, msg in smtp_server.messages if r == "ada@acme.example")
    assert "Ada" in ada.get_body(preferencelist=("plain",)).get_content()  # type: ignore[union-attr]
    assert ada["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"

    # The same instant again sends nothing.
    again = tick(engine, now, prog, m, worker="test")
    assert again.summary() == {"enrolled": 0, "sent": 0, "failed": 0, "promoted": 0}
    assert smtp_server.count() == 2

    # Two days later: the case study, one variant each, recorded on the delivery.
    later = tick(engine, now + timedelta(days=2), prog, m, worker="test")
    assert later.send.sent == 2
    with session_scope(engine) as session:
        variants = dict(
            session.execute(
                select(Delivery.lead_id, Delivery.variant).where(Delivery.step_id == "case-study")
            ).all()
        )
    assert set(variants.values()) <= {"roi", "story"} and len(variants) == 2

    # Ada clicks the case study; Ben does not. Three days on, Ada gets the demo offer and
    # Ben jumps to the break-up step, which waits 5 more days.
    with session_scope(engine) as session:
        ada_case = session.scalar(
            select(Delivery.id)
            .join(Lead, Lead.id == Delivery.lead_id)
            .where(Lead.email == "ada@acme.example", Delivery.step_id == "case-study")
        )
        record_events(
            session,
            [EventIn(type="clicked", occurred_at=now + timedelta(days=2, hours=1),
                     delivery_id=ada_case, url="https://example.com/x")],
            now=now + timedelta(days=2, hours=1),
        )  # fmt: skip
    t3 = now + timedelta(days=5)
    third = tick(engine, t3, prog, m, worker="test")
    assert third.send.sent == 1
    assert ("ada@acme.example", "demo-offer") in _sent(engine)
    assert ("ben@globex.example", "demo-offer") not in _sent(engine)
    # Her click scored 5 points (4.66 after 3 days of decay): promoted once, locally.
    assert third.promotions.pushed == 1
    with session_scope(engine) as session:
        assert (
            session.scalar(select(Lead.lifecycle_stage).where(Lead.email == "ada@acme.example"))
            == "mql"
        )
        assert session.scalar(select(func.count(StageTransition.id))) == 1
        assert session.scalar(select(func.count(Promotion.id))) == 1

    fourth = tick(engine, t3 + timedelta(days=5), prog, m, worker="test")
    assert fourth.send.sent == 2  # both get the break-up mail
    assert _sent(engine).count(("ben@globex.example", "breakup")) == 1
    with session_scope(engine) as session:
        statuses = set(session.scalars(select(Enrollment.status)))
    assert statuses == {"completed"}
    m.sender.close()


def test_reply_exits_the_sequence(engine: Engine, smtp_server: SmtpSink, now: datetime) -> None:
    add_leads(engine, now, {"email": "ada@acme.example", "attributes": {"type": "b2b"}})
    prog = programme(B2B, scoring=ScoringSpec(points={"replied": 1}))
    m = mailer(smtp_server.url)
    tick(engine, now, prog, m, worker="test")
    with session_scope(engine) as session:
        welcome = session.scalar(select(Delivery.id))
        record_events(
            session,
            [EventIn(type="replied", occurred_at=now + timedelta(hours=2), delivery_id=welcome)],
            now=now + timedelta(hours=2),
        )
    result = tick(engine, now + timedelta(days=10), prog, m, worker="test")
    assert result.send.sent == 0
    assert result.campaigns["b2b-test"].exited == 1
    assert _sent(engine) == [("ada@acme.example", "welcome")]
    m.sender.close()
