"""Webhook: signed JSON, idempotency keys, faults and crashes against a real receiver."""

from __future__ import annotations

import json
from datetime import datetime

import httpx
import pytest
import respx
from nurture.connectors.webhook import WebhookConnector, sign, verify
from nurture.crm.promotions import process_promotions
from sqlalchemy import Engine

from nurture.crm import FatalConnectorError, PromotionItem
from nurture.spec.schema import PipelineSpec
from tests.fakes.harness import CrashAfter, Sleeps, counts, seed_promotions
from tests.fakes.webhook import FakeWebhookReceiver

T0 = 1_772_532_000.0


def test_signature_round_trip_and_tampering() -> None:
    header = sign("k", int(T0), b'{"a":1}')
    assert verify("k", header, b'{"a":1}', T0)
    assert not verify("k", header, b'{"a":2}', T0)
    assert not verify("other", header, b'{"a":1}', T0)
    assert not verify("k", header, b'{"a":1}', T0 + 301)  # a replay after the tolerance
    assert not verify("k", "garbage", b"{}", T0)


@respx.mock
def test_exact_request() -> None:
    route = respx.post("https://hooks.test/in").mock(return_value=httpx.Response(204))
    conn = WebhookConnector(url="https://hooks.test/in", secret="s3cret", clock=lambda: T0)
    item = PromotionItem(promotion_id=1, lead_id=7, email="a@x.io", stage="mql", first_name="A")
    assert conn.push([item])[0].external_id == "lead-7-mql"
    request = route.calls.last.request
    body = json.loads(request.content)
    assert body["event"] == "lead.promoted"
    assert body["leads"][0]["idempotency_key"] == "lead-7-mql"
    assert body["leads"][0]["fields"]["email"] == "a@x.io"
    assert request.headers["X-Nurture-Signature"] == sign("s3cret", int(T0), request.content)
    assert len(request.headers["Idempotency-Key"]) == 64
    assert "s3cret" not in repr(conn) and "s3cret" not in repr(conn.__dict__)
    route.mock(return_value=httpx.Response(410))
    with pytest.raises(FatalConnectorError):
        conn.push([item])


def test_thousand_leads_once_through_faults_and_a_crash(engine: Engine, now: datetime) -> None:
    seed_promotions(engine, now, 1000, "webhook")
    with FakeWebhookReceiver("s3cret", T0) as fake:
        assert fake.server is not None
        fake.faults.rate = 0.2
        sleeps = Sleeps()
        conn = WebhookConnector(
            url=f"{fake.server.url}/hooks/nurture",
            secret="s3cret",
            clock=lambda: T0,
            sleep=sleeps,
            max_attempts=10,
            backoff_base=0.01,
        )
        with pytest.raises(RuntimeError):
            process_promotions(engine, {"webhook": CrashAfter(conn, 3)}, PipelineSpec(), now)
        report = process_promotions(engine, {"webhook": conn}, PipelineSpec(), now)
        assert report.pushed == 800 and report.parked == 0
        assert counts(engine, "webhook")["status"] == {"done": 1000}
        assert len(fake.records) == 1000 and fake.rejected == 0
        assert fake.deliveries > 1000  # copies arrived, and the keys absorbed them
        assert 4.0 in sleeps.waits  # the fake's Retry-After, not a backoff of ours

        # A wrong secret is refused by the receiver: fatal, parked with the reason.
        seed_more = WebhookConnector(
            url=f"{fake.server.url}/hooks/nurture", secret="wrong", clock=lambda: T0
        )
        item = PromotionItem(promotion_id=1, lead_id=1, email="a@x.io", stage="mql")
        fake.faults.rate = 0.0
        with pytest.raises(FatalConnectorError, match="401"):
            seed_more.push([item])
