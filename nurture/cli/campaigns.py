"""``nurture campaigns``: validate campaign YAML files and list the configured campaigns."""

from __future__ import annotations

import sys
from pathlib import Path

import click
from rich.table import Table

from nurture.cli.common import console, fail, json_option, print_json, shown
from nurture.config import get_settings
from nurture.spec.schema import SpecError, campaign_files, check_campaigns, template_exists


@click.group()
def campaigns() -> None:
    """Validate and list campaign playbooks (YAML)."""


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


@campaigns.command(name="list")
@json_option
def list_(as_json: bool) -> None:
    """List the campaigns in NURTURE_CAMPAIGNS: name, steps, active."""
    folder = get_settings().campaigns
    if not folder.is_dir():
        fail(f"campaign folder {folder} does not exist (set NURTURE_CAMPAIGNS)")
    good, errors = check_campaigns([folder])
    rows = [
        {
            "name": spec.name,
            "file": str(path),
            "steps": len(spec.steps),
            "active": spec.active,
            "description": spec.description,
        }
        for path, spec in good
    ]
    if as_json:
        print_json({"campaigns": rows, "errors": [_error_json(e) for e in errors]})
    else:
        table = Table(title=f"Campaigns in {shown(folder)}")
        table.add_column("name")
        table.add_column("steps", justify="right")
        table.add_column("active")
        table.add_column("description")
        for row in rows:
            table.add_row(
                shown(row["name"]),
                str(row["steps"]),
                "yes" if row["active"] else "no",
                shown(row["description"] or ""),
            )
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
