"""The ``nurture_first_touch`` flow: new leads get their first step within minutes.

Scheduled every minute beside the 15-minute tick (``nurture-first-touch`` in
prefect.yaml). One task runs :func:`nurture.first_touch.first_touch`: enroll, advance the
enrollments of the last hour, send what is due. The rules are the tick's own, so the two
never send a step twice.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE

from nurture.config import get_settings
from nurture.first_touch import first_touch
from nurture.flows.runtime import engine_for, mailer_for, parse_now, programme_for
from nurture.journey.sequences import worker_id

WORKER = worker_id()


@task(cache_policy=NONE, timeout_seconds=600)
def first_touch_task(
    db: str | None,
    campaigns: str | None,
    templates: str | None,
    now: str,
    smtp_block: str | None,
) -> dict[str, int]:
    """One first-touch pass at ``now``."""
    result = first_touch(
        engine_for(db),
        parse_now(now),
        programme_for(campaigns, templates),
        mailer_for(templates, smtp_block),
        worker=WORKER,
        batch_size=get_settings().batch_size,
    )
    deferred = sum(c.deferred for c in result.campaigns.values())
    return {"enrolled": result.enrolled, "sent": result.send.sent, "deferred": deferred}


@flow(name="nurture_first_touch", log_prints=False, timeout_seconds=900)
def nurture_first_touch(
    now: str | None = None,
    database_url: str | None = None,
    campaigns_dir: str | None = None,
    templates_dir: str | None = None,
    smtp_block: str | None = None,
) -> dict[str, Any]:
    """Enroll new leads and send their first step now (inside their send window).

    Args:
        now: ISO 8601 instant (default: the current time).
        database_url: The nurture database (default: ``NURTURE_DATABASE_URL``).
        campaigns_dir: Campaign YAML folder (default: ``NURTURE_CAMPAIGNS``).
        templates_dir: Templates folder (default: ``NURTURE_TEMPLATES``).
        smtp_block: Name of a ``nurture-smtp`` block; when empty, ``NURTURE_SMTP_URL``.
    """
    get_settings().secret_keys()
    iso = parse_now(now).isoformat()
    counts = first_touch_task(database_url, campaigns_dir, templates_dir, iso, smtp_block)
    get_run_logger().info("first touch at %s: %s", iso, counts)
    return counts
