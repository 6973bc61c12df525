"""The batch sink against a real PostgreSQL."""

from __future__ import annotations

import logging
import multiprocessing
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from psycopg.types.json import Jsonb
from sqlalchemy import create_engine, text

from sentiment.dto import RawEventDTO, dump_events, load_events
from sentiment.errors import ServiceUnavailable
from sentiment.sinks.postgres import insert_batch, stored_new_events
from tests.factories import make_event, make_events, make_poison


def _stored_keys(engine) -> list[tuple[str, datetime]]:
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(text("SELECT id, occurred_at FROM raw_events"))]


def test_new_events_are_stored_and_returned(db):
    events = make_events(250)

    result = insert_batch(events)

    assert {e.key for e in result.new} == {e.key for e in events}
    assert result.duplicates == 0
    assert sorted(_stored_keys(db)) == sorted(e.key for e in events)


def test_payload_and_columns_round_trip(db):
    event = make_event(title='ünïcødé 🚀 "quoted"\n\ttabbed \\ backslash')

    insert_batch([event])

    with db.connect() as conn:
        row = conn.execute(text("SELECT * FROM raw_events")).mappings().one()
    assert row["payload"] == event.payload
    assert row["source"] == "reddit"
    assert row["source_id"] == "wallstreetbets"
    assert row["processed"] is False
    assert row["processed_at"] is None
    assert row["ingested_at"] is not None


def test_same_batch_twice_returns_nothing_new(db):
    events = make_events(100)
    insert_batch(events)

    again = insert_batch(events)

    assert again.new == []
    assert again.duplicates == 100
    assert len(_stored_keys(db)) == 100


def test_overlapping_batch_returns_exactly_the_new_rows(db):
    first, second = make_events(60), make_events(40)
    insert_batch(first)

    result = insert_batch(first[30:] + second)

    assert {e.key for e in result.new} == {e.key for e in second}
    assert result.duplicates == 30
    assert len(_stored_keys(db)) == 100


def test_duplicates_inside_one_batch_are_stored_once(db):
    events = make_events(10)

    result = insert_batch(events + events[:4])

    assert len(result.new) == 10
    assert result.duplicates == 4


def test_chunks_smaller_than_the_batch(db):
    events = make_events(1000)

    result = insert_batch(events, chunk_size=64)

    assert len(result.new) == 1000
    assert len(_stored_keys(db)) == 1000


def test_same_id_at_another_time_is_another_event(db):
    now = datetime.now(UTC)
    a = make_event(event_id="abc123", occurred_at=now)
    b = make_event(event_id="abc123", occurred_at=now - timedelta(days=3))

    assert len(insert_batch([a, b]).new) == 2


def _insert_in_child(blob: bytes) -> list[tuple[str, datetime]]:
    from sentiment.sinks.postgres import insert_batch as child_insert

    # A batch travels between processes as the pipeline's blob.
    return [e.key for e in child_insert(load_events(blob), chunk_size=50).new]


def test_two_processes_inserting_overlapping_batches_store_each_event_once(db):
    events = make_events(2000)
    # Both halves share 1000 events, in opposite orders: without a fixed lock
    # order the two transactions would deadlock.
    left = events[:1500]
    right = list(reversed(events[500:]))
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(2) as pool:
        first, second = pool.map(_insert_in_child, [dump_events(left), dump_events(right)])

    assert len(first) + len(second) == 2000
    assert set(first) | set(second) == {e.key for e in events}
    assert set(first) & set(second) == set()
    assert len(_stored_keys(db)) == 2000


