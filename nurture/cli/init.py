"""``nurture init DIR``: scaffold a programme repository (campaigns, templates, deployments)."""

from __future__ import annotations

from pathlib import Path

import click

from nurture.cli.common import console, json_option, print_json, shown


@click.command("init")
@click.argument("directory", type=click.Path(path_type=Path), default=Path("."))
@json_option
def init(directory: Path, as_json: bool) -> None:
    """Scaffold a programme repository in DIRECTORY (default: here).

    Writes the starter campaigns (with scoring.yaml and pipeline.yaml), the email
    templates, a prefect.yaml that deploys the installed flows, .env.example and a
    README. Existing files are never overwritten: if any is in the way, nothing is written.
    """
    from nurture.scaffold import init_programme

    written = init_programme(directory)  # NurtureError -> one line, exit 1 (cli.main)
    if as_json:
        print_json({"directory": str(directory), "files": [str(p) for p in written]})
        return
    console.print(f"[bold]nurture init[/]: {len(written)} files in {shown(directory)}")
    console.print(
        f"next: cd {shown(directory)} && nurture campaigns validate campaigns "
        "&& nurture templates lint (README.md says how to deploy)",
        highlight=False,
    )
