"""campaign pauses (the emergency stop) and the spec of each campaign version

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02 16:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "campaign_pauses",
        sa.Column("id", _ID, primary_key=True),
        sa.Column("campaign_id", _ID, sa.ForeignKey("campaigns.id"), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("paused_by", sa.String(length=255), nullable=True),
        sa.Column("paused_at", sa.DateTime(), nullable=False),
        sa.Column("resumed_at", sa.DateTime(), nullable=True),
        sa.Column("resumed_by", sa.String(length=255), nullable=True),
    )
    op.create_index(
        "ix_campaign_pauses_open", "campaign_pauses", ["campaign_id", "resumed_at"], unique=False
    )
    with op.batch_alter_table("campaign_versions") as batch:
        batch.add_column(sa.Column("spec", _JSON, nullable=True))
    # The live version's spec is known: it is the campaign's own.
    op.execute(
        "UPDATE campaign_versions SET spec = (SELECT c.spec FROM campaigns c"
        " WHERE c.id = campaign_versions.campaign_id) WHERE retired_at IS NULL"
    )


def downgrade() -> None:
    with op.batch_alter_table("campaign_versions") as batch:
        batch.drop_column("spec")
    op.drop_index("ix_campaign_pauses_open", table_name="campaign_pauses")
    op.drop_table("campaign_pauses")
