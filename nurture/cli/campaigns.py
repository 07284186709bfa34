"""``nurture campaigns``."""

from __future__ import annotations

import click


@click.group()
def campaigns() -> None:
    """(not yet implemented)"""
