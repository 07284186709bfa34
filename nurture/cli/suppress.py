"""``nurture suppress``: the suppression list, which always wins over any campaign."""

from __future__ import annotations

import csv
from datetime import UTC, datetime
from pathlib import Path

import click
from email_validator import EmailNotValidError
from rich.table import Table
from sqlalchemy import func, select

from nurture.cli.common import console, engine, fail, json_option, print_json, shown

REASONS = ["manual", "unsubscribed", "bounced", "complained"]


@click.group()
def suppress() -> None:
    """Addresses that must never get marketing mail."""


def _add(emails: list[str], reason: str, source: str) -> int:
    from nurture.store.db import session_scope
    from nurture.store.suppression import suppress as add_suppressions

    with session_scope(engine()) as session:
        return add_suppressions(session, emails, reason, source, datetime.now(UTC))


@suppress.command("add")
@click.argument("emails", nargs=-1, required=True)
@click.option("--reason", type=click.Choice(REASONS), default="manual", show_default=True)
@json_option
def add(emails: tuple[str, ...], reason: str, as_json: bool) -> None:
    """Suppress one or more addresses."""
    from nurture.intake.leads import normalise_email

    clean: list[str] = []
    for raw in emails:
        try:
            clean.append(normalise_email(raw))
        except EmailNotValidError as exc:
            fail(f"{raw!r} is not a valid email address: {exc}")
    added = _add(clean, reason, "cli")
    if as_json:
        print_json({"added": added, "already": len(set(clean)) - added})
    else:
        console.print(f"suppressed {added} new address(es); {len(set(clean)) - added} already were")


@suppress.command("import")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--reason", type=click.Choice(REASONS), default="manual", show_default=True)
@json_option
def import_(path: Path, reason: str, as_json: bool) -> None:
    """Suppress every address in a file: one per line, or a CSV whose first column or
    ``email`` column holds them. Invalid lines are listed with their line number."""
    from nurture.intake.leads import normalise_email

    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        fail(f"{path}: cannot read: {exc}")
    rows = list(csv.reader(text.splitlines()))
    header = [c.strip().lower() for c in rows[0]] if rows else []
    named = [i for i, name in enumerate(header) if name in ("email", "e-mail")]
    column, start = (named[0], 1) if named else (0, 0)
    clean: list[str] = []
    bad: list[dict[str, object]] = []
    for number, row in enumerate(rows[start:], start=start + 1):
        if not row or not "".join(row).strip():
            continue
        value = row[column] if column < len(row) else ""
        try:
            clean.append(normalise_email(value.strip()))
        except EmailNotValidError as exc:
            bad.append({"line": number, "value": value, "reason": str(exc)})
    added = _add(clean, reason, f"import:{path.name}")
    if as_json:
        print_json({"read": len(clean) + len(bad), "added": added, "invalid": bad})
        return
    console.print(
        f"{shown(path)}: {added} new suppression(s), {len(clean) - added} already suppressed"
    )
    for item in bad:
        console.print(
            f"  {shown(path)}:{item['line']}: {shown(repr(item['value']))}: "
            f"{shown(item['reason'])}",
            highlight=False,
        )


@suppress.command("list")
@click.option("--limit", default=100, show_default=True)
@json_option
def list_(limit: int, as_json: bool) -> None:
    """Show the newest suppressions."""
    from nurture.store.db import session_scope
    from nurture.store.models import Suppression

    with session_scope(engine()) as session:
        total = session.scalar(select(func.count(Suppression.id))) or 0
        rows = session.execute(
            select(
                Suppression.email, Suppression.reason, Suppression.source, Suppression.created_at
            )
            .order_by(Suppression.created_at.desc(), Suppression.id.desc())
            .limit(limit)
        ).all()
    if as_json:
        print_json(
            {
                "total": total,
                "suppressions": [
                    {"email": e, "reason": r, "source": s, "created_at": c.isoformat()}
                    for e, r, s, c in rows
                ],
            }
        )
        return
    table = Table(title=f"suppressions ({total} in all)")
    for col in ("email", "reason", "source", "since"):
        table.add_column(col)
    for e, r, s, c in rows:
        table.add_row(shown(e), shown(r), shown(s or ""), c.strftime("%Y-%m-%d %H:%M"))
    console.print(table)
