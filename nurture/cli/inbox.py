"""``nurture inbox``: read replies and bounces from the mailbox at ``NURTURE_IMAP_URL``."""

from __future__ import annotations

from datetime import UTC, datetime

import click
from rich.table import Table

from nurture.cli.common import console, engine, fail, json_option, print_json, shown


@click.group()
def inbox() -> None:
    """Reply and bounce detection over IMAP."""


@inbox.command()
@click.option("--batch-size", default=100, show_default=True, help="Messages per round trip.")
@json_option
def poll(batch_size: int, as_json: bool) -> None:
    """Record replies and DSN bounces from the unseen messages of the mailbox.

    The mailbox is NURTURE_IMAP_URL, e.g. imap://user:pass@host:143/INBOX or imaps://...
    Processed messages are flagged \\Seen once their events are stored.
    """
    from nurture.config import get_settings
    from nurture.engagement.inbox import ImapConfig, InboxError, poll_inbox

    secret = get_settings().imap_url
    url = secret.get_secret_value() if secret else None
    if not url:
        fail("NURTURE_IMAP_URL is not set (imap://user:pass@host:port/INBOX)")
    try:
        config = ImapConfig.from_url(url)
    except ValueError as exc:
        fail(str(exc))
    now = datetime.now(UTC)  # the CLI is the edge that may read the clock
    try:
        report = poll_inbox(engine(), config, now, batch_size=batch_size)
    except InboxError as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"cannot reach IMAP server {config.host}:{config.port}: {exc}")
    if as_json:
        print_json(report.as_dict())
        return
    table = Table(title=f"inbox {shown(config.mailbox)}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(justify="right")
    for key in (
        "fetched",
        "replies",
        "bounces",
        "hard_bounces",
        "auto_replies",
        "other",
        "unmatched",
        "inserted",
        "duplicates",
        "suppressed",
        "marked_seen",
    ):
        table.add_row(key.replace("_", " "), f"{getattr(report, key):,}")
    console.print(table)
    for uid, reason in report.failed:
        console.print(f"[yellow]message uid {uid} left unseen: {shown(reason)}[/]")
