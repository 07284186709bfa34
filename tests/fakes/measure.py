"""Leads/s pushed per connector against its fake, and HTTP calls per 1,000 leads.

Run: ``.venv/bin/python -m tests.fakes.measure [N] [FAULT_RATE]`` (SQLite, no Prefect).
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from nurture.connectors.hubspot import HubSpotConnector
from nurture.connectors.pipedrive import PipedriveConnector
from nurture.connectors.salesforce import SalesforceConnector
from nurture.connectors.webhook import WebhookConnector
from nurture.crm.promotions import process_promotions

from nurture.spec.schema import PipelineSpec
from nurture.store.db import make_engine, upgrade
from tests.fakes.base import FakeCrm
from tests.fakes.harness import Sleeps, seed_promotions
from tests.fakes.hubspot import FakeHubSpot
from tests.fakes.pipedrive import FakePipedrive
from tests.fakes.salesforce import FakeSalesforce
from tests.fakes.webhook import FakeWebhookReceiver

NOW = datetime(2026, 3, 3, 10, tzinfo=UTC)


def _cases() -> list[tuple[str, Callable[[], FakeCrm], Callable[[str], Any]]]:
    opts: dict[str, Any] = {"sleep": Sleeps(), "max_attempts": 10, "backoff_base": 0.01}
    return [
        ("hubspot", FakeHubSpot, lambda url: HubSpotConnector(
            token="hs-token", base_url=url, pipeline="default", deal_stage="qualifiedtobuy",
            **opts)),
        ("salesforce", FakeSalesforce, lambda url: SalesforceConnector(
            client_id="app", client_secret="shh", login_url=url,
            opportunity_stage="Qualification", **opts)),
        ("pipedrive", FakePipedrive, lambda url: PipedriveConnector(
            token="pd-token", base_url=url, pipeline_id=1, stage_id=2, **opts)),
        ("webhook", lambda: FakeWebhookReceiver("s3cret", time.time()), lambda url:
            WebhookConnector(url=f"{url}/hooks/nurture", secret="s3cret", **opts)),
    ]  # fmt: skip


def main(n: int = 1000, rate: float = 0.0) -> None:
    """Print one line per connector."""
    for name, make_fake, make_conn in _cases():
        with tempfile.TemporaryDirectory() as tmp:
            engine = make_engine(f"sqlite:///{Path(tmp) / 'm.db'}")
            upgrade(engine)
            seed_promotions(engine, NOW, n, name)
            fake = make_fake()
            url = fake.start()
            try:
                fake.faults.rate = rate
                conn = make_conn(url)
                start = time.perf_counter()
                report = process_promotions(engine, {name: conn}, PipelineSpec(), NOW)
                took = time.perf_counter() - start
            finally:
                fake.stop()
            engine.dispose()
        print(
            f"{name:<11} {report.pushed:>5} leads in {took:6.2f} s = {report.pushed / took:7.0f} "
            f"leads/s; {fake.total_calls * 1000 / n:6.0f} HTTP calls per 1,000 leads"
        )


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 1000,
         float(sys.argv[2]) if len(sys.argv) > 2 else 0.0)  # fmt: skip
