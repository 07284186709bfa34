"""promotion failure times: failing_since and parked_at

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02 14:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import nurture.store.models

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("promotions") as batch:
        batch.add_column(
            sa.Column("failing_since", nurture.store.models.UTCDateTime(), nullable=True)
        )
        batch.add_column(sa.Column("parked_at", nurture.store.models.UTCDateTime(), nullable=True))
    # Rows parked before this revision were parked now, as far as anyone can tell.
    op.execute("UPDATE promotions SET parked_at = next_attempt_at WHERE status = 'parked'")


def downgrade() -> None:
    with op.batch_alter_table("promotions") as batch:
        batch.drop_column("parked_at")
        batch.drop_column("failing_since")