def test_poison_record_is_quarantined_and_the_rest_stored(db):
    good = make_events(99)
    # Built without validation, as a buggy scraper might: PostgreSQL refuses a
    # NUL in jsonb, and the record must not take its 99 neighbours down with it.
    poison = make_poison(event_id="zzz999", payload={"title": "bad\x00byte"})
    batch = good[:50] + [poison] + good[50:]

    result = insert_batch(batch)

    assert result.rejected == 1
    assert {e.key for e in result.new} == {e.key for e in good}
    with db.connect() as conn:
        rejected = conn.execute(text("SELECT event_id, reason, record FROM rejected_events")).one()
    assert rejected.event_id == "zzz999"
    assert rejected.reason.startswith("unsupported Unicode escape sequence")
    assert "\\u0000 cannot be converted to text" in rejected.reason
    assert "bad\\u0000byte" in rejected.record


@pytest.mark.parametrize("errcode", ["insufficient_privilege", "undefined_table"])
def test_an_error_that_is_not_the_records_fault_quarantines_nothing(db, errcode):
    """A worker role without INSERT on raw_events, a stage table a pooler lost:
    every record fails alike, and none of them is to blame. Quarantining them all
    would report the batch stored (its watermarks move on) with nothing in it."""
    events = make_events(30)
    with db.begin() as conn:
        conn.execute(text(f"""
            CREATE FUNCTION refuse_all() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN RAISE EXCEPTION 'refused' USING ERRCODE = '{errcode}'; END $$;
            CREATE TRIGGER refuse_all BEFORE INSERT ON raw_events
                FOR EACH ROW EXECUTE FUNCTION refuse_all();
        """))  # fmt: skip
    try:
        with pytest.raises(psycopg.ProgrammingError, match="refused"):
            insert_batch(events, batch_id="not-their-fault")
    finally:
        with db.begin() as conn:
            conn.execute(text("DROP TRIGGER refuse_all ON raw_events; DROP FUNCTION refuse_all()"))

    with db.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM rejected_events")).scalar() == 0
    assert _stored_keys(db) == []
    stored = insert_batch(events, batch_id="not-their-fault")  # once the cause is gone
    assert sorted(e.key for e in stored.new) == sorted(e.key for e in events)


def test_two_poison_records_in_a_large_batch(db):
    good = make_events(500)
    bad = [make_poison(event_id=f"bad{i}") for i in range(2)]

    result = insert_batch(good[:100] + [bad[0]] + good[100:400] + [bad[1]] + good[400:])

    assert result.rejected == 2
    assert len(result.new) == 500


def test_database_down_raises_a_retryable_error(settings):
    from sqlalchemy import create_engine

    unreachable = create_engine("postgresql+psycopg://nobody@127.0.0.1:1/none")
    with pytest.raises(ServiceUnavailable) as caught:
        insert_batch(make_events(3), engine=unreachable)
    assert caught.value.retryable
    assert "PostgreSQL could not take the batch now (OperationalError)" in str(caught.value)


def test_a_batch_run_again_hands_on_the_same_new_rows(db):
    # A task that died after its insert committed runs again: it must hand on
    # the rows it inserted the first time, or they would never be exported.
    stored_before = make_events(30)
    insert_batch(stored_before)
    batch = stored_before[:10] + make_events(70)

    first = insert_batch(batch, batch_id="batch-1", chunk_size=16)
    again = insert_batch(batch, batch_id="batch-1", chunk_size=16)

    assert len(first.new) == 70
    assert [e.key for e in again.new] == [e.key for e in first.new]
    assert (again.duplicates, again.rejected) == (first.duplicates, first.rejected) == (10, 0)
    assert insert_batch(batch, batch_id="batch-2").new == []


def test_a_batch_run_again_with_another_chunk_size_hands_on_the_same_new_rows(db):
    # Workers restarted with another INSERT_BATCH_SIZE, and the task runs again.
    batch = make_events(20)

    first = insert_batch(batch, batch_id="resized", chunk_size=20)
    again = insert_batch(batch, batch_id="resized", chunk_size=8)
    third = insert_batch(batch, batch_id="resized", chunk_size=8)  # now replays (0, 8), ...

    assert len(first.new) == 20
    assert sorted(e.key for e in again.new) == sorted(e.key for e in first.new)
    assert sorted(e.key for e in third.new) == sorted(e.key for e in first.new)
    assert (again.duplicates, again.rejected) == (third.duplicates, third.rejected) == (0, 0)
    assert insert_batch(batch, batch_id="another").new == []


