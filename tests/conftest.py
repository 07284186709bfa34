"""Shared fixtures: real SQLite files, a throwaway PostgreSQL cluster, a real SMTP server."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from sqlalchemy import Engine

from nurture.store.db import make_engine, upgrade
from tests.servers import PostgresCluster, SmtpSink

_db_counter = itertools.count()

# The tests sign with the public development key unless they set their own; that is allowed
# only where NURTURE_ENV says development (subprocesses inherit it). Tests of the refusal set
# NURTURE_ENV=production themselves.
os.environ.setdefault("NURTURE_ENV", "development")
# The tests' Prefect is local and offline, like the demo's (make test sets PREFECT_HOME too).
os.environ.setdefault("PREFECT_HOME", os.path.abspath(".nurture/prefect"))
os.makedirs(os.environ["PREFECT_HOME"], exist_ok=True)  # Prefect makes it without parents
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PostgresCluster]:
    """One PostgreSQL cluster for the whole test session, with a migrated template database."""
    cluster = PostgresCluster.start()
    cluster.execute("CREATE DATABASE nurture_template")
    template = make_engine(cluster.url("nurture_template"))
    upgrade(template)
    template.dispose()
    yield cluster
    cluster.stop()


def _pg_engine(cluster: PostgresCluster) -> Engine:
    name = f"nurture_test_{next(_db_counter)}"
    cluster.execute(f"CREATE DATABASE {name} TEMPLATE nurture_template")
    return make_engine(cluster.url(name))


@pytest.fixture
def sqlite_engine(tmp_path: object) -> Iterator[Engine]:
    """A migrated SQLite database in a file under tmp_path."""
    engine = make_engine(f"sqlite:///{tmp_path}/nurture.db")
    upgrade(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def pg_engine(pg_cluster: PostgresCluster) -> Iterator[Engine]:
    """A fresh, migrated PostgreSQL database."""
    engine = _pg_engine(pg_cluster)
    yield engine
    engine.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def engine(request: pytest.FixtureRequest, tmp_path: object) -> Iterator[Engine]:
    """The same test on SQLite and on PostgreSQL."""
    if request.param == "sqlite":
        eng = make_engine(f"sqlite:///{tmp_path}/nurture.db")
        upgrade(eng)
    else:
        eng = _pg_engine(request.getfixturevalue("pg_cluster"))
    yield eng
    eng.dispose()


@pytest.fixture
def smtp_server() -> Iterator[SmtpSink]:
    """A real SMTP server on 127.0.0.1 that keeps every message it accepts."""
    sink = SmtpSink().start()
    yield sink
    sink.stop()


@pytest.fixture(scope="session")
def harness() -> Iterator[None]:
    """One ephemeral Prefect API for every flow test (it takes about 20 s to start)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def now() -> datetime:
    """A fixed instant: a Tuesday at 10:00 UTC."""
    return datetime(2026, 3, 3, 10, 0, tzinfo=UTC)
