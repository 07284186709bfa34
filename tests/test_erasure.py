"""Erasure and export: nothing of the person is left, counts stay right, CRMs are told."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import Engine, func, select, text

from nurture.connectors.hubspot import HubSpotConnector
from nurture.connectors.pipedrive import PipedriveConnector
from nurture.connectors.salesforce import SalesforceConnector
from nurture.connectors.webhook import WebhookConnector
from nurture.crm.promotions import process_promotions
from nurture.engagement.events import EventIn, record_events
from nurture.intake.leads import import_leads
from nurture.privacy.erasure import (
    PersonNotFound,
    erase,
    export,
    process_crm_deletions,
    requeue_crm_deletions,
)
from nurture.spec.schema import PipelineSpec
from nurture.store.db import session_scope
from nurture.store.models import (
    CrmDeletion,
    CrmLink,
    Delivery,
    Enrollment,
    Event,
    Lead,
    Suppression,
)
from nurture.store.suppression import erased_address
from nurture.tick import tick
from tests.fakes.base import FakeCrm
from tests.fakes.harness import Sleeps, seed_promotions
from tests.fakes.hubspot import FakeHubSpot
from tests.fakes.pipedrive import FakePipedrive
from tests.fakes.salesforce import FakeSalesforce
from tests.fakes.webhook import FakeWebhookReceiver
from tests.helpers import campaign, mailer, programme
from tests.servers import SmtpSink

KEY = "erasure-test-key"
ADA = "ada.lovelace@analytical.example"
WELCOME = campaign("""
name: welcome
audience: {field: source, op: eq, value: website}
steps:
  - {id: welcome, template: b2b/welcome}
  - {id: next, wait: 1d, template: b2b/breakup}
