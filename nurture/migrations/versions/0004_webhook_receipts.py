"""webhook receipts (replay refusal across serve processes)

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02 13:40:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import nurture.store.models

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "webhook_receipts",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("signature", sa.String(length=64), nullable=False),
        sa.Column("signed_at", nurture.store.models.UTCDateTime(), nullable=False),
        sa.Column("expires_at", nurture.store.models.UTCDateTime(), nullable=False),
        sa.Column("received_at", nurture.store.models.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("signature"),
    )
    op.create_index(
        op.f("ix_webhook_receipts_expires_at"), "webhook_receipts", ["expires_at"], unique=False
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_webhook_receipts_expires_at"), table_name="webhook_receipts")
    op.drop_table("webhook_receipts")
