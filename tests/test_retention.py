"""Retention: old days go, whole; an unprocessed row is never dropped."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import Engine, text

from sentiment.config import Settings
from sentiment.retention import apply_retention
from sentiment.schedule import build_beat_schedule
from sentiment.tasks import apply_retention as apply_retention_task
from tests.conftest import raw_events_partitions, run_alembic, use_layout, wait_for_a_lock_wait

NOW = datetime.now(UTC).replace(microsecond=0)
_INSERT = text(
    "INSERT INTO raw_events (id, occurred_at, source, source_id, event_type, payload, processed)"
    " VALUES (:id, :at, 'reddit', 'stocks', 'comment', '{}', :processed)"
)


def _days_ago(days: float) -> datetime:
    return NOW - timedelta(days=days)


def _insert(scratch: Engine, rows: dict[str, tuple[datetime, bool]]) -> None:
    with scratch.begin() as conn:
        conn.execute(
            _INSERT, [{"id": i, "at": at, "processed": done} for i, (at, done) in rows.items()]
        )


def _keep_partitions(scratch: Engine) -> None:
    """Run the partition keeper: every day with a row in the default partition gets its own."""
    with scratch.begin() as conn:
        conn.execute(text("SELECT * FROM raw_events_ensure_partitions(7)"))


def _stored(scratch: Engine) -> set[str]:
    with scratch.connect() as conn:
        return set(conn.execute(text("SELECT id FROM raw_events")).scalars())


@pytest.fixture
def partitioned(scratch_engine, monkeypatch) -> Engine:
    use_layout(monkeypatch, "partitioned")
    run_alembic(scratch_engine, "upgrade", "head")
    return scratch_engine


def _day_partition(at: datetime) -> str:
    return f"raw_events_p{at:%Y%m%d}"


def test_old_processed_days_are_dropped_whole_and_the_rest_kept(partitioned):
    _insert(
        partitioned,
        {"old40": (_days_ago(40), True), "old31": (_days_ago(31), True),
         "new2": (_days_ago(2), False), "new29": (_days_ago(29), True)},
    )  # fmt: skip
    _keep_partitions(partitioned)  # the old days get their partitions
    _insert(partitioned, {"default50": (_days_ago(50), True)})  # no partition: the default one
    before = set(raw_events_partitions(partitioned))

    result = apply_retention(30, engine=partitioned, now=NOW)

    assert _stored(partitioned) == {"new2", "new29"}
    assert set(result.dropped) == {_day_partition(_days_ago(40)), _day_partition(_days_ago(31))}
    assert set(raw_events_partitions(partitioned)) == before - set(result.dropped)
    assert result.rows_deleted == 1
    assert result.cutoff == _days_ago(30)
    assert result.held_back_by is None

    again = apply_retention(30, engine=partitioned, now=NOW)  # nothing left to drop
    assert (again.dropped, again.rows_deleted) == ((), 0)
    assert _stored(partitioned) == {"new2", "new29"}


def test_an_unprocessed_row_holds_the_cutoff_back_until_it_is_processed(partitioned):
    _insert(
        partitioned,
        {"old40": (_days_ago(40), True), "waiting35": (_days_ago(35), False),
         "old33": (_days_ago(33), True), "default45": (_days_ago(45), True)},
    )  # fmt: skip
    _keep_partitions(partitioned)
    _insert(partitioned, {"default36": (_days_ago(36), True), "default34": (_days_ago(34), True)})

    held = apply_retention(30, engine=partitioned, now=NOW)

    assert held.held_back_by == _days_ago(35)
    assert held.cutoff == _days_ago(35)
    assert _stored(partitioned) == {"waiting35", "old33", "default34"}
    assert set(held.dropped) == {_day_partition(_days_ago(40)), _day_partition(_days_ago(45))}
    assert held.rows_deleted == 1  # default36; default34 is newer than the held cutoff

    with partitioned.begin() as conn:
        conn.execute(text("UPDATE raw_events SET processed = true WHERE id = 'waiting35'"))
    released = apply_retention(30, engine=partitioned, now=NOW)

    assert released.held_back_by is None
    assert _stored(partitioned) == set()
    assert set(released.dropped) == {_day_partition(_days_ago(35)), _day_partition(_days_ago(33))}


def test_a_naive_now_is_utc_as_everywhere_else(partitioned):
    _insert(partitioned, {"old40": (_days_ago(40), True), "waiting35": (_days_ago(35), False)})
    _keep_partitions(partitioned)

    result = apply_retention(30, engine=partitioned, now=NOW.replace(tzinfo=None))

    assert result.cutoff == result.held_back_by == _days_ago(35)
    assert _stored(partitioned) == {"waiting35"}


def test_a_day_that_is_not_over_by_the_cutoff_stays(partitioned):
    # The cutoff falls inside this row's day: its partition still holds newer time.
    cutoff_day_start = _days_ago(30).replace(hour=0, minute=0, second=0)
    _insert(partitioned, {"early": (cutoff_day_start, True)})
    _keep_partitions(partitioned)

    result = apply_retention(30, engine=partitioned, now=NOW)

    assert result.dropped == ()
    assert _stored(partitioned) == {"early"}


def test_a_row_written_while_retention_runs_is_not_lost(partitioned):
    _insert(partitioned, {"old40": (_days_ago(40), True)})
    _keep_partitions(partitioned)

    with partitioned.connect() as writer, ThreadPoolExecutor(1) as pool:
        late = writer.begin()  # an old, unprocessed row, not yet committed
        writer.execute(_INSERT, {"id": "late40", "at": _days_ago(40), "processed": False})
        running = pool.submit(apply_retention, 30, engine=partitioned, now=NOW)
        wait_for_a_lock_wait(partitioned, "retention")
        late.commit()
        result = running.result(timeout=30)

    assert _stored(partitioned) == {"old40", "late40"}
    assert result.held_back_by == _days_ago(40)
    assert result.dropped == ()


@pytest.fixture(params=["partitioned", "hypertable"])
def any_layout(request, scratch_engine, monkeypatch, timescale) -> Engine:
    if request.param == "hypertable" and not timescale:
        pytest.skip("this server has no TimescaleDB; the partitioned layout was tested instead")
    use_layout(monkeypatch, "partitioned" if request.param == "partitioned" else "auto")
    run_alembic(scratch_engine, "upgrade", "head")
    return scratch_engine


def test_retention_steps_back_from_an_open_claim_without_stalling_anyone(any_layout):
    """A sentiment worker scores its claimed rows for a while (the README's usage).

    Retention used to take the table, wait for the claim, and deadlock the
    worker when it marked its rows (its work rolled back), with every insert
    queued behind it meanwhile. Now it waits a moment, gives up with a
    retryable error, and drops the day once the claim is over.
    """
    from sentiment.db import MAINTENANCE_LOCK_WAIT_S as LOCK_WAIT_S
    from sentiment.errors import ServiceUnavailable
    from sentiment.processing import claim_unprocessed, mark_processed

    _insert(any_layout, {"old40": (_days_ago(40), True), "new1": (_days_ago(0.1), False)})
    if _is_partitioned(any_layout):
        _keep_partitions(any_layout)
    claimed = threading.Event()

    def sentiment_worker() -> int:
        with claim_unprocessed(limit=10, engine=any_layout) as rows:
            claimed.set()
            time.sleep(LOCK_WAIT_S + 2)  # the model scores the rows
            return mark_processed([r.key for r in rows], connection=rows.connection).updated

    def late_insert() -> bool:
        """Whether the insert is done while the claim is still open: it queued behind
        retention's short wait, not behind the claim retention was waiting for."""
        _insert(any_layout, {"late": (NOW, False)})
        return not worker.done()

    with ThreadPoolExecutor(3) as pool:
        worker = pool.submit(sentiment_worker)
        assert claimed.wait(10)
        running = pool.submit(apply_retention, 30, engine=any_layout, now=NOW)
        wait_for_a_lock_wait(any_layout, "retention")
        before_the_claim_ended = pool.submit(late_insert).result(timeout=30)
        with pytest.raises(ServiceUnavailable, match="raw_events is in use"):
            running.result(timeout=30)
        assert worker.result(timeout=30) == 1  # marked, not deadlocked

    assert before_the_claim_ended
    assert len(apply_retention(30, engine=any_layout, now=NOW).dropped) == 1  # day -40
    assert _stored(any_layout) == {"new1", "late"}


def _is_partitioned(scratch: Engine) -> bool:
    with scratch.connect() as conn:
        return bool(conn.execute(text("SELECT to_regclass('raw_events_default')")).scalar())


def test_a_dry_run_reports_exactly_what_a_run_drops_and_drops_nothing(partitioned):
    _insert(partitioned, {"old40": (_days_ago(40), True), "new2": (_days_ago(2), False)})
    _keep_partitions(partitioned)
    _insert(partitioned, {"default50": (_days_ago(50), True)})
    before = raw_events_partitions(partitioned)

    preview = apply_retention(30, engine=partitioned, now=NOW, dry_run=True)

    assert raw_events_partitions(partitioned) == before
    assert _stored(partitioned) == {"old40", "new2", "default50"}
    done = apply_retention(30, engine=partitioned, now=NOW)
    assert (preview.dropped, preview.rows_deleted) == (done.dropped, done.rows_deleted)
    assert done.dropped == (_day_partition(_days_ago(40)),)
    assert _stored(partitioned) == {"new2"}


def test_retention_refuses_to_keep_nothing(partitioned):
    with pytest.raises(ValueError, match="at least one day"):
        apply_retention(0, engine=partitioned)


@pytest.mark.timescale
def test_hypertable_chunks_go_whole_and_unprocessed_rows_stay(
    scratch_engine, monkeypatch, timescale
):
    if not timescale:
        pytest.skip("this server has no TimescaleDB; the partitioned layout was tested instead")
    use_layout(monkeypatch, "auto")
    run_alembic(scratch_engine, "upgrade", "head")
    _insert(
        scratch_engine,
        {"old40": (_days_ago(40), True), "waiting35": (_days_ago(35), False),
         "old33": (_days_ago(33), True), "new2": (_days_ago(2), False)},
    )  # fmt: skip

    held = apply_retention(30, engine=scratch_engine, now=NOW)

    assert held.held_back_by == _days_ago(35)
    assert len(held.dropped) == 1  # the chunk of day -40
    assert _stored(scratch_engine) == {"waiting35", "old33", "new2"}

    with scratch_engine.begin() as conn:
        conn.execute(text("UPDATE raw_events SET processed = true WHERE id = 'waiting35'"))
        chunks = conn.execute(text("SELECT count(*) FROM show_chunks('raw_events')")).scalar()
    released = apply_retention(30, engine=scratch_engine, now=NOW)

    assert _stored(scratch_engine) == {"new2"}
    assert len(released.dropped) == 2
    with scratch_engine.connect() as conn:
        left = conn.execute(text("SELECT count(*) FROM show_chunks('raw_events')")).scalar()
    assert left == chunks - 2


def test_retention_is_off_until_configured(settings):
    assert settings.retention_days is None
    assert "apply-retention" not in build_beat_schedule(settings)
    assert apply_retention_task.run() == {"skipped": "RETENTION_DAYS is not set"}

    configured = settings.model_copy(update={"retention_days": 90})
    entry = build_beat_schedule(configured)["apply-retention"]
    assert entry["task"] == apply_retention_task.name


@pytest.mark.parametrize(("value", "expected"), [("", None), ("  ", None), ("30", 30)])
def test_retention_setting_blank_means_keep_everything(monkeypatch, value, expected):
    monkeypatch.setenv("RETENTION_DAYS", value)
    assert Settings(_env_file=None).retention_days == expected


def test_status_shows_how_the_last_retention_and_partition_runs_went(
    settings, db, redis_client, monkeypatch
):
    """Retention held off by back-to-back claims fails every hour, quietly, unless
    `sentiment status` says so."""
    from sentiment import retention as retention_module
    from sentiment import tasks
    from sentiment.errors import ServiceUnavailable
    from sentiment.status import collect_status, status_table

    monkeypatch.setattr(tasks, "_settings", settings.model_copy(update={"retention_days": 30}))
    before = time.time()
    tasks.keep_partitions.run()

    def held(_days: int) -> None:
        raise ServiceUnavailable("raw_events is held by another transaction")

    monkeypatch.setattr(retention_module, "apply_retention", held)
    with pytest.raises(ServiceUnavailable):
        tasks.apply_retention.run()

    report = collect_status(settings)
    jobs = report["maintenance"]
    assert jobs["partitions"]["ok"] is True
    assert jobs["partitions"]["last_s_ago"] <= round(time.time() - before) + 1  # this run's
    assert jobs["retention"]["ok"] is False
    assert "raw_events is held by another transaction" in jobs["retention"]["result"]
    assert any("retention" in problem for problem in report["problems"])
    from rich.console import Console

    console = Console(width=200, record=True)
    console.print(status_table(report))
    shown = console.export_text()
    assert "partitions" in shown and "failed: ServiceUnavailable" in shown
