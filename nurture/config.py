"""Settings from the environment (``NURTURE_*``), with embedded defaults for the demo."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

if TYPE_CHECKING:
    from nurture.delivery import Throttle

PROJECT_ROOT = Path(__file__).resolve().parent.parent


class Settings(BaseSettings):
    """Runtime configuration. Secrets are ``SecretStr`` so they never show in reprs or logs."""

    model_config = SettingsConfigDict(env_prefix="NURTURE_", extra="ignore")

    database_url: str = "sqlite:///.nurture/nurture.db"
    smtp_url: SecretStr = SecretStr("smtp://127.0.0.1:8025")
    from_address: str = Field(
        default="Nurture Demo <hello@nurture.example>",
        validation_alias="NURTURE_FROM",
    )
    secret_key: SecretStr = SecretStr("dev-only-secret-change-me")
    tracking_url: str = "http://127.0.0.1:8080"
    imap_url: SecretStr | None = None  # imap://user:pass@host:port/INBOX, for replies/bounces
    webhook_secret: SecretStr | None = None
    ingest_keys: SecretStr | None = None  # comma-separated bearer keys for POST /events
    tracking_max_body: int = 64_000
    # The tracking service's durable event spool (one set of files per serve process).
    spool_dir: Path = Path(".nurture/spool")
    campaigns: Path = PROJECT_ROOT / "campaigns"
    templates: Path = PROJECT_ROOT / "templates" / "emails"
    batch_size: int = 500
    smtp_connections: int = 4
    # Processes that render while the main one sends, for a tick with more than one chunk
    # due (0: always render inline). None: one per core, up to 4, if there are two or more.
    # Each process costs about 0.3 s of CPU to start.
    render_workers: int | None = None
    # Sending caps (messages per second), enforced per tick as budgets and paced in real time.
    max_per_second: float | None = None
    max_per_domain_per_second: float | None = None
    tick_seconds: float = 900.0

    def render_processes(self) -> int:
        """How many render worker processes to use (``render_workers`` resolved)."""
        if self.render_workers is not None:
            return max(0, self.render_workers)
        cores = os.cpu_count() or 1
        return min(cores, 4) if cores > 1 else 0

    def throttle(self) -> Throttle:
        """The sending throttle these settings describe."""
        from nurture.delivery import Throttle

        return Throttle(
            per_second=self.max_per_second,
            per_domain_per_second=self.max_per_domain_per_second,
            tick_seconds=self.tick_seconds,
        )


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Return the process-wide settings, read once from the environment."""
    return Settings()
