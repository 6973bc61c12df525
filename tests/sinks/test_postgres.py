"""The batch sink against a real PostgreSQL."""

from __future__ import annotations

import multiprocessing
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import text

from sentiment.dto import RawEventDTO
from sentiment.sinks.postgres import insert_batch
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


def _insert_in_child(events_json: list[str]) -> int:
    from sentiment.sinks.postgres import insert_batch as child_insert

    events = [RawEventDTO.model_validate_json(e) for e in events_json]
    return len(child_insert(events, chunk_size=50).new)


def test_two_processes_inserting_overlapping_batches_store_each_event_once(db):
    events = make_events(2000)
    # Both halves share 1000 events, in opposite orders: without a fixed lock
    # order the two transactions would deadlock.
    left = events[:1500]
    right = list(reversed(events[500:]))
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(2) as pool:
        counts = pool.map(
            _insert_in_child,
            [[e.model_dump_json() for e in left], [e.model_dump_json() for e in right]],
        )

    assert sum(counts) == 2000
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


def test_two_poison_records_in_a_large_batch(db):
    good = make_events(500)
    bad = [make_poison(event_id=f"bad{i}") for i in range(2)]

    result = insert_batch(good[:100] + [bad[0]] + good[100:400] + [bad[1]] + good[400:])

    assert result.rejected == 2
    assert len(result.new) == 500


def test_database_down_raises_a_retryable_error(settings):
    from sqlalchemy import create_engine

    from sentiment.errors import ServiceUnavailable

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


def test_a_rejected_record_is_quarantined_once_across_reruns(db):
    poison = make_poison(event_id="zzz998")
    batch = [*make_events(20), poison]

    first = insert_batch(batch, batch_id="b")
    again = insert_batch(batch, batch_id="b")

    assert first.rejected == again.rejected == 1
    assert len(again.new) == 20
    with db.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM rejected_events")).scalar() == 1
