"""record what each chunk of a batch inserted (ingested_batches)

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23

A re-run of a batch whose insert had committed replays this record, so the
rows it inserted are still exported exactly once.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "ingested_batches",
        sa.Column("batch_id", sa.Text(), nullable=False),
        sa.Column("first_row", sa.Integer(), nullable=False),
        sa.Column("last_row", sa.Integer(), nullable=False),
        sa.Column("new_keys", postgresql.JSONB(), nullable=False),
        sa.Column("rejected", sa.Integer(), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint(
            "batch_id", "first_row", "last_row", name=op.f("pk_ingested_batches")
        ),
    )


def downgrade() -> None:
    op.drop_table("ingested_batches")
