"""``nurture plan``: what a change to the campaign files will do, before it does it."""

from __future__ import annotations

import sys
from pathlib import Path

import click
from rich.table import Table

from nurture.cli.common import console, engine, fail, json_option, parse_now, print_json, shown


@click.command()
@click.option(
    "--campaigns",
    "campaigns_dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Campaign folder (default: NURTURE_CAMPAIGNS).",
)
@click.option(
    "--templates",
    "templates_dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Templates folder (default: NURTURE_TEMPLATES).",
)
@click.option("--days", type=click.IntRange(1, 366), default=14, show_default=True)
@click.option("--now", "now_text", default=None, help="Plan from this instant (ISO 8601).")
@click.option("--all", "include_unchanged", is_flag=True, help="Plan unchanged campaigns too.")
@click.option("--markdown", "as_markdown", is_flag=True, help="Markdown for a pull request.")
@click.option(
    "--rates",
    "rates",
    default="none",
    show_default=True,
    help="Forecast engagement: none (no new engagement) or history (observed rates).",
)
@click.option("--since", "since_text", default="90d", show_default=True, help="History window.")
@click.option(
    "--min-sends",
    "min_sends_text",
    default="50",
    show_default=True,
    help="Sends a step needs for its own rates; fewer fall back to the campaign's.",
)
@json_option
def plan(
    campaigns_dir: Path | None,
    templates_dir: Path | None,
    days: int,
    now_text: str | None,
    include_unchanged: bool,
    as_markdown: bool,
    rates: str,
    since_text: str,
    min_sends_text: str,
    as_json: bool,
) -> None:
    """Show what the campaign files would change: diff, audience, forecast, promotions.

    Reads the live database and writes nothing. Spec or template errors are printed as
    ``file:line: ...`` and exit 1.
    """
    from nurture.config import get_settings
    from nurture.planning.plan import RATES, build_plan, plan_errors, plan_markdown
    from nurture.spec.rules import parse_duration
    from nurture.spec.schema import SpecErrors, load_pipeline

    if as_json and as_markdown:
        fail("--json and --markdown are exclusive: pick one output format")
    if rates not in RATES:
        fail(f"--rates must be one of {', '.join(RATES)}, not {rates!r}")
    try:
        since = parse_duration(since_text)
    except ValueError:
        fail(f"--since {since_text!r} is not a duration (e.g. 90d, 12w)")
    if since.total_seconds() <= 0:
        fail(f"--since {since_text!r} must be longer than zero")
    if not min_sends_text.isdigit() or int(min_sends_text) < 1:
        fail(f"--min-sends {min_sends_text!r} must be a whole number of at least 1")
    settings = get_settings()
    folder = campaigns_dir or settings.campaigns
    tdir = templates_dir or settings.templates
    if not folder.is_dir():
        fail(f"campaign folder {folder} does not exist (set NURTURE_CAMPAIGNS or --campaigns)")
    if not tdir.is_dir():
        fail(f"template folder {tdir} does not exist (set NURTURE_TEMPLATES or --templates)")
    now = parse_now(now_text)
    specs, errors = plan_errors(folder, tdir)
    pipeline = None
    try:
        pipeline = load_pipeline(next(folder.glob("pipeline.y*ml"), None))
    except SpecErrors as exc:
        errors += exc.errors
    result = build_plan(
        engine(),
        specs,
        now,
        days=days,
        pipeline=pipeline,
        errors=errors,
        include_unchanged=include_unchanged,
        templates_dir=tdir,
        rates=rates,
        since=since,
        min_sends=int(min_sends_text),
    )
    if as_json:
        print_json(result.as_json())
    elif as_markdown:
        click.echo(plan_markdown(result), nl=False)
    else:
        _print(result)
    if result.errors:
        if not as_json and not as_markdown:
            for err in result.errors:
                click.echo(str(err))  # plain: a linter line must not wrap or be read as markup
        sys.exit(1)


def _print(result: object) -> None:
    from nurture.planning.plan import Plan

    assert isinstance(result, Plan)
    if result.errors:
        return
    if not result.campaigns:
        console.print("No changes: every campaign matches its stored version.")
        return
    labels = result.day_labels
    for c in result.campaigns:
        version = f", stored v{c.version}" if c.version else ""
        console.rule(f"{shown(c.name)} ({c.status}{version})")
        for ch in c.changes:
            colour = {"added": "green", "removed": "red"}.get(ch.kind, "yellow")
            console.print(f"[{colour}]{shown(str(ch))}[/]", highlight=False)
        a = c.audience
        console.print(
            f"would enter now {a.would_enter:,}; enrolled {a.enrolled:,}; "
            f"would exit {a.would_exit:,}"
            + (f"; [bold red]stranded[/] {shown(a.stranded)}" if a.stranded else "")
            + (f"; promotions now {c.promotions:,}" if c.promotions else "")
        )
        for note in c.notes:
            console.print(f"note: {shown(note)}")
        if c.forecast:
            assumption = "observed rates" if c.rates else "no new engagement"
            table = Table(title=f"{c.total:,} messages in {result.days} days ({assumption})")
            table.add_column("day")
            for step in c.forecast:
                table.add_column(shown(step), justify="right")
            table.add_column("total", justify="right")
            for i, day in enumerate(labels):
                row = [c.forecast[s][i] for s in c.forecast]
                if any(row):
                    table.add_row(day.isoformat(), *(f"{n:,}" for n in row), f"{sum(row):,}")
            console.print(table)
    if result.unchanged:
        console.print(f"unchanged: {shown(', '.join(result.unchanged))}")
