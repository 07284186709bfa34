"""``nurture events``: engagement events from files."""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import click
from rich.table import Table

from nurture.cli.common import console, engine, err_console, fail, json_option, print_json, shown

if TYPE_CHECKING:
    from nurture.engagement.events import ImportReport

# Bad lines listed in the human output; --json lists them all.
_SHOW_BAD = 50


@click.group()
def events() -> None:
    """Import engagement events (opens, clicks, page views, custom events)."""


@events.command("import")
@click.argument(
    "path", type=click.Path(exists=True, dir_okay=False, allow_dash=True, path_type=Path)
)
@click.option("--batch-size", default=1000, show_default=True, help="Events per transaction.")
@json_option
def import_(path: Path, batch_size: int, as_json: bool) -> None:
    """Import events from a JSON Lines file (PATH, or - for stdin).

    One event per line: {"id": "evt-1", "type": "page_view", "email": "a@b.com",
    "occurred_at": "2026-03-03T10:00:00Z", "url": "...", "payload": {...}}. Give email,
    lead_id or delivery_id. The id makes re-imports idempotent. Bad lines are reported
    with their line number and skipped; the good lines load.
    """
    from nurture.engagement.events import import_jsonl

    if batch_size < 1:
        fail("--batch-size must be at least 1")
    eng = engine()
    # The CLI is the edge where the wall clock may be read.
    now = datetime.now(UTC)

    def progress(report: ImportReport) -> None:
        if not as_json:
            err_console.print(
                f"  line {report.lines:,}: {report.inserted:,} inserted", highlight=False
            )

    if str(path) == "-":
        report = import_jsonl(eng, sys.stdin.buffer, now=now, batch_size=batch_size)
    else:
        with path.open("rb") as handle:
            report = import_jsonl(eng, handle, now=now, batch_size=batch_size, on_batch=progress)

    if as_json:
        print_json({"path": str(path), **report.as_dict()})
        return
    try:
        _show(path, report)
    except Exception as exc:
        # The events are committed: a display problem (a terminal that cannot encode the
        # text, say) must not exit non-zero, or a rerun would add the id-less events again.
        click.echo(
            f"{str(path)!a}: imported ({report.inserted} inserted, {len(report.bad)} bad "
            f"lines); the summary could not be shown: {type(exc).__name__}",
            err=True,
        )


def _show(path: Path, report: ImportReport) -> None:
    """The human summary of an import; every value that came from the file is escaped."""
    console.print(
        f"[bold]{shown(path)}[/]: {report.lines:,} lines, [green]{report.inserted:,} inserted[/], "
        f"{report.duplicates:,} duplicates, {report.unknown_lead:,} for unknown leads, "
        f"{len(report.bad):,} bad, {report.suppressed:,} addresses suppressed",
        highlight=False,
    )
    if report.unknown_lines:
        lines = ", ".join(str(n) for n in report.unknown_lines[:20])
        more = "" if len(report.unknown_lines) <= 20 else ", ..."
        console.print(f"unknown lead on lines {lines}{more}", highlight=False)
    if report.bad:
        table = Table("line", "field", "reason", title="skipped lines", title_justify="left")
        for bad in report.bad[:_SHOW_BAD]:
            table.add_row(str(bad.line), shown(bad.field), shown(bad.reason))
        err_console.print(table)
        if len(report.bad) > _SHOW_BAD:
            err_console.print(f"... and {len(report.bad) - _SHOW_BAD:,} more (see --json)")
