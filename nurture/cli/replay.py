"""``nurture replay``: a campaign version over the recorded history, in a scratch copy."""

from __future__ import annotations

import tempfile
from pathlib import Path

import click
from rich.table import Table

from nurture.cli.common import console, engine, fail, json_option, parse_now, print_json, shown


@click.command()
@click.argument("campaign")
@click.option("--since", "since_text", default="30d", show_default=True, help="How far back.")
@click.option("--until", "until_text", default=None, help="End of the replay (default: now).")
@click.option("--version", "version", type=int, default=None, help="A stored version.")
@click.option(
    "--campaigns",
    "campaigns_dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Replay the working copy in this folder instead of a stored version.",
)
@click.option("--every", "every_text", default="1h", show_default=True, help="Tick interval.")
@json_option
def replay(
    campaign: str,
    since_text: str,
    until_text: str | None,
    version: int | None,
    campaigns_dir: Path | None,
    every_text: str,
    as_json: bool,
) -> None:
    """Replay CAMPAIGN over the last --since of history; compare with what was sent.

    Works in a scratch copy: the live database is only read and no mail is sent.
    """
    from nurture.config import get_settings
    from nurture.planning.replay import replay as run_replay
    from nurture.planning.replay import stored_spec, template_note
    from nurture.spec.rules import parse_duration
    from nurture.spec.schema import SpecErrors, load_campaigns, load_scoring, template_exists

    if version is not None and campaigns_dir is not None:
        fail("--version and --campaigns are exclusive: a stored version or the working copy")
    try:
        back, every = parse_duration(since_text), parse_duration(every_text)
    except ValueError as exc:
        fail(f"--since/--every: {exc}")
    until = parse_now(until_text)
    settings = get_settings()
    live = engine()
    folder = campaigns_dir or settings.campaigns
    if campaigns_dir is not None:
        try:
            specs = load_campaigns([campaigns_dir], template_exists(settings.templates))
        except SpecErrors as exc:
            fail("invalid campaign specs:\n" + "\n".join(f"  {e}" for e in exc.errors))
        found = [s for s in specs if s.name == campaign]
        if not found:
            fail(f"no campaign {campaign!r} in {campaigns_dir}")
        spec, label = found[0], f"working copy ({campaigns_dir})"
    else:
        try:
            spec, label = stored_spec(live, campaign, version)
        except ValueError as exc:
            fail(str(exc))
    try:
        scoring = load_scoring(next(iter(folder.glob("scoring.y*ml")), None))
    except SpecErrors as exc:
        fail("invalid scoring spec:\n" + "\n".join(f"  {e}" for e in exc.errors))
    with tempfile.TemporaryDirectory(prefix="nurture-replay-") as tmp:
        try:
            result = run_replay(
                live,
                spec,
                since=until - back,
                until=until,
                workdir=Path(tmp),
                scoring=scoring,
                every=every,
                version=label,
            )
        except ValueError as exc:
            fail(str(exc))
    templates = {"status": "working copy", "differ": []}
    if campaigns_dir is None:
        status, differ = template_note(live, campaign, version, settings.templates, spec)
        templates = {"status": status, "differ": differ}
    if as_json:
        print_json(result.as_json() | {"templates": templates})
        return
    table = Table(
        title=f"replay of {shown(campaign)} {shown(label)}: {result.ticks} ticks from "
        f"{result.since.isoformat()} to {result.until.isoformat()}"
    )
    for col in ("step", "variant", "replayed", "actual", "delta"):
        table.add_column(col, justify="left" if col in ("step", "variant") else "right")
    for step, variant, replayed, actual in result.rows():
        table.add_row(
            shown(step),
            shown(variant or "-"),
            str(replayed),
            str(actual),
            f"{replayed - actual:+d}",
        )
    console.print(table)
    if templates["status"] == "unavailable":
        console.print(
            f"templates: {shown(label)} was stored before template sources were kept; "
            "which templates it sent with is unknown"
        )
    elif templates["status"] == "differ":
        console.print(
            f"templates: {shown(label)} sent with other sources than the working copy of "
            f"{shown(', '.join(templates['differ']))}"
        )
    if result.dropped_events:
        console.print(
            f"{result.dropped_events} recorded opens/clicks were on messages the replay would "
            "not have sent, so they could not happen in it"
        )
