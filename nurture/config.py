"""Settings from the environment (``NURTURE_*``), with embedded defaults for the demo."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

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
    campaigns: Path = PROJECT_ROOT / "campaigns"
    templates: Path = PROJECT_ROOT / "templates" / "emails"
    batch_size: int = 500
    smtp_connections: int = 4


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Return the process-wide settings, read once from the environment."""
    return Settings()
