"""Engines, sessions and schema migrations for SQLite and PostgreSQL."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session, sessionmaker
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_delay,
    wait_exponential,
)

MIGRATIONS = Path(__file__).parent.parent / "migrations"

log = logging.getLogger(__name__)


def _sqlite_pragmas(busy_seconds: float) -> Any:
    def on_connect(dbapi_conn: Any, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute(f"PRAGMA busy_timeout={int(busy_seconds * 1000)}")
        cur.close()

    return on_connect


def normalise_url(url: str) -> str:
    """Give plain ``postgresql://`` URLs the psycopg 3 driver we ship."""
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def make_engine(url: str, *, sqlite_busy_seconds: float = 30.0) -> Engine:
    """Create an engine; SQLite files get WAL and their parent folder is created."""
    url = normalise_url(url)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": sqlite_busy_seconds})
        event.listen(engine, "connect", _sqlite_pragmas(sqlite_busy_seconds))
        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5)


def alembic_config(engine: Engine) -> Config:
    """An Alembic config pointing at our migrations and this engine."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["engine"] = engine
    return cfg


def upgrade(engine: Engine) -> None:
    """Apply every pending migration."""
    command.upgrade(alembic_config(engine), "head")


def is_current(engine: Engine) -> bool:
    """Whether the database is at the newest migration."""
    head = ScriptDirectory.from_config(alembic_config(engine)).get_current_head()
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision() == head


@lru_cache(maxsize=8)
def _engine_for(url: str) -> Engine:
    engine = make_engine(url)
    if not is_current(engine):
        upgrade(engine)
    return engine


def get_engine(url: str | None = None) -> Engine:
    """The engine for ``url`` (default: settings), migrated to the newest schema."""
    if url is None:
        from nurture.config import get_settings

        url = get_settings().database_url
    return _engine_for(normalise_url(url))


@lru_cache(maxsize=32)
def _session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def session_scope(engine: Engine) -> Iterator[Session]:
    """A session that commits on success and rolls back on error."""
    with _session_factory(engine)() as session, session.begin():
        yield session


def transient_db_error(exc: BaseException) -> bool:
    """A database error worth retrying: locked (SQLite), or a connection lost (restart)."""
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    if isinstance(exc, OperationalError):
        text = str(exc.orig).lower() if exc.orig is not None else str(exc).lower()
        return any(
            marker in text
            for marker in ("locked", "busy", "connection", "server closed", "terminat", "shut")
        )
    return False


def _log_db_retry(state: RetryCallState) -> None:
    exc = state.outcome.exception() if state.outcome is not None else None
    wait = state.next_action.sleep if state.next_action is not None else 0.0
    log.warning(
        "database write failed (attempt %d, %s: %s); retrying in %.1f s",
        state.attempt_number,
        type(exc).__name__,
        str(getattr(exc, "orig", None) or exc).splitlines()[0][:200],
        wait,
    )


def db_retrying(max_seconds: float = 120.0) -> Retrying:
    """Retries for a write that must not be lost: a locked or restarting database.

    Each retry is logged at WARNING on ``nurture.store.db``, so an operator sees why a tick slowed.
    """
    return Retrying(
        retry=retry_if_exception(transient_db_error),
        stop=stop_after_delay(max_seconds),
        wait=wait_exponential(multiplier=0.1, max=5.0),
        before_sleep=_log_db_retry,
        reraise=True,
    )


def is_postgres(engine: Engine) -> bool:
    """True on PostgreSQL, where workers claim rows with ``FOR UPDATE SKIP LOCKED``."""
    return engine.dialect.name == "postgresql"
