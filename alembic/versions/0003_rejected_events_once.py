"""keep a refused record once in rejected_events

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-06

A batch re-run with another chunk size, or a record scraped again, was
quarantined once per attempt. One row per (event_id, occurred_at) now; the
first refusal, with its reason, is the one kept.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute(
        """
        DELETE FROM rejected_events AS later USING rejected_events AS first
        WHERE later.event_id = first.event_id
          AND later.occurred_at = first.occurred_at
          AND later.id > first.id
        """
    )
    op.create_unique_constraint(
        op.f("uq_rejected_events_event_id_occurred_at"),
        "rejected_events",
        ["event_id", "occurred_at"],
    )


def downgrade() -> None:
    op.drop_constraint(
        op.f("uq_rejected_events_event_id_occurred_at"), "rejected_events", type_="unique"
    )