def test_a_batch_cut_short_then_run_with_another_chunk_size_hands_on_all_its_rows(db):
    # The first run committed its first chunk and died; the next, resized, stores the rest.
    batch = make_events(30)
    insert_batch(batch[:20], batch_id="cut", chunk_size=20)  # what the first run committed

    again = insert_batch(batch, batch_id="cut", chunk_size=8)

    assert sorted(e.key for e in again.new) == sorted(e.key for e in batch)
    assert again.duplicates == 0
    assert sorted(e.key for e in stored_new_events("cut")) == sorted(e.key for e in batch)


def test_a_batch_split_in_chunks_commits_its_oldest_items_first(db, monkeypatch):
    """A batch of several chunks that dies part-way, and then loses its watermarks and
    its blob with Redis: the watermarks' database fallback takes the newest id stored,
    and the next scrape fetches only what is newer. So the chunks that committed must
    hold the oldest items of each kind, whatever order the batch came in."""
    from sentiment.sinks import postgres as pg_sink

    now = datetime.now(UTC)
    kinds = {
        kind: [make_event(event_type=kind, occurred_at=now - timedelta(seconds=60 - i))
               for i in range(15)]  # oldest first
        for kind in ("submission", "comment")
    }  # fmt: skip
    batch = kinds["submission"][::-1] + kinds["comment"][::-1]  # as the scraper lists them
    real_copy, copies = pg_sink._copy_direct, []

    def dies_on_the_third_chunk(*args):  # type: ignore[no-untyped-def]
        copies.append(args)
        if len(copies) == 3:
            raise psycopg.OperationalError("server closed the connection unexpectedly")
        return real_copy(*args)

    monkeypatch.setattr(pg_sink, "_copy_direct", dies_on_the_third_chunk)
    with pytest.raises(ServiceUnavailable):
        insert_batch(batch, batch_id="split", chunk_size=8)
    stored = {event_id for event_id, _ in _stored_keys(db)}

    assert len(stored) == 16
    for events in kinds.values():
        ids = [e.id for e in events]
        assert [i for i in ids if i in stored] == ids[: len(stored & set(ids))]
    monkeypatch.setattr(pg_sink, "_copy_direct", real_copy)
    again = insert_batch(batch, batch_id="split", chunk_size=8)
    assert sorted(e.key for e in again.new) == sorted(e.key for e in batch)


def test_a_rerun_whose_chunks_hold_other_rows_than_recorded_still_stores_them(db, monkeypatch):
    """An earlier run (an earlier version, which kept the batch's order) recorded chunk
    (0, 8) with other rows than the same range holds now: the re-run must not take
    the record's word for what that range stored."""
    from sentiment.sinks import postgres as pg_sink

    batch = make_events(24)[::-1]  # newest first, as the scraper lists them
    real_sort, real_copy, copies = pg_sink._oldest_first, pg_sink._copy_direct, []

    def dies_on_the_second_chunk(*args):  # type: ignore[no-untyped-def]
        copies.append(args)
        if len(copies) == 2:
            raise psycopg.OperationalError("server closed the connection unexpectedly")
        return real_copy(*args)

    monkeypatch.setattr(pg_sink, "_oldest_first", list)  # the order given, as before
    monkeypatch.setattr(pg_sink, "_copy_direct", dies_on_the_second_chunk)
    with pytest.raises(ServiceUnavailable):
        insert_batch(batch, batch_id="reordered", chunk_size=8)
    monkeypatch.setattr(pg_sink, "_oldest_first", real_sort)
    monkeypatch.setattr(pg_sink, "_copy_direct", real_copy)

    again = insert_batch(batch, batch_id="reordered", chunk_size=8)

    assert sorted(_stored_keys(db)) == sorted(e.key for e in batch)
    assert sorted(e.key for e in again.new) == sorted(e.key for e in batch)
    assert sorted(e.key for e in stored_new_events("reordered")) == sorted(e.key for e in batch)


