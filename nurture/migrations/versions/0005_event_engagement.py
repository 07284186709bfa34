"""event engagement: human or machine, the reason, and what scoring counts

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02 14:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("events") as batch:
        batch.add_column(sa.Column("engagement", sa.String(length=8), nullable=True))
        batch.add_column(sa.Column("engagement_reason", sa.String(length=255), nullable=True))
        batch.add_column(
            sa.Column("counted_human", sa.Boolean(), server_default=sa.true(), nullable=False)
        )
        batch.add_column(
            sa.Column("counted_any", sa.Boolean(), server_default=sa.true(), nullable=False)
        )
        batch.drop_index("ix_events_lead_type")
        batch.create_index(
            "ix_events_lead_type",
            ["lead_id", "type", "occurred_at", "counted_human", "counted_any"],
            unique=False,
        )
    # Opens and clicks recorded before classification existed had no request data to
    # judge: they stay human. Repeats do not count any more: one open per delivery and
    # one click per distinct link per delivery (the earliest).
    op.execute("UPDATE events SET engagement = 'human' WHERE type IN ('opened', 'clicked')")
    same_url = (
        "e2.url IS events.url"
        if op.get_bind().dialect.name == "sqlite"
        else "e2.url IS NOT DISTINCT FROM events.url"
    )
    op.execute(
        "UPDATE events SET counted_human = false, counted_any = false "
        "WHERE type IN ('opened', 'clicked') AND delivery_id IS NOT NULL AND EXISTS ("
        "SELECT 1 FROM events e2 WHERE e2.delivery_id = events.delivery_id "
        f"AND e2.type = events.type AND (events.type = 'opened' OR {same_url}) "
        "AND (e2.occurred_at < events.occurred_at "
        "OR (e2.occurred_at = events.occurred_at AND e2.id < events.id)))"
    )


def downgrade() -> None:
    with op.batch_alter_table("events") as batch:
        batch.drop_index("ix_events_lead_type")
        batch.create_index("ix_events_lead_type", ["lead_id", "type", "occurred_at"], unique=False)
        batch.drop_column("counted_any")
        batch.drop_column("counted_human")
        batch.drop_column("engagement_reason")
        batch.drop_column("engagement")
