"""``nurture doctor``: check every setting a deployment depends on, one line each.

Each check talks to the real thing once, with a short timeout and no retries: the secret
key, the database (reachable and at the newest migration), SMTP (EHLO, STARTTLS, AUTH),
IMAP when configured, the tracking service's health endpoint, each CRM the campaigns
promote to (one cheap authenticated call), and the Prefect API with its work pool and
concurrency limits. The Prefect checks use its REST API over HTTP, so the core still never
imports Prefect. Nothing here writes anything: a missing SQLite file is reported, not made.
"""

from __future__ import annotations

import base64
import contextlib
import imaplib
import smtplib
import ssl
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import httpx

from nurture.config import Settings

OK, FAIL, SKIP = "ok", "fail", "skip"
SMTP_LIMIT = "smtp"  # the global concurrency limit every send batch holds (nurture.flows.limits)
# Connectors with no provider behind them, so no credentials and no shared limit.
_LOCAL_CONNECTORS = frozenset({"local"})


@dataclass(frozen=True)
class Check:
    """One line of the report: what was checked, ``ok``/``fail``/``skip`` and why."""

    name: str
    status: str
    detail: str

    @property
    def failed(self) -> bool:
        """Whether this check failed (a skipped check did not)."""
        return self.status == FAIL


@dataclass
class PrefectApi:
    """Where the Prefect API is and how to authenticate (from PREFECT_* at the CLI)."""

    url: str | None
    api_key: str | None = field(default=None, repr=False)
    auth_string: str | None = field(default=None, repr=False)
    work_pool: str = "nurture"

    @classmethod
    def from_env(cls, env: Mapping[str, str], work_pool: str = "nurture") -> PrefectApi:
        """Read ``PREFECT_API_URL``, ``PREFECT_API_KEY`` and ``PREFECT_API_AUTH_STRING``."""
        return cls(
            url=env.get("PREFECT_API_URL") or None,
            api_key=env.get("PREFECT_API_KEY") or None,
            auth_string=env.get("PREFECT_API_AUTH_STRING") or None,
            work_pool=work_pool,
        )

    def headers(self) -> dict[str, str]:
        """Authorization for Prefect Cloud (API key) or a server with basic auth."""
        if self.api_key:
            return {"Authorization": f"Bearer {self.api_key}"}
        if self.auth_string:
            token = base64.b64encode(self.auth_string.encode()).decode()
            return {"Authorization": f"Basic {token}"}
        return {}


