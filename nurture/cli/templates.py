"""``nurture templates``."""

from __future__ import annotations

import click


@click.group()
def templates() -> None:
    """(not yet implemented)"""
