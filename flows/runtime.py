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
from nurture.db import get_engine
from nurture.delivery import Mailer, mailer_from_settings
from nurture.programme import Programme


def engine_for(database_url: str | None) -> Engine:
    """The migrated engine for this URL (default: settings)."""
    return get_engine(database_url or get_settings().database_url)


@lru_cache(maxsize=4)
def mailer_for(templates_dir: str | None) -> Mailer:
    """One mailer (and so one pool of SMTP connections) per process."""
    return mailer_from_settings(templates_dir)


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
