"""Helpers shared by the CLI modules: output, errors, the database engine."""

from __future__ import annotations

import json
import sys
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


def engine() -> Engine:
    """The configured database engine, migrated to the current schema."""
    from nurture.db import get_engine

    return get_engine()
