"""opt_ins: the confirmation email's outbox state (claimed, sending, sent, failed, unknown)

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-03 05:40:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import nurture.store.models

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("opt_ins") as batch:
        batch.add_column(sa.Column("confirmation_state", sa.String(length=16), nullable=True))
        batch.add_column(sa.Column("claimed_by", sa.String(length=128), nullable=True))
        batch.add_column(sa.Column("claimed_at", nurture.store.models.UTCDateTime(), nullable=True))
        batch.create_index("ix_opt_ins_confirmation_state", ["confirmation_state"])
    # A confirmation marked before this revision went out or was refused: count it sent.
    op.execute(
        "UPDATE opt_ins SET confirmation_state = 'sent' WHERE confirmation_sent_at IS NOT NULL"
    )


def downgrade() -> None:
    with op.batch_alter_table("opt_ins") as batch:
        batch.drop_index("ix_opt_ins_confirmation_state")
        batch.drop_column("claimed_at")
        batch.drop_column("claimed_by")
        batch.drop_column("confirmation_state")
