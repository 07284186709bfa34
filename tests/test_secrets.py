"""The signing key: the public development key is refused outside development, and several
keys allow a rotation in which links already sent keep working."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import httpx
import pytest
from sqlalchemy import Engine, func, select

from nurture.config import DEV_SECRET_KEY, Settings, get_settings
from nurture.dev.webserver import ThreadedServer
from nurture.engagement.tracking import create_app
from nurture.errors import ConfigError, NurtureError
from nurture.message.tokens import TokenError, click_token, open_token, verify_click, verify_open
from nurture.store.models import Delivery
from tests.test_events import seed

OLD, NEW = "old-key-" + "o" * 24, "new-key-" + "n" * 24


def _settings(**values: str) -> Settings:
    return Settings(**values)  # type: ignore[arg-type]


@pytest.fixture
def clean_settings() -> Iterator[None]:
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def test_the_development_key_is_refused_outside_development() -> None:
    for settings in (
        _settings(environment="production"),
        _settings(environment="staging", secret_key=DEV_SECRET_KEY),
        _settings(environment="production", secret_key=f"{NEW},{DEV_SECRET_KEY}"),
    ):
        with pytest.raises(ConfigError, match="NURTURE_SECRET_KEY"):
            settings.secret_keys()
    assert issubclass(ConfigError, NurtureError)


def test_the_development_key_is_allowed_only_when_said_so() -> None:
    assert _settings(environment="development").secret_keys() == (DEV_SECRET_KEY,)
    assert _settings(environment=" Development ").secret_keys() == (DEV_SECRET_KEY,)


def test_empty_keys_are_refused_everywhere() -> None:
    for value in ("", " , ,"):
        with pytest.raises(ConfigError, match="empty"):
            _settings(environment="development", secret_key=value).secret_keys()


def test_several_keys_the_first_signs() -> None:
    settings = _settings(environment="production", secret_key=f" {NEW} , {OLD} ")
    assert settings.secret_keys() == (NEW, OLD)


def test_the_environment_variable_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NURTURE_ENV", "production")
    monkeypatch.delenv("NURTURE_SECRET_KEY", raising=False)
    with pytest.raises(ConfigError):
        Settings().secret_keys()
    monkeypatch.setenv("NURTURE_SECRET_KEY", f"{NEW},{OLD}")
    assert Settings().secret_keys() == (NEW, OLD)


def test_tokens_verify_with_any_key_of_a_rotation() -> None:
    old_click = click_token(7, "https://acme.example/pricing", OLD)
    assert verify_click(old_click, [NEW, OLD]) == (7, "https://acme.example/pricing")
    assert verify_open(open_token(7, NEW), (NEW, OLD)) == 7
    # A key that was retired no longer verifies, and an unknown key never did.
    with pytest.raises(TokenError):
        verify_click(old_click, [NEW])
    with pytest.raises(TokenError):
        verify_open(open_token(7, "someone-else-" + "x" * 20), [NEW, OLD])
    with pytest.raises(ValueError):
        verify_open(open_token(7, NEW), [])


def test_the_tracking_service_accepts_links_signed_before_a_rotation(
    engine: Engine, now: datetime
) -> None:
    ids = seed(engine, now)
    app = create_app(
        engine,
        secret=[NEW, OLD],
        clock=lambda: now,
        webhook_secret=None,
        ingest_keys=[],
    )
    target = "https://acme.example/pricing"
    with (
        ThreadedServer(app) as server,
        httpx.Client(base_url=server.url, follow_redirects=False, timeout=10) as client,
    ):
        for key in (OLD, NEW):
            response = client.get(f"/c/{click_token(ids.delivery_id, target, key)}")
            assert response.status_code == 302
            assert response.headers["location"] == target
        forged = client.get(f"/c/{click_token(ids.delivery_id, target, DEV_SECRET_KEY)}")
        assert forged.status_code == 404
    with pytest.raises(ValueError):
        create_app(engine, secret=[NEW, ""], clock=lambda: now, webhook_secret=None, ingest_keys=[])


def _nurture(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("NURTURE_")}
    return subprocess.run(
        [sys.executable, "-m", "nurture", *args],
        env={**base, **env},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_tick_and_serve_refuse_to_start_with_the_development_key(
    sqlite_engine: Engine, smtp_server: object, tmp_path: Path, now: datetime
) -> None:
    seed(sqlite_engine, now)
    db_url = sqlite_engine.url.render_as_string(hide_password=False)
    before = _deliveries(sqlite_engine)
    env = {"NURTURE_ENV": "production", "NURTURE_DATABASE_URL": db_url}
    for args in (["tick", "--now", now.isoformat()], ["serve", "--port", "9"]):
        result = _nurture(args, env, tmp_path)
        assert result.returncode == 1, result.stderr
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert lines[0].startswith("error: NURTURE_SECRET_KEY is unset or the public")
        assert "Traceback" not in result.stderr
    assert _deliveries(sqlite_engine) == before


def test_flow_refuses_to_start_with_the_development_key(
    monkeypatch: pytest.MonkeyPatch, clean_settings: None
) -> None:
    from nurture.flows.tick import nurture_tick

    monkeypatch.setenv("NURTURE_ENV", "production")
    monkeypatch.delenv("NURTURE_SECRET_KEY", raising=False)
    with pytest.raises(ConfigError):
        nurture_tick.fn(database_url="sqlite:////nonexistent/never-opened.db")


def _deliveries(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(Delivery)).scalar_one())


def test_a_bad_setting_is_one_line_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, clean_settings: None, tmp_path: Path
) -> None:
    monkeypatch.setenv("NURTURE_CRM_PARK_AFTER", "12x")
    with pytest.raises(ConfigError, match=r"NURTURE_CRM_PARK_AFTER: .*got '12x'"):
        get_settings()
    result = _nurture(["crm", "parked"], {"NURTURE_CRM_PARK_AFTER": "soon"}, tmp_path)
    assert result.returncode == 1
    assert result.stderr.startswith("error: invalid setting: NURTURE_CRM_PARK_AFTER")
    for value, expected in (("12h", 0.5), ("P2D", 2.0), ("1.5", 1.5), ("0", 0.0)):
        monkeypatch.setenv("NURTURE_CRM_PARK_AFTER", value)
        get_settings.cache_clear()
        assert get_settings().crm_park_after.total_seconds() == expected * 86400