def test_a_rejected_record_is_quarantined_once_across_reruns(db):
    poison = make_poison(event_id="zzz998")
    batch = [*make_events(20), poison]

    first = insert_batch(batch, batch_id="b")
    again = insert_batch(batch, batch_id="b")

    assert first.rejected == again.rejected == 1
    assert len(again.new) == 20
    with db.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM rejected_events")).scalar() == 1


def test_a_rejected_record_is_kept_once_however_often_it_comes_back(db):
    """A re-run with another chunk size, and the same record in a later batch (a
    redelivered scrape): one row in rejected_events, not one per attempt."""
    poison = make_poison(event_id="zzz996")
    batch = [*make_events(20), poison]

    runs = [
        insert_batch(batch, batch_id="again", chunk_size=50),
        insert_batch(batch, batch_id="again", chunk_size=8),
        insert_batch(batch, batch_id="later"),
    ]

    assert [run.rejected for run in runs] == [1, 1, 1]
    with db.connect() as conn:
        rows = conn.execute(text("SELECT event_id FROM rejected_events")).scalars().all()
    assert rows == ["zzz996"]


# -- which path stored a chunk: the direct COPY, or the stage table ----------------------


@pytest.fixture
def paths(caplog):
    """The path each chunk took, in order, as ("first-last", path, reason), from the debug log."""
    caplog.set_level(logging.DEBUG, logger="sentiment.sinks.postgres")

    def taken() -> list[tuple[str, str, str]]:
        return [
            ("{}-{}".format(*r.sink_rows), r.sink_path, r.sink_reason)
            for r in caplog.records
            if hasattr(r, "sink_path")
        ]

    return taken


def test_a_new_batch_is_copied_straight_in_and_returned_whole(db, paths):
    now = datetime.now(UTC)
    events = make_events(250)
    # One id at two times, and ids that are prefixes of each other.
    events += [
        make_event(event_id="abc", occurred_at=now - timedelta(hours=1)),
        make_event(event_id="abc", occurred_at=now - timedelta(hours=2)),
        make_event(event_id="abc0", occurred_at=now - timedelta(hours=2)),
        make_event(event_id="ab", occurred_at=now - timedelta(hours=1)),
    ]
    random.shuffle(events)

    result = insert_batch(events, chunk_size=100)

    assert [path for _, path, _ in paths()] == ["copy", "copy", "copy"]
    assert {e.key for e in result.new} == {e.key for e in events}
    assert (result.duplicates, result.rejected) == (0, 0)
    assert sorted(_stored_keys(db)) == sorted(e.key for e in events)
    # Chunks are cut from the batch oldest first (Reddit's id order), and each chunk's
    # rows come back in the order they were written: (id, occurred_at).
    oldest_first = sorted(events, key=lambda e: (len(e.id), e.id))
    for start in range(0, len(events), 100):
        chunk_keys = [e.key for e in result.new[start : start + 100]]
        assert chunk_keys == sorted(e.key for e in oldest_first[start : start + 100])


def test_some_rows_stored_falls_back_to_the_stage_path_and_returns_exactly_the_new(db, paths):
    stored = make_events(30)
    insert_batch(stored)
    fresh = make_events(70)
    batch = fresh[:40] + stored[:10] + fresh[40:]

    result = insert_batch(batch)

    assert paths()[-1] == ("0-80", "stage", "direct COPY met stored rows (UniqueViolation)")
    assert {e.key for e in result.new} == {e.key for e in fresh}
    assert (result.duplicates, result.rejected) == (10, 0)
    assert sorted(_stored_keys(db)) == sorted(e.key for e in stored + fresh)
    # The stage path wrote the new rows in the order the COPY would have (RETURNING
    # gives them in the order written).
    assert [e.key for e in result.new] == sorted(e.key for e in fresh)


