"""``nurture demo``."""

from __future__ import annotations

import click


@click.group()
def demo() -> None:
    """(not yet implemented)"""
