"""HubSpot: the exact requests (respx), and the connector against a stateful fake server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime, timedelta

import httpx
import pytest
import respx
from nurture.connectors.base import DailyLimitExceeded
from nurture.connectors.hubspot import HubSpotConnector
from nurture.crm.promotions import process_promotions
from sqlalchemy import Engine, select

from nurture.config import PROJECT_ROOT
from nurture.crm import FatalConnectorError, PromotionItem, RetriableConnectorError
from nurture.crm.sync import sync_stage_changes
from nurture.spec.schema import PipelineSpec
from nurture.store.db import session_scope
from nurture.store.models import Lead, Promotion, StageTransition
from tests.fakes.harness import CrashAfter, Sleeps, counts, links, seed_promotions
from tests.fakes.hubspot import FakeHubSpot

BASE = "https://hs.test"
PIPELINE = PipelineSpec()


def _item(pid: int, email: str, external_id: str | None = None) -> PromotionItem:
    return PromotionItem(
        promotion_id=pid,
        lead_id=pid * 10,
        email=email,
        stage="mql",
        first_name="Ada",
        last_name="Lovelace",
        company="Analytical Engines",
        external_id=external_id,
    )


def _connector(sleeps: Sleeps, **kw: object) -> HubSpotConnector:
    return HubSpotConnector(token="secret-token", base_url=BASE, sleep=sleeps, **kw)  # type: ignore[arg-type]


@respx.mock
def test_upsert_by_email_first_then_update_by_id() -> None:
    upsert = respx.post(f"{BASE}/crm/v3/objects/contacts/batch/upsert").mock(
        return_value=httpx.Response(
            200,
            json={"status": "COMPLETE", "results": [
                {"id": "101", "new": True, "properties": {"email": "ada@x.io"}}]},
        )
    )  # fmt: skip
    update = respx.post(f"{BASE}/crm/v3/objects/contacts/batch/update").mock(
        return_value=httpx.Response(200, json={"status": "COMPLETE", "results": [{"id": "77"}]})
    )
    conn = _connector(Sleeps())
    results = conn.push([_item(1, "Ada@X.io"), _item(2, "bob@x.io", external_id="77")])
    assert [(r.ok, r.external_id, r.object_type) for r in results] == [
        (True, "101", "contact"),
        (True, "77", "contact"),
    ]
    sent = upsert.calls.last.request
    assert sent.headers["Authorization"] == "Bearer secret-token"
    assert json.loads(sent.content) == {
        "inputs": [
            {
                "idProperty": "email",
                "id": "ada@x.io",
                "properties": {
                    "email": "ada@x.io",
                    "firstname": "Ada",
                    "lastname": "Lovelace",
                    "company": "Analytical Engines",
                    "lifecyclestage": "marketingqualifiedlead",
                },
            }
        ]
    }
    # A linked lead is matched by its HubSpot id, never by email again.
    assert json.loads(update.calls.last.request.content) == {
        "inputs": [
            {
                "id": "77",
                "properties": {
                    "email": "bob@x.io",
                    "firstname": "Ada",
                    "lastname": "Lovelace",
                    "company": "Analytical Engines",
                    "lifecyclestage": "marketingqualifiedlead",
                },
            }
        ]
    }
    assert "secret-token" not in repr(conn)


@respx.mock
def test_deal_upsert_by_key_and_association() -> None:
    respx.post(f"{BASE}/crm/v3/objects/contacts/batch/upsert").mock(
        return_value=httpx.Response(
            200, json={"results": [{"id": "101", "properties": {"email": "ada@x.io"}}]}
        )
    )
    deals = respx.post(f"{BASE}/crm/v3/objects/deals/batch/upsert").mock(
        return_value=httpx.Response(
            200, json={"results": [{"id": "900", "properties": {"nurture_key": "lead-10"}}]}
        )
    )
    assoc = respx.post(f"{BASE}/crm/v4/associations/deals/contacts/batch/associate/default").mock(
        return_value=httpx.Response(200, json={"status": "COMPLETE", "results": []})
    )
    conn = _connector(Sleeps(), pipeline="default", deal_stage="appointmentscheduled")
    assert conn.push([_item(1, "ada@x.io")])[0].ok
    assert json.loads(deals.calls.last.request.content) == {
        "inputs": [
            {
                "idProperty": "nurture_key",
                "id": "lead-10",
                "properties": {
                    "nurture_key": "lead-10",
                    "dealname": "Ada Lovelace (Analytical Engines)",
                    "pipeline": "default",
                    "dealstage": "appointmentscheduled",
                    "nurture_contact_id": "101",
                },
            }
        ]
    }
    assert json.loads(assoc.calls.last.request.content) == {
        "inputs": [{"from": {"id": "900"}, "to": {"id": "101"}}]
    }


@respx.mock
def test_rate_limits_are_honoured_and_errors_classified() -> None:
    route = respx.post(f"{BASE}/crm/v3/objects/contacts/batch/upsert")
    limited = {"status": "error", "errorType": "RATE_LIMIT", "policyName": "TEN_SECONDLY_ROLLING"}
    route.side_effect = [
        httpx.Response(429, json=limited, headers={"Retry-After": "3"}),
        httpx.Response(429, json=limited),
        httpx.Response(503, text="unavailable"),
        httpx.ConnectTimeout("timed out"),
        httpx.Response(200, json={"results": [{"id": "5", "properties": {"email": "a@x.io"}}]},
                       headers={"X-HubSpot-RateLimit-Secondly-Remaining": "0"}),
    ]  # fmt: skip
    sleeps = Sleeps()
    conn = _connector(sleeps, max_attempts=5, backoff_base=0.01)
    assert conn.push([_item(1, "a@x.io")])[0].external_id == "5"
    assert route.call_count == 5
    # Retry-After wins; a TEN_SECONDLY_ROLLING 429 without it waits the 10 s window.
    assert sleeps.waits[:2] == [3.0, 10.0]
    assert all(w < 1 for w in sleeps.waits[2:])
    # The secondly budget is spent: the next call waits for the next second first.
    respx.post(f"{BASE}/crm/v3/objects/contacts/search").mock(
        return_value=httpx.Response(200, json={"results": []})
    )
    conn.pull(None, datetime(2026, 3, 3, 10, 0))
    assert sleeps.waits[-1] == 1.0

    # A 400 is fatal: one call, no retry.
    route.side_effect = None
    route.return_value = httpx.Response(400, json={"category": "VALIDATION_ERROR"})
    before = route.call_count
    with pytest.raises(FatalConnectorError):
        conn.push([_item(1, "a@x.io")])
    assert route.call_count == before + 1
    # A daily quota is not retried in a loop.
    route.return_value = httpx.Response(429, json={"policyName": "DAILY"})
    with pytest.raises(RetriableConnectorError) as info:
        conn.push([_item(1, "a@x.io")])
    assert (info.value.retry_after or 0) >= 3600
    assert not isinstance(info.value, DailyLimitExceeded) or route.call_count == before + 2


@respx.mock
def test_invalid_emails_never_reach_hubspot_and_record_errors_are_fatal() -> None:
    route = respx.post(f"{BASE}/crm/v3/objects/contacts/batch/upsert").mock(
        return_value=httpx.Response(
            207,
            json={"results": [], "numErrors": 1, "errors": [
                {"message": "Email address b@x.io is invalid", "context": {"ids": ["b@x.io"]}}]},
        )
    )  # fmt: skip
    res = _connector(Sleeps()).push([_item(1, ""), _item(2, "not an email"), _item(3, "b@x.io")])
    assert [(r.ok, r.retryable) for r in res] == [(False, False)] * 3
    assert "invalid" in (res[2].error or "")
    assert len(json.loads(route.calls.last.request.content)["inputs"]) == 1


@respx.mock
def test_search_pages_from_the_high_water_mark_minus_overlap() -> None:
    route = respx.post(f"{BASE}/crm/v3/objects/contacts/search")
    route.side_effect = [
        httpx.Response(200, json={
            "results": [{"id": "1", "properties": {
                "email": "a@x.io", "lifecyclestage": "customer",
                "lastmodifieddate": "2026-03-03T10:00:00.000Z"}}],
            "paging": {"next": {"after": "1"}}}),
        httpx.Response(200, json={"results": [{"id": "2", "properties": {
            "email": "b@x.io", "lifecyclestage": "weird"}}]}),
    ]  # fmt: skip
    since = datetime.fromisoformat("2026-03-03T09:00:00+00:00")
    changes = _connector(Sleeps()).pull(since, since + timedelta(hours=2))
    assert [(c.external_id, c.stage) for c in changes] == [("1", "customer")]
    first, second = (json.loads(c.request.content) for c in route.calls)
    start_ms = int((since - timedelta(minutes=5)).timestamp() * 1000)
    assert first["filterGroups"] == [
        {"filters": [{"propertyName": "lastmodifieddate", "operator": "GTE",
                      "value": str(start_ms)}]}
    ]  # fmt: skip
    assert (first["after"], second["after"]) == (0, "1")


# --- against the fake server --------------------------------------------------------------


@pytest.fixture
def fake() -> Iterator[FakeHubSpot]:
    server = FakeHubSpot()
    server.start()
    yield server
    server.stop()


def _live(fake: FakeHubSpot, sleeps: Sleeps, **kw: object) -> HubSpotConnector:
    assert fake.server is not None
    options: dict[str, object] = {
        "pipeline": "default",
        "deal_stage": "qualifiedtobuy",
        "max_attempts": 10,
        "backoff_base": 0.01,
        "timeout": 5.0,
    }
    options.update(kw)
    return HubSpotConnector(token="hs-token", base_url=fake.server.url, sleep=sleeps, **options)  # type: ignore[arg-type]


def test_thousand_leads_arrive_once_through_faults_and_a_crash(
    engine: Engine, fake: FakeHubSpot, now: datetime
) -> None:
    ids = seed_promotions(engine, now, 1000, "hubspot")
    fake.faults.rate = 0.2
    sleeps = Sleeps()
    conn = _live(fake, sleeps)
    # The worker dies after the CRM accepted its fourth batch, before our commit.
    with pytest.raises(RuntimeError, match="killed"):
        process_promotions(engine, {"hubspot": CrashAfter(conn, 4)}, PIPELINE, now)
    assert counts(engine, "hubspot")["status"] == {"done": 300, "queued": 700}
    assert len(fake.objects["contacts"]) == 400  # the lost batch is in HubSpot already

    report = process_promotions(engine, {"hubspot": conn}, PIPELINE, now)
    assert report.pushed == 700 and report.parked == 0
    state = counts(engine, "hubspot")
    assert state["status"] == {"done": 1000}
    assert state["links"] == 1000 and state["stages"] == {"mql": 1000}

    contacts = fake.objects["contacts"]
    assert len(contacts) == 1000
    assert {c["properties"]["email"] for c in contacts.values()} == {
        f"person{i}@co{i}.example" for i in range(1000)
    }
    assert {c["properties"]["lifecyclestage"] for c in contacts.values()} == {
        "marketingqualifiedlead"
    }
    deals = fake.objects["deals"]
    assert len(deals) == 1000
    assert {
        (d["properties"]["pipeline"], d["properties"]["dealstage"]) for d in deals.values()
    } == {("default", "qualifiedtobuy")}
    # Every deal is associated with its own lead's contact, and links name HubSpot's ids.
    linked = links(engine, "hubspot")
    assert set(linked) == set(ids) and set(linked.values()) == set(contacts)
    assert {
        (d["properties"]["nurture_key"], d["properties"]["nurture_contact_id"])
        for d in deals.values()
    } == {(f"lead-{lid}", linked[lid]) for lid in ids}
    assert {c for _, c in fake.associations} == set(contacts) and len(fake.associations) == 1000
    # The faults did happen, were retried, and Retry-After was honoured.
    assert max(fake.batch_sizes) == 100
    # The fake's Retry-After (7 s) is none of the connector's own waits (1 s, 10 s, backoff).
    assert 7.0 in sleeps.waits and len(sleeps.waits) > 10


def test_an_outage_for_a_whole_tick_delays_but_loses_nothing(
    engine: Engine, fake: FakeHubSpot, now: datetime
) -> None:
    seed_promotions(engine, now, 250, "hubspot")
    fake.faults.outage = True
    conn = _live(fake, Sleeps(), max_attempts=3)
    report = process_promotions(engine, {"hubspot": conn}, PIPELINE, now)
    assert report.pushed == 0 and report.parked == 0
    state = counts(engine, "hubspot")
    assert state["status"] == {"queued": 250} and state["links"] == 0
    assert state["stages"] == {"lead": 250}

    fake.faults.outage = False
    later = now + timedelta(minutes=15)
    report = process_promotions(engine, {"hubspot": conn}, PIPELINE, later)
    assert report.pushed == 250
    assert counts(engine, "hubspot")["status"] == {"done": 250}
    assert len(fake.objects["contacts"]) == 250 and len(fake.objects["deals"]) == 250


def test_deals_match_without_hubspot_echoing_the_id_property(
    engine: Engine, fake: FakeHubSpot, now: datetime
) -> None:
    seed_promotions(engine, now, 30, "hubspot")
    fake.echo_id_property = False
    report = process_promotions(engine, {"hubspot": _live(fake, Sleeps())}, PIPELINE, now)
    assert report.pushed == 30 and report.retry == 0
    assert len(fake.objects["deals"]) == 30 and len(fake.associations) == 30


def test_a_linked_lead_whose_email_changed_in_hubspot_is_not_duplicated(
    engine: Engine, fake: FakeHubSpot, now: datetime
) -> None:
    ids = seed_promotions(engine, now, 3, "hubspot")
    conn = _live(fake, Sleeps(), pipeline=None, deal_stage=None)
    process_promotions(engine, {"hubspot": conn}, PIPELINE, now)
    hs_id = links(engine, "hubspot")[ids[0]]
    fake.set_property("contacts", hs_id, email="renamed@elsewhere.example")
    # A second promotion (to sql) for the same lead goes by id, not by the old email.
    with session_scope(engine) as session:
        session.add(
            Promotion(lead_id=ids[0], connector="hubspot", stage="sql", status="queued",
                      attempts=0, created_at=now, next_attempt_at=now)
        )  # fmt: skip
    process_promotions(engine, {"hubspot": conn}, PIPELINE, now)
    assert len(fake.objects["contacts"]) == 3
    assert fake.objects["contacts"][hs_id]["properties"]["lifecyclestage"] == "salesqualifiedlead"


def test_stage_changes_come_back_once_and_echoes_are_ignored(engine: Engine, now: datetime) -> None:
    clock = {"t": now}
    fake = FakeHubSpot(clock=lambda: clock["t"])
    with fake:
        ids = seed_promotions(engine, now, 3, "hubspot")
        conn = _live(fake, Sleeps())
        process_promotions(engine, {"hubspot": conn}, PIPELINE, now)
        deal = {d["properties"]["nurture_key"]: d["id"] for d in fake.objects["deals"].values()}
        t = now + timedelta(hours=4)
        clock["t"] = t - timedelta(minutes=2)  # within the next pull's overlap
        fake.set_property("deals", deal[f"lead-{ids[0]}"], dealstage="closedwon")
        fake.set_property("deals", deal[f"lead-{ids[1]}"], dealstage="closedlost")
        dry = sync_stage_changes(engine, conn, PIPELINE, t, dry_run=True)
        assert sorted((m.lead_id, m.to_stage) for m in dry.moves) == [
            (ids[0], "customer"),
            (ids[1], "recycled"),
        ]
        assert counts(engine, "hubspot")["stages"] == {"mql": 3}  # nothing written

        report = sync_stage_changes(engine, conn, PIPELINE, t)
        assert report.echoes == 1  # the third contact's mql is our own write
        with session_scope(engine) as session:
            stages = dict(session.execute(select(Lead.id, Lead.lifecycle_stage)).all())
            pulled = session.execute(
                select(StageTransition.lead_id, StageTransition.from_stage,
                       StageTransition.to_stage)
                .where(StageTransition.cause == "crm pull via hubspot")
            ).all()  # fmt: skip
        assert stages == {ids[0]: "customer", ids[1]: "recycled", ids[2]: "mql"}
        assert sorted(pulled) == [(ids[0], "mql", "customer"), (ids[1], "mql", "recycled")]

        # The overlap pulls the same changes again: they apply once.
        again = sync_stage_changes(engine, conn, PIPELINE, t + timedelta(minutes=1))
        assert again.since == t and again.moves == [] and again.pulled >= 2
        # With nurture owning the stage, the CRM's changes are not applied.
        clock["t"] = t + timedelta(hours=1)
        fake.set_property("deals", deal[f"lead-{ids[2]}"], dealstage="closedwon")
        owned = sync_stage_changes(
            engine, conn, PIPELINE, t + timedelta(hours=2), ownership={"lifecycle_stage": "nurture"}
        )
        assert owned.not_owned >= 1 and owned.moves == []
        with session_scope(engine) as session:
            assert session.get(Lead, ids[2]).lifecycle_stage == "mql"  # type: ignore[union-attr]


def test_a_hung_call_times_out_and_the_retry_does_not_duplicate(
    sqlite_engine: Engine, fake: FakeHubSpot, now: datetime
) -> None:
    seed_promotions(sqlite_engine, now, 150, "hubspot")
    fake.faults.hang, fake.faults.hang_seconds = 1, 1.0  # the first batch answers too late
    conn = _live(fake, Sleeps(), timeout=0.3)
    report = process_promotions(sqlite_engine, {"hubspot": conn}, PIPELINE, now)
    conn.close()
    assert report.pushed == 150
    # The hung upsert was applied after the client gave up; the retry updated the same records.
    assert fake.calls["POST /crm/v3/objects/contacts/batch/upsert"] == 3
    assert len(fake.objects["contacts"]) == 150 and len(fake.objects["deals"]) == 150


def test_a_pusher_killed_with_sigkill_leaves_nothing_duplicated(
    sqlite_engine: Engine, fake: FakeHubSpot, now: datetime
) -> None:
    seed_promotions(sqlite_engine, now, 1000, "hubspot")
    assert fake.server is not None
    reached = fake.watch(300)
    worker = subprocess.Popen(
        [sys.executable, "-m", "tests.fakes.push_worker",
         sqlite_engine.url.render_as_string(hide_password=False), fake.server.url,
         now.isoformat()],
        cwd=PROJECT_ROOT, env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)},
    )  # fmt: skip
    try:
        assert reached.wait(60), "the worker never reached 300 contacts"
        worker.send_signal(signal.SIGKILL)
    finally:
        assert worker.wait(30) == -signal.SIGKILL
    before = counts(sqlite_engine, "hubspot")["status"]
    assert before.get("queued", 0) > 0  # killed mid-push, with work left
    conn = _live(fake, Sleeps())
    report = process_promotions(sqlite_engine, {"hubspot": conn}, PIPELINE, now)
    conn.close()
    assert report.pushed == before["queued"]
    assert counts(sqlite_engine, "hubspot")["status"] == {"done": 1000}
    assert len(fake.objects["contacts"]) == 1000 and len(fake.objects["deals"]) == 1000
    assert len(fake.associations) == 1000
