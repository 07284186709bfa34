"""The ``privacy_retention`` flow: the scheduled retention of raw event detail and the
purge of double opt-ins that were never confirmed (both set in ``consent.yaml``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE

from nurture.config import get_settings
from nurture.flows.runtime import engine_for, parse_now
from nurture.privacy.opt_in import expire_opt_ins
from nurture.privacy.retention import apply_retention
from nurture.spec.consent import load_consent


@task(cache_policy=NONE, retries=2, retry_delay_seconds=10, timeout_seconds=3600)
def retention_task(db: str | None, campaigns: str | None, now: str) -> dict[str, Any]:
    """One set-based pass: strip and thin old events, purge expired opt-ins."""
    folder = get_settings().campaigns if campaigns is None else Path(campaigns)
    path = next((p for p in (folder / "consent.yaml", folder / "consent.yml") if p.exists()), None)
    spec = load_consent(path)
    engine, at = engine_for(db), parse_now(now)
    out: dict[str, Any] = {"events": None}
    if spec.retention.events is not None:
        out["events"] = apply_retention(engine, spec.retention.events, at).as_dict()
    out["purged_opt_ins"] = expire_opt_ins(engine, spec, at)
    return out


@flow(name="privacy_retention", timeout_seconds=7200)
def privacy_retention(
    now: str | None = None, database_url: str | None = None, campaigns_dir: str | None = None
) -> dict[str, Any]:
    """Apply ``consent.yaml``'s ``retention.events`` age and ``unconfirmed`` rule.

    Args:
        now: ISO 8601 instant to apply the ages at (default: the current time).
        database_url: The nurture database (default: ``NURTURE_DATABASE_URL``).
        campaigns_dir: The folder with ``consent.yaml`` (default: ``NURTURE_CAMPAIGNS``).
    """
    at = parse_now(now)
    result = retention_task(database_url, campaigns_dir, at.isoformat())
    get_run_logger().info("retention at %s: %s", at.isoformat(), result)
    return result
