"""The ``crm_sync`` flow: push the promotion queue to each CRM, one task per connector.

Each push batch holds one slot of that CRM's ``crm-<connector>`` global concurrency limit,
so concurrent runs (this flow and the ticks) share the vendor's rate limit.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.blocks.core import Block
from prefect.cache_policies import NONE

from flows.artifacts import CRM_SYNC
from flows.limits import LimitedConnector, crm_limit
from flows.runtime import engine_for, parse_now, programme_for
from nurture.crm import Connector
from nurture.pipeline import process_promotions
from nurture.tick import connectors_for


def connector_from_block(ref: str) -> Connector:
    """The connector a CRM block (``<block-type-slug>/<name>``) opens with ``connector()``."""
    block: Any = Block.load(ref)
    if not callable(getattr(block, "connector", None)):
        raise TypeError(f"block {ref!r} has no connector() method, so it is not a CRM block")
    connector = block.connector()
    if not isinstance(connector, Connector):
        raise TypeError(f"block {ref!r}: connector() did not return a nurture Connector")
    return connector


@task(cache_policy=NONE, retries=2, retry_delay_seconds=30, timeout_seconds=1800)
def push_task(
    db: str | None,
    campaigns: str | None,
    templates: str | None,
    connector: str,
    block: str | None,
    now: str,
    limits: bool,
) -> dict[str, Any]:
    """Push every due promotion of one connector, batch by batch (the connector's size)."""
    programme = programme_for(campaigns, templates)
    conn = connector_from_block(block) if block else connectors_for(programme)[connector]
    limited = LimitedConnector(conn, crm_limit(connector) if limits else None)
    report = process_promotions(
        engine_for(db), {connector: limited}, programme.pipeline, parse_now(now)
    )
    get_run_logger().info(
        "%s: pushed %d, retry later %d, parked %d",
        connector,
        report.pushed,
        report.retry,
        report.parked,
    )
    return {"connector": connector, **asdict(report)}


@flow(name="crm_sync", timeout_seconds=3 * 3600)
def crm_sync(
    now: str | None = None,
    database_url: str | None = None,
    campaigns_dir: str | None = None,
    templates_dir: str | None = None,
    crm_blocks: dict[str, str] | None = None,
    concurrency_limits: bool = True,
) -> list[dict[str, Any]]:
    """Push queued promotions to every CRM the campaigns promote into.

    Args:
        now: ISO 8601 instant (default: the current time).
        database_url: The nurture database (default: ``NURTURE_DATABASE_URL``).
        campaigns_dir: Campaign YAML folder (default: ``NURTURE_CAMPAIGNS``).
        templates_dir: Templates folder (default: ``NURTURE_TEMPLATES``).
        crm_blocks: Connector name -> ``<block-type-slug>/<block-name>`` of its credentials
            block; connectors not named here are built from their own settings.
        concurrency_limits: Hold the ``crm-<connector>`` global limit per push batch.
    """
    at = parse_now(now).isoformat()
    programme = programme_for(campaigns_dir, templates_dir)
    names = sorted({c.promote.to.connector for c in programme.campaigns if c.promote})
    blocks = crm_blocks or {}
    rows = [
        push_task(
            database_url,
            campaigns_dir,
            templates_dir,
            name,
            blocks.get(name),
            at,
            concurrency_limits,
        )
        for name in names
    ]
    lines = [
        f"# CRM sync {at}",
        "",
        "| connector | pushed | retry later | parked |",
        "|---|---:|---:|---:|",
    ]
    lines += [f"| {r['connector']} | {r['pushed']} | {r['retry']} | {r['parked']} |" for r in rows]
    errors = [e for r in rows for e in r["errors"]]
    if errors:
        lines += ["", "## Errors", "", *(f"- {e}" for e in errors[:50])]
    create_markdown_artifact("\n".join(lines) + "\n", key=CRM_SYNC, description="CRM push")
    return rows
