"""Helpers shared by the CLI modules: output, errors, the database engine."""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from typing import Any, NoReturn

import click
from rich.console import Console
from sqlalchemy import Engine

console = Console()
err_console = Console(stderr=True, soft_wrap=True)

json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for machines.")


def print_json(obj: Any) -> None:
    """Print one JSON document on stdout."""
    click.echo(json.dumps(obj, default=str, indent=None))


def fail(message: str, code: int = 1) -> NoReturn:
    """Print a one-line error on stderr and exit non-zero."""
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, markup=True)
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
    from nurture.db import get_engine

    return get_engine()
