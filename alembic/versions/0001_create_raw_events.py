"""create raw_events (hypertable or daily partitions) and rejected_events

Revision ID: 0001
Revises:
Create Date: 2026-11-23

With the timescaledb extension available and preloaded, raw_events becomes a
hypertable on occurred_at. Otherwise it is a natively range-partitioned table
with one partition a day plus a default partition, kept ahead of time by
raw_events_ensure_partitions() (run by the migration and by a periodic task).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from alembic import op
from sentiment.config import get_settings

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


ENSURE_PARTITIONS = """
CREATE FUNCTION raw_events_ensure_partitions(days_ahead integer DEFAULT 7)
RETURNS TABLE (partition_name text, rows_moved bigint)
LANGUAGE plpgsql AS $fn$
DECLARE
    day date;
    lower_bound timestamptz;
    upper_bound timestamptz;
    moved bigint;
BEGIN
    -- One keeper at a time: two beat ticks must not race on the same DDL.
    PERFORM pg_advisory_xact_lock(hashtext('raw_events_ensure_partitions'));
    FOR day IN
        SELECT d::date FROM generate_series(
            (now() AT TIME ZONE 'UTC')::date,
            (now() AT TIME ZONE 'UTC')::date + days_ahead,
            interval '1 day') AS d
        UNION
        SELECT DISTINCT (occurred_at AT TIME ZONE 'UTC')::date FROM raw_events_default
        ORDER BY 1
    LOOP
        partition_name := format('raw_events_p%s', to_char(day, 'YYYYMMDD'));
        CONTINUE WHEN to_regclass(format('%I.%I', current_schema(), partition_name)) IS NOT NULL;
        lower_bound := day::timestamp AT TIME ZONE 'UTC';
        upper_bound := (day + 1)::timestamp AT TIME ZONE 'UTC';
        -- Rows of that day that landed in the default partition would make the
        -- new partition's constraint fail: lift them out, create, put them back.
        CREATE TEMP TABLE raw_events_moving (LIKE raw_events) ON COMMIT DROP;
        WITH gone AS (
            DELETE FROM raw_events_default
            WHERE occurred_at >= lower_bound AND occurred_at < upper_bound
            RETURNING *
        )
        INSERT INTO raw_events_moving SELECT * FROM gone;
        GET DIAGNOSTICS moved = ROW_COUNT;
        EXECUTE format(
            'CREATE TABLE %I PARTITION OF raw_events FOR VALUES FROM (%L) TO (%L)',
            partition_name, lower_bound, upper_bound);
        INSERT INTO raw_events SELECT * FROM raw_events_moving;
        DROP TABLE raw_events_moving;
        rows_moved := moved;
        RETURN NEXT;
    END LOOP;
END
$fn$;
"""


def _use_timescaledb(bind: sa.Connection) -> bool:
    layout = get_settings().storage_layout
    if layout == "partitioned":
        return False
    available = bind.execute(
        sa.text("SELECT count(*) FROM pg_available_extensions WHERE name = 'timescaledb'")
    ).scalar()
    # Only superusers (and pg_read_all_settings) may read shared_preload_libraries;
    # pg_settings hides it from everyone else instead of raising. A managed
    # server's owner role then goes by whether an administrator created the
    # extension in this database already (it cannot be created unless preloaded).
    libraries = bind.execute(
        sa.text("SELECT setting FROM pg_settings WHERE name = 'shared_preload_libraries'")
    ).scalar()
    if libraries is not None:
        preloaded = "timescaledb" in libraries
    else:
        preloaded = bool(
            bind.execute(
                sa.text("SELECT count(*) FROM pg_extension WHERE extname = 'timescaledb'")
            ).scalar()
        )
    if layout == "timescaledb" and not (available and preloaded):
        raise RuntimeError(
            "STORAGE_LAYOUT=timescaledb but this server has no preloaded timescaledb extension: "
            "install TimescaleDB and add it to shared_preload_libraries, or set STORAGE_LAYOUT=auto"
        )
    return bool(available and preloaded)


def _columns() -> list[sa.Column]:  # type: ignore[type-arg]
    return [
        sa.Column("id", sa.Text(), nullable=False),
        sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("source_id", sa.Text(), nullable=False),
        sa.Column("event_type", sa.Text(), nullable=False),
        sa.Column("payload", postgresql.JSONB(), nullable=False),
        sa.Column(
            "ingested_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("processed", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("processed_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", "occurred_at", name=op.f("pk_raw_events")),
    ]


def upgrade() -> None:
    bind = op.get_bind()
    settings = get_settings()
    timescale = _use_timescaledb(bind)

    if timescale:
        op.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
        op.create_table("raw_events", *_columns())
    else:
        op.create_table("raw_events", *_columns(), postgresql_partition_by="RANGE (occurred_at)")

    op.create_index(
        op.f("ix_raw_events_source_id_event_type_occurred_at"),
        "raw_events",
        ["source_id", "event_type", "occurred_at"],
    )
    op.create_index(
        "ix_raw_events_unprocessed",
        "raw_events",
        ["occurred_at"],
        postgresql_where=sa.text("NOT processed"),
    )

    if timescale:
        # No default time index: the primary key and our indexes cover every
        # query, and an index Alembic does not know would look like drift.
        # Columnstore stays off: rows are updated when processed, and updating
        # compressed chunks is slow.
        op.execute(
            sa.text(
                "SELECT create_hypertable('raw_events',"
                " by_range('occurred_at', CAST(:chunk AS interval)),"
                " create_default_indexes => false)"
            ).bindparams(chunk=settings.timescale_chunk_interval)
        )
    else:
        op.execute("CREATE TABLE raw_events_default PARTITION OF raw_events DEFAULT")
        op.execute(ENSURE_PARTITIONS)
        op.execute(
            sa.text("SELECT count(*) FROM raw_events_ensure_partitions(:days)").bindparams(
                days=settings.partition_days_ahead
            )
        )

    op.create_table(
        "rejected_events",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=True), nullable=False),
        sa.Column("event_id", sa.Text(), nullable=True),
        sa.Column("source_id", sa.Text(), nullable=True),
        sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("record", sa.Text(), nullable=False),
        sa.Column(
            "rejected_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_rejected_events")),
    )


def downgrade() -> None:
    op.drop_table("rejected_events")
    op.execute("DROP FUNCTION IF EXISTS raw_events_ensure_partitions(integer)")
    # Partitions and hypertable chunks go with their parent. The timescaledb
    # extension stays: other objects in the database may use it, and it is harmless.
    op.drop_table("raw_events")
