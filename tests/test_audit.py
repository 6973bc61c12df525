"""Exports the chains missed are found and written, once."""

from __future__ import annotations

import csv
from pathlib import Path

from sqlalchemy import text

from sentiment.sinks.csv import export_events
from sentiment.sinks.postgres import insert_batch
from tests.factories import make_events


def _csv_ids(csv_dir: Path) -> list[str]:
    ids: list[str] = []
    for path in sorted(csv_dir.rglob("*.csv")):
        with path.open(newline="", encoding="utf-8") as handle:
            ids += [row[0] for row in list(csv.reader(handle))[1:]]
    return ids


def _age(db, batch_id: str, hours: float) -> None:
    with db.begin() as conn:
        conn.execute(
            text("UPDATE ingested_batches SET created_at = now() - make_interval(hours => :h)"
                 " WHERE batch_id = :b"),
            {"h": hours, "b": batch_id},
        )  # fmt: skip


def test_a_batch_stored_but_never_exported_is_exported_once(db, csv_dir, redis_client):
    """Redis lost everything after the insert (the queued export with it), or the
    insert failed for good after committing part of a split batch."""
    from sentiment.audit import export_missing

    stored = make_events(12, subreddit="stocks")
    insert_batch(stored, batch_id="lost-export", chunk_size=5)  # three committed chunks
    exported = make_events(7, subreddit="stocks")
    new = insert_batch(exported, batch_id="exported").new
    export_events(new, csv_dir=csv_dir, batch_id="exported")
    for batch_id in ("lost-export", "exported"):
        _age(db, batch_id, hours=2)

    first = export_missing(csv_dir=csv_dir)
    again = export_missing(csv_dir=csv_dir)

    assert (first.missing, first.rows_written, first.failing) == (1, 12, 0)
    assert (again.missing, again.rows_written) == (0, 0)
    assert sorted(_csv_ids(csv_dir)) == sorted(e.id for e in stored + exported)


def test_recent_old_and_empty_batches_are_left_alone(db, csv_dir, redis_client):
    from sentiment.audit import export_missing

    insert_batch(make_events(3, subreddit="stocks"), batch_id="in-flight")  # its chain may run yet
    insert_batch(make_events(3, subreddit="stocks"), batch_id="too-old")
    _age(db, "too-old", hours=4 * 24)  # the CSV ledger may have forgotten it: writing could repeat
    events = make_events(3, subreddit="stocks")
    insert_batch(events)
    insert_batch(events, batch_id="all-duplicates")  # nothing new: nothing to export
    _age(db, "all-duplicates", hours=2)

    result = export_missing(csv_dir=csv_dir)

    assert (result.batches, result.missing, result.rows_written) == (0, 0, 0)
    assert _csv_ids(csv_dir) == []


def test_a_directory_that_cannot_be_written_is_counted_and_the_others_go_on(
    db, csv_dir, redis_client
):
    from sentiment.audit import export_missing

    insert_batch(make_events(4, subreddit="stocks"), batch_id="blocked")
    insert_batch(make_events(5, subreddit="investing"), batch_id="fine")
    for batch_id in ("blocked", "fine"):
        _age(db, batch_id, hours=2)
    (csv_dir / "reddit").mkdir(parents=True, exist_ok=True)
    (csv_dir / "reddit" / "stocks").write_text("a file where a folder should be")

    result = export_missing(csv_dir=csv_dir)

    assert (result.missing, result.rows_written, result.failing) == (1, 5, 1)  # stocks: unknown


def test_a_batch_still_held_by_its_chain_is_left_to_it_and_reaches_the_csv_whole(
    db, csv_dir, redis_client
):
    """A worker died after the first chunks of a split batch committed; its insert
    comes back more than an hour later (the visibility timeout) and stores the rest."""
    from sentiment import pipeline
    from sentiment.audit import export_missing

    events = make_events(12, subreddit="stocks")
    pipeline.stash_batch(events, "redelivered")  # the chain's blob, still in Redis
    insert_batch(events[:5], batch_id="redelivered")  # what committed before the worker died
    _age(db, "redelivered", hours=2)

    waiting = export_missing(csv_dir=csv_dir)

    assert (waiting.missing, waiting.rows_written, waiting.in_flight) == (0, 0, 1)
    assert _csv_ids(csv_dir) == []
    # The insert, redelivered, stores the rest; its chain exports the whole batch.
    new = insert_batch(events, batch_id="redelivered", chunk_size=5).new
    export_events(new, csv_dir=csv_dir, batch_id="redelivered")
    pipeline.drop_batch(pipeline.batch_key("redelivered"))
    assert sorted(_csv_ids(csv_dir)) == sorted(e.id for e in events)
    assert export_missing(csv_dir=csv_dir).missing == 0


def test_a_batch_whose_insert_failed_for_good_is_exported_once_its_blob_is_gone(
    db, csv_dir, redis_client
):
    from sentiment import pipeline
    from sentiment.audit import export_missing
    from sentiment.tasks import insert_batch as insert_task

    events = make_events(12, subreddit="stocks")
    key = pipeline.stash_batch(events, "failed")
    insert_batch(events[:5], batch_id="failed")  # committed before the insert failed for good
    _age(db, "failed", hours=2)
    token = pipeline.acquire_scrape_lock("stocks", ttl_s=600)
    batch = {"subreddit": "stocks", "batch": key, "batch_id": "failed", "lock": token}

    insert_task.on_failure(RuntimeError("gave up"), "task-id", (batch,), {}, None)

    assert redis_client.exists(key) == 0  # the blob is let go of,
    assert pipeline.acquire_scrape_lock("stocks", ttl_s=60) is not None  # and the lock
    assert "gave up" in redis_client.hget(pipeline.runs_key("stocks"), "error").decode()
    result = export_missing(csv_dir=csv_dir)
    assert (result.missing, result.rows_written, result.in_flight) == (1, 5, 0)
    assert sorted(_csv_ids(csv_dir)) == sorted(e.id for e in events[:5])


def test_a_batch_whose_chain_died_is_exported_once_its_blob_expires(db, csv_dir, redis_client):
    """The chain died without letting go of its blob (Redis down when it failed):
    the batch is in flight while the blob lives, and still looked for after it
    expires, three days on."""
    from sentiment import pipeline
    from sentiment.audit import export_missing

    events = make_events(6, subreddit="stocks")
    key = pipeline.stash_batch(events, "abandoned")
    insert_batch(events, batch_id="abandoned")
    _age(db, "abandoned", hours=2)
    assert export_missing(csv_dir=csv_dir).in_flight == 1

    redis_client.delete(key)  # as its expiry does, three days after the scrape
    _age(db, "abandoned", hours=pipeline.BATCH_TTL_S // 3600 + 1)
    result = export_missing(csv_dir=csv_dir)

    assert (result.missing, result.rows_written, result.in_flight) == (1, 6, 0)
    assert sorted(_csv_ids(csv_dir)) == sorted(e.id for e in events)