""")


def _import(engine: Engine, tmp_path: Path, now: datetime, *rows: dict[str, str]) -> None:
    path = tmp_path / "people.csv"
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    import_leads(engine, path, now=now, consent_basis="consent", erased_keys=[KEY])


def _history(engine: Engine, tmp_path: Path, smtp: SmtpSink, now: datetime) -> None:
    """Two people with a real history: import, consent, a tick, clicks with IP and UA."""
    _import(
        engine,
        tmp_path,
        now,
        {"email": ADA, "first_name": "Augusta", "last_name": "Byronhill", "source": "website",
         "company": "Analytical Engines", "note": "met Ada at the Babbage fair"},
        {"email": "ben@other.example", "first_name": "Ben", "last_name": "Other",
         "source": "website", "company": "Other", "note": "ordinary"},
    )  # fmt: skip
    tick(engine, now, programme(WELCOME), mailer(smtp.url), worker="t")
    smtp.wait_for(2)
    with session_scope(engine) as session:
        deliveries = {
            lid: (did, email)
            for lid, did, email in session.execute(
                select(Delivery.lead_id, Delivery.id, Lead.email).join(
                    Lead, Lead.id == Delivery.lead_id
                )
            )
        }
        record_events(
            session,
            [
                EventIn(
                    type="clicked",
                    occurred_at=now + timedelta(minutes=m),
                    delivery_id=d,
                    url=f"https://site.example/p?who={email}",
                    payload={"ip": "198.51.100.7", "user_agent": f"Mozilla/5.0 {email[:3]}Browser"},
                )
                for m, (d, email) in enumerate(deliveries.values(), start=5)
            ],
            now=now,
        )
        session.add(
            CrmLink(lead_id=min(deliveries), connector="local", object_type="lead",
                    external_id=f"local-{min(deliveries)}", created_at=now, updated_at=now)
        )  # fmt: skip
    tick(
        engine, now + timedelta(days=1, minutes=1), programme(WELCOME), mailer(smtp.url), worker="t"
    )


def _counts(engine: Engine) -> dict[str, int]:
    with session_scope(engine) as session:
        return {
            "leads": session.scalar(select(func.count()).select_from(Lead)) or 0,
            "enrollments": session.scalar(select(func.count()).select_from(Enrollment)) or 0,
            "sent": session.scalar(
                select(func.count()).select_from(Delivery).where(Delivery.status == "sent")
            )
            or 0,
            "clicked": session.scalar(
                select(func.count()).select_from(Event).where(Event.type == "clicked")
            )
            or 0,
        }


def _rows_mentioning(engine: Engine, needle: str) -> list[str]:
    """Every table whose rows, as text, contain ``needle`` (case-insensitive)."""
    hits = []
    with engine.connect() as conn:
        if engine.dialect.name == "postgresql":
            tables = conn.execute(
                text("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
            ).scalars()
            for table in list(tables):
                n = conn.execute(
                    text(f'SELECT count(*) FROM "{table}" t WHERE t::text ILIKE :n'),
                    {"n": f"%{needle}%"},
                ).scalar()
                if n:
                    hits.append(table)
        else:
            tables = conn.exec_driver_sql(
                "SELECT name FROM sqlite_master WHERE type = 'table'"
            ).scalars()
            for table in list(tables):
                cols = [r[1] for r in conn.exec_driver_sql(f'PRAGMA table_info("{table}")')]
                joined = " || '|' || ".join(f"COALESCE(CAST(\"{c}\" AS TEXT), '')" for c in cols)
                n = conn.exec_driver_sql(
                    f'SELECT count(*) FROM "{table}" WHERE lower({joined}) LIKE ?',
                    (f"%{needle.lower()}%",),
                ).scalar()
                if n:
                    hits.append(table)
    return hits


def test_erase_leaves_nothing_of_the_person_and_keeps_the_counts(
    engine: Engine, smtp_server: SmtpSink, tmp_path: Path, now: datetime
) -> None:
    _history(engine, tmp_path, smtp_server, now)
    before = _counts(engine)
    assert before == {"leads": 2, "enrollments": 2, "sent": 4, "clicked": 2}
    for needle in (ADA, "Byronhill", "adaBrowser", "198.51.100.7", "Babbage"):
        assert _rows_mentioning(engine, needle), needle  # the search finds what is there

    result = erase(engine, [ADA.upper(), "never@seen.example"], now + timedelta(days=2), key=KEY)
    assert (len(result.erased), len(result.not_found)) == (1, 1)

    for needle in (ADA, "Byronhill", "Augusta", "adaBrowser", "Babbage"):
        assert _rows_mentioning(engine, needle) == [], needle
    assert _rows_mentioning(engine, "ben@other.example")  # the other person is untouched
    assert _counts(engine) == before  # campaign and funnel counts stay right
    with session_scope(engine) as session:
        suppressed = set(session.scalars(select(Suppression.email)))
        assert erased_address(ADA, KEY) in suppressed
        assert erased_address("never@seen.example", KEY) in suppressed
        assert session.scalar(select(func.count()).select_from(CrmDeletion)) == 1

    if engine.dialect.name == "sqlite":
        assert result.checkpoint == "done"
        files = list(tmp_path.glob("nurture.db*"))
        assert files
        for path in files:
            data = path.read_bytes()
            for needle in (ADA, "Byronhill", "adaBrowser", "Babbage"):
                assert needle.encode() not in data, (path.name, needle)
                assert needle.lower().encode() not in data.lower(), (path.name, needle)


def test_an_erased_person_who_comes_back_is_suppressed(
    engine: Engine, smtp_server: SmtpSink, tmp_path: Path, now: datetime
) -> None:
    _import(engine, tmp_path, now, {"email": ADA, "source": "website"})
    erase(engine, [ADA], now, key=KEY)
    _import(engine, tmp_path, now, {"email": ADA, "source": "website"})
    result = tick(engine, now, programme(WELCOME), mailer(smtp_server.url), worker="t")
    assert result.summary()["sent"] == 0
    with session_scope(engine) as session:
        reason = session.scalar(select(Suppression.reason).where(Suppression.email == ADA))
    assert reason == "erased"


def test_export_prints_everything_stored(
    engine: Engine, smtp_server: SmtpSink, tmp_path: Path, now: datetime
) -> None:
    _history(engine, tmp_path, smtp_server, now)
    data = json.loads(json.dumps(export(engine, ADA.upper())))
    assert data["lead"]["first_name"] == "Augusta"
    assert data["lead"]["attributes"]["note"] == "met Ada at the Babbage fair"
    assert data["consents"]["*"]["basis"] == "consent"
    assert data["consents"]["*"]["source"] == "people.csv"
    assert [d["step_id"] for d in data["deliveries"]] == ["welcome", "next"]
    assert {e["type"] for e in data["events"]} >= {"clicked", "consent_granted"}
    assert data["counts"]["enrollments"] == 1
    assert data["crm_links"] and data["crm_links"][0]["connector"] == "local"
    assert "ben@other.example" not in json.dumps(data)
    with pytest.raises(PersonNotFound):
        export(engine, "nobody@x.example")


def test_cli_erase_asks_unless_yes_and_export_prints_json(
    sqlite_engine: Engine, tmp_path: Path, now: datetime, monkeypatch: pytest.MonkeyPatch
) -> None:
    from nurture.cli import cli
    from nurture.config import get_settings

    url = str(sqlite_engine.url)
    monkeypatch.setenv("NURTURE_DATABASE_URL", url)
    monkeypatch.setenv("NURTURE_SECRET_KEY", KEY)
    get_settings.cache_clear()
    try:
        _import(sqlite_engine, tmp_path, now, {"email": ADA, "first_name": "Augusta"})
        runner = CliRunner()
        out = runner.invoke(cli, ["leads", "export", ADA, "--json"])
        assert out.exit_code == 0, out.output
        assert json.loads(out.output)["lead"]["first_name"] == "Augusta"
        refused = runner.invoke(cli, ["leads", "erase", ADA], input="n\n")
        assert refused.exit_code != 0
        assert _rows_mentioning(sqlite_engine, ADA)
        done = runner.invoke(cli, ["leads", "erase", ADA, "--yes", "--json"])
        assert done.exit_code == 0, done.output
        assert json.loads(done.output)["erased"] == 1
        assert ADA not in done.output  # the output may be logged: counts only
        assert _rows_mentioning(sqlite_engine, ADA) == []
        listing = tmp_path / "erase.txt"
        listing.write_text("# requests\nnever@seen.example\n\n")
        from_file = runner.invoke(
            cli, ["leads", "erase", "--file", str(listing), "--yes", "--json"]
        )
        assert json.loads(from_file.output)["not_found"] == 1
        gone = runner.invoke(cli, ["leads", "export", ADA, "--json"])
        assert gone.exit_code == 1
    finally:
        get_settings.cache_clear()


# --------------------------------------------------------------------------- CRM queue


def _hubspot(fake: FakeCrm) -> Any:
    assert fake.server is not None
    return HubSpotConnector(token="hs-token", base_url=fake.server.url, sleep=Sleeps(),
                            max_attempts=2, backoff_base=0.001)  # fmt: skip


def _salesforce(fake: FakeCrm) -> Any:
    assert fake.server is not None
    return SalesforceConnector(client_id="app", client_secret="shh", login_url=fake.server.url,
                               sleep=Sleeps(), max_attempts=2, backoff_base=0.001)  # type: ignore[arg-type]  # fmt: skip


def _pipedrive(fake: FakeCrm) -> Any:
    assert fake.server is not None
    return PipedriveConnector(token="pd-token", base_url=fake.server.url, sleep=Sleeps(),
                              max_attempts=2, backoff_base=0.001)  # type: ignore[arg-type]  # fmt: skip


def _webhook(fake: FakeCrm) -> Any:
    assert fake.server is not None
    return WebhookConnector(url=f"{fake.server.url}/hooks/nurture", secret="s3cret",
                            clock=lambda: 1_700_000_000, sleep=Sleeps(), max_attempts=2,
                            backoff_base=0.001)  # fmt: skip


def _present(name: str, fake: Any, external_id: str) -> bool:
    if name == "hubspot":
        return external_id in fake.objects["contacts"]
    if name == "salesforce":
        return any(str(r.get("Id")) == external_id for r in fake.leads.values())
    if name == "pipedrive":
        return int(external_id) in fake.persons
    return external_id in fake.records


CRMS: dict[str, tuple[Callable[[], Any], Callable[[FakeCrm], Any]]] = {
    "hubspot": (FakeHubSpot, _hubspot),
    "salesforce": (FakeSalesforce, _salesforce),
    "pipedrive": (FakePipedrive, _pipedrive),
    "webhook": (lambda: FakeWebhookReceiver("s3cret", 1_700_000_000), _webhook),
}


@pytest.fixture(params=sorted(CRMS))
def crm(request: pytest.FixtureRequest) -> Iterator[tuple[str, Any, Any]]:
    make_fake, make_conn = CRMS[request.param]
    fake = make_fake()
    with fake:
        yield request.param, fake, make_conn(fake)


def test_erase_deletes_the_person_in_each_crm_through_a_queue_with_retries(
    sqlite_engine: Engine, crm: tuple[str, Any, Any], now: datetime
) -> None:
    name, fake, conn = crm
    engine = sqlite_engine
    seed_promotions(engine, now, 3, name)
    assert process_promotions(engine, {name: conn}, PipelineSpec(), now).pushed == 3
    with session_scope(engine) as session:
        links = {
            email: ext
            for email, ext in session.execute(
                select(Lead.email, CrmLink.external_id).join(Lead, Lead.id == CrmLink.lead_id)
            )
        }
    target = links["person1@co1.example"]
    assert _present(name, fake, target)

    erase(engine, ["person1@co1.example"], now, key=KEY)
    fake.faults.outage = True  # the CRM is down: the deletion waits, nothing is lost
    first = process_crm_deletions(engine, {name: conn}, now)
    assert (first.done, first.retry) == (0, 1)
    assert _present(name, fake, target)
    # Not due yet on the next tick a minute later; due after the backoff.
    assert process_crm_deletions(engine, {name: conn}, now + timedelta(minutes=1)).retry == 0
    fake.faults.outage = False
    later = process_crm_deletions(engine, {name: conn}, now + timedelta(hours=1))
    assert (later.done, later.parked) == (1, 0)
    assert not _present(name, fake, target)
    assert _present(name, fake, links["person2@co2.example"])  # nobody else
    with session_scope(engine) as session:
        row = session.scalars(select(CrmDeletion)).one()
    assert (row.status, row.attempts, row.external_id) == ("done", 2, target)
    # A second run sends nothing more.
    calls = fake.total_calls
    process_crm_deletions(engine, {name: conn}, now + timedelta(hours=2))
    assert fake.total_calls == calls


def test_a_failing_crm_deletion_parks_after_a_time_and_can_be_requeued(
    sqlite_engine: Engine, now: datetime
) -> None:
    engine = sqlite_engine
    with session_scope(engine) as session:
        session.add(
            CrmDeletion(connector="hubspot", object_type="contact", external_id="77",
                        status="queued", attempts=0, created_at=now, next_attempt_at=now)
        )  # fmt: skip

    class Down:
        name = "hubspot"

        def delete(self, object_type: str, external_id: str) -> None:
            from nurture.crm import RetriableConnectorError

            raise RetriableConnectorError("503 down")

    class CannotDelete:
        name = "hubspot"

    t = now
    while True:
        report = process_crm_deletions(engine, {"hubspot": Down()}, t, park_after=timedelta(days=1))
        if report.parked:
            break
        assert t - now <= timedelta(days=1, hours=2)
        t += timedelta(hours=1)
    assert t - now >= timedelta(days=1)
    assert requeue_crm_deletions(engine, t) == 1
    fatal = process_crm_deletions(engine, {"hubspot": CannotDelete()}, t)
    assert fatal.parked == 1 and "cannot delete" in fatal.errors[0]


def test_cli_lists_pending_crm_deletions_and_requeues_the_parked(
    sqlite_engine: Engine, now: datetime, monkeypatch: pytest.MonkeyPatch
) -> None:
    from nurture.cli import cli
    from nurture.config import get_settings

    with session_scope(sqlite_engine) as session:
        for ext, status, error in (
            ("1", "queued", None),
            ("2", "parked", "403 [bold]no[/]"),
            ("3", "done", None),
        ):
            session.add(
                CrmDeletion(connector="hubspot", object_type="contact", external_id=ext,
                            status=status, attempts=4, last_error=error, created_at=now,
                            next_attempt_at=now, parked_at=now if status == "parked" else None)
            )  # fmt: skip
    monkeypatch.setenv("NURTURE_DATABASE_URL", str(sqlite_engine.url))
    get_settings.cache_clear()
    try:
        runner = CliRunner()
        listed = runner.invoke(cli, ["crm", "deletions", "--json"])
        assert listed.exit_code == 0, listed.output
        rows = json.loads(listed.output)
        # Parked first, done never; the CRM's error text is kept as it came.
        assert [(r["external_id"], r["status"]) for r in rows] == [("2", "parked"), ("1", "queued")]
        assert rows[0]["last_error"] == "403 [bold]no[/]"
        from nurture.cli.common import console

        monkeypatch.setattr(console, "width", 200)
        table = runner.invoke(cli, ["crm", "deletions"])
        assert table.exit_code == 0, table.output
        assert "2 CRM deletions pending (1 parked)" in table.output
        assert "403 [bold]no[/]" in table.output  # shown, not read as markup
        requeued = runner.invoke(cli, ["crm", "deletions", "--requeue", "--json"])
        assert json.loads(requeued.output) == {"requeued": 1}
        after = json.loads(runner.invoke(cli, ["crm", "deletions", "--json"]).output)
        assert {r["status"] for r in after} == {"queued"} and len(after) == 2
        assert runner.invoke(cli, ["crm", "deletions", "--connector", "pipedrive"]).output == (
            "no CRM deletions pending\n"
        )
    finally:
        get_settings.cache_clear()
