"""The ``campaign_report`` flow: the funnel, and the week's full report (stages, conversion,
time in stage, speed to lead, steps, A/B tests, health) as markdown and table artifacts."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Any

from nurture.flows.artifacts import FUNNEL, funnel_markdown
from nurture.flows.runtime import engine_for, parse_now, programme_for
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NONE

from nurture.reporting.report import (
    CampaignFunnel,
    Period,
    build_report,
    campaign_funnels,
    report_markdown,
    report_tables,
)


@task(cache_policy=NONE, retries=2, retry_delay_seconds=10, timeout_seconds=1800)
def funnel_task(db: str | None) -> list[dict[str, Any]]:
    """Each campaign's funnel, computed set-based in the database."""
    return [f.as_dict() for f in campaign_funnels(engine_for(db))]


@task(cache_policy=NONE, retries=2, retry_delay_seconds=10, timeout_seconds=1800)
def report_task(db: str | None, campaigns: str | None, until: str, days: int) -> int:
    """Build the period's report and publish it as markdown plus one table per section."""
    end = datetime.fromisoformat(until)
    pipeline = programme_for(campaigns, None).pipeline
    report = build_report(engine_for(db), pipeline, period=Period(end - timedelta(days=days), end))
    create_markdown_artifact(
        report_markdown(report), key="campaign-report", description=f"The last {days} days"
    )
    tables = report_tables(report)
    for table in tables:
        key = "report-" + re.sub(r"[^a-z0-9]+", "-", table.title.lower()).strip("-")
        create_table_artifact(
            [dict(zip(table.columns, row, strict=False)) for row in table.rows],
            key=key[:100],
            description=table.note or table.title,
        )
    return len(tables)


@flow(name="campaign_report", timeout_seconds=3600)
def campaign_report(
    now: str | None = None,
    database_url: str | None = None,
    campaigns_dir: str | None = None,
    days: int = 7,
) -> str:
    """Publish the funnel (``campaign-funnel``) and the last ``days`` days' full report
    (``campaign-report`` and ``report-*`` tables) as artifacts.

    Args:
        now: ISO 8601 instant the report is dated (default: the current time).
        database_url: The nurture database (default: ``NURTURE_DATABASE_URL``).
        campaigns_dir: The folder with ``pipeline.yaml`` (default: ``NURTURE_CAMPAIGNS``).
        days: The length of the reported period, ending at ``now``.
    """
    funnels = [CampaignFunnel(**row) for row in funnel_task(database_url)]
    at = parse_now(now)
    report_task(database_url, campaigns_dir, at.isoformat(), days)
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