def test_a_resent_batch_costs_one_failed_copy(db, paths):
    events = make_events(500)
    insert_batch(events, chunk_size=100)

    again = insert_batch(events, chunk_size=100)

    assert again.new == []
    assert again.duplicates == 500
    assert paths()[5:] == [
        ("0-100", "stage", "direct COPY met stored rows (UniqueViolation)"),
        *((f"{s}-{s + 100}", "stage", "stored rows seen earlier in this call")
          for s in range(100, 500, 100)),
    ]  # fmt: skip


def test_after_stored_rows_a_chunk_of_only_new_rows_brings_the_copy_back(db, paths):
    stored = make_events(150)
    insert_batch(stored)
    fresh = make_events(350)

    result = insert_batch(stored + fresh, chunk_size=100)

    assert [(rows, path) for rows, path, _ in paths()[1:]] == [
        ("0-100", "stage"),  # the COPY met stored rows
        ("100-200", "stage"),  # half stored
        ("200-300", "stage"),  # all new: the next chunk tries the COPY again
        ("300-400", "copy"),
        ("400-500", "copy"),
    ]
    assert {e.key for e in result.new} == {e.key for e in fresh}
    assert result.duplicates == 150


def test_poison_in_a_chunk_after_direct_copies_is_quarantined_and_the_rest_stored(db, paths):
    good = make_events(151)
    # Chunks are cut oldest first: the poison takes a place in the middle chunk.
    poison = make_poison(event_id=good.pop(75).id, payload={"title": "bad\x00byte"})
    batch = good[:75] + [poison] + good[75:]

    first = insert_batch(batch, batch_id="poisoned", chunk_size=50)
    again = insert_batch(batch, batch_id="poisoned", chunk_size=50)

    taken = [(rows, path) for rows, path, _ in paths()]
    assert taken[:3] == [("0-50", "copy"), ("50-100", "stage"), ("100-150", "copy")]
    assert paths()[1][2] == "direct COPY refused (UntranslatableCharacter)"
    assert first.rejected == again.rejected == 1
    assert {e.key for e in first.new} == {e.key for e in good}
    assert [e.key for e in again.new] == [e.key for e in first.new]
    assert sorted(_stored_keys(db)) == sorted(e.key for e in good)
    with db.connect() as conn:
        rejected = conn.execute(text("SELECT event_id, reason FROM rejected_events")).all()
    assert [r.event_id for r in rejected] == [poison.id]
    assert "\\u0000 cannot be converted to text" in rejected[0].reason


def test_a_batch_copied_straight_in_hands_on_the_same_new_rows_when_run_again(db, paths):
    events = make_events(120)

    first = insert_batch(events, batch_id="direct", chunk_size=50)
    again = insert_batch(events, batch_id="direct", chunk_size=50)

    assert [path for _, path, _ in paths()] == ["copy", "copy", "copy"]  # nothing on the re-run
    assert len(first.new) == 120
    assert [e.key for e in again.new] == [e.key for e in first.new]
    assert (again.duplicates, again.rejected) == (0, 0)
    assert insert_batch(events, batch_id="another").new == []


def _new_keys_when_all_start(go: threading.Barrier, batch: list[RawEventDTO]) -> set:
    go.wait(30)
    return {e.key for e in insert_batch(batch, chunk_size=100).new}


def test_threads_inserting_overlapping_batches_store_each_event_once(db, paths):
    # Both threads start on the same rows at the same moment, in orders of their
    # own, so a COPY waits on the other's uncommitted keys and then meets them;
    # each also has rows no one else has.
    with ThreadPoolExecutor(2) as pool:
        for _ in range(3):
            shared, own = make_events(600), [make_events(400), make_events(400)]
            batches = [shared + own[0], random.sample(shared, len(shared)) + own[1]]
            go = threading.Barrier(2)
            first, second = pool.map(_new_keys_when_all_start, [go, go], batches)

            assert first | second == {e.key for e in shared + own[0] + own[1]}
            assert first & second == set()
            assert {e.key for e in own[0]} <= first
            assert {e.key for e in own[1]} <= second
    stored = _stored_keys(db)
    assert len(stored) == len(set(stored)) == 3 * 1400
    taken = paths()
    assert any(path == "copy" for _, path, _ in taken)
    assert any("met stored rows" in why for _, _, why in taken)


