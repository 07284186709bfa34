"""``nurture doctor`` against real servers: healthy, then broken in every way it checks.

Everything is real and local: the database (SQLite and PostgreSQL), an aiosmtpd server
with AUTH, Dovecot for IMAP, the tracking service over HTTP, the stateful CRM fakes, and
an ephemeral Prefect API with a work pool and concurrency limits made through its REST API.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner
from sqlalchemy import Engine

from nurture.cli import cli
from nurture.config import DEV_SECRET_KEY, get_settings
from nurture.dev.webserver import ThreadedServer
from nurture.engagement.tracking import create_app
from nurture.scaffold import STARTER_CAMPAIGNS, STARTER_TEMPLATES
from nurture.store.db import make_engine, upgrade
from tests import test_inbox
from tests.fakes.hubspot import FakeHubSpot
from tests.fakes.pipedrive import FakePipedrive
from tests.fakes.salesforce import FakeSalesforce
from tests.servers import PASSWORD, RecordingServer, free_port

# The real Dovecot of the inbox tests (module-scoped there and here).
dovecot = test_inbox.dovecot

KEY = "doctor-test-" + "k" * 40
NOW = datetime(2026, 3, 3, 10, 0, tzinfo=UTC)
CRMS = ("hubspot", "pipedrive", "salesforce")


@pytest.fixture(scope="module")
def crms() -> Iterator[dict[str, str]]:
    """The three CRM fakes, by connector name -> base URL."""
    fakes = {"hubspot": FakeHubSpot(), "pipedrive": FakePipedrive(), "salesforce": FakeSalesforce()}
    urls = {name: fake.start() for name, fake in fakes.items()}
    yield urls
    for fake in fakes.values():
        fake.stop()


@pytest.fixture(scope="module")
def prefect_api(harness: None) -> str:
    """The ephemeral Prefect API's URL, with the pool and the limits a deployment needs."""
    from prefect.settings import PREFECT_API_URL

    url = str(PREFECT_API_URL.value()).rstrip("/")
    with httpx.Client(base_url=url, timeout=30) as client:
        for path, body in [
            ("/work_pools/", {"name": "nurture", "type": "process"}),
            ("/v2/concurrency_limits/", {"name": "smtp", "limit": 4}),
            *(("/v2/concurrency_limits/", {"name": f"crm-{c}", "limit": 2}) for c in CRMS),
        ]:
            response = client.post(path, json=body)
            assert response.status_code in (201, 409), response.text  # 409: made by a rerun
    return url


@pytest.fixture
def smtp_auth() -> Iterator[RecordingServer]:
    """An SMTP server that requires AUTH (user ``mailer``)."""
    server = RecordingServer(pipelining=True, auth=True).start()
    yield server
    server.stop()


@pytest.fixture
def tracking(sqlite_engine: Engine) -> Iterator[str]:
    """The real tracking service over HTTP."""
    app = create_app(
        sqlite_engine,
        secret=[KEY],
        clock=lambda: NOW,
        webhook_secret=None,
        ingest_keys=[],
    )
    with ThreadedServer(app) as server:
        yield server.url


def _doctor(monkeypatch: pytest.MonkeyPatch, env: dict[str, str], *args: str) -> Any:
    """Run ``nurture doctor --json`` with exactly ``env`` as the NURTURE_/PREFECT_ settings."""
    import os

    for name in list(os.environ):
        if name.startswith(("NURTURE_", "PREFECT_API_")):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(cli, ["doctor", "--json", "--timeout", "5", *args])
    finally:
        get_settings.cache_clear()
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    doc = json.loads(result.output)
    return result.exit_code, {c["name"]: (c["status"], c["detail"]) for c in doc["checks"]}, doc


