"""Pipedrive: exact requests (respx), and the connector against a stateful fake."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime, timedelta

import httpx
import pytest
import respx
from nurture.connectors.base import DailyLimitExceeded
from nurture.connectors.pipedrive import PipedriveConnector
from nurture.crm.promotions import process_promotions
from sqlalchemy import Engine, select

from nurture.crm import PromotionItem
from nurture.crm.sync import sync_stage_changes
from nurture.spec.schema import PipelineSpec
from nurture.store.db import session_scope
from nurture.store.models import Lead
from tests.fakes.harness import CrashAfter, Sleeps, counts, links, seed_promotions
from tests.fakes.pipedrive import FakePipedrive

BASE = "https://acme.pipedrive.test"
PIPELINE = PipelineSpec()


def _ok(data: object, **headers: str) -> httpx.Response:
    return httpx.Response(200, json={"success": True, "data": data}, headers=headers)


def _item(pid: int, external_id: str | None = None) -> PromotionItem:
    return PromotionItem(promotion_id=pid, lead_id=pid, email=f"P{pid}@x.io", stage="mql",
                         first_name="Ada", last_name="Lovelace", company="Acme",
                         external_id=external_id)  # fmt: skip


@respx.mock
def test_search_then_create_person_and_deal_with_paced_bursts() -> None:
    search = respx.get(f"{BASE}/api/v2/persons/search").mock(return_value=_ok({"items": []}))
    create = respx.post(f"{BASE}/api/v2/persons").mock(
        return_value=_ok({"id": 55}, **{"x-ratelimit-remaining": "0", "x-ratelimit-reset": "2"})
    )
    deals = respx.get(f"{BASE}/api/v2/deals").mock(return_value=_ok([]))
    deal = respx.post(f"{BASE}/api/v2/deals").mock(return_value=_ok({"id": 9}))
    sleeps = Sleeps()
    conn = PipedriveConnector(token="pd-secret", base_url=BASE, pipeline_id=1, stage_id=2,
                              sleep=sleeps)  # fmt: skip
    assert conn.push([_item(1)])[0].external_id == "55"
    q = search.calls.last.request.url.params
    assert (q["term"], q["fields"], q["exact_match"], q["api_token"]) == (
        "p1@x.io", "email", "true", "pd-secret"
    )  # fmt: skip
    assert json.loads(create.calls.last.request.content) == {
        "name": "Ada Lovelace",
        "emails": [{"value": "p1@x.io", "primary": True, "label": "work"}],
    }
    assert not deals.called  # a person created just now has no deal to look for
    assert json.loads(deal.calls.last.request.content) == {
        "title": "Ada Lovelace - Acme", "person_id": 55, "pipeline_id": 1, "stage_id": 2
    }  # fmt: skip
    assert sleeps.waits == [2.0]  # the burst window was spent after the create
    assert "pd-secret" not in repr(conn)

    # A linked person is patched by id: no search, and the deal is not created twice.
    patch = respx.patch(f"{BASE}/api/v2/persons/55").mock(return_value=_ok({"id": 55}))
    deals.mock(return_value=_ok([{"id": 9}]))
    assert conn.push([_item(1, external_id="55")])[0].ok
    assert patch.called and search.call_count == 1 and deal.call_count == 1
    assert deals.calls.last.request.url.params["person_id"] == "55"


@respx.mock
def test_envelope_errors_and_daily_budget() -> None:
    route = respx.get(f"{BASE}/api/v2/persons/search")
    route.mock(return_value=httpx.Response(200, json={"success": False, "error": "nope"}))
    conn = PipedriveConnector(token="t", base_url=BASE, sleep=Sleeps())
    res = conn.push([_item(1)])
    assert not res[0].ok and not res[0].retryable and "unsuccessful" in (res[0].error or "")
    route.mock(
        return_value=httpx.Response(
            429, json={"success": False}, headers={"x-daily-requests-left": "0"}
        )
    )
    calls = route.call_count
    with pytest.raises(DailyLimitExceeded):
        conn.push([_item(1)])
    assert route.call_count == calls + 1


@pytest.fixture
def fake() -> Iterator[FakePipedrive]:
    server = FakePipedrive()
    server.start()
    yield server
    server.stop()


def _live(fake: FakePipedrive, **kw: object) -> PipedriveConnector:
    assert fake.server is not None
    options: dict[str, object] = {"pipeline_id": 1, "stage_id": 2, "max_attempts": 10,
                                  "backoff_base": 0.01, "timeout": 5.0}  # fmt: skip
    options.update(kw)
    return PipedriveConnector(token="pd-token", base_url=fake.server.url, sleep=Sleeps(), **options)  # type: ignore[arg-type]


def test_thousand_leads_arrive_once_through_faults_and_a_crash(
    sqlite_engine: Engine, fake: FakePipedrive, now: datetime
) -> None:
    # One call per write (no batch API): SQLite only, HubSpot covers both databases.
    engine = sqlite_engine
    ids = seed_promotions(engine, now, 1000, "pipedrive")
    fake.faults.rate = 0.2
    conn = _live(fake)
    with pytest.raises(RuntimeError):
        process_promotions(engine, {"pipedrive": CrashAfter(conn, 4)}, PIPELINE, now)
    assert len(fake.persons) == 400
    report = process_promotions(engine, {"pipedrive": conn}, PIPELINE, now)
    assert report.pushed == 700 and report.parked == 0
    assert counts(engine, "pipedrive")["status"] == {"done": 1000}
    emails = [p["emails"][0]["value"] for p in fake.persons.values()]
    assert len(emails) == 1000 and set(emails) == {f"person{i}@co{i}.example" for i in range(1000)}
    assert len(fake.deals) == 1000
    assert {(d["pipeline_id"], d["stage_id"]) for d in fake.deals.values()} == {(1, 2)}
    # The fake's Retry-After (6 s) is none of the connector's own waits: it was honoured.
    assert 6.0 in conn.client.sleep.waits  # type: ignore[attr-defined]
    linked = links(engine, "pipedrive")
    assert set(linked) == set(ids)
    assert {str(d["person_id"]) for d in fake.deals.values()} == set(linked.values())


def test_outage_then_recovery_and_won_lost_pull_back(engine: Engine, now: datetime) -> None:
    clock = {"t": now}
    with FakePipedrive(clock=lambda: clock["t"]) as fake:
        seed_promotions(engine, now, 4, "pipedrive")
        fake.faults.outage = True
        conn = _live(fake, max_attempts=2)
        assert process_promotions(engine, {"pipedrive": conn}, PIPELINE, now).pushed == 0
        assert counts(engine, "pipedrive")["status"] == {"queued": 4}
        fake.faults.outage = False
        later = now + timedelta(hours=1)
        assert process_promotions(engine, {"pipedrive": conn}, PIPELINE, later).pushed == 4
        linked = links(engine, "pipedrive")
        lead_won, lead_lost = sorted(linked)[:2]
        deal_of = {str(d["person_id"]): d["id"] for d in fake.deals.values()}
        clock["t"] = now + timedelta(hours=2)
        fake.set_deal(deal_of[linked[lead_won]], status="won")
        fake.set_deal(deal_of[linked[lead_lost]], status="lost")
        report = sync_stage_changes(engine, conn, PIPELINE, now + timedelta(hours=2))
        assert len(report.moves) == 2
        with session_scope(engine) as session:
            stages = dict(session.execute(select(Lead.id, Lead.lifecycle_stage)).all())
        assert stages[lead_won] == "customer" and stages[lead_lost] == "recycled"
        assert sync_stage_changes(engine, conn, PIPELINE, now + timedelta(hours=3)).moves == []


def test_v1_leads_are_created_once_per_person_through_faults(
    sqlite_engine: Engine, fake: FakePipedrive, now: datetime
) -> None:
    seed_promotions(sqlite_engine, now, 60, "pipedrive")
    fake.faults.rate = 0.2
    conn = _live(fake, pipeline_id=None, stage_id=None, create_lead=True)
    report = process_promotions(sqlite_engine, {"pipedrive": conn}, PIPELINE, now)
    conn.close()
    assert report.pushed == 60 and not fake.deals
    assert len(fake.persons) == 60 and len(fake.leads) == 60
    assert {str(v["person_id"]) for v in fake.leads.values()} == {str(p) for p in fake.persons}
    assert {v["title"].rsplit(" - ", 1)[1] for v in fake.leads.values()} == {"mql"}
