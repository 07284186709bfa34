"""The ``nurture`` command. Each sub-command group lives in its own module here.

Packages may add commands through the ``nurture.commands`` entry point group (the demo,
which runs Prefect flows, comes from :mod:`flows` that way); they are imported only when
invoked, so the core never imports them and ``nurture --help`` stays fast.
"""

from __future__ import annotations

from importlib.metadata import EntryPoint, entry_points

import click

from nurture.cli import (
    campaigns,
    crm,
    db,
    doctor,
    events,
    inbox,
    init,
    leads,
    plan,
    replay,
    report,
    serve,
    suppress,
    templates,
    tick,
)
from nurture.cli.common import fail
from nurture.errors import NurtureError

COMMAND_GROUP = "nurture.commands"


class _PluginGroup(click.Group):
    """A group that also offers the commands registered under ``nurture.commands``."""

    def _plugins(self) -> dict[str, EntryPoint]:
        return {ep.name: ep for ep in entry_points(group=COMMAND_GROUP)}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self._plugins()})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        found = super().get_command(ctx, cmd_name)
        if found is not None:
            return found
        ep = self._plugins().get(cmd_name)
        command = ep.load() if ep is not None else None
        return command if isinstance(command, click.Command) else None


@click.group(cls=_PluginGroup)
@click.version_option(package_name="nurture")
def cli() -> None:
    """Lead-nurturing automation: import, segment, sequence, score and promote leads."""


cli.add_command(db.db)
cli.add_command(leads.leads)
cli.add_command(campaigns.campaigns)
cli.add_command(templates.templates)
cli.add_command(tick.tick)
cli.add_command(suppress.suppress)
cli.add_command(events.events)
cli.add_command(serve.serve)
cli.add_command(inbox.inbox)
cli.add_command(crm.crm)
cli.add_command(report.report)
cli.add_command(init.init)
cli.add_command(doctor.doctor)
cli.add_command(plan.plan)
cli.add_command(replay.replay)


def main() -> None:
    """Console-script entry point: a :class:`NurtureError` becomes one line and exit 1."""
    try:
        cli()
    except NurtureError as exc:
        fail(str(exc))  # fail() escapes it
