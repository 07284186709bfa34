"""The ``import_leads`` flow: one task per file, each streaming its file in batches."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nurture.flows.artifacts import IMPORT_TABLE
from nurture.flows.runtime import engine_for, parse_now
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NONE

from nurture.intake.leads import import_leads as import_file


# An import is an upsert keyed by email, so retrying a file after a failure half way
# loads the rest and counts the already-loaded rows as updates: nothing is lost or doubled.
@task(cache_policy=NONE, retries=2, retry_delay_seconds=10, timeout_seconds=3600)
def import_file_task(
    db: str | None,
    path: str,
    now: str,
    source: str,
    check_deliverability: bool,
    batch_size: int,
) -> dict[str, Any]:
    """Import one CSV or JSON Lines file; bad rows go to its rejects file."""
    result = import_file(
        engine_for(db),
        Path(path),
        now=parse_now(now),
        source=source,
        check_deliverability=check_deliverability,
        batch_size=batch_size,
    )
    get_run_logger().info(
        "%s: read %d, inserted %d, updated %d, duplicates %d, rejected %d",
        path,
        result.read,
        result.inserted,
        result.updated,
        result.duplicates,
        result.rejected,
    )
    return {"file": path, **result.as_dict()}


@flow(name="import_leads", timeout_seconds=6 * 3600)
def import_leads(
    paths: list[str],
    source: str = "import",
    now: str | None = None,
    database_url: str | None = None,
    check_deliverability: bool = False,
    batch_size: int = 2000,
) -> list[dict[str, Any]]:
    """Import lead files (CSV or JSON Lines), one task per file, and publish the counts.

    Args:
        paths: Files to import, relative to the flow run's working directory or absolute.
        source: Touchpoint for new leads whose record names none.
        now: ISO 8601 instant stamped on the leads (default: the current time).
        database_url: The nurture database (default: ``NURTURE_DATABASE_URL``).
        check_deliverability: Also check each email domain in DNS (cached per domain).
        batch_size: Records per transaction.
    """
    at = parse_now(now).isoformat()
    # Files go one after another: they upsert the same tables, and a file is already a
    # stream of large batches.
    rows = [
        import_file_task(database_url, p, at, source, check_deliverability, batch_size)
        for p in paths
    ]
    totals = {k: sum(r[k] for r in rows) for k in ("read", "inserted", "updated", "rejected")}
    get_run_logger().info(
        "%d files: read %d, inserted %d, updated %d, rejected %d",
        len(rows),
        totals["read"],
        totals["inserted"],
        totals["updated"],
        totals["rejected"],
    )
    create_table_artifact(rows, key=IMPORT_TABLE, description=f"Lead import at {at}")
    return rows
