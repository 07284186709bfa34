"""``nurture crm deletions``: the CRM deletion queue that erasure fills, and its parked rows."""

from __future__ import annotations

import click
from rich.table import Table

from nurture.cli.common import console, engine, json_option, parse_now, print_json, shown


@click.command()
@click.option("--connector", "connector", default=None, help="Only this connector's.")
@click.option(
    "--requeue",
    is_flag=True,
    help="Put the parked deletions back in the queue (after fixing their cause); the next "
    "tick tries them.",
)
@click.option("--now", "now_text", default=None, help="The instant (ISO 8601).")
@json_option
def deletions(connector: str | None, requeue: bool, now_text: str | None, as_json: bool) -> None:
    """List the CRM deletions still to do (queued or parked), with their last error.

    Each erased person's CRM records are deleted by the tick's crm-deletions stage; a
    deletion that keeps failing is parked, never dropped, and waits here.
    """
    from nurture.privacy.erasure import pending_crm_deletions, requeue_crm_deletions

    if requeue:
        count = requeue_crm_deletions(engine(), parse_now(now_text), connector)
        if as_json:
            print_json({"requeued": count})
        else:
            console.print(f"requeued {count} parked CRM deletions", highlight=False)
        return
    rows = pending_crm_deletions(engine(), connector)
    if as_json:
        print_json([r.as_dict() for r in rows])
        return
    if not rows:
        console.print("no CRM deletions pending", highlight=False)
        return
    parked = sum(r.status == "parked" for r in rows)
    table = Table(title=f"{len(rows)} CRM deletions pending ({parked} parked)")
    for col in ("connector", "object", "id", "status", "attempts", "next attempt", "last error"):
        table.add_column(col, justify="right" if col == "attempts" else "left")
    for r in rows:
        due = "-" if r.status == "parked" else r.next_attempt_at.isoformat(timespec="seconds")
        # A CRM's error message is never read as rich markup, nor sent raw to the terminal.
        table.add_row(
            *map(shown, (r.connector, r.object_type, r.external_id, r.status, r.attempts, due)),
            shown(r.last_error),
        )
    console.print(table)
