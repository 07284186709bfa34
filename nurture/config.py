"""Settings from the environment (``NURTURE_*``), with embedded defaults for the demo."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from functools import lru_cache
from pathlib import Path
from typing import Generic, Literal, TypeVar
from urllib.parse import SplitResult, parse_qs, unquote, urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from nurture.errors import ConfigError

# The source checkout (tests and benchmarks only): after a wheel install this is
# site-packages, so no default may resolve against it.
PROJECT_ROOT = Path(__file__).resolve().parent.parent


K = TypeVar("K")


@dataclass(frozen=True)
class ServerUrl(Generic[K]):
    """A mail server URL (``smtp://``, ``imaps://`` ...) taken apart by :func:`parse_server_url`."""

    kind: K  # what the scheme means to the caller (a security mode, "use SSL" ...)
    host: str
    port: int
    username: str | None
    password: SecretStr | None
    path: str
    timeout: float


def parse_server_url(
    url: str | SecretStr, label: str, schemes: dict[str, tuple[K, int]]
) -> ServerUrl[K]:
    """Parse ``scheme://user:pass@host:port/path?timeout=SECONDS`` for a mail server.

    User, password and path are percent-decoded; the timeout defaults to 30 seconds.

    Args:
        url: The URL, plain or wrapped in a ``SecretStr`` (as the settings keep it).
        label: What the URL is for, in messages ("SMTP", "IMAP").
        schemes: Each accepted scheme with its meaning and default port.

    Raises:
        ValueError: An unknown scheme, a missing host, a bad port or a bad timeout. The
            message shows the URL with its password replaced by ``***``.
    """
    raw = url.get_secret_value() if isinstance(url, SecretStr) else url
    parts = urlsplit(raw.strip())
    shown = _redact(parts)
    scheme = parts.scheme.lower()
    if scheme not in schemes:
        known = ", ".join(f"{s}://" for s in schemes)
        raise ValueError(f"{label} URL {shown}: scheme must be one of {known}")
    kind, default_port = schemes[scheme]
    if not parts.hostname:
        raise ValueError(f"{label} URL {shown}: no host")
    try:
        port = parts.port or default_port
    except ValueError:
        raise ValueError(f"{label} URL {shown}: port must be a number 1-65535") from None
    timeout = 30.0
    query = parse_qs(parts.query)
    if "timeout" in query:
        try:
            timeout = float(query["timeout"][-1])
        except ValueError:
            raise ValueError(f"{label} URL {shown}: timeout must be a number") from None
    return ServerUrl(
        kind=kind,
        host=parts.hostname,
        port=port,
        username=unquote(parts.username) if parts.username else None,
        password=SecretStr(unquote(parts.password)) if parts.password is not None else None,
        path=unquote(parts.path.lstrip("/")),
        timeout=timeout,
    )


def _redact(parts: SplitResult) -> str:
    """The URL with any password replaced, safe for error messages."""
    if parts.password is None:
        return parts.geturl()
    host = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=f"{parts.username or ''}:***@{host}").geturl()


@dataclass(frozen=True)
class Throttle:
    """Sending caps as rates. A tick turns them into budgets over its interval, and what
    exceeds a budget stays queued, in due order, for the next tick."""

    per_second: float | None = None
    per_domain_per_second: float | None = None
    tick_seconds: float = 900.0

    def caps(self) -> tuple[int | None, int | None]:
        """The most one tick may send, overall and per recipient domain (None: no cap)."""

        def cap(rate: float | None) -> int | None:
            return None if rate is None else max(1, int(rate * self.tick_seconds))

        return cap(self.per_second), cap(self.per_domain_per_second)


# The public development key: anyone who reads this file can sign links with it, so it is
# accepted only where NURTURE_ENV=development says so (the demo and the tests).
DEV_SECRET_KEY = "dev-only-secret-change-me"
DEVELOPMENT = "development"


