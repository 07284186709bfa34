"""campaign_versions.templates: the template sources each stored campaign version used

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-03 05:50:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # NULL for versions stored before this revision: their template sources are unknown.
    with op.batch_alter_table("campaign_versions") as batch:
        batch.add_column(
            sa.Column(
                "templates",
                sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
                nullable=True,
            )
        )


def downgrade() -> None:
    with op.batch_alter_table("campaign_versions") as batch:
        batch.drop_column("templates")
