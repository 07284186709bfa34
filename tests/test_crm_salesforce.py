"""Salesforce: exact requests (respx), and the connector against a stateful fake org."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime, timedelta
from urllib.parse import parse_qs

import httpx
import pytest
import respx
from nurture.connectors.base import DailyLimitExceeded
from nurture.connectors.salesforce import SalesforceConnector, SessionExpired
from nurture.crm.promotions import process_promotions
from sqlalchemy import Engine, select

from nurture.crm import PromotionItem
from nurture.crm.sync import sync_stage_changes
from nurture.spec.schema import PipelineSpec
from nurture.store.db import session_scope
from nurture.store.models import Lead, Promotion
from tests.fakes.harness import CrashAfter, Sleeps, counts, links, seed_promotions
from tests.fakes.salesforce import FakeSalesforce

LOGIN = "https://login.sf.test"
ORG = "https://org.my.sf.test"
UPSERT = f"{ORG}/services/data/v61.0/composite/sobjects/Lead/Nurture_Id__c"
PIPELINE = PipelineSpec()


def _token(route: respx.Route) -> None:
    route.mock(
        return_value=httpx.Response(
            200, json={"access_token": "tok-1", "instance_url": ORG, "token_type": "Bearer"}
        )
    )


def _item(pid: int, **kw: object) -> PromotionItem:
    base: dict[str, object] = {
        "promotion_id": pid, "lead_id": pid, "email": f"p{pid}@x.io", "stage": "mql",
        "first_name": "Ada", "last_name": "Lovelace",
    }  # fmt: skip
    base.update(kw)
    return PromotionItem(**base)  # type: ignore[arg-type]


def _conn(**kw: object) -> SalesforceConnector:
    return SalesforceConnector(
        client_id="app",
        client_secret="shh",
        login_url=LOGIN,
        sleep=Sleeps(),
        **kw,  # type: ignore[arg-type]
    )


@respx.mock
def test_token_then_composite_upsert_by_external_id() -> None:
    token = respx.post(f"{LOGIN}/services/oauth2/token")
    _token(token)
    upsert = respx.patch(UPSERT).mock(
        return_value=httpx.Response(
            200,
            json=[
                {"id": "00Q1", "success": True, "errors": [], "created": True},
                {"success": False, "errors": [
                    {"statusCode": "UNABLE_TO_LOCK_ROW", "message": "locked", "fields": []}]},
                {"success": False, "errors": [
                    {"statusCode": "FIELD_CUSTOM_VALIDATION_EXCEPTION", "message": "no"}]},
            ],
            headers={"Sforce-Limit-Info": "api-usage=18/5000"},
        )
    )  # fmt: skip
    conn = _conn()
    res = conn.push([_item(1, company=None), _item(2), _item(3)])
    assert [(r.ok, r.external_id, r.retryable) for r in res] == [
        (True, "00Q1", False), (False, None, True), (False, None, False)
    ]  # fmt: skip
    assert parse_qs(token.calls.last.request.content.decode()) == {
        "grant_type": ["client_credentials"], "client_id": ["app"], "client_secret": ["shh"]
    }  # fmt: skip
    sent = upsert.calls.last.request
    assert sent.headers["Authorization"] == "Bearer tok-1"
    body = json.loads(sent.content)
    assert body["allOrNone"] is False and len(body["records"]) == 3
    assert body["records"][0] == {
        "attributes": {"type": "Lead"},
        "Email": "p1@x.io",
        "FirstName": "Ada",
        "LastName": "Lovelace",
        "Company": "[not provided]",
        "Status": "Open - Not Contacted",
        "Nurture_Id__c": "lead-1",
    }
    assert "shh" not in repr(conn)


@respx.mock
def test_expired_session_refreshes_once_then_fails() -> None:
    token = respx.post(f"{LOGIN}/services/oauth2/token")
    _token(token)
    expired = httpx.Response(
        401, json=[{"message": "Session expired", "errorCode": "INVALID_SESSION_ID"}]
    )
    ok = httpx.Response(200, json=[{"id": "00Q1", "success": True, "errors": [], "created": False}])
    route = respx.patch(UPSERT)
    route.side_effect = [expired, ok]
    conn = _conn()
    assert conn.push([_item(1)])[0].ok
    assert token.call_count == 2 and route.call_count == 2
    route.side_effect = [expired, expired, ok]
    with pytest.raises(SessionExpired):
        conn.push([_item(1)])
    assert token.call_count == 3  # refreshed once, not in a loop


@respx.mock
def test_daily_limit_is_not_retried() -> None:
    _token(respx.post(f"{LOGIN}/services/oauth2/token"))
    route = respx.patch(UPSERT).mock(
        return_value=httpx.Response(
            403, json=[{"message": "TotalRequests Limit exceeded.",
                        "errorCode": "REQUEST_LIMIT_EXCEEDED"}]
        )
    )  # fmt: skip
    with pytest.raises(DailyLimitExceeded):
        _conn().push([_item(1)])
    assert route.call_count == 1


@pytest.fixture
def fake() -> Iterator[FakeSalesforce]:
    server = FakeSalesforce()
    server.start()
    yield server
    server.stop()


def _live(fake: FakeSalesforce, **kw: object) -> SalesforceConnector:
    assert fake.server is not None
    options: dict[str, object] = {"max_attempts": 10, "backoff_base": 0.01, "timeout": 5.0}
    options.update(kw)
    return SalesforceConnector(
        client_id="app",
        client_secret="shh",
        login_url=fake.server.url,
        sleep=Sleeps(),
        **options,  # type: ignore[arg-type]
    )


def test_thousand_leads_arrive_once_through_faults_and_a_crash(
    engine: Engine, fake: FakeSalesforce, now: datetime
) -> None:
    ids = seed_promotions(engine, now, 1000, "salesforce")
    fake.faults.rate = 0.2
    conn = _live(fake, opportunity_stage="Qualification", clock=lambda: now)
    with pytest.raises(RuntimeError):
        process_promotions(engine, {"salesforce": CrashAfter(conn, 3)}, PIPELINE, now)
    assert len(fake.leads) == 600  # the third batch reached Salesforce, our commit did not
    fake.expire_tokens()  # and the session expired meanwhile
    report = process_promotions(engine, {"salesforce": conn}, PIPELINE, now)
    assert report.pushed == 600 and report.parked == 0
    state = counts(engine, "salesforce")
    assert state["status"] == {"done": 1000} and state["stages"] == {"mql": 1000}
    assert len(fake.leads) == 1000 and max(fake.batch_sizes) == 200
    assert {r["Nurture_Id__c"] for r in fake.leads.values()} == {f"lead-{i}" for i in ids}
    assert {r["Status"] for r in fake.leads.values()} == {"Open - Not Contacted"}
    # The fake's Retry-After (5 s) is none of the connector's own waits: it was honoured.
    assert conn.api is not None and 5.0 in conn.api.sleep.waits  # type: ignore[attr-defined]
    assert {r["Email"] for r in fake.leads.values()} == {
        f"person{i}@co{i}.example" for i in range(1000)
    }
    assert set(links(engine, "salesforce").values()) == set(fake.leads)
    opps = fake.opportunities.values()
    assert len(opps) == 1000
    assert {(o["StageName"], o["CloseDate"]) for o in opps} == {("Qualification", "2026-04-02")}
    assert {o["Nurture_Lead__c"] for o in opps} == set(fake.leads)


def test_daily_limit_pauses_the_connector_until_tomorrow(
    engine: Engine, fake: FakeSalesforce, now: datetime
) -> None:
    seed_promotions(engine, now, 500, "salesforce")
    fake.daily_limit = 1  # one API call (a batch), then the quota is spent
    conn = _live(fake, batch_size=200)
    report = process_promotions(engine, {"salesforce": conn}, PIPELINE, now)
    assert report.pushed == 200 and report.parked == 0
    tomorrow = datetime(2026, 3, 4, tzinfo=now.tzinfo)
    assert report.paused == {"salesforce": tomorrow}
    with session_scope(engine) as session:
        waiting = session.execute(
            select(Promotion.attempts, Promotion.next_attempt_at).where(
                Promotion.status == "queued"
            )
        ).all()
    assert len(waiting) == 300 and {w for w in waiting} == {(0, tomorrow)}
    calls = fake.total_calls
    # Later today: nothing is due, so the exhausted org is not called at all.
    again = process_promotions(engine, {"salesforce": conn}, PIPELINE, now + timedelta(hours=6))
    assert again.pushed == 0 and fake.total_calls == calls
    fake.new_day()
    fake.daily_limit = 1000
    done = process_promotions(engine, {"salesforce": conn}, PIPELINE, tomorrow)
    assert done.pushed == 300 and len(fake.leads) == 500


def test_outage_then_recovery_and_status_pull_back(engine: Engine, now: datetime) -> None:
    clock = {"t": now}
    with FakeSalesforce(clock=lambda: clock["t"], page_size=2) as fake:
        seed_promotions(engine, now, 5, "salesforce")
        fake.faults.outage = True
        conn = _live(fake, max_attempts=2, opportunity_stage="Prospecting")
        assert process_promotions(engine, {"salesforce": conn}, PIPELINE, now).pushed == 0
        assert counts(engine, "salesforce")["status"] == {"queued": 5}
        fake.faults.outage = False
        assert (
            process_promotions(
                engine, {"salesforce": conn}, PIPELINE, now + timedelta(hours=1)
            ).pushed
            == 5
        )
        linked = links(engine, "salesforce")
        first, second = sorted(linked)[:2]
        clock["t"] = now + timedelta(hours=2)
        fake.set_field(linked[first], Status="Closed - Converted")
        fake.set_field(linked[second], Status="Closed - Not Converted")
        third = sorted(linked)[2]
        opp = next(o["Id"] for o in fake.opportunities.values()
                   if o["Nurture_Lead__c"] == linked[third])  # fmt: skip
        fake.set_field(opp, obj="Opportunity", StageName="Closed Won")
        report = sync_stage_changes(engine, conn, PIPELINE, now + timedelta(hours=2))
        assert report.pulled == 6 and report.echoes == 2  # paged 2 at a time
        with session_scope(engine) as session:
            stages = dict(session.execute(select(Lead.id, Lead.lifecycle_stage)).all())
        assert stages[first] == "opportunity" and stages[second] == "recycled"
        assert stages[third] == "customer"
        again = sync_stage_changes(engine, conn, PIPELINE, now + timedelta(hours=3))
        assert again.moves == []
