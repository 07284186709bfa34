"""Consent records: a campaign's topic is enforced at enrollment and again at claim time."""

from __future__ import annotations

import csv
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine, func, select

from nurture.config import PROJECT_ROOT
from nurture.intake.leads import import_leads
from nurture.journey.sequences import advance_due
from nurture.outbox.delivery import send_due
from nurture.spec.consent import ConsentSpec, TopicSpec
from nurture.spec.programme import Programme
from nurture.spec.schema import SpecErrors
from nurture.store.consent import ConsentError, ConsentIn, record_consents
from nurture.store.db import session_scope
from nurture.store.models import Consent, Delivery, Enrollment, Event, Lead
from nurture.tick import enroll_campaign, prepare_campaigns, tick
from tests.helpers import TEMPLATES, add_leads, campaign, mailer, programme
from tests.servers import SmtpSink

NEWS = campaign("""
name: news
topic: newsletter
audience: {field: source, op: eq, value: website}
steps:
  - {id: welcome, template: retail/welcome}
""")

TOPICS = ConsentSpec(
    topics={
        "newsletter": TopicSpec(label="Newsletter", bases=["consent"]),
        "offers": TopicSpec(label="Offers", bases=["consent", "legitimate_interest"]),
    }
)


def _programme(*campaigns: object) -> Programme:
    prog = programme(*campaigns)  # type: ignore[arg-type]
    return Programme(prog.campaigns, prog.scoring, prog.pipeline, prog.templates, TOPICS)


def _grant(
    engine: Engine, now: datetime, lead_id: int, topic: str, basis: str, status: str = "granted"
) -> int:
    with session_scope(engine) as session:
        return record_consents(
            session,
            [ConsentIn(lead_id, topic, basis, status, "test", "unit", "v1", "203.0.113.9", "UA")],
            now,
        )


def test_a_topic_campaign_enrolls_only_leads_with_the_consent_it_needs(
    engine: Engine, smtp_server: SmtpSink, now: datetime
) -> None:
    ids = add_leads(
        engine,
        now,
        {"email": "yes@a.example"},  # consent to newsletter
        {"email": "star@a.example"},  # consent to every topic
        {"email": "li@a.example"},  # legitimate interest: newsletter accepts consent only
        {"email": "none@a.example"},  # no record
        {"email": "out@a.example"},  # every topic, but withdrew newsletter
    )
    _grant(engine, now, ids[0], "newsletter", "consent")
    _grant(engine, now, ids[1], "*", "consent")
    _grant(engine, now, ids[2], "newsletter", "legitimate_interest")
    _grant(engine, now, ids[4], "*", "consent")
    _grant(engine, now, ids[4], "newsletter", "consent", "withdrawn")
    result = tick(engine, now, _programme(NEWS), mailer(smtp_server.url), worker="t")
    assert result.campaigns["news"].enrolled == 2
    smtp_server.wait_for(2)
    assert sorted(smtp_server.recipients()) == ["star@a.example", "yes@a.example"]


def test_consent_withdrawn_after_queueing_is_checked_again_at_claim_time(
    engine: Engine, smtp_server: SmtpSink, now: datetime
) -> None:
    ids = add_leads(engine, now, {"email": "a@b.example"}, {"email": "c@d.example"})
    for lead_id in ids:
        _grant(engine, now, lead_id, "newsletter", "consent")
    prog = _programme(NEWS)
    (ref,) = prepare_campaigns(engine, prog, now)
    assert enroll_campaign(engine, ref, now) == 2
    assert advance_due(engine, ref, now).queued == 2
    # Withdrawn between queueing and sending: the claim must not take it.
    _grant(engine, now, ids[0], "newsletter", "consent", "withdrawn")
    report = send_due(engine, now, mailer(smtp_server.url), worker="t")
    assert report.skipped == 1
    smtp_server.wait_for(1)
    assert smtp_server.recipients() == ["c@d.example"]
    with session_scope(engine) as session:
        status = session.scalar(select(Delivery.status).where(Delivery.lead_id == ids[0]))
    assert status == "skipped"


def test_every_consent_change_is_an_event_and_a_repeat_is_not(
    engine: Engine, now: datetime
) -> None:
    (lead,) = add_leads(engine, now, {"email": "e@f.example"})
    assert _grant(engine, now, lead, "offers", "consent") == 1
    assert _grant(engine, now + timedelta(hours=1), lead, "offers", "consent") == 0
    assert _grant(engine, now + timedelta(hours=2), lead, "offers", "consent", "withdrawn") == 1
    with session_scope(engine) as session:
        events = session.execute(
            select(Event.type, Event.payload).where(Event.lead_id == lead).order_by(Event.id)
        ).all()
        row = session.scalars(select(Consent).where(Consent.lead_id == lead)).one()
    assert [t for t, _ in events] == ["consent_granted", "consent_withdrawn"]
    assert events[0][1] == {
        "topic": "offers",
        "basis": "consent",
        "source_kind": "test",
        "source": "unit",
        "text_version": "v1",
        "ip": "203.0.113.9",
        "user_agent": "UA",
    }
    assert (row.status, row.recorded_at) == ("withdrawn", now + timedelta(hours=2))
    with pytest.raises(ConsentError, match="unknown lawful basis 'whim'"):
        _grant(engine, now, lead, "offers", "whim")