def _healthy_env(
    db_url: str,
    smtp: RecordingServer,
    imap_url: str,
    tracking_url: str,
    crms: dict[str, str],
    prefect_url: str,
) -> dict[str, str]:
    return {
        "NURTURE_ENV": "production",
        "NURTURE_SECRET_KEY": KEY,
        "NURTURE_DATABASE_URL": db_url,
        "NURTURE_SMTP_URL": f"smtp://mailer:{PASSWORD}@127.0.0.1:{smtp.port}",
        "NURTURE_IMAP_URL": imap_url,
        "NURTURE_TRACKING_URL": tracking_url,
        "NURTURE_CAMPAIGNS": str(STARTER_CAMPAIGNS),
        "NURTURE_TEMPLATES": str(STARTER_TEMPLATES),
        "NURTURE_HUBSPOT_TOKEN": "hs-token",
        "NURTURE_HUBSPOT_BASE_URL": crms["hubspot"],
        "NURTURE_PIPEDRIVE_TOKEN": "pd-token",
        "NURTURE_PIPEDRIVE_BASE_URL": crms["pipedrive"],
        "NURTURE_SALESFORCE_CLIENT_ID": "app",
        "NURTURE_SALESFORCE_CLIENT_SECRET": "shh",
        "NURTURE_SALESFORCE_LOGIN_URL": crms["salesforce"],
        "PREFECT_API_URL": prefect_url,
    }


CRM_ARGS = [arg for c in CRMS for arg in ("--crm", c)]


def test_doctor_healthy(
    monkeypatch: pytest.MonkeyPatch,
    engine: Engine,
    smtp_auth: RecordingServer,
    dovecot: test_inbox.Dovecot,
    tracking: str,
    crms: dict[str, str],
    prefect_api: str,
) -> None:
    db_url = engine.url.render_as_string(hide_password=False)
    env = _healthy_env(db_url, smtp_auth, dovecot.url("box0"), tracking, crms, prefect_api)
    code, checks, doc = _doctor(monkeypatch, env, *CRM_ARGS)
    assert code == 0, checks
    assert doc["ok"] is True
    assert {name: status for name, (status, _) in checks.items()} == {
        "secret key": "ok",
        "database": "ok",
        "smtp": "ok",
        "imap": "ok",
        "tracking": "ok",
        "campaigns": "ok",
        "crm hubspot": "ok",
        "crm local": "ok",  # the starter campaigns promote to the local connector
        "crm pipedrive": "ok",
        "crm salesforce": "ok",
        "prefect api": "ok",
        "prefect work pool": "ok",
        "prefect limits": "ok",
    }
    assert "AUTH as mailer" in checks["smtp"][1]
    assert smtp_auth.handler.logins == 1
    assert "smtp (4)" in checks["prefect limits"][1]
    assert "crm-hubspot" in checks["prefect limits"][1]
    # No secret reaches the report.
    text = json.dumps(doc)
    for secret in (KEY, PASSWORD, test_inbox.PASSWORD, "hs-token", "pd-token", "shh"):
        assert secret not in text


