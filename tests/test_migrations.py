"""The Alembic migrations build exactly the schema the models describe, on both databases."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine

from nurture.store.models import Base


def test_migrations_match_the_models(engine: Engine) -> None:
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        diff = compare_metadata(context, Base.metadata)
    assert diff == []


def test_leads_leave_room_for_updated_rows_on_postgresql(pg_engine: Engine) -> None:
    """Migration 0011: scoring's updates stay on their page (HOT) instead of moving."""
    with pg_engine.connect() as conn:
        options = conn.exec_driver_sql(
            "SELECT reloptions FROM pg_class WHERE relname = 'leads'"
        ).scalar_one()
    assert options == ["fillfactor=85"]
