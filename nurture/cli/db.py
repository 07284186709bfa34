"""``nurture db``: schema migrations."""

from __future__ import annotations

import click

from nurture.cli.common import console, shown


@click.group()
def db() -> None:
    """Manage the database schema."""


@db.command()
@click.option("--url", default=None, help="Database URL (default: NURTURE_DATABASE_URL).")
def upgrade(url: str | None) -> None:
    """Apply every pending migration."""
    from nurture.config import get_settings
    from nurture.store.db import make_engine
    from nurture.store.db import upgrade as do_upgrade

    engine = make_engine(url or get_settings().database_url)
    do_upgrade(engine)
    console.print(
        f"database at {shown(engine.url.render_as_string(hide_password=True))} is up to date"
    )
