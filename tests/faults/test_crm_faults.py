"""CRM faults over an hour of ticks: an outage for the whole hour, then a storm of 429s and
5xx on every call, then recovery. Every promotion arrives once; nothing is lost or parked.

The per-connector suites (tests/test_crm_*.py) add 20% faults with a crash mid-push, hung
calls, SIGKILL of a pusher, and the Salesforce daily limit.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import pytest
from nurture.crm.promotions import process_promotions
from sqlalchemy import Engine

from nurture.crm import Connector
from nurture.spec.schema import PipelineSpec
from tests.fakes.base import FakeCrm
from tests.fakes.harness import Sleeps, counts, seed_promotions
from tests.fakes.hubspot import FakeHubSpot
from tests.fakes.salesforce import FakeSalesforce
from tests.fakes.webhook import FakeWebhookReceiver
from tests.test_crm_hubspot import _live as hubspot_connector
from tests.test_crm_salesforce import _live as salesforce_connector

LEADS = 200


def _hubspot() -> tuple[FakeCrm, Callable[[], Connector], Callable[[], int]]:
    fake = FakeHubSpot()
    return fake, lambda: hubspot_connector(fake, Sleeps()), lambda: len(fake.objects["contacts"])


def _salesforce() -> tuple[FakeCrm, Callable[[], Connector], Callable[[], int]]:
    fake = FakeSalesforce()
    return fake, lambda: salesforce_connector(fake), lambda: len(fake.leads)


def _webhook() -> tuple[FakeCrm, Callable[[], Connector], Callable[[], int]]:
    from nurture.connectors.webhook import WebhookConnector

    fake = FakeWebhookReceiver("s3cret", 1_772_532_000.0)

    def make() -> Connector:
        assert fake.server is not None
        return WebhookConnector(
            url=f"{fake.server.url}/hooks/nurture", secret="s3cret",
            clock=lambda: 1_772_532_000.0, sleep=Sleeps(), max_attempts=10, backoff_base=0.01,
        )  # fmt: skip

    return fake, make, lambda: len(fake.records)


CRMS: dict[str, Callable[[], tuple[FakeCrm, Callable[[], Connector], Callable[[], int]]]] = {
    "hubspot": _hubspot,
    "salesforce": _salesforce,
    "webhook": _webhook,
}


@pytest.mark.parametrize("name", sorted(CRMS))
def test_an_hour_of_outage_then_a_storm_then_recovery(
    engine: Engine, now: datetime, name: str
) -> None:
    fake, make, records = CRMS[name]()
    fake.start()
    try:
        seed_promotions(engine, now, LEADS, name)
        connector: Any = make()
        pipeline = PipelineSpec()
        fake.faults.outage = True
        for quarter in range(5):  # ticks every 15 minutes for an hour
            report = process_promotions(
                engine, {name: connector}, pipeline, now + timedelta(minutes=15 * quarter)
            )
            assert report.pushed == 0 and report.parked == 0
        assert counts(engine, name)["status"] == {"queued": LEADS}
        assert records() == 0
        fake.faults.outage = False
        fake.faults.rate = 1.0  # every call: 429 (with Retry-After) or 5xx
        storm = now + timedelta(hours=2)
        report = process_promotions(engine, {name: connector}, pipeline, storm)
        assert report.parked == 0
        fake.faults.rate = 0.0
        done = now + timedelta(days=1)  # past every back-off
        process_promotions(engine, {name: connector}, pipeline, done)
        state = counts(engine, name)
        assert state["status"] == {"done": LEADS}
        assert state["links"] == LEADS
        assert records() == LEADS, "no duplicate and no missing CRM record"
        close = getattr(connector, "close", None)
        if close is not None:
            close()
    finally:
        fake.stop()


def _next_waits(engine: Engine, name: str, now: datetime) -> list[timedelta]:
    from sqlalchemy import select

    from nurture.store.models import Promotion

    with engine.connect() as conn:
        due = conn.execute(
            select(Promotion.next_attempt_at).where(
                Promotion.connector == name, Promotion.status == "queued"
            )
        ).scalars()
        return [at - now for at in due]


@pytest.mark.parametrize("name", sorted(CRMS))
def test_a_whole_day_of_outage_only_delays_promotions(
    engine: Engine, now: datetime, name: str
) -> None:
    fake, make, records = CRMS[name]()
    fake.start()
    try:
        seed_promotions(engine, now, LEADS, name)
        connector: Any = make()
        pipeline = PipelineSpec()
        fake.faults.outage = True
        for quarter in range(24 * 4 + 1):  # a tick every 15 minutes for a whole day
            at = now + timedelta(minutes=15 * quarter)
            report = process_promotions(engine, {name: connector}, pipeline, at)
            assert report.pushed == 0 and report.parked == 0, at
            # The back-off is capped at an hour: a recovered CRM is tried within the hour.
            assert all(wait <= timedelta(hours=1) for wait in _next_waits(engine, name, at))
        state = counts(engine, name)
        assert state["status"] == {"queued": LEADS}
        assert records() == 0
        fake.faults.outage = False
        back = now + timedelta(days=1, hours=1)  # within the hour after the last failure
        process_promotions(engine, {name: connector}, pipeline, back)
        state = counts(engine, name)
        assert state["status"] == {"done": LEADS}
        assert records() == LEADS, "no duplicate and no missing CRM record"
        close = getattr(connector, "close", None)
        if close is not None:
            close()
    finally:
        fake.stop()


def test_an_outage_longer_than_park_after_parks_then_retry_requeues(
    engine: Engine, now: datetime
) -> None:
    from nurture.crm.promotions import parked_counts, parked_promotions, requeue_parked

    fake, make, records = CRMS["hubspot"]()
    fake.start()
    try:
        seed_promotions(engine, now, 20, "hubspot")
        connector: Any = make()
        pipeline = PipelineSpec()
        fake.faults.outage = True
        park_after = timedelta(hours=6)
        parked_at = None
        for hour in range(8):
            at = now + timedelta(hours=hour)
            report = process_promotions(
                engine, {"hubspot": connector}, pipeline, at, park_after=park_after
            )
            if report.parked:
                parked_at = hour
                break
        # The first failure starts the clock; it parks at the first try 6 h or more later.
        assert parked_at == 6
        assert parked_counts(engine) == {"hubspot": 20}
        parked = parked_promotions(engine, connector="hubspot")
        assert len(parked) == 20
        assert all(p.reason.startswith("still failing after 6 h 0 min: ") for p in parked)
        assert parked_promotions(engine, reason="no such reason") == []
        # Parked rows are never tried again by themselves, however long the CRM is back.
        fake.faults.outage = False
        later = now + timedelta(days=2)
        assert process_promotions(engine, {"hubspot": connector}, pipeline, later).pushed == 0
        assert requeue_parked(engine, later, connector="salesforce") == 0
        assert requeue_parked(engine, later, connector="hubspot", reason="still failing") == 20
        assert parked_counts(engine) == {}
        report = process_promotions(
            engine, {"hubspot": connector}, pipeline, later, park_after=park_after
        )
        assert report.pushed == 20 and report.parked == 0
        assert records() == 20
        connector.close()
    finally:
        fake.stop()
