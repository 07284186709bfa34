"""``nurture campaigns pause`` / ``resume``: the emergency stop, without a deploy."""

from __future__ import annotations

import getpass

import click

from nurture.cli.common import console, engine, json_option, parse_now, print_json, shown


def _operator() -> str | None:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no user name in this environment (a bare container)
        return None


@click.command()
@click.argument("name")
@click.option("--reason", required=True, help="Why: shown to whoever resumes it.")
@click.option("--now", "now_text", default=None, help="When (ISO 8601); default: now.")
@json_option
def pause(name: str, reason: str, now_text: str | None, as_json: bool) -> None:
    """Pause campaign NAME at once: its queued mail stays queued and nothing of it is sent.

    Ticks stop enrolling into it and advancing it until `nurture campaigns resume NAME`.
    """
    from nurture.journey.pauses import pause as do_pause
    from nurture.store.db import session_scope

    now = parse_now(now_text)
    with session_scope(engine()) as session:
        info, new = do_pause(session, name, reason, now, by=_operator())
    if as_json:
        print_json({"paused": True, "new": new, **info.as_json()})
        return
    if new:
        console.print(f"[bold red]paused[/] {shown(name)}: {shown(info.reason)}")
    else:
        console.print(
            f"{shown(name)} was already paused since {info.paused_at.isoformat()}: "
            f"{shown(info.reason)}"
        )


@click.command()
@click.argument("name")
@click.option("--now", "now_text", default=None, help="When (ISO 8601); default: now.")
@json_option
def resume(name: str, now_text: str | None, as_json: bool) -> None:
    """Resume campaign NAME: the next tick sends its queued mail and moves its leads on."""
    from nurture.journey.pauses import resume as do_resume
    from nurture.store.db import session_scope

    now = parse_now(now_text)
    with session_scope(engine()) as session:
        info = do_resume(session, name, now, by=_operator())
    if as_json:
        print_json(
            {"paused": False, "resumed": info is not None, "campaign": name}
            | ({"pause": info.as_json()} if info else {})
        )
        return
    if info is None:
        console.print(f"{shown(name)} was not paused")
    else:
        console.print(
            f"[bold green]resumed[/] {shown(name)} (paused since {info.paused_at.isoformat()}: "
            f"{shown(info.reason)})"
        )
