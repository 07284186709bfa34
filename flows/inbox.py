"""The ``inbox_poll`` flow: replies and bounces from the mailbox at ``NURTURE_IMAP_URL``.

Deployed every 5 minutes (``prefect.yaml``), apart from the tick: a reply is recorded within
minutes, and the tick's exit check before every send then stops that lead's sequence; a
DSN hard bounce suppresses its address before the next tick can mail it again.
"""

from __future__ import annotations

from typing import Any

from nurture.flows.artifacts import INBOX_POLL
from nurture.flows.runtime import engine_for, parse_now
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from nurture.config import get_settings
from nurture.engagement.inbox import ImapConfig, poll_inbox

NOT_CONFIGURED = "NURTURE_IMAP_URL is not set"


@flow(name="inbox_poll", timeout_seconds=900)
def inbox_poll(
    now: str | None = None,
    database_url: str | None = None,
    batch_size: int = 100,
) -> dict[str, Any]:
    """Record replies and DSN bounces from the unseen messages of the mailbox.

    Args:
        now: ISO 8601 instant; a message without a usable Date counts as received then.
        database_url: The nurture database (default: ``NURTURE_DATABASE_URL``).
        batch_size: Messages fetched, recorded and flagged ``\\Seen`` per round trip.

    Returns:
        The poll's counts, or ``{"skipped": ...}`` when no mailbox is configured (a
        warning in the run's log, not a failure, so an unused deployment stays quiet).
    """
    logger = get_run_logger()
    secret = get_settings().imap_url
    url = secret.get_secret_value() if secret else ""
    if not url:
        logger.warning("%s: replies and bounces are not being read", NOT_CONFIGURED)
        return {"skipped": NOT_CONFIGURED}
    config = ImapConfig.from_url(url)
    report = poll_inbox(engine_for(database_url), config, parse_now(now), batch_size=batch_size)
    counts = report.as_dict()
    logger.info(
        "inbox %s: %d fetched, %d replies, %d bounces (%d hard), %d left unseen",
        config.mailbox,
        report.fetched,
        report.replies,
        report.bounces,
        report.hard_bounces,
        len(report.failed),
    )
    if report.fetched:
        rows = [f"| {k.replace('_', ' ')} | {v} |" for k, v in counts.items() if k != "failed"]
        create_markdown_artifact(
            "\n".join(["| | count |", "|---|---:|", *rows]) + "\n",
            key=INBOX_POLL,
            description="Replies and bounces read from the inbox",
        )
    return counts
