"""Alembic: upgrade, downgrade and check, on each storage layout this server offers."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import Engine, text

from sentiment.config import get_settings
from tests.conftest import raw_events_partitions, run_alembic, use_layout


@pytest.fixture(autouse=True)
def _fresh_settings_afterwards() -> Iterator[None]:
    yield
    get_settings.cache_clear()


def _tables(scratch: Engine) -> set[str]:
    with scratch.connect() as conn:
        return set(
            conn.execute(
                text("SELECT tablename FROM pg_tables WHERE schemaname = current_schema()")
            ).scalars()
        )


def test_partitioned_upgrade_check_downgrade(scratch_engine, monkeypatch):
    use_layout(monkeypatch, "partitioned")

    run_alembic(scratch_engine, "upgrade", "head")
    run_alembic(scratch_engine, "check")

    today = datetime.now(UTC).date()
    days = [today + timedelta(days=n) for n in range(8)]
    assert raw_events_partitions(scratch_engine) == sorted(
        ["raw_events_default", *(f"raw_events_p{d:%Y%m%d}" for d in days)]
    )
    assert {"raw_events", "rejected_events", "alembic_version"} <= _tables(scratch_engine)

    run_alembic(scratch_engine, "downgrade", "base")
    assert _tables(scratch_engine) == {"alembic_version"}

    run_alembic(scratch_engine, "upgrade", "head")
    run_alembic(scratch_engine, "check")


def test_partition_keeper_moves_rows_out_of_the_default_partition(scratch_engine, monkeypatch):
    use_layout(monkeypatch, "partitioned")
    run_alembic(scratch_engine, "upgrade", "head")
    far = datetime.now(UTC) + timedelta(days=40)
    old = datetime(2020, 2, 29, 23, 59, 59, tzinfo=UTC)
    insert = text(
        "INSERT INTO raw_events (id, occurred_at, source, source_id, event_type, payload)"
        " VALUES (:id, :at, 'reddit', 'stocks', 'comment', '{}')"
    )
    with scratch_engine.begin() as conn:
        conn.execute(insert, [{"id": "far1", "at": far}, {"id": "old1", "at": old}])
        assert conn.execute(text("SELECT count(*) FROM raw_events_default")).scalar() == 2

    with scratch_engine.begin() as conn:
        made = dict(conn.execute(text("SELECT * FROM raw_events_ensure_partitions(7)")).all())

    assert made == {f"raw_events_p{far:%Y%m%d}": 1, "raw_events_p20200229": 1}
    with scratch_engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM raw_events_default")).scalar() == 0
        placed = dict(
            conn.execute(text("SELECT id, tableoid::regclass::text FROM raw_events")).all()
        )
    assert placed == {"far1": f"raw_events_p{far:%Y%m%d}", "old1": "raw_events_p20200229"}

    # Running it again is a no-op: everything it would make exists.
    with scratch_engine.begin() as conn:
        assert (
            conn.execute(text("SELECT count(*) FROM raw_events_ensure_partitions(7)")).scalar() == 0
        )


def test_timescaledb_layout_refused_clearly_without_the_extension(
    scratch_engine, monkeypatch, timescale
):
    if timescale:
        pytest.skip("this server has TimescaleDB")
    use_layout(monkeypatch, "timescaledb")

    with pytest.raises(RuntimeError, match="STORAGE_LAYOUT=timescaledb but this server has no"):
        run_alembic(scratch_engine, "upgrade", "head")


@pytest.mark.timescale
def test_hypertable_upgrade_check_downgrade(scratch_engine, monkeypatch, timescale):
    if not timescale:
        pytest.skip("this server has no TimescaleDB; the partitioned layout was tested instead")
    use_layout(monkeypatch, "auto")

    run_alembic(scratch_engine, "upgrade", "head")
    run_alembic(scratch_engine, "check")

    with scratch_engine.connect() as conn:
        hypertable = conn.execute(
            text(
                "SELECT compression_enabled FROM timescaledb_information.hypertables"
                " WHERE hypertable_name = 'raw_events'"
            )
        ).one()
        policies = conn.execute(
            text(
                "SELECT count(*) FROM timescaledb_information.jobs"
                " WHERE hypertable_name = 'raw_events'"
            )
        ).scalar()
        indexes = set(
            conn.execute(
                text("SELECT indexname FROM pg_indexes WHERE tablename = 'raw_events'")
            ).scalars()
        )
    assert hypertable.compression_enabled is False  # rows are updated when processed
    assert policies == 0
    assert indexes == {
        "pk_raw_events",
        "ix_raw_events_source_id_event_type_occurred_at",
        "ix_raw_events_unprocessed",
        "ix_raw_events_set_aside",
    }  # ours only: no default time index of TimescaleDB's

    run_alembic(scratch_engine, "downgrade", "base")
    assert _tables(scratch_engine) == {"alembic_version"}
    run_alembic(scratch_engine, "upgrade", "head")


def test_0003_keeps_the_first_of_repeated_rejections(scratch_engine, monkeypatch):
    use_layout(monkeypatch, "partitioned")
    run_alembic(scratch_engine, "upgrade", "0002")
    at = datetime(2026, 12, 1, tzinfo=UTC)
    with scratch_engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO rejected_events (event_id, source_id, occurred_at, reason, record)"
                " VALUES (:id, 'stocks', :at, :reason, '{}')"
            ),
            [
                {"id": "a1", "at": at, "reason": "first"},
                {"id": "a1", "at": at, "reason": "second"},
                {"id": "a1", "at": at + timedelta(seconds=1), "reason": "another time"},
                {"id": "b2", "at": at, "reason": "another record"},
            ],
        )

    run_alembic(scratch_engine, "upgrade", "head")

    with scratch_engine.connect() as conn:
        kept = conn.execute(text("SELECT event_id, reason FROM rejected_events ORDER BY id")).all()
    assert [tuple(row) for row in kept] == [
        ("a1", "first"), ("a1", "another time"), ("b2", "another record"),
    ]  # fmt: skip
    run_alembic(scratch_engine, "downgrade", "0002")


@pytest.mark.parametrize("layout", ["auto", "partitioned"])
def test_a_database_owner_without_superuser_can_migrate(scratch_engine, monkeypatch, layout):
    """Managed PostgreSQL gives the application a role that owns its database and no
    more; `shared_preload_libraries` is then not readable."""
    import uuid

    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url

    role = f"owner_{uuid.uuid4().hex[:8]}"
    with scratch_engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        database = conn.execute(text("SELECT current_database()")).scalar_one()
        conn.execute(text(f"CREATE ROLE {role} LOGIN NOSUPERUSER PASSWORD 'pw'"))
        conn.execute(text(f'ALTER DATABASE "{database}" OWNER TO {role}'))
        conn.execute(text(f"GRANT ALL ON SCHEMA public TO {role}"))
        conn.execute(text(f"ALTER SCHEMA public OWNER TO {role}"))
    owner = create_engine(make_url(str(scratch_engine.url)).set(username=role, password="pw"))
    use_layout(monkeypatch, layout)
    try:
        run_alembic(owner, "upgrade", "head")
        assert "raw_events" in _tables(owner)
    finally:
        owner.dispose()
        with scratch_engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text(f"REASSIGN OWNED BY {role} TO CURRENT_USER"))
            conn.execute(text(f"DROP OWNED BY {role}"))
            conn.execute(text(f"DROP ROLE {role}"))