class Settings(BaseSettings):
    """Runtime configuration. Secrets are ``SecretStr`` so they never show in reprs or logs."""

    model_config = SettingsConfigDict(env_prefix="NURTURE_", extra="ignore", populate_by_name=True)

    database_url: str = "sqlite:///.nurture/nurture.db"
    smtp_url: SecretStr = SecretStr("smtp://127.0.0.1:8025")
    from_address: str = Field(
        default="Nurture Demo <hello@nurture.example>",
        validation_alias="NURTURE_FROM",
    )
    # One key, or several separated by commas for rotation: the first signs, all verify.
    secret_key: SecretStr = SecretStr(DEV_SECRET_KEY)
    environment: str = Field(default="production", validation_alias="NURTURE_ENV")
    tracking_url: str = "http://127.0.0.1:8080"
    imap_url: SecretStr | None = None  # imap://user:pass@host:port/INBOX, for replies/bounces
    webhook_secret: SecretStr | None = None
    ingest_keys: SecretStr | None = None  # comma-separated bearer keys for POST /events
    tracking_max_body: int = 64_000
    # The tracking service's durable event spool (one set of files per serve process).
    spool_dir: Path = Path(".nurture/spool")
    # Where the spool is recorded: "process" (a child process, so recording never holds
    # the GIL that answers clicks) or "thread" (a thread of the serving process).
    spool_recorder: Literal["process", "thread"] = "process"
    # A programme's folders, relative to the working directory (the programme repository
    # `nurture init` made, or the worker's checkout of it), wherever nurture is installed.
    campaigns: Path = Path("campaigns")
    templates: Path = Path("templates") / "emails"
    batch_size: int = 500
    smtp_connections: int = 4
    # Compose from skeletons (each template, step and shape of lead data rendered once,
    # checked against the full render, then filled per lead); off: Jinja per message.
    skeletons: bool = True
    # Sending caps (messages per second), enforced per tick as budgets and paced in real time.
    max_per_second: float | None = None
    max_per_domain_per_second: float | None = None
    tick_seconds: float = 900.0
    # How long a promotion may keep failing retryably (CRM outage, 429, 5xx) before it parks:
    # 30m, 12h, 7d, 1w (a bare number is days) or ISO 8601 (P7D). A shorter outage only
    # delays promotions.
    crm_park_after: timedelta = timedelta(days=7)
    # Sales-alert webhooks (Slack or Teams incoming webhooks, or any JSON receiver):
    # "channel=https://...,other=https://..." or one URL for every channel.
    alert_webhooks: SecretStr | None = None

    @field_validator("crm_park_after", mode="before")
    @classmethod
    def _duration(cls, value: object) -> object:
        if isinstance(value, str) and not value.strip().upper().startswith("P"):
            from nurture.spec.rules import parse_duration

            text = value.strip()
            try:
                return parse_duration(float(text))  # a bare number: days, as in campaigns
            except ValueError:
                return parse_duration(text)
        return value

    @property
    def is_development(self) -> bool:
        """Whether ``NURTURE_ENV`` explicitly says this is a development machine."""
        return self.environment.strip().lower() == DEVELOPMENT

    def secret_keys(self) -> tuple[str, ...]:
        """The token keys from ``NURTURE_SECRET_KEY``: the first signs, every one verifies.

        Raises:
            ConfigError: No key is set, or the public development key is among them while
                ``NURTURE_ENV`` is not ``development``: anyone could forge links with it.
        """
        keys = tuple(k.strip() for k in self.secret_key.get_secret_value().split(","))
        keys = tuple(k for k in keys if k)
        if not keys:
            raise ConfigError("NURTURE_SECRET_KEY is empty; set a long random secret")
        if DEV_SECRET_KEY in keys and not self.is_development:
            raise ConfigError(
                "NURTURE_SECRET_KEY is unset or the public development key, so anyone could "
                "forge tracking and unsubscribe links. Set a long random secret (for example "
                "`python -c 'import secrets; print(secrets.token_urlsafe(32))'`), or set "
                "NURTURE_ENV=development on a development machine."
            )
        return keys

    def throttle(self) -> Throttle:
        """The sending throttle these settings describe."""
        return Throttle(
            per_second=self.max_per_second,
            per_domain_per_second=self.max_per_domain_per_second,
            tick_seconds=self.tick_seconds,
        )


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Return the process-wide settings, read once from the environment.

    Raises:
        ConfigError: A ``NURTURE_*`` variable has a value it cannot take, named in the message.
    """
    try:
        return Settings()
    except ValidationError as exc:
        problems = "; ".join(
            f"{_variable(err['loc'])}: {err['msg']}" for err in exc.errors(include_url=False)
        )
        raise ConfigError(f"invalid setting: {problems}") from None


def _variable(loc: tuple[int | str, ...]) -> str:
    field = str(loc[0]) if loc else "?"
    info = Settings.model_fields.get(field)
    alias = info.validation_alias if info is not None else None
    return alias if isinstance(alias, str) else f"NURTURE_{field.upper()}"
