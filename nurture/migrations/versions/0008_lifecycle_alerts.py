"""alerts: the sales-alert outbox, one row per (stage transition, alert rule); crm_cursors

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02 16:40:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import nurture.store.models

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "alerts",
        sa.Column("id", _ID, nullable=False),
        sa.Column("transition_id", _ID, nullable=False),
        sa.Column("rule", sa.Integer(), nullable=False),
        sa.Column("lead_id", _ID, nullable=False),
        sa.Column("stage", sa.String(length=32), nullable=False),
        sa.Column("channel", sa.String(length=255), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", nurture.store.models.UTCDateTime(), nullable=False),
        sa.Column("next_attempt_at", nurture.store.models.UTCDateTime(), nullable=False),
        sa.Column("failing_since", nurture.store.models.UTCDateTime(), nullable=True),
        sa.Column("sent_at", nurture.store.models.UTCDateTime(), nullable=True),
        sa.ForeignKeyConstraint(["lead_id"], ["leads.id"]),
        sa.ForeignKeyConstraint(["transition_id"], ["stage_transitions.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("transition_id", "rule", name="uq_alert_transition_rule"),
    )
    op.create_index("ix_alerts_lead_id", "alerts", ["lead_id"], unique=False)
    op.create_index("ix_alerts_status", "alerts", ["status", "next_attempt_at"], unique=False)
    op.create_table(
        "crm_cursors",
        sa.Column("id", _ID, nullable=False),
        sa.Column("connector", sa.String(length=64), nullable=False),
        sa.Column("stream", sa.String(length=64), nullable=False),
        sa.Column("high_water", nurture.store.models.UTCDateTime(), nullable=False),
        sa.Column("updated_at", nurture.store.models.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("connector", "stream", name="uq_crm_cursor"),
    )


def downgrade() -> None:
    op.drop_table("crm_cursors")
    op.drop_index("ix_alerts_status", table_name="alerts")
    op.drop_index("ix_alerts_lead_id", table_name="alerts")
    op.drop_table("alerts")
