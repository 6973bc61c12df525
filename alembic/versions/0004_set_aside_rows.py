"""rows a sentiment worker cannot score: raw_events.process_error

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-06

A row no model can score would otherwise head every claim (oldest first) for
good. `processing.set_aside` marks it processed with the reason in
`process_error`; a small partial index finds those rows again (`sentiment
status`, `sentiment requeue`).
"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("raw_events", sa.Column("process_error", sa.Text(), nullable=True))
    op.create_index(
        "ix_raw_events_set_aside",
        "raw_events",
        ["occurred_at"],
        postgresql_where=sa.text("process_error IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_raw_events_set_aside", table_name="raw_events")
    op.drop_column("raw_events", "process_error")