def _error(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _run(name: str, probe: Callable[[], tuple[str, str]]) -> Check:
    """Run one probe; any exception is that check's failure, never the report's."""
    try:
        status, detail = probe()
    except Exception as exc:  # a doctor reports every failure as a line, whatever it is
        return Check(name, FAIL, _error(exc))
    return Check(name, status, detail)


def check_secret_key(settings: Settings) -> tuple[str, str]:
    """NURTURE_SECRET_KEY is set, and not the public development key outside development."""
    keys = settings.secret_keys()  # ConfigError names the problem
    extra = f" (+{len(keys) - 1} verify-only)" if len(keys) > 1 else ""
    return OK, f"set{extra}" + (" [development]" if settings.is_development else "")


def check_database(settings: Settings) -> tuple[str, str]:
    """The database answers and is at the newest migration (never created or migrated)."""
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory
    from sqlalchemy import make_url

    from nurture.store.db import alembic_config, make_engine, normalise_url

    url = make_url(normalise_url(settings.database_url))
    shown = url.render_as_string(hide_password=True)
    file = url.database if url.get_backend_name() == "sqlite" else None
    if file not in (None, "", ":memory:") and not Path(str(file)).exists():
        return FAIL, f"{shown}: no such database file (run `nurture db upgrade`)"
    engine = make_engine(url.render_as_string(hide_password=False))
    try:
        head = ScriptDirectory.from_config(alembic_config(engine)).get_current_head()
        with engine.connect() as conn:
            current = MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()
    if current != head:
        return FAIL, f"{shown}: at migration {current}, head is {head} (run `nurture db upgrade`)"
    return OK, f"{shown} at {head}"


def check_smtp(settings: Settings, timeout: float) -> tuple[str, str]:
    """EHLO, then STARTTLS and AUTH when the URL asks for them."""
    from nurture.outbox.smtp_transport import SmtpConfig

    cfg = SmtpConfig.from_url(settings.smtp_url)
    wait = min(cfg.timeout, timeout)
    conn: smtplib.SMTP
    try:
        if cfg.security == "ssl":
            conn = smtplib.SMTP_SSL(
                cfg.host, cfg.port, timeout=wait, context=ssl.create_default_context()
            )
        else:
            conn = smtplib.SMTP(cfg.host, cfg.port, timeout=wait)
    except (OSError, smtplib.SMTPException) as exc:
        return FAIL, f"{cfg.host}:{cfg.port}: {_error(exc)}"
    steps = [f"{cfg.host}:{cfg.port}", "EHLO"]
    try:
        code, reply = conn.ehlo()
        if code != 250:
            return FAIL, f"{cfg.host}:{cfg.port}: EHLO answered {code} {reply!r}"
        if cfg.security == "starttls":
            if not conn.has_extn("starttls"):
                return FAIL, f"{cfg.host}:{cfg.port}: the server does not offer STARTTLS"
            conn.starttls(context=ssl.create_default_context())
            conn.ehlo()
            steps.append("STARTTLS")
        elif cfg.security == "ssl":
            steps.append("TLS")
        if cfg.username is not None:
            if not conn.has_extn("auth"):
                return FAIL, f"{cfg.host}:{cfg.port}: the server does not offer AUTH"
            password = cfg.password.get_secret_value() if cfg.password else ""
            conn.login(cfg.username, password)
            steps.append(f"AUTH as {cfg.username}")
    finally:
        try:
            conn.quit()
        except (smtplib.SMTPException, OSError):
            conn.close()
    return OK, " ".join(steps) + " ok"


def check_imap(settings: Settings, timeout: float) -> tuple[str, str]:
    """Log in and open the mailbox read-only, when NURTURE_IMAP_URL is set."""
    if settings.imap_url is None:
        return SKIP, "NURTURE_IMAP_URL not set (replies and bounces are not read)"
    from nurture.engagement.inbox import ImapConfig, connect

    cfg = ImapConfig.from_url(settings.imap_url)
    cfg = ImapConfig(**{**asdict(cfg), "timeout": min(cfg.timeout, timeout)})
    conn = connect(cfg, attempts=1)
    try:
        typ, data = conn.select(f'"{cfg.mailbox}"', readonly=True)
        if typ != "OK":
            return FAIL, f"{cfg.host}:{cfg.port}: cannot open mailbox {cfg.mailbox!r}: {data!r}"
    finally:
        with contextlib.suppress(imaplib.IMAP4.error, OSError):
            conn.logout()
    return OK, f"{cfg.host}:{cfg.port} {cfg.mailbox} ({int(data[0] or 0)} messages)"


def check_tracking(settings: Settings, timeout: float) -> tuple[str, str]:
    """The tracking service's ``/healthz`` answers 200 with status ok."""
    url = settings.tracking_url.rstrip("/") + "/healthz"
    try:
        response = httpx.get(url, timeout=timeout)
    except httpx.HTTPError as exc:
        return FAIL, f"{url}: {_error(exc)}"
    if response.status_code != 200:
        return FAIL, f"{url} answered {response.status_code}"
    return OK, f"{url} healthy"


def check_programme(settings: Settings) -> tuple[list[str], Check]:
    """Load the campaigns; returns the connectors they promote to, and the check line."""
    from nurture.spec.programme import Programme
    from nurture.spec.schema import SpecErrors

    try:
        programme = Programme.load(Path(settings.campaigns), Path(settings.templates))
    except SpecErrors as exc:
        first = exc.errors[0] if exc.errors else "invalid"
        return [], Check("campaigns", FAIL, f"{len(exc.errors)} problem(s), first: {first}")
    except Exception as exc:  # a missing folder and the like: one line, not a crash
        return [], Check("campaigns", FAIL, _error(exc))
    crms = sorted({c.promote.to.connector for c in programme.campaigns if c.promote})
    detail = f"{len(programme.campaigns)} campaign(s) in {settings.campaigns}"
    return crms, Check("campaigns", OK, detail + (f"; CRMs: {', '.join(crms)}" if crms else ""))


def check_crm(name: str) -> tuple[str, str]:
    """Build the connector from its settings and make its one cheap authenticated call."""
    from nurture.crm import load_connector

    connector: Any = load_connector(name)
    try:
        probe = getattr(connector, "check", None)
        if probe is None:
            return OK, "nothing to check (the connector has no credentials check)"
        return OK, str(probe())
    finally:
        close = getattr(connector, "close", None)
        if close is not None:
            close()


def check_prefect(api: PrefectApi, crms: Sequence[str], timeout: float) -> list[Check]:
    """The API answers; the work pool and the concurrency limits the flows use exist."""
    if not api.url:
        return [Check("prefect", SKIP, "PREFECT_API_URL not set (only the CLI can run ticks)")]
    base = api.url.rstrip("/")
    with httpx.Client(base_url=base, headers=api.headers(), timeout=timeout) as client:

        def health() -> tuple[str, str]:
            try:
                response = client.get("/health")
            except httpx.HTTPError as exc:
                return FAIL, f"{base}: {_error(exc)}"
            if response.status_code != 200:
                return FAIL, f"{base}/health answered {response.status_code}"
            return OK, f"{base} answers"

        line = _run("prefect api", health)
        if line.failed:
            return [line]

        def pool() -> tuple[str, str]:
            response = client.get(f"/work_pools/{api.work_pool}")
            if response.status_code == 404:
                hint = f"prefect work-pool create {api.work_pool} --type process"
                return FAIL, f"no work pool {api.work_pool!r} (run `{hint}`)"
            response.raise_for_status()
            return OK, f"{api.work_pool!r} ({response.json().get('type', '?')})"

        def limits() -> tuple[str, str]:
            response = client.post("/v2/concurrency_limits/filter", json={"limit": 200})
            response.raise_for_status()
            have = {row["name"]: row for row in response.json()}
            need = [SMTP_LIMIT, *(f"crm-{c}" for c in crms if c not in _LOCAL_CONNECTORS)]
            missing = [n for n in need if n not in have]
            if missing:
                hints = "; ".join(f"prefect gcl create {n} --limit N" for n in missing)
                return FAIL, f"missing {', '.join(missing)} (run `{hints}`)"
            return OK, ", ".join(f"{n} ({have[n].get('limit')})" for n in need)

        return [line, _run("prefect work pool", pool), _run("prefect limits", limits)]


def run_checks(
    settings: Settings,
    prefect: PrefectApi,
    *,
    crms: Sequence[str] = (),
    timeout: float = 10.0,
) -> list[Check]:
    """Every check, in a fixed order, each independent of the others' failures.

    Args:
        settings: The nurture settings to check.
        prefect: Where the Prefect API is (its checks are skipped without a URL).
        crms: Connectors to check besides those the campaigns promote to.
        timeout: Seconds each network check may take.
    """
    checks = [
        _run("secret key", lambda: check_secret_key(settings)),
        _run("database", lambda: check_database(settings)),
        _run("smtp", lambda: check_smtp(settings, timeout)),
        _run("imap", lambda: check_imap(settings, timeout)),
        _run("tracking", lambda: check_tracking(settings, timeout)),
    ]
    promoted, programme = check_programme(settings)
    checks.append(programme)
    names = sorted({*promoted, *crms})
    checks += [_run(f"crm {name}", partial(check_crm, name)) for name in names]
    checks += check_prefect(prefect, names, timeout)
    return checks