def test_doctor_broken(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    smtp_auth: RecordingServer,
    dovecot: test_inbox.Dovecot,
    crms: dict[str, str],
    prefect_api: str,
) -> None:
    # A database file that exists but was never migrated.
    stale = tmp_path / "stale.db"
    make_engine(f"sqlite:///{stale}").connect().close()
    closed = free_port()
    env = _healthy_env(
        f"sqlite:///{stale}",
        smtp_auth,
        dovecot.url("box0").replace(test_inbox.PASSWORD, "wrong"),
        f"http://127.0.0.1:{closed}",
        crms,
        prefect_api,
    )
    env.update(
        {
            "NURTURE_SECRET_KEY": DEV_SECRET_KEY,  # the public key, outside development
            "NURTURE_SMTP_URL": f"smtp://mailer:wrong@127.0.0.1:{smtp_auth.port}",
            "NURTURE_HUBSPOT_TOKEN": "revoked",
            "NURTURE_PIPEDRIVE_TOKEN": "revoked",
            "NURTURE_SALESFORCE_CLIENT_SECRET": "revoked",
        }
    )
    code, checks, doc = _doctor(
        monkeypatch, env, "--work-pool", "elsewhere", *CRM_ARGS, "--crm", "webhook"
    )
    assert code == 1 and doc["ok"] is False
    status = {name: s for name, (s, _) in checks.items()}
    assert status == {
        "secret key": "fail",
        "database": "fail",
        "smtp": "fail",
        "imap": "fail",
        "tracking": "fail",
        "campaigns": "ok",
        "crm hubspot": "fail",
        "crm local": "ok",
        "crm pipedrive": "fail",
        "crm salesforce": "fail",
        "crm webhook": "fail",  # no URL configured
        "prefect api": "ok",
        "prefect work pool": "fail",
        "prefect limits": "fail",  # no crm-webhook limit
    }
    assert "NURTURE_SECRET_KEY" in checks["secret key"][1]
    assert "head is" in checks["database"][1] and "nurture db upgrade" in checks["database"][1]
    assert "Authentication" in checks["smtp"][1] or "535" in checks["smtp"][1]
    assert "refused" in checks["imap"][1]
    assert f"127.0.0.1:{closed}" in checks["tracking"][1]
    assert "'elsewhere'" in checks["prefect work pool"][1]
    assert "crm-webhook" in checks["prefect limits"][1]
    text = json.dumps(doc)
    for secret in (DEV_SECRET_KEY, "wrong", "revoked"):
        assert secret not in text


def test_doctor_without_servers_names_each_target(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Nothing listening anywhere: every network check fails naming where it looked,
    nothing is created (no SQLite file appears), and the Prefect checks are skipped."""
    closed = free_port()
    missing = tmp_path / "nowhere" / "nurture.db"
    env = {
        "NURTURE_ENV": "production",
        "NURTURE_SECRET_KEY": KEY,
        "NURTURE_DATABASE_URL": f"sqlite:///{missing}",
        "NURTURE_SMTP_URL": f"smtp+starttls://127.0.0.1:{closed}",
        "NURTURE_TRACKING_URL": f"http://127.0.0.1:{closed}",
        "NURTURE_CAMPAIGNS": str(tmp_path / "no-campaigns"),
        "NURTURE_TEMPLATES": str(STARTER_TEMPLATES),
    }
    code, checks, _ = _doctor(monkeypatch, env)
    assert code == 1
    assert checks["secret key"][0] == "ok"
    assert checks["database"] == (
        "fail",
        f"sqlite:///{missing}: no such database file (run `nurture db upgrade`)",
    )
    assert not missing.parent.exists()
    assert checks["smtp"][0] == "fail" and f"127.0.0.1:{closed}" in checks["smtp"][1]
    assert checks["imap"][0] == "skip"
    assert checks["campaigns"][0] == "fail"
    assert checks["prefect"][0] == "skip"


def test_doctor_starttls_refused_by_a_server_without_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, smtp_auth: RecordingServer
) -> None:
    db = tmp_path / "ok.db"
    upgrade(make_engine(f"sqlite:///{db}"))
    env = {
        "NURTURE_ENV": "production",
        "NURTURE_SECRET_KEY": KEY,
        "NURTURE_DATABASE_URL": f"sqlite:///{db}",
        "NURTURE_SMTP_URL": f"smtp+starttls://mailer:{PASSWORD}@127.0.0.1:{smtp_auth.port}",
        "NURTURE_TRACKING_URL": f"http://127.0.0.1:{free_port()}",
        "NURTURE_CAMPAIGNS": str(STARTER_CAMPAIGNS),
        "NURTURE_TEMPLATES": str(STARTER_TEMPLATES),
    }
    code, checks, _ = _doctor(monkeypatch, env)
    assert code == 1
    assert checks["database"][0] == "ok"
    assert checks["smtp"] == (
        "fail",
        f"127.0.0.1:{smtp_auth.port}: the server does not offer STARTTLS",
    )
    assert smtp_auth.handler.logins == 0  # no password sent in the clear
