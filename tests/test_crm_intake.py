"""Intake from CRMs: HubSpot contacts, Salesforce Leads and Pipedrive persons created since
the mark become leads, once each, page by page."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime, timedelta

import pytest
from click.testing import CliRunner
from sqlalchemy import Engine, select

from nurture.cli.crm import crm
from nurture.config import get_settings
from nurture.connectors.hubspot import HubSpotConnector
from nurture.connectors.pipedrive import PipedriveConnector
from nurture.connectors.salesforce import SalesforceConnector
from nurture.crm import ContactSource
from nurture.crm.intake import intake_contacts
from nurture.store.db import session_scope
from nurture.store.models import CrmCursor, CrmLink, Lead
from tests.fakes.hubspot import FakeHubSpot
from tests.fakes.pipedrive import FakePipedrive
from tests.fakes.salesforce import FakeSalesforce
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


# --- Salesforce Lead and Pipedrive person intake, paging, failure mid-way, the CLI -----


@pytest.fixture
def salesforce(clock: dict[str, datetime]) -> Iterator[FakeSalesforce]:
    server = FakeSalesforce(clock=lambda: clock["t"], page_size=2)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def pipedrive(clock: dict[str, datetime]) -> Iterator[FakePipedrive]:
    server = FakePipedrive(clock=lambda: clock["t"])
    server.page_size = 2
    server.start()
    yield server
    server.stop()


def _sf(fake: FakeSalesforce) -> SalesforceConnector:
    assert fake.server is not None
    return SalesforceConnector(
        client_id="app", client_secret="shh", login_url=fake.server.url,
        max_attempts=2, backoff_base=0.01, timeout=5.0,
    )  # fmt: skip


def _pd(fake: FakePipedrive) -> PipedriveConnector:
    assert fake.server is not None
    return PipedriveConnector(
        token="pd-token", base_url=fake.server.url, max_attempts=2, backoff_base=0.01, timeout=5.0
    )


def _add(crm: FakeSalesforce | FakePipedrive, email: str | None, first: str) -> str:
    """A salesperson creates a record by hand in the CRM."""
    if isinstance(crm, FakeSalesforce):
        return crm.add_lead(Email=email, FirstName=first, LastName="Doe", Company="Acme")
    return str(crm.add_person(first, [email] if email else [], first_name=first))


def _leads(engine: Engine, connector: str) -> dict[str, tuple[str, datetime]]:
    with session_scope(engine) as session:
        rows = session.execute(
            select(Lead.email, CrmLink.external_id, Lead.created_at)
            .join(CrmLink, CrmLink.lead_id == Lead.id)
            .where(CrmLink.connector == connector)
        ).all()
    return {e: (x, c) for e, x, c in rows}


@pytest.mark.parametrize("crm_name", ["salesforce", "pipedrive"])
def test_leads_and_persons_created_in_the_crm_become_leads_once_across_pages(
    engine: Engine,
    salesforce: FakeSalesforce,
    pipedrive: FakePipedrive,
    clock: dict[str, datetime],
    now: datetime,
    crm_name: str,
) -> None:
    fake: FakeSalesforce | FakePipedrive = salesforce if crm_name == "salesforce" else pipedrive
    connector: SalesforceConnector | PipedriveConnector = (
        _sf(salesforce) if crm_name == "salesforce" else _pd(pipedrive)
    )
    assert isinstance(connector, ContactSource)
    add_leads(engine, now - timedelta(days=5), {"email": "known@example.com"})
    ids = {}
    for minutes, email in enumerate(
        ["a@example.com", "KNOWN@example.com", None, "not-an-email", "A@example.com", "b@x.io"]
    ):
        clock["t"] = now - timedelta(minutes=60 - 10 * minutes)
        ids[email] = _add(fake, email, f"P{minutes}")
    report = intake_contacts(engine, connector, now)
    assert report.error is None and report.applied
    # Six records over three pages of two: the invalid ones reported, the duplicate email
    # (second page, "A@example.com") folded into the first lead.
    assert report.pulled == 6 and report.created == 2
    invalid = sorted(i.split(":")[0] for i in report.invalid)
    assert invalid == sorted([ids[None], ids["not-an-email"]])
    assert any("no email" in i for i in report.invalid)
    leads = _leads(engine, crm_name)
    assert set(leads) == {"a@example.com", "known@example.com", "b@x.io"}
    assert leads["a@example.com"] == (ids["a@example.com"], now - timedelta(minutes=60))
    assert leads["known@example.com"][0] == ids["KNOWN@example.com"]

    # Again: the mark (minus the overlap) keeps it small and nothing is created twice.
    clock["t"] = now + timedelta(hours=2)
    _add(fake, "c@example.com", "C")
    again = intake_contacts(engine, connector, now + timedelta(hours=2))
    assert again.since == now - timedelta(minutes=10)
    assert (again.pulled, again.created) == (2, 1)  # the overlap repeats b@x.io, harmlessly
    assert set(_leads(engine, crm_name)) == {
        "a@example.com", "known@example.com", "b@x.io", "c@example.com"
    }  # fmt: skip
    connector.close()


@pytest.mark.parametrize("crm_name", ["salesforce", "pipedrive"])
def test_a_crm_failing_mid_way_loses_nothing(
    engine: Engine,
    salesforce: FakeSalesforce,
    pipedrive: FakePipedrive,
    clock: dict[str, datetime],
    now: datetime,
    crm_name: str,
) -> None:
    fake: FakeSalesforce | FakePipedrive = salesforce if crm_name == "salesforce" else pipedrive
    connector: SalesforceConnector | PipedriveConnector = (
        _sf(salesforce) if crm_name == "salesforce" else _pd(pipedrive)
    )
    emails = [f"p{i}@example.com" for i in range(6)]
    for i, email in enumerate(emails):
        clock["t"] = now - timedelta(hours=6 - i)
        _add(fake, email, f"P{i}")
    # The first page is answered, then the CRM fails (every retry too).
    if isinstance(fake, FakeSalesforce):
        fake.queries_left = 1
    else:
        fake.lists_left = 1
    report = intake_contacts(engine, connector, now)
    assert report.error is not None and not report.applied
    assert (report.pulled, report.created) == (2, 2)
    assert set(_leads(engine, crm_name)) == set(emails[:2])
    with session_scope(engine) as session:
        mark = session.scalar(select(CrmCursor.high_water).where(CrmCursor.connector == crm_name))
    assert mark == now - timedelta(hours=5)  # only past what was stored

    if isinstance(fake, FakeSalesforce):
        fake.queries_left = None
    else:
        fake.lists_left = None
    resumed = intake_contacts(engine, connector, now)
    assert resumed.error is None and resumed.created == 4
    assert set(_leads(engine, crm_name)) == set(emails)
    connector.close()


def test_cli_pulls_every_crm_past_a_failing_one_and_exits_1(
    sqlite_engine: Engine,
    salesforce: FakeSalesforce,
    pipedrive: FakePipedrive,
    fake: FakeHubSpot,
    clock: dict[str, datetime],
    now: datetime,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert salesforce.server and pipedrive.server and fake.server
    env = {
        "NURTURE_DATABASE_URL": sqlite_engine.url.render_as_string(hide_password=False),
        "NURTURE_HUBSPOT_TOKEN": "hs-token",
        "NURTURE_HUBSPOT_BASE_URL": fake.server.url,
        "NURTURE_SALESFORCE_CLIENT_ID": "app",
        "NURTURE_SALESFORCE_CLIENT_SECRET": "shh",
        "NURTURE_SALESFORCE_LOGIN_URL": salesforce.server.url,
        "NURTURE_PIPEDRIVE_TOKEN": "pd-token",
        "NURTURE_PIPEDRIVE_BASE_URL": pipedrive.server.url,
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    get_settings.cache_clear()
    clock["t"] = now - timedelta(minutes=30)
    salesforce.add_lead(Email="sf@example.com", LastName="Doe", Company="Acme")
    pipedrive.add_person("Pat", ["pd@example.com"])
    fake._write("contacts", "hs@example.com", {})
    fake.faults.outage = True  # HubSpot is down, the others are not
    at = ["--now", now.isoformat()]
    names = [a for n in ("hubspot", "salesforce", "pipedrive") for a in ("--connector", n)]
    try:
        res = CliRunner().invoke(crm, ["pull", "--contacts", "--json", *names, *at])
    finally:
        get_settings.cache_clear()
    assert res.exit_code == 1
    rows = {r["connector"]: r for r in json.loads(res.stdout)}
    assert rows["hubspot"]["error"] and rows["hubspot"]["created"] == 0
    assert (rows["salesforce"]["created"], rows["pipedrive"]["created"]) == (1, 1)
    assert "connector hubspot" in res.stderr
    with session_scope(sqlite_engine) as session:
        assert set(session.scalars(select(Lead.email))) == {"sf@example.com", "pd@example.com"}


def test_hostile_crm_records_are_reported_or_taken_never_fatal(
    engine: Engine, pipedrive: FakePipedrive, clock: dict[str, datetime], now: datetime
) -> None:
    """Dates that are garbage or carry no offset, a record without an id, an email that is
    a number: the pull goes on, the good records become leads, the bad are listed."""
    people = {}
    for minutes, name in enumerate(["good", "garbage", "naive", "noid", "number"]):
        clock["t"] = now - timedelta(minutes=30 - minutes)
        people[name] = pipedrive.add_person(name, [f"{name}@example.com"])
    good, garbage, naive, no_id, number = people.values()
    with pipedrive.lock:
        pipedrive.persons[garbage]["add_time"] = "not a date"
        pipedrive.persons[naive]["add_time"] = (now - timedelta(minutes=20)).strftime(
            "%Y-%m-%d %H:%M:%S"
        )
        pipedrive.persons[no_id]["id"] = None
        pipedrive.persons[number]["emails"] = [{"value": 12345, "primary": True}]
    report = intake_contacts(engine, _pd(pipedrive), now)
    assert report.error is None and report.pulled == 5
    leads = _leads(engine, "pipedrive")
    assert set(leads) == {"good@example.com", "garbage@example.com", "naive@example.com"}
    assert leads["good@example.com"][0] == str(good)
    assert leads["garbage@example.com"][1] == now  # unreadable: taken as captured now
    assert leads["naive@example.com"][1] == now - timedelta(minutes=20)  # read as UTC
    assert len(report.invalid) == 2
    assert "noid@example.com: no record id" in report.invalid
    assert any(i.startswith(f"{number}: ") and "@-sign" in i for i in report.invalid)
    # The mark is the newest date read: the unreadable one (captured as now) does not move
    # it, or a failure on a later page would skip that page's records next time.
    assert _mark(engine) == now - timedelta(minutes=20)


def test_a_record_dated_in_the_future_does_not_stop_intake(
    engine: Engine, pipedrive: FakePipedrive, clock: dict[str, datetime], now: datetime
) -> None:
    clock["t"] = now - timedelta(minutes=10)
    future = pipedrive.add_person("future", ["future@example.com"])
    with pipedrive.lock:
        pipedrive.persons[future]["add_time"] = "9999-12-31T23:59:59Z"
    intake_contacts(engine, _pd(pipedrive), now)
    assert _mark(engine) == now  # not 9999: later contacts still come in
    later = now + timedelta(hours=1)
    clock["t"] = later - timedelta(minutes=5)
    pipedrive.add_person("later", ["later@example.com"])
    report = intake_contacts(engine, _pd(pipedrive), later)
    assert report.created == 1
    assert set(_leads(engine, "pipedrive")) == {"future@example.com", "later@example.com"}
    assert _leads(engine, "pipedrive")["future@example.com"][1] == now  # captured, not 9999


def _mark(engine: Engine) -> datetime:
    with session_scope(engine) as session:
        return session.scalars(select(CrmCursor.high_water)).one()
