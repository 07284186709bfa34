"""``nurture crm push|pull|status|parked|retry|deletions``: the promotion queue, the CRM
pull-back and the deletion queue, without Prefect."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import click
from rich.table import Table

from nurture.cli.common import console, engine, fail, json_option, parse_now, print_json, shown
from nurture.cli.crm_deletions import deletions

connector_option = click.option(
    "--connector", "names", multiple=True, help="Connector name (repeatable); default: all in use."
)
dry_run_option = click.option(
    "--dry-run", is_flag=True, help="Print the changes it would write, and write nothing."
)
now_option = click.option("--now", "now_text", default=None, help="The instant (ISO 8601).")


def _names(names: tuple[str, ...], now: datetime) -> list[str]:
    from nurture.crm import available_connectors
    from nurture.crm.sync import connector_status

    known = available_connectors()
    for name in names:
        if name not in known:
            fail(f"--connector: unknown connector {name!r}; installed: {', '.join(known)}")
    return list(names) or sorted(n for n in connector_status(engine(), now) if n in known)


def _load(name: str) -> Any:
    from nurture.crm import ConnectorError, load_connector

    try:
        return load_connector(name)
    except ConnectorError as exc:  # e.g. missing credentials in the environment
        fail(f"connector {name}: {exc}")


def _close(connector: Any) -> None:
    close = getattr(connector, "close", None)  # optional: not part of the protocol
    if callable(close):
        close()


def _pipeline() -> Any:
    from nurture.config import get_settings
    from nurture.spec.schema import SpecErrors, load_pipeline

    try:
        return load_pipeline(get_settings().campaigns / "pipeline.yaml")
    except SpecErrors as exc:
        fail("invalid pipeline.yaml:\n" + "\n".join(f"  {e}" for e in exc.errors))


def _park_after() -> Any:
    from nurture.config import get_settings

    return get_settings().crm_park_after


@click.group()
def crm() -> None:
    """Push promoted leads to CRMs, pull stage changes back, show the queue."""


crm.add_command(deletions)


@crm.command()
@connector_option
@dry_run_option
@now_option
@json_option
def push(names: tuple[str, ...], dry_run: bool, now_text: str | None, as_json: bool) -> None:
    """Push the due promotions through their connectors."""
    from nurture.crm.promotions import process_promotions
    from nurture.crm.sync import due_promotions

    now = parse_now(now_text)
    selected = _names(names, now)
    if dry_run:
        plan = {
            name: [
                {"lead_id": r.lead_id, "email": r.email, "stage": r.stage,
                 "match": f"id {r.external_id}" if r.external_id else "email",
                 "attempts": r.attempts}
                for r in due_promotions(engine(), name, now)
            ]
            for name in selected
        }  # fmt: skip
        if as_json:
            print_json({"dry_run": True, "push": plan})
            return
        table = Table(title=f"would push at {now.isoformat()}")
        for col in ("connector", "lead", "email", "stage", "match", "attempts"):
            table.add_column(col)
        for name, rows in plan.items():
            for r in rows:
                table.add_row(shown(name), str(r["lead_id"]), shown(r["email"]),
                              shown(r["stage"]), shown(r["match"]), str(r["attempts"]))  # fmt: skip
        console.print(table)
        return
    connectors = {name: _load(name) for name in selected}
    try:
        with console.status("pushing promotions...", spinner="dots"):
            report = process_promotions(
                engine(), connectors, _pipeline(), now, park_after=_park_after()
            )
    finally:
        for conn in connectors.values():
            _close(conn)
    out = {
        "pushed": report.pushed,
        "retry": report.retry,
        "parked": report.parked,
        "by_connector": dict(report.by_connector),
        "errors": report.errors,
    }
    if as_json:
        print_json(out)
        return
    console.print(
        f"pushed {report.pushed}, to retry {report.retry}, parked {report.parked}", highlight=False
    )
    for err in report.errors:
        console.print(f"  [yellow]parked[/] {shown(err)}", highlight=False)


@crm.command()
@connector_option
@dry_run_option
@now_option
@click.option(
    "--contacts",
    is_flag=True,
    help="Intake: import the contacts created in each CRM since its mark as new leads "
    "(deduplicated by email, linked to their CRM record) instead of pulling stage changes.",
)
@json_option
def pull(
    names: tuple[str, ...], dry_run: bool, now_text: str | None, contacts: bool, as_json: bool
) -> None:
    """Pull stage changes since the high-water mark and record them as transitions."""
    from nurture.crm import ConnectorError
    from nurture.crm.sync import sync_stage_changes

    now = parse_now(now_text)
    if contacts:
        _intake(names, dry_run, now, as_json)
        return
    pipeline = _pipeline()
    reports = []
    for name in _names(names, now):
        conn = _load(name)
        try:
            reports.append(sync_stage_changes(engine(), conn, pipeline, now, dry_run=dry_run))
        except ConnectorError as exc:
            fail(f"connector {name}: {exc}")
        finally:
            _close(conn)
    if as_json:
        print_json(
            [
                {**r.summary(), "moves": [
                    {"lead_id": m.lead_id, "email": m.email, "from": m.from_stage,
                     "to": m.to_stage, "external_id": m.external_id,
                     "occurred_at": m.occurred_at.isoformat()} for m in r.moves]}
                for r in reports
            ]
        )  # fmt: skip
        return
    for r in reports:
        verb = "would move" if dry_run else "moved"
        console.print(
            f"{shown(r.connector)}: pulled {r.pulled}, {verb} {len(r.moves)}, echoes {r.echoes}, "
            f"stale {r.stale}, unknown {r.unknown}",
            highlight=False,
        )
        for m in r.moves:
            console.print(
                f"  {shown(m.email)}: {shown(m.from_stage)} -> {shown(m.to_stage)}",
                highlight=False,
            )


def _intake(names: tuple[str, ...], dry_run: bool, now: datetime, as_json: bool) -> None:
    """``crm pull --contacts``: contacts created in each CRM become leads.

    One failing CRM (credentials, an outage mid-way) does not stop the others: what it
    stored before failing stays, it is reported, and the command exits 1 at the end.
    """
    from nurture.crm import ConnectorError, ContactSource, load_connector
    from nurture.crm.intake import IntakeReport, intake_contacts

    reports: list[IntakeReport] = []
    for name in _names(names, now):
        try:
            conn = load_connector(name)
        except ConnectorError as exc:  # e.g. missing credentials in the environment
            reports.append(IntakeReport(connector=name, error=str(exc)))
            continue
        try:
            if not isinstance(conn, ContactSource):
                if names:  # asked for by name: say why nothing happened
                    reports.append(
                        IntakeReport(connector=name, error="does not support contact intake")
                    )
                continue
            reports.append(intake_contacts(engine(), conn, now, dry_run=dry_run))
        except ConnectorError as exc:
            reports.append(IntakeReport(connector=name, error=str(exc)))
        finally:
            _close(conn)
    failed = [r for r in reports if r.error]
    if as_json:
        print_json([r.summary() for r in reports])
    else:
        for r in reports:
            verb = "would create" if dry_run else "created"
            console.print(
                f"{shown(r.connector)}: pulled {r.pulled} contacts, {verb} {r.created} leads, "
                f"linked {r.existing} existing, {r.duplicates} duplicate, {len(r.invalid)} invalid",
                highlight=False,
            )
            for item in r.invalid:
                console.print(f"  [yellow]skipped[/] {shown(item)}", highlight=False)
    if failed:
        fail(
            "; ".join(
                f"connector {r.connector}: {r.error}"
                + (f" (kept {r.created} new leads pulled before)" if r.created else "")
                for r in failed
            )
        )


@crm.command()
@connector_option
@now_option
@json_option
def status(names: tuple[str, ...], now_text: str | None, as_json: bool) -> None:
    """Queue counts, parked promotions with their reasons, links and last pull."""
    from nurture.crm.sync import connector_status

    now = parse_now(now_text)
    stats = connector_status(engine(), now)
    if names:
        stats = {n: s for n, s in stats.items() if n in names}
    if as_json:
        print_json([s.summary() for s in stats.values()])
        return
    table = Table(title="CRM connectors")
    for col in ("connector", "queued", "due", "done", "parked", "links", "last pull"):
        table.add_column(col, justify="left" if col in ("connector", "last pull") else "right")
    for s in stats.values():
        table.add_row(shown(s.connector), str(s.queued), str(s.due), str(s.done), str(s.parked),
                      str(s.links), s.last_pull.isoformat() if s.last_pull else "-")  # fmt: skip
    console.print(table)
    for s in stats.values():
        for reason in s.parked_reasons:
            console.print(
                f"  [yellow]{shown(s.connector)} parked[/] {shown(reason)}", highlight=False
            )


@crm.command()
@click.option("--connector", "connector", default=None, help="Only this connector's.")
@click.option("--reason", default=None, help="Only those whose reason contains TEXT.")
@json_option
def parked(connector: str | None, reason: str | None, as_json: bool) -> None:
    """List parked promotions with their reasons (requeue them with `nurture crm retry`)."""
    from nurture.crm.promotions import parked_promotions

    rows = parked_promotions(engine(), connector=connector, reason=reason)
    if as_json:
        print_json([r.as_dict() for r in rows])
        return
    if not rows:
        console.print("no parked promotions", highlight=False)
        return
    table = Table(title=f"{len(rows)} parked promotions")
    for col in ("connector", "lead", "email", "stage", "attempts", "parked at", "reason"):
        table.add_column(col, justify="right" if col in ("lead", "attempts") else "left")
    for r in rows:
        parked_at = r.parked_at.isoformat(timespec="seconds") if r.parked_at else "-"
        # An email or a CRM's error message is never read as rich markup, and its control
        # characters are shown, not sent to the terminal.
        table.add_row(
            *map(shown, (r.connector, r.lead_id, r.email, r.stage, r.attempts, parked_at)),
            shown(r.reason),
        )
    console.print(table)


@crm.command()
@click.option("--connector", "connector", default=None, help="Only this connector's.")
@click.option("--reason", default=None, help="Only those whose reason contains TEXT.")
@now_option
@json_option
def retry(connector: str | None, reason: str | None, now_text: str | None, as_json: bool) -> None:
    """Requeue parked promotions (after fixing their cause); the next push tries them."""
    from nurture.crm.promotions import requeue_parked

    count = requeue_parked(engine(), parse_now(now_text), connector=connector, reason=reason)
    if as_json:
        print_json({"requeued": count})
        return
    console.print(f"requeued {count} parked promotions", highlight=False)
