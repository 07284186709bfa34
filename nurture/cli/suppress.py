"""``nurture suppress``."""

from __future__ import annotations

import click


@click.group()
def suppress() -> None:
    """(not yet implemented)"""
