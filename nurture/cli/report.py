"""``nurture report``: the funnel, stage, speed-to-lead, A/B, health and back-test report."""

from __future__ import annotations

from pathlib import Path

import click
from rich.console import Console
from rich.table import Table as RichTable

from nurture.cli.common import console, engine, fail, parse_time, print_json, shown


@click.command()
@click.option("--campaign", default=None, help="Only leads enrolled in this campaign.")
@click.option("--since", "since_text", default=None, help="Period start (ISO 8601, inclusive).")
@click.option("--until", "until_text", default=None, help="Period end (ISO 8601, exclusive).")
@click.option(
    "--by",
    type=click.Choice(["touchpoint", "campaign", "variant", "owner"]),
    default="touchpoint",
    show_default=True,
    help="Breakdown of the leads captured in the period.",
)
@click.option(
    "--metric",
    type=click.Choice(["opened", "clicked", "replied"]),
    default="clicked",
    show_default=True,
    help="What the A/B tests compare, per delivered message.",
)
@click.option(
    "--min-sends",
    default=100,
    show_default=True,
    help="Sends a campaign version should gather before it changes (health).",
)
@click.option(
    "--promote-winners",
    is_flag=True,
    help="Print the YAML change that keeps each significant A/B winner (files are not edited).",
)
@click.option(
    "--campaigns",
    "campaigns_dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Folder with pipeline.yaml (default: NURTURE_CAMPAIGNS).",
)
@click.option(
    "--count-machines",
    is_flag=True,
    help="Count opens and clicks by security gateways and privacy proxies as engagement "
    "(by default only people's count; the machines' are shown apart).",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON for machines.")
@click.option("--markdown", "as_markdown", is_flag=True, help="Print markdown.")
@click.option(
    "--html",
    "html_path",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Also write a self-contained HTML report with charts to this file.",
)
def report(
    campaign: str | None,
    since_text: str | None,
    until_text: str | None,
    by: str,
    metric: str,
    min_sends: int,
    promote_winners: bool,
    campaigns_dir: Path | None,
    count_machines: bool,
    as_json: bool,
    as_markdown: bool,
    html_path: Path | None,
) -> None:
    """Stages, transitions, time in stage, speed to lead, steps, A/B tests, health, back-test."""
    from nurture.config import get_settings
    from nurture.reporting.report import Period, build_report, report_markdown, report_tables
    from nurture.spec.schema import SpecErrors, load_pipeline

    if as_json and as_markdown:
        fail("--json and --markdown are exclusive: pick one output format")
    period = Period(parse_time("--since", since_text), parse_time("--until", until_text))
    if period.since and period.until and period.since >= period.until:
        fail(f"--since ({since_text}) must be before --until ({until_text})")
    folder = campaigns_dir or get_settings().campaigns
    pipeline_file = next(
        (folder / n for n in ("pipeline.yaml", "pipeline.yml") if (folder / n).exists()), None
    )
    try:
        pipeline = load_pipeline(pipeline_file)
    except SpecErrors as exc:
        fail("invalid pipeline spec:\n" + "\n".join(f"  {e}" for e in exc.errors))
    try:
        result = build_report(
            engine(),
            pipeline,
            campaign=campaign,
            period=period,
            by=by,
            metric=metric,
            min_sends=min_sends,
            count_machine=count_machines,
        )
    except ValueError as exc:
        fail(str(exc))
    written = None
    if html_path is not None:
        from nurture.reporting.html_report import write_html

        written = write_html(result, html_path)
    promotions = [ab.promotion for ab in result.ab_tests if ab.promotion]
    if as_json:
        data = result.as_dict()
        data["html"] = str(written) if written else None
        print_json(data)
        return
    if as_markdown:
        click.echo(report_markdown(result))
    else:
        wide = Console(width=max(console.width, 120))
        for table in report_tables(result):
            rich_table = RichTable(
                title=shown(table.title), caption=shown(table.note) if table.note else None
            )
            for i, col in enumerate(table.columns):
                rich_table.add_column(shown(col), justify="left" if i == 0 else "right")
            for row in table.rows:
                rich_table.add_row(*map(shown, row))
            wide.print(rich_table)
    if promote_winners:
        if promotions:
            click.echo("# Make these changes to the campaign YAML to keep each winner:")
            click.echo("\n".join(promotions))
        else:
            click.echo("# No significant A/B winner to promote.")
    if written:
        click.echo(f"HTML report: {written}")
