"""``nurture leads``: import leads from CSV or JSON Lines files."""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from pathlib import Path

import click
from rich.markup import escape
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from nurture.cli.common import console, engine, err_console, json_option, print_json
from nurture.models import Touchpoint


@click.group()
def leads() -> None:
    """Manage leads."""


@leads.command("import")
@click.argument("path", type=click.Path(path_type=Path, dir_okay=False))
@click.option(
    "--source",
    type=click.Choice([t.value for t in Touchpoint]),
    default=Touchpoint.import_.value,
    show_default=True,
    help="Touchpoint for new leads whose record names none.",
)
@click.option(
    "--rejects",
    "rejects_path",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Where to write rejected records [default: <name>.rejects.csv next to PATH].",
)
@click.option("--check-deliverability", is_flag=True, help="Also check each email domain in DNS.")
@json_option
def import_(
    path: Path,
    source: str,
    rejects_path: Path | None,
    check_deliverability: bool,
    as_json: bool,
) -> None:
    """Import leads from PATH, a CSV file with a header row or a JSON Lines file.

    Leads are upserted by normalised email; rows that fail go to a rejects CSV with their
    line number and reason, and the import goes on.
    """
    from nurture.leads import ImportResult, LeadFileError, import_leads

    eng = engine()
    now = datetime.now(UTC)  # the CLI is the edge that may read the clock
    try:
        if as_json or not err_console.is_terminal:
            result = import_leads(
                eng,
                path,
                now=now,
                source=source,
                rejects_path=rejects_path,
                check_deliverability=check_deliverability,
            )
        else:
            with Progress(
                SpinnerColumn(),
                TextColumn("importing {task.description}: {task.completed:,} records read"),
                TimeElapsedColumn(),
                console=err_console,
                transient=True,
            ) as bar:
                task = bar.add_task(path.name, total=None)

                def tick(r: ImportResult) -> None:
                    bar.update(task, completed=r.read)

                result = import_leads(
                    eng,
                    path,
                    now=now,
                    source=source,
                    rejects_path=rejects_path,
                    check_deliverability=check_deliverability,
                    progress=tick,
                )
    except LeadFileError as exc:
        # soft_wrap keeps the promised single line however long the path; escape keeps
        # brackets in file names from being read as rich markup.
        err_console.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True)
        sys.exit(1)
    if as_json:
        print_json(result.as_dict())
        return
    table = Table(title=f"Imported {path.name}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(justify="right")
    for key in ("read", "inserted", "updated", "duplicates", "rejected"):
        table.add_row(key, f"{getattr(result, key):,}")
    console.print(table)
    if result.rejects_path is not None:
        console.print(
            f"[yellow]{result.rejected:,} rejected record(s) with line and reason in "
            f"{result.rejects_path}[/]"
        )
