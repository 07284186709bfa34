"""The ``crm_sync`` flow: for each CRM, push the promotion queue, then pull stage changes.

One push task and one pull task per connector; inside, the work goes in the connector's
own batches. Each push batch and each pull holds one slot of that CRM's ``crm-<connector>``
global concurrency limit, so concurrent runs (this flow and the ticks) share the vendor's
rate limit.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from nurture.crm.promotions import parked_counts, process_promotions
from nurture.flows.artifacts import CRM_SYNC
from nurture.flows.limits import LimitedConnector, crm_limit
from nurture.flows.runtime import engine_for, parse_now, programme_for
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.blocks.core import Block
from prefect.cache_policies import NONE
from prefect.events import emit_event

from nurture.config import get_settings
from nurture.crm import Connector, load_connector
from nurture.crm.sync import sync_stage_changes

# The Prefect event a push emits while a connector has parked promotions; an automation
# on it (say, "notify when nurture.promotions.parked is seen") alerts sales ops.
PARKED_EVENT = "nurture.promotions.parked"


def connector_from_block(ref: str) -> Connector:
    """The connector a CRM credentials block (``<block-type-slug>/<name>``) opens."""
    block: Any = Block.load(ref)
    opener = getattr(block, "get_connector", None)
    if not callable(opener):
        raise TypeError(f"block {ref!r} has no get_connector() method, so it is not a CRM block")
    connector = opener()
    if not isinstance(connector, Connector):
        raise TypeError(f"block {ref!r}: get_connector() did not return a nurture Connector")
    return connector


@contextmanager
def opened(name: str, block: str | None, limits: bool) -> Iterator[Connector]:
    """The connector (from its block, or its own settings), limited, closed afterwards."""
    inner = connector_from_block(block) if block else load_connector(name)
    try:
        yield LimitedConnector(inner, crm_limit(name) if limits else None)
    finally:
        close = getattr(inner, "close", None)  # optional: not part of the protocol
        if callable(close):
            close()


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
    """Push every due promotion of one connector, in the connector's batch size."""
    programme = programme_for(campaigns, templates)
    with opened(connector, block, limits) as conn:
        report = process_promotions(
            engine_for(db),
            {connector: conn},
            programme.pipeline,
            parse_now(now),
            park_after=get_settings().crm_park_after,
        )
    parked_total = parked_counts(engine_for(db)).get(connector, 0)
    logger = get_run_logger()
    logger.info(
        "%s: pushed %d, retry later %d, parked %d (%d parked in all)",
        connector,
        report.pushed,
        report.retry,
        report.parked,
        parked_total,
    )
    if parked_total:
        logger.warning(
            "%s: %d parked promotions wait for `nurture crm retry`", connector, parked_total
        )
        emit_event(
            event=PARKED_EVENT,
            resource={"prefect.resource.id": f"nurture.crm.{connector}"},
            payload={"connector": connector, "parked": parked_total},
        )
    return {
        "connector": connector,
        "pushed": report.pushed,
        "retry": report.retry,
        "parked": report.parked,
        "parked_total": parked_total,
        "errors": list(report.errors),
    }


@task(cache_policy=NONE, retries=2, retry_delay_seconds=30, timeout_seconds=1800)
def pull_task(
    db: str | None,
    campaigns: str | None,
    templates: str | None,
    connector: str,
    block: str | None,
    now: str,
    limits: bool,
) -> dict[str, Any]:
    """Pull one CRM's stage changes since its high-water mark and apply them, set-based."""
    programme = programme_for(campaigns, templates)
    with opened(connector, block, limits) as conn:
        report = sync_stage_changes(engine_for(db), conn, programme.pipeline, parse_now(now))
    summary = report.summary()
    get_run_logger().info(
        "%s: pulled %d changes, moved %d leads (unknown %d, echoes %d, stale %d)",
        connector,
        summary["pulled"],
        summary["moved"],
        summary["unknown"],
        summary["echoes"],
        summary["stale"],
    )
    return summary


def _markdown(at: str, pushed: list[dict[str, Any]], pulled: list[dict[str, Any]]) -> str:
    lines = [
        f"# CRM sync {at}",
        "",
        "| connector | pushed | retry later | parked | parked in all | pulled | moved | unknown |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    by_name = {p["connector"]: p for p in pulled}
    for r in pushed:
        p = by_name.get(r["connector"], {})
        lines.append(
            f"| {r['connector']} | {r['pushed']} | {r['retry']} | {r['parked']} | "
            f"{r['parked_total']} | {p.get('pulled', '-')} | {p.get('moved', '-')} | "
            f"{p.get('unknown', '-')} |"
        )
    errors = [e for r in pushed for e in r["errors"]]
    if errors:
        lines += ["", "## Parked or failed pushes", "", *(f"- {e}" for e in errors[:50])]
        if len(errors) > 50:
            lines.append(f"- ... and {len(errors) - 50} more")
    return "\n".join(lines) + "\n"


@flow(name="crm_sync", timeout_seconds=3 * 3600)
def crm_sync(
    now: str | None = None,
    database_url: str | None = None,
    campaigns_dir: str | None = None,
    templates_dir: str | None = None,
    crm_blocks: dict[str, str] | None = None,
    pull: bool = True,
    concurrency_limits: bool = True,
) -> dict[str, list[dict[str, Any]]]:
    """Push queued promotions to every CRM the campaigns promote into, then pull back.

    Args:
        now: ISO 8601 instant (default: the current time).
        database_url: The nurture database (default: ``NURTURE_DATABASE_URL``).
        campaigns_dir: Campaign YAML folder (default: ``NURTURE_CAMPAIGNS``).
        templates_dir: Templates folder (default: ``NURTURE_TEMPLATES``).
        crm_blocks: Connector name -> ``<block-type-slug>/<block-name>`` of its credentials
            block (e.g. ``{"hubspot": "hubspot-credentials/prod"}``); connectors not named
            here read their own environment settings.
        pull: Also pull stage changes made in each CRM.
        concurrency_limits: Hold the ``crm-<connector>`` global limit per batch.
    """
    at = parse_now(now).isoformat()
    programme = programme_for(campaigns_dir, templates_dir)
    names = sorted({c.promote.to.connector for c in programme.campaigns if c.promote})
    blocks = crm_blocks or {}
    args = (database_url, campaigns_dir, templates_dir)
    pushed = [push_task(*args, name, blocks.get(name), at, concurrency_limits) for name in names]
    pulled = (
        [pull_task(*args, name, blocks.get(name), at, concurrency_limits) for name in names]
        if pull
        else []
    )
    create_markdown_artifact(
        _markdown(at, pushed, pulled), key=CRM_SYNC, description="CRM push and pull"
    )
    return {"pushed": pushed, "pulled": pulled}
