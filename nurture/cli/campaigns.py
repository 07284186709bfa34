"""``nurture campaigns``: validate campaign YAML files and list the configured campaigns."""

from __future__ import annotations

import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import click
from rich.table import Table
from sqlalchemy.exc import SQLAlchemyError

from nurture.cli.campaign_pause import pause, resume
from nurture.cli.common import console, engine, fail, json_option, parse_now, print_json, shown
from nurture.config import get_settings
from nurture.spec.schema import SpecError, campaign_files, check_campaigns, template_exists


@click.group()
def campaigns() -> None:
    """Validate and list campaign playbooks (YAML)."""


campaigns.add_command(pause)
campaigns.add_command(resume)


def _error_json(err: SpecError) -> dict[str, object]:
    return {"file": err.file, "line": err.line, "key": err.key, "message": err.message}


@campaigns.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--templates",
    "templates_dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Folder of email templates to check names against (default: NURTURE_TEMPLATES).",
)
@json_option
def validate(paths: tuple[Path, ...], templates_dir: Path | None, as_json: bool) -> None:
    """Check campaign files (or folders of them): keys, rules, steps and templates.

    Prints every problem as ``file:line: key.path: message`` and exits 1 if there is any.
    """
    templates_dir = templates_dir or get_settings().templates
    if not templates_dir.is_dir():
        fail(
            f"template folder {templates_dir} does not exist (set NURTURE_TEMPLATES or --templates)"
        )
    files = campaign_files(paths)
    good, errors = check_campaigns(files, template_exists(templates_dir))
    if not files:
        errors = [
            SpecError(str(p), None, "", "no campaign files (*.yaml, *.yml) here") for p in paths
        ]
    if as_json:
        print_json(
            {
                "ok": not errors,
                "campaigns": [spec.name for _, spec in good],
                "errors": [_error_json(e) for e in errors],
            }
        )
    else:
        for path, spec in good:
            steps = len(spec.steps)
            click.echo(
                f"{click.style('OK', fg='green')} {path}: {spec.name} "
                f"({steps} step{'s' if steps != 1 else ''})"
            )
        for err in errors:
            # Plain echo, not rich: a linter line must not wrap or be read as markup.
            click.echo(str(err))
        if errors:
            bad_files = len({e.file for e in errors})
            click.echo(
                f"{len(errors)} error{'s' if len(errors) != 1 else ''} in {bad_files} "
                f"file{'s' if bad_files != 1 else ''}",
                err=True,
            )
    if errors:
        sys.exit(1)


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def _schedule_text(row: dict[str, Any]) -> str:
    parts = []
    if row["starts_at"] or row["ends_at"]:
        parts.append(f"enrolls {row['starts_at'] or '...'} to {row['ends_at'] or '...'}")
    if row["stop_at"]:
        parts.append(f"stops {row['stop_at']}")
    if row["send_at"]:
        parts.append(", ".join(f"{k} at {v} local" for k, v in row["send_at"].items()))
    return "; ".join(parts)


@campaigns.command(name="list")
@click.option("--now", "now_text", default=None, help="The instant states are judged at.")
@json_option
def list_(now_text: str | None, as_json: bool) -> None:
    """List the campaigns in NURTURE_CAMPAIGNS: name, steps, state, schedule, pause."""
    from nurture.journey.pauses import campaign_state, paused_campaigns
    from nurture.store.db import session_scope

    folder = get_settings().campaigns
    if not folder.is_dir():
        fail(f"campaign folder {folder} does not exist (set NURTURE_CAMPAIGNS)")
    now = parse_now(now_text)
    good, errors = check_campaigns([folder])
    try:
        with session_scope(engine()) as session:
            paused = paused_campaigns(session)
    except SQLAlchemyError as exc:
        # The files can still be listed; only the pauses need the database.
        paused = {}
        reason = str(exc).splitlines()[0]
        click.echo(f"warning: pauses not shown, the database is unreachable: {reason}", err=True)
    rows: list[dict[str, Any]] = [
        {
            "name": spec.name,
            "file": str(path),
            "steps": len(spec.steps),
            "active": spec.active,
            "state": campaign_state(spec, paused.get(spec.name), now),
            "starts_at": _iso(spec.starts_at),
            "ends_at": _iso(spec.ends_at),
            "stop_at": _iso(spec.stop_at),
            "send_at": {s.id: s.send_at for s in spec.steps if s.send_at},
            "paused": paused[spec.name].as_json() if spec.name in paused else None,
            "description": spec.description,
        }
        for path, spec in good
    ]
    if as_json:
        print_json({"campaigns": rows, "errors": [_error_json(e) for e in errors]})
    else:
        table = Table(title=f"Campaigns in {shown(folder)}")
        # Names and states never wrap (a linter-like list is read by name); the schedule
        # and description columns take what room is left.
        table.add_column("name", no_wrap=True)
        table.add_column("steps", justify="right", no_wrap=True)
        table.add_column("active", no_wrap=True)
        table.add_column("state", no_wrap=True)
        scheduled = any(_schedule_text(row) for row in rows)
        if scheduled:
            table.add_column("schedule")
        table.add_column("description")
        for row in rows:
            state = str(row["state"])
            if row["paused"]:
                state = f"[bold red]paused[/]: {shown(row['paused']['reason'])}"
            cells = [
                shown(row["name"]),
                str(row["steps"]),
                "yes" if row["active"] else "no",
                state,
                *([shown(_schedule_text(row))] if scheduled else []),
                shown(row["description"] or ""),
            ]
            table.add_row(*cells)
        console.print(table)
        for err in errors:
            click.echo(str(err), err=True)
        if errors:
            click.echo(
                f"{len({e.file for e in errors})} invalid file(s) skipped: "
                "run `nurture campaigns validate` for details",
                err=True,
            )
    if errors:
        sys.exit(1)
