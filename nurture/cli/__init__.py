"""The ``nurture`` command. Each sub-command group lives in its own module here."""

from __future__ import annotations

import click

from nurture.cli import (
    campaigns,
    crm,
    db,
    demo,
    events,
    inbox,
    leads,
    report,
    serve,
    suppress,
    templates,
    tick,
)
from nurture.cli.common import fail
from nurture.errors import NurtureError


@click.group()
@click.version_option(package_name="nurture")
def cli() -> None:
    """Lead-nurturing automation: import, segment, sequence, score and promote leads."""


cli.add_command(db.db)
cli.add_command(leads.leads)
cli.add_command(campaigns.campaigns)
cli.add_command(templates.templates)
cli.add_command(tick.tick)
cli.add_command(suppress.suppress)
cli.add_command(demo.demo)
cli.add_command(events.events)
cli.add_command(serve.serve)
cli.add_command(inbox.inbox)
cli.add_command(crm.crm)
cli.add_command(report.report)


def main() -> None:
    """Console-script entry point: a :class:`NurtureError` becomes one line and exit 1."""
    try:
        cli()
    except NurtureError as exc:
        fail(str(exc))  # fail() escapes it
