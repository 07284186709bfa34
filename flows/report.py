"""The ``campaign_report`` flow: the campaign funnel as a markdown artifact."""

from __future__ import annotations

from datetime import UTC
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NONE

from flows.artifacts import FUNNEL, funnel_markdown
from flows.runtime import engine_for, parse_now
from nurture.reports import CampaignFunnel, campaign_funnels


@task(cache_policy=NONE, retries=2, retry_delay_seconds=10, timeout_seconds=1800)
def funnel_task(db: str | None) -> list[dict[str, Any]]:
    """Each campaign's funnel, computed set-based in the database."""
    return [f.as_dict() for f in campaign_funnels(engine_for(db))]


@flow(name="campaign_report", timeout_seconds=3600)
def campaign_report(now: str | None = None, database_url: str | None = None) -> str:
    """Publish the funnel of every campaign as the ``campaign-funnel`` markdown artifact.

    Args:
        now: ISO 8601 instant the report is dated (default: the current time).
        database_url: The nurture database (default: ``NURTURE_DATABASE_URL``).
    """
    funnels = [CampaignFunnel(**row) for row in funnel_task(database_url)]
    at = parse_now(now)
    text = funnel_markdown(
        funnels, title=f"Campaign funnel, {at.astimezone(UTC):%Y-%m-%d %H:%M} UTC"
    )
    create_markdown_artifact(text, key=FUNNEL, description="Leads per funnel stage, per campaign")
    get_run_logger().info(
        "%d campaigns: %d enrolled, %d sent, %d promoted",
        len(funnels),
        sum(f.enrolled for f in funnels),
        sum(f.sent for f in funnels),
        sum(f.promoted for f in funnels),
    )
    return text
