"""Intake from a CRM: HubSpot contacts created since the mark become leads, once each."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta

import pytest
from sqlalchemy import Engine, select

from nurture.connectors.hubspot import HubSpotConnector
from nurture.crm import ContactSource
from nurture.crm.intake import intake_contacts
from nurture.store.db import session_scope
from nurture.store.models import CrmLink, Lead
from tests.fakes.hubspot import FakeHubSpot
from tests.helpers import add_leads


@pytest.fixture
def clock(now: datetime) -> dict[str, datetime]:
    return {"t": now}


@pytest.fixture
def fake(clock: dict[str, datetime]) -> Iterator[FakeHubSpot]:
    server = FakeHubSpot(clock=lambda: clock["t"])
    server.start()
    yield server
    server.stop()


def _connector(fake: FakeHubSpot) -> HubSpotConnector:
    assert fake.server is not None
    return HubSpotConnector(
        token="hs-token", base_url=fake.server.url, max_attempts=3, backoff_base=0.01, timeout=5.0
    )


def test_contacts_created_in_hubspot_become_leads_once(
    engine: Engine, fake: FakeHubSpot, clock: dict[str, datetime], now: datetime
) -> None:
    add_leads(engine, now - timedelta(days=5), {"email": "known@example.com"})
    created = now - timedelta(minutes=30)
    clock["t"] = created
    fake._write("contacts", "new@example.com", {"firstname": "Nia", "company": "Acme"})
    fake._write("contacts", "KNOWN@example.com", {"firstname": "Kai"})
    fake._write("contacts", "not-an-email", {"firstname": "Bad"})
    connector = _connector(fake)
    assert isinstance(connector, ContactSource)

    report = intake_contacts(engine, connector, now)
    assert (report.pulled, report.created, report.existing) == (3, 1, 1)
    assert len(report.invalid) == 1 and "must have an @-sign" in report.invalid[0]
    with session_scope(engine) as session:
        lead = session.scalars(select(Lead).where(Lead.email == "new@example.com")).one()
        assert lead.created_at == created  # the CRM's creation time: the capture
        assert (lead.first_name, lead.source, lead.attributes) == (
            "Nia",
            "sales",
            {"company": "Acme"},
        )
        links = session.execute(
            select(Lead.email, CrmLink.external_id).join(CrmLink, CrmLink.lead_id == Lead.id)
        ).all()
    assert sorted(e for e, _ in links) == ["known@example.com", "new@example.com"]

    # The next pull starts at the mark (minus the overlap): nothing new, nothing twice.
    again = intake_contacts(engine, connector, now + timedelta(minutes=5))
    assert again.since is not None and again.created == 0
    clock["t"] = now + timedelta(hours=1)
    fake._write("contacts", "later@example.com", {})
    third = intake_contacts(engine, connector, now + timedelta(hours=1, minutes=1))
    # The overlap repeats the earlier records; only the new one becomes a lead.
    assert (third.pulled, third.created, third.existing) == (4, 1, 2)
    with session_scope(engine) as session:
        assert session.scalar(select(Lead.id).where(Lead.email == "later@example.com"))
        assert len(session.scalars(select(Lead.id)).all()) == 3
    connector.close()