def _csv(path: Path, rows: list[dict[str, str]]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_import_consent_columns_and_a_per_file_basis(
    engine: Engine, tmp_path: Path, now: datetime
) -> None:
    path = _csv(
        tmp_path / "fair.csv",
        [
            {
                "email": "a@x.example",
                "consent_topics": "newsletter;offers",
                "consent_basis": "consent",
                "consent_text_version": "2026-01",
                "consent_at": "2026-02-01T09:00:00+00:00",
            },
            {
                "email": "b@x.example",
                "consent_topics": "",
                "consent_basis": "",
                "consent_text_version": "",
                "consent_at": "",
            },
            {
                "email": "c@x.example",
                "consent_topics": "offers",
                "consent_basis": "whim",
                "consent_text_version": "",
                "consent_at": "",
            },
            {
                "email": "d@x.example",
                "consent_topics": "",
                "consent_basis": "Legitimate Interests",
                "consent_text_version": "",
                "consent_at": "",
            },
        ],
    )
    result = import_leads(
        engine, path, now=now, consent_basis="contract", consent_topics=["offers"]
    )
    assert (result.inserted, result.rejected, result.consents) == (3, 1, 4)
    rejects = (tmp_path / "fair.rejects.csv").read_text()
    assert "unknown lawful basis 'whim'" in rejects
    with session_scope(engine) as session:
        got = sorted(
            session.execute(
                select(
                    Lead.email, Consent.topic, Consent.basis, Consent.source, Consent.text_version
                ).join(Lead, Lead.id == Consent.lead_id)
            ).all()
        )
        first = session.scalar(
            select(Consent.recorded_at)
            .join(Lead, Lead.id == Consent.lead_id)
            .where(Lead.email == "a@x.example")
        )
    assert got == [
        ("a@x.example", "newsletter", "consent", "fair.csv", "2026-01"),
        ("a@x.example", "offers", "consent", "fair.csv", "2026-01"),
        ("b@x.example", "offers", "contract", "fair.csv", None),
        ("d@x.example", "offers", "legitimate_interest", "fair.csv", None),
    ]
    assert first == datetime.fromisoformat("2026-02-01T09:00:00+00:00")
    # The same file again changes no record and writes no event.
    again = import_leads(engine, path, now=now, consent_basis="contract", consent_topics=["offers"])
    assert again.consents == 0
    with session_scope(engine) as session:
        assert session.scalar(select(func.count()).select_from(Event)) == 4


def test_import_topics_without_a_basis_are_rejected(
    engine: Engine, tmp_path: Path, now: datetime
) -> None:
    path = _csv(tmp_path / "t.csv", [{"email": "a@x.example", "consent_topics": "offers"}])
    result = import_leads(engine, path, now=now)
    assert (result.inserted, result.rejected) == (0, 1)
    assert "consent topics without a consent_basis" in (tmp_path / "t.rejects.csv").read_text()
    with pytest.raises(ValueError, match="unknown lawful basis"):
        import_leads(engine, path, now=now, consent_basis="vibes")


def test_the_shipped_programme_keeps_mailing_imported_leads(
    engine: Engine, smtp_server: SmtpSink, tmp_path: Path, now: datetime
) -> None:
    prog = Programme.load(PROJECT_ROOT / "campaigns", TEMPLATES)
    assert prog.consent.topics  # the example declares topics for its preference centre
    path = _csv(
        tmp_path / "leads.csv",
        [
            {
                "email": "shop@x.example",
                "source": "marketplace",
                "type": "retail",
                "first_name": "Sam",
            }
        ],
    )
    assert import_leads(engine, path, now=now).inserted == 1
    result = tick(engine, now, prog, mailer(smtp_server.url), worker="t")
    assert result.campaigns["retail-welcome"].enrolled == 1
    smtp_server.wait_for(1)
    assert smtp_server.recipients() == ["shop@x.example"]


def test_a_campaign_naming_an_unknown_topic_fails_to_load(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text(
        "name: c\ntopic: nope\naudience: {field: source, op: eq, value: web}\n"
        "steps:\n  - {id: a, template: retail/welcome}\n"
    )
    with pytest.raises(SpecErrors, match="unknown topic 'nope'"):
        Programme.load(tmp_path, TEMPLATES)


def test_enrollment_counts_stay_zero_without_consent(engine: Engine, now: datetime) -> None:
    add_leads(engine, now, {"email": "z@z.example"})
    (ref,) = prepare_campaigns(engine, _programme(NEWS), now)
    assert enroll_campaign(engine, ref, now) == 0
    with session_scope(engine) as session:
        assert session.scalar(select(func.count()).select_from(Enrollment)) == 0
