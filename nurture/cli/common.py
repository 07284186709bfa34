"""Helpers shared by the CLI modules: output, errors, the database engine."""

from __future__ import annotations

import json
import re
import sys
from datetime import UTC, datetime
from typing import Any, NoReturn

import click
from rich.console import Console
from rich.markup import escape
from sqlalchemy import Engine

console = Console()
err_console = Console(stderr=True, soft_wrap=True)

# Characters a terminal acts on instead of showing: C0 controls (TAB and LF aside), DEL,
# C1 controls (ESC's 8-bit twins), and the bidi overrides and isolates that reorder a line.
_UNPRINTABLE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def _visible(match: re.Match[str]) -> str:
    code = ord(match.group(0))
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def shown(value: object) -> str:
    """``value`` as text safe to hand to rich: markup escaped, controls made visible.

    Everything a lead, a CSV file, a CRM or a campaign author typed goes through this
    before rich sees it: ``[/]`` in a stage name would otherwise be read as a closing tag
    (and raise), and an ESC or a bidi override would drive the terminal. Those characters
    are shown as ``\\x1b`` or ``\\u202e`` instead. Lone surrogates are shown the same way
    rather than failing the terminal's encoder.
    """
    text = value if isinstance(value, str) else str(value)
    if _UNPRINTABLE.search(text):
        text = _UNPRINTABLE.sub(_visible, text)
    if not text.isascii():
        # Lone surrogates (undecodable CSV bytes) cannot be written to a UTF-8 terminal.
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return escape(text)


json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for machines.")


def print_json(obj: Any) -> None:
    """Print one JSON document on stdout."""
    click.echo(json.dumps(obj, default=str, indent=None))


def fail(message: str, code: int = 1) -> NoReturn:
    """Print a one-line error on stderr and exit non-zero.

    The message is plain text: it often quotes a value from a file or a lead, so it is
    passed through :func:`shown` here rather than trusted as markup.
    """
    err_console.print(f"[bold red]error:[/] {shown(message)}", highlight=False, markup=True)
    sys.exit(code)


def parse_time(option: str, value: str | None) -> datetime | None:
    """An ISO 8601 option value as an aware datetime (naive means UTC); None when empty."""
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        fail(
            f"{option}: expected an ISO 8601 date or timestamp such as 2026-03-02 or "
            f"2026-03-02T09:00:00Z, got {value!r}"
        )
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def parse_now(value: str | None) -> datetime:
    """``--now``: the given instant, else the current time (the CLI is the edge that may
    read the clock; the core never does)."""
    return parse_time("--now", value) or datetime.now(UTC)


def engine() -> Engine:
    """The configured database engine, migrated to the current schema."""
    from nurture.store.db import get_engine

    return get_engine()
