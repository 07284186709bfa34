"""``nurture tick``."""

from __future__ import annotations

import click


@click.group()
def tick() -> None:
    """(not yet implemented)"""
