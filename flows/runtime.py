"""Process-level resources for flow runs: engines and mailers, built once per process.

Tasks take plain values (a database URL, an ISO timestamp) so Prefect never has to
serialise an engine or an SMTP connection; they look the live objects up here.
"""

from __future__ import annotations

from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path

from sqlalchemy import Engine

from nurture.config import get_settings
from nurture.outbox.delivery import Mailer, mailer_from_settings
from nurture.spec.programme import Programme
from nurture.store.db import get_engine


def engine_for(database_url: str | None) -> Engine:
    """The migrated engine for this URL (default: settings)."""
    return get_engine(database_url or get_settings().database_url)


@lru_cache(maxsize=4)
def mailer_for(templates_dir: str | None, smtp_block: str | None = None) -> Mailer:
    """One mailer (and so one pool of SMTP connections) per process and SMTP block.

    With ``smtp_block`` the server and From address come from that :class:`NurtureSmtp`
    block (loaded once per process: a process worker starts one process per flow run, so
    an edited block takes effect on the next run); without it, from ``NURTURE_SMTP_URL``.
    """
    if not smtp_block:
        return mailer_from_settings(templates_dir)
    from nurture.flows.blocks import smtp_settings

    url, from_address = smtp_settings(smtp_block)
    return mailer_from_settings(templates_dir, smtp_url=url, from_address=from_address)


@lru_cache(maxsize=4)
def programme_for(campaigns_dir: str | None, templates_dir: str | None) -> Programme:
    """The validated programme from git, loaded once per process."""
    settings = get_settings()
    return Programme.load(
        Path(campaigns_dir or settings.campaigns), Path(templates_dir or settings.templates)
    )


def parse_now(now: str | None) -> datetime:
    """``now`` from a flow parameter: ISO 8601, or the current time when empty."""
    if not now:
        return datetime.now(UTC)
    value = datetime.fromisoformat(now)
    return value if value.tzinfo else value.replace(tzinfo=UTC)
