"""consent records, topics, double opt-in and the CRM deletion queue

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02 16:20:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

import nurture.store.models

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")


def upgrade() -> None:
    with op.batch_alter_table("campaigns") as batch:
        batch.add_column(sa.Column("topic", sa.String(length=64), nullable=True))
    op.create_table(
        "consents",
        sa.Column("id", _ID, nullable=False),
        sa.Column("lead_id", _ID, nullable=False),
        sa.Column("topic", sa.String(length=64), nullable=False),
        sa.Column("basis", sa.String(length=32), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("source_kind", sa.String(length=32), nullable=False),
        sa.Column("source", sa.String(length=255), nullable=True),
        sa.Column("text_version", sa.String(length=64), nullable=True),
        sa.Column("ip", sa.String(length=64), nullable=True),
        sa.Column("user_agent", sa.String(length=512), nullable=True),
        sa.Column("recorded_at", nurture.store.models.UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(["lead_id"], ["leads.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("lead_id", "topic", name="uq_consent_lead_topic"),
    )
    op.create_table(
        "topic_bases",
        sa.Column("topic", sa.String(length=64), nullable=False),
        sa.Column("basis", sa.String(length=32), nullable=False),
        sa.PrimaryKeyConstraint("topic", "basis"),
    )
    op.create_table(
        "opt_ins",
        sa.Column("lead_id", _ID, nullable=False),
        sa.Column("form", sa.String(length=64), nullable=True),
        sa.Column("source", sa.String(length=32), nullable=False),
        sa.Column("topics", _JSON, nullable=False),
        sa.Column("requested_at", nurture.store.models.UTCDateTime(), nullable=False),
        sa.Column("confirmation_sent_at", nurture.store.models.UTCDateTime(), nullable=True),
        sa.Column("confirmed_at", nurture.store.models.UTCDateTime(), nullable=True),
        sa.Column("holds", sa.Boolean(), nullable=False),
        sa.ForeignKeyConstraint(["lead_id"], ["leads.id"]),
        sa.PrimaryKeyConstraint("lead_id"),
    )
    op.create_index(
        op.f("ix_opt_ins_confirmation_sent_at"), "opt_ins", ["confirmation_sent_at"], unique=False
    )
    op.create_table(
        "crm_deletions",
        sa.Column("id", _ID, nullable=False),
        sa.Column("connector", sa.String(length=64), nullable=False),
        sa.Column("object_type", sa.String(length=64), nullable=False),
        sa.Column("external_id", sa.String(length=255), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", nurture.store.models.UTCDateTime(), nullable=False),
        sa.Column("next_attempt_at", nurture.store.models.UTCDateTime(), nullable=False),
        sa.Column("failing_since", nurture.store.models.UTCDateTime(), nullable=True),
        sa.Column("parked_at", nurture.store.models.UTCDateTime(), nullable=True),
        sa.Column("done_at", nurture.store.models.UTCDateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("connector", "object_type", "external_id", name="uq_crm_deletion"),
    )
    op.create_index(
        "ix_crm_deletions_status", "crm_deletions", ["status", "next_attempt_at"], unique=False
    )


def downgrade() -> None:
    op.drop_index("ix_crm_deletions_status", table_name="crm_deletions")
    op.drop_table("crm_deletions")
    op.drop_index(op.f("ix_opt_ins_confirmation_sent_at"), table_name="opt_ins")
    op.drop_table("opt_ins")
    op.drop_table("topic_bases")
    op.drop_table("consents")
    with op.batch_alter_table("campaigns") as batch:
        batch.drop_column("topic")
