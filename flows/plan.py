"""The ``campaign_plan`` flow: ``nurture plan`` as a markdown artifact (e.g. for a PR check)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NONE

from nurture.config import get_settings
from nurture.errors import NurtureError
from nurture.flows.runtime import engine_for, parse_now
from nurture.planning.plan import RATES, build_plan, plan_errors, plan_markdown
from nurture.spec.schema import SpecErrors, load_pipeline

PLAN_ARTIFACT = "campaign-plan"


@task(cache_policy=NONE, retries=2, retry_delay_seconds=10, timeout_seconds=900)
def plan_task(
    db: str | None,
    campaigns: str | None,
    templates: str | None,
    now: str,
    days: int,
    rates: str = "none",
    since_days: float = 90,
    min_sends: int = 50,
) -> tuple[str, bool]:
    """Build the plan (reads only) and return its markdown and whether it is free of errors."""
    settings = get_settings()
    folder = Path(campaigns) if campaigns else settings.campaigns
    tdir = Path(templates) if templates else settings.templates
    specs, errors = plan_errors(folder, tdir)
    pipeline = None
    try:
        pipeline = load_pipeline(next(folder.glob("pipeline.y*ml"), None))
    except SpecErrors as exc:
        errors += exc.errors
    plan = build_plan(
        engine_for(db),
        specs,
        parse_now(now),
        days=days,
        pipeline=pipeline,
        errors=errors,
        templates_dir=tdir,
        rates=rates,
        since=timedelta(days=since_days),
        min_sends=min_sends,
    )
    return plan_markdown(plan), not plan.errors


@flow(name="campaign_plan", timeout_seconds=1800)
def campaign_plan(
    now: str | None = None,
    database_url: str | None = None,
    campaigns_dir: str | None = None,
    templates_dir: str | None = None,
    days: int = 14,
    rates: str = "none",
    since_days: float = 90,
    min_sends: int = 50,
) -> str:
    """Publish what the campaign files would change as the ``campaign-plan`` artifact.

    Args:
        now: ISO 8601 instant the plan starts at (default: the current time).
        database_url: The nurture database (default: ``NURTURE_DATABASE_URL``).
        campaigns_dir: Campaign YAML folder (default: ``NURTURE_CAMPAIGNS``).
        templates_dir: Templates folder (default: ``NURTURE_TEMPLATES``).
        days: Days to forecast.
        rates: ``none`` (no new engagement) or ``history`` (each step's observed rates).
        since_days: With ``history``: the days of history the rates are measured on.
        min_sends: With ``history``: sends a step needs for its own rates.

    Raises:
        NurtureError: the campaign files or templates have errors (after the artifact,
            which lists them with file:line, is published).
    """
    if rates not in RATES:
        raise NurtureError(f"rates must be one of {', '.join(RATES)}, not {rates!r}")
    if since_days <= 0 or min_sends < 1:
        raise NurtureError("since_days must be positive and min_sends at least 1")
    iso = parse_now(now).isoformat()
    markdown, ok = plan_task(
        database_url, campaigns_dir, templates_dir, iso, days, rates, since_days, min_sends
    )
    create_markdown_artifact(markdown, key=PLAN_ARTIFACT, description=f"Plan for {days} days")
    get_run_logger().info("plan published (%d characters)", len(markdown))
    if not ok:
        raise NurtureError("the campaign files have errors: see the campaign-plan artifact")
    return markdown