def _wait_until_waiting_for_a_lock(look: psycopg.Connection, application_name: str) -> None:
    deadline = time.monotonic() + 10
    query = (
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE application_name = %s AND wait_event_type = 'Lock'"
    )
    while not look.execute(query, (application_name,)).fetchone()[0]:
        assert time.monotonic() < deadline, f"{application_name} never waited for a lock"
        time.sleep(0.01)


def test_a_deadlock_in_the_direct_copy_falls_back_to_the_stage_path(settings, db, paths, timescale):
    # Another writer holds the chunk's last key, the COPY waits on it, and then
    # that writer asks for the chunk's first key: a deadlock the COPY loses (its
    # deadlock_timeout runs out first), so the chunk goes the stage way.
    events = sorted(make_events(10), key=lambda e: e.key)
    url = settings.database_url(driver="psycopg")
    dsn = url.replace("postgresql+psycopg://", "postgresql://")
    insert = (
        "INSERT INTO raw_events (id, occurred_at, source, source_id, event_type, payload)"
        " VALUES (%s, %s, %s, %s, %s, %s)"
    )

    def row(e: RawEventDTO) -> tuple:
        return (e.id, e.occurred_at, e.source, e.source_id, e.event_type, Jsonb(e.payload))

    with psycopg.connect(dsn) as other, psycopg.connect(dsn, autocommit=True) as look:
        superuser = "SELECT rolsuper FROM pg_roles WHERE rolname = current_user"
        if not look.execute(superuser).fetchone()[0]:
            pytest.skip("setting deadlock_timeout needs a superuser")
        other.execute("SET deadlock_timeout = '60s'")
        other.execute(insert, row(events[-1]))
        sink = create_engine(
            url,
            connect_args={
                "application_name": "sink-deadlock-test",
                "options": "-c deadlock_timeout=3s",
            },
        )
        result: list = []
        worker = threading.Thread(target=lambda: result.append(insert_batch(events, engine=sink)))
        worker.start()
        _wait_until_waiting_for_a_lock(look, "sink-deadlock-test")
        other.execute(insert, row(events[0]))  # returns once the COPY gave up its keys
        other.commit()
        worker.join(30)
        sink.dispose()

    # TimescaleDB's COPY buffers rows per chunk and flushes them in its own order:
    # it waits on the last key before taking the first, so the other writer gets
    # the first key, commits, and the COPY meets a stored row instead. Either way
    # the chunk goes the stage way.
    why = "UniqueViolation" if timescale else "DeadlockDetected"
    assert paths()[0][1:] == ("stage", f"direct COPY met stored rows ({why})")
    (stored,) = result
    assert {e.key for e in stored.new} == {e.key for e in events[1:-1]}
    assert stored.duplicates == 2
    assert sorted(_stored_keys(db)) == sorted(e.key for e in events)


@pytest.mark.parametrize("which", ["sink", "default"])
def test_a_forked_child_opens_its_own_connections(db, which):
    # Celery's prefork pool forks: a child sharing its parent's socket would garble
    # both sides' conversations with the server.
    from sentiment.db import get_engine
    from sentiment.sinks.postgres import get_sink_engine

    engine = get_sink_engine() if which == "sink" else get_engine()
    with engine.connect():
        pass
    assert engine.pool.checkedin() >= 1

    pid = os.fork()
    if pid == 0:
        os._exit(0 if engine.pool.checkedin() == 0 else 1)
    _, status = os.waitpid(pid, 0)

    assert os.waitstatus_to_exitcode(status) == 0
    assert engine.pool.checkedin() >= 1  # the parent's pool is untouched
