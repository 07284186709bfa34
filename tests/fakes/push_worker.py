"""A push run in a process of its own, for tests that SIGKILL it mid-push.

Usage: ``python -m tests.fakes.push_worker DATABASE_URL HUBSPOT_URL NOW_ISO``.
"""

from __future__ import annotations

import sys
from datetime import datetime

from nurture.connectors.hubspot import HubSpotConnector
from nurture.crm.promotions import process_promotions

from nurture.spec.schema import PipelineSpec
from nurture.store.db import make_engine


def main(database_url: str, hubspot_url: str, now: str) -> None:
    """Push every due HubSpot promotion once."""
    conn = HubSpotConnector(
        token="hs-token", base_url=hubspot_url, pipeline="default", deal_stage="qualifiedtobuy"
    )
    engine = make_engine(database_url)
    process_promotions(engine, {"hubspot": conn}, PipelineSpec(), datetime.fromisoformat(now))


if __name__ == "__main__":
    main(*sys.argv[1:4])
