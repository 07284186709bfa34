"""``nurture leads``."""

from __future__ import annotations

import click


@click.group()
def leads() -> None:
    """(not yet implemented)"""
