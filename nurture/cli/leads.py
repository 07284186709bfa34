"""``nurture leads``: import leads from CSV or JSON Lines files."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

import click
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from nurture.cli.common import console, engine, err_console, json_option, print_json, shown
from nurture.spec.touchpoints import Touchpoint


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
@click.option(
    "--consent-basis",
    default=None,
    help="Lawful basis of every row that names none (consent, legitimate_interest, contract, "
    "...); recorded as a consent record with the file as its source.",
)
@click.option(
    "--consent-topic",
    "consent_topics",
    multiple=True,
    help="Topic --consent-basis covers (repeatable) [default: every topic].",
)
@json_option
def import_(
    path: Path,
    source: str,
    rejects_path: Path | None,
    check_deliverability: bool,
    consent_basis: str | None,
    consent_topics: tuple[str, ...],
    as_json: bool,
) -> None:
    """Import leads from PATH, a CSV file with a header row or a JSON Lines file.

    Leads are upserted by normalised email; rows that fail go to a rejects CSV with their
    line number and reason, and the import goes on.
    """
    from nurture.intake.leads import ImportResult, LeadFileError, import_leads

    eng = engine()
    now = datetime.now(UTC)  # the CLI is the edge that may read the clock
    try:
        with contextlib.ExitStack() as stack:
            progress: Callable[[ImportResult], None] | None = None
            if not as_json and err_console.is_terminal:
                bar = stack.enter_context(
                    Progress(
                        SpinnerColumn(),
                        TextColumn("importing {task.description}: {task.completed:,} records read"),
                        TimeElapsedColumn(),
                        console=err_console,
                        transient=True,
                    )
                )
                task = bar.add_task(shown(path.name), total=None)

                def progress(r: ImportResult) -> None:
                    bar.update(task, completed=r.read)

            result = import_leads(
                eng,
                path,
                now=now,
                source=source,
                rejects_path=rejects_path,
                check_deliverability=check_deliverability,
                progress=progress,
                consent_basis=consent_basis,
                consent_topics=consent_topics,
                erased_keys=_erasure_keys(required=False),
            )
    except ValueError as exc:  # a bad --consent-basis or --consent-topic
        err_console.print(f"[bold red]error:[/] {shown(str(exc))}", soft_wrap=True)
        sys.exit(2)
    except LeadFileError as exc:
        # soft_wrap keeps the promised single line however long the path; escape keeps
        # brackets in file names from being read as rich markup.
        err_console.print(f"[bold red]error:[/] {shown(str(exc))}", soft_wrap=True)
        sys.exit(1)
    if as_json:
        print_json(result.as_dict())
        return
    table = Table(title=f"Imported {shown(path.name)}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(justify="right")
    for key in ("read", "inserted", "updated", "duplicates", "rejected", "consents"):
        table.add_row(key, f"{getattr(result, key):,}")
    console.print(table)
    if result.rejects_path is not None:
        console.print(
            f"[yellow]{result.rejected:,} rejected record(s) with line and reason in "
            f"{shown(result.rejects_path)}[/]"
        )


@leads.command("explain")
@click.argument("email")
@click.option(
    "--now", "now_text", default=None, help="Explain the scores at this instant (ISO 8601)."
)
@click.option(
    "--scoring",
    "scoring_path",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Scoring spec [default: scoring.yaml in NURTURE_CAMPAIGNS].",
)
@json_option
def explain(email: str, now_text: str | None, scoring_path: Path | None, as_json: bool) -> None:
    """Explain the scores of the lead with EMAIL: events, fit rules, grade and account."""
    from nurture.cli.common import fail, parse_now
    from nurture.config import get_settings
    from nurture.reporting.explain import LeadNotFound, explain_lead
    from nurture.spec.schema import SpecErrors, load_scoring

    now = parse_now(now_text)
    if scoring_path is None:
        folder = get_settings().campaigns
        scoring_path = next(
            (p for p in (folder / "scoring.yaml", folder / "scoring.yml") if p.exists()), None
        )
    try:
        spec = load_scoring(scoring_path)
    except SpecErrors as exc:
        fail("invalid scoring spec:\n" + "\n".join(f"  {e}" for e in exc.errors))
    try:
        result = explain_lead(engine(), email, spec, now)
    except LeadNotFound as exc:
        fail(str(exc))
    if as_json:
        print_json(result.as_dict())
        return
    console.print(f"[bold]{shown(result.email)}[/] (lead {result.lead_id}) at {now.isoformat()}")
    events = Table(title="behaviour", title_justify="left")
    for col in ("event", "time", "points", "decay", "decayed"):
        events.add_column(col, justify="left" if col in ("event", "time") else "right")
    for e in result.events:
        events.add_row(
            shown(e.type),
            e.occurred_at.isoformat(timespec="seconds"),
            f"{e.points:g}",
            f"{e.decay:.4f}",
            f"{e.decayed:.4f}",
        )
    events.add_section()
    events.add_row("total", "", "", "", f"{result.behaviour:.4f}")
    console.print(events)
    if result.excluded:
        left_out = Table(title="not counted", title_justify="left")
        for col in ("event", "time", "link", "why"):
            # Fold, not truncate: the link and the reasons are the point of this table.
            left_out.add_column(col, overflow="fold")
        for x in result.excluded:
            left_out.add_row(
                x.type,
                x.occurred_at.isoformat(timespec="seconds"),
                shown(x.url or ""),  # a URL is request data: never rich markup
                shown(x.reason),
            )
        console.print(left_out)
    fits = Table(title="fit", title_justify="left")
    fits.add_column("rule")
    fits.add_column("points", justify="right")
    for r in result.fit_rules:
        fits.add_row(shown(r.name), f"{r.points:g}")
    fits.add_section()
    fits.add_row("total", f"{result.fit:g}")
    console.print(fits)
    console.print(f"grade: [bold]{result.grade}[/]")
    if result.account_id is not None:
        acct = Table(
            title=f"account {shown(result.account_name or result.account_id)} "
            f"({result.account_method})",
            title_justify="left",
        )
        for col in ("rank", "contact", "total", "weight", "adds"):
            acct.add_column(col, justify="left" if col == "contact" else "right")
        for c in result.account_contacts:
            acct.add_row(
                str(c.rank),
                shown(c.email),
                f"{c.total:.4f}",
                f"{c.weight:g}",
                f"{c.contribution:.4f}",
            )
        acct.add_section()
        acct.add_row("", "account score", "", "", f"{result.account_score or 0.0:.4f}")
        console.print(acct)


def _erasure_keys(*, required: bool) -> tuple[str, ...]:
    """The keys of erasure hashes: ``NURTURE_SECRET_KEY`` (the first one hashes)."""
    from nurture.cli.common import fail
    from nurture.config import get_settings
    from nurture.errors import ConfigError

    try:
        return get_settings().secret_keys()
    except ConfigError as exc:
        if required:
            fail(str(exc))
        return ()


@leads.command("erase")
@click.argument("emails", nargs=-1)
@click.option(
    "--file",
    "from_file",
    type=click.File("r"),
    default=None,
    help="Also erase the addresses in this file, one a line ('#' starts a comment).",
)
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@json_option
def erase(emails: tuple[str, ...], from_file: IO[str] | None, yes: bool, as_json: bool) -> None:
    """Erase people (GDPR art. 17): every table, CRM deletions queued, a keyed hash kept.

    Campaign and funnel counts stay right: the person's deliveries and events stay as an
    anonymous record. The address is kept only as a keyed hash in the suppression list, so
    a later import or signup is never mailed. On SQLite the database is vacuumed and its
    WAL checkpointed, so the address is in none of its files.
    """
    from nurture.cli.common import fail
    from nurture.privacy.erasure import erase as erase_people

    wanted = list(emails)
    if from_file is not None:
        for line in from_file:
            line = line.split("#", 1)[0].strip()
            if line:
                wanted.append(line)
    if not wanted:
        fail("give at least one EMAIL or --file")
    keys = _erasure_keys(required=True)
    if not yes:
        click.confirm(
            f"Erase {len(wanted)} person(s) permanently? This cannot be undone", abort=True
        )
    result = erase_people(engine(), wanted, datetime.now(UTC), key=keys[0])
    if as_json:
        print_json(result.as_dict())
        return
    console.print(
        f"erased {len(result.erased)}, not found {len(result.not_found)} (suppressed by hash "
        f"all the same); {result.crm_deletions} CRM deletion(s) queued for the next tick"
    )


@leads.command("export")
@click.argument("email")
@json_option
def export(email: str, as_json: bool) -> None:
    """Print everything stored about the person with EMAIL (GDPR arts. 15 and 20).

    The output is JSON either way: it is meant to be handed to the person.
    """
    from nurture.cli.common import fail
    from nurture.privacy.erasure import PersonNotFound
    from nurture.privacy.erasure import export as export_person

    try:
        data = export_person(engine(), email)
    except PersonNotFound as exc:
        fail(str(exc))
    print_json(data)
