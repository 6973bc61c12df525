"""The Celery pipeline end to end: real worker processes, Redis, PostgreSQL, simulator.

The failure tests do to the system what production will: SIGKILL a worker in
the middle of an insert, stop PostgreSQL for 20 seconds, restart Redis.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from celery import chain
from sqlalchemy import text

from sentiment import pipeline
from sentiment.errors import ServiceUnavailable
from sentiment.tasks import export_csv, insert_batch, mark_processed, scrape, set_aside
from tests.conftest import _free_port, wait_for_a_lock_wait
from tests.factories import make_events
from tests.processes import ROOT

pytestmark = pytest.mark.slow


def _unique_subreddit(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


def _csv_ids(csv_dir: Path) -> list[str]:
    ids = []
    for path in sorted(csv_dir.rglob("*.csv")):
        with path.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.reader(handle))
        assert rows[0][0] == "id"
        ids += [row[0] for row in rows[1:]]
    return ids


def _stored_ids(engine, subreddit: str | None = None) -> list[str]:
    query = "SELECT id FROM raw_events" + (" WHERE source_id = :s" if subreddit else "")
    with engine.connect() as conn:
        return list(conn.execute(text(query), {"s": subreddit}).scalars())


def test_scrape_runs_the_whole_chain_and_returns_its_summary(worker, simulator, db, csv_dir):
    name = _unique_subreddit("chain")
    simulator.add_subreddit(name, submissions=150, comments=320)

    summary = scrape.delay(name).get(timeout=90)

    assert summary["subreddit"] == name
    assert summary["fetched"] == summary["inserted"] == summary["exported"] == 470
    assert summary["gaps"] == 0
    assert summary["seconds"] > 0
    assert sorted(_stored_ids(db, name)) == sorted(_csv_ids(csv_dir))

    simulator.add_items(name, submissions=7, comments=11)
    again = scrape.delay(name).get(timeout=90)

    assert again["fetched"] == again["inserted"] == again["exported"] == 18
    assert again["requests"] == 2  # one page of each kind: incremental
    assert len(_stored_ids(db, name)) == len(_csv_ids(csv_dir)) == 488


def test_scrape_runs_eagerly_too(simulator, db, redis_client, csv_dir):
    """`scrape.apply(...)` (or task_always_eager, as in a notebook or a unit test):
    the chain runs in this process and its summary comes back."""
    name = _unique_subreddit("eager")
    simulator.add_subreddit(name, submissions=4, comments=6)

    summary = scrape.apply(args=[name]).get(timeout=60)

    assert summary["subreddit"] == name
    assert summary["inserted"] == summary["exported"] == 10
    assert len(_csv_ids(csv_dir)) == 10


def test_scrape_delay_from_a_python_shell(worker, simulator):
    name = _unique_subreddit("shell")
    simulator.add_subreddit(name, submissions=5, comments=5)
    code = f"from sentiment.tasks import scrape; print(scrape.delay({name!r}).get(timeout=60))"

    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert result.returncode == 0, result.stderr
    assert f"'subreddit': '{name}'" in result.stdout
    assert "'inserted': 10" in result.stdout


def test_a_beat_scrape_retried_after_its_expiry_still_runs(
    worker_factory, simulator, db, redis_client, csv_dir
):
    """Beat sends scrapes with `expires`; a retry must not inherit it, or a scrape
    whose failing attempts used up its interval would be dropped, not retried."""
    worker_factory(env={"REDDIT_MAX_ATTEMPTS": "1"})  # a page fails after asyncprawcore tries 3
    name = _unique_subreddit("expiring")
    simulator.add_subreddit(name, submissions=3, comments=4)
    # Both kinds are fetched at once: 3 requests each, 2-6 s, then the task retries.
    simulator.inject_fault("status", status=503, count=6, subreddit=name)

    summary = scrape.apply_async(args=[name], expires=2).get(timeout=120)

    assert summary["inserted"] == summary["exported"] == 7


def test_an_overlapping_scrape_is_refused(worker, simulator):
    name = _unique_subreddit("overlap")
    simulator.add_subreddit(name, submissions=3)
    token = pipeline.acquire_scrape_lock(name, ttl_s=60)  # another scrape is running

    result = scrape.delay(name).get(timeout=30)

    assert result == {"subreddit": name, "skipped": f"another scrape of r/{name} is in progress"}
    pipeline.release_scrape_lock(name, token)
    assert scrape.delay(name).get(timeout=60)["inserted"] == 3


def test_a_scrape_whose_worker_died_mid_fetch_runs_again_when_redelivered(
    worker_factory, simulator, db, redis_client, csv_dir
):
    """The worker died holding the subreddit's scrape lock; Redis hands the same
    message out again. That delivery takes its own task's lock back and scrapes,
    instead of answering "in progress" for a run that is dead (and every beat
    scrape after it, until the lock's TTL)."""
    name = _unique_subreddit("diedfetch")
    simulator.add_subreddit(name, submissions=3, comments=4)
    simulator.inject_fault("delay", delay=20, count=2, subreddit=name)  # both first pages hang
    worker = worker_factory()
    result = scrape.delay(name)
    deadline = time.monotonic() + 30
    while not redis_client.exists(pipeline.scrape_lock_key(name)):
        assert time.monotonic() < deadline, "the scrape never started"
        time.sleep(0.05)

    # The OOM killer's usual pick: the pool process, not the worker. The worker
    # requeues the task at once (task_reject_on_worker_lost), well inside the TTL
    # of the lock the dead process holds.
    pool = subprocess.run(["pgrep", "-P", str(worker.process.pid)], capture_output=True,
                          text=True, check=True).stdout.split()  # fmt: skip
    for pid in pool:
        os.kill(int(pid), signal.SIGKILL)
    summary = result.get(timeout=60)

    assert "skipped" not in summary
    assert summary["inserted"] == summary["exported"] == 7
    other = pipeline.acquire_scrape_lock(name, ttl_s=60)  # and it let go of the lock
    assert other is not None
    assert scrape.delay(name).get(timeout=30)["skipped"].startswith("another scrape")


def test_a_task_whose_id_starts_another_tasks_lock_does_not_take_it(redis_client):
    name = _unique_subreddit("lockprefix")
    held = pipeline.acquire_scrape_lock(name, ttl_s=60, task_id="t:x")  # ids are free text
    assert held is not None

    assert pipeline.acquire_scrape_lock(name, ttl_s=60, task_id="t") is None
    assert redis_client.get(pipeline.scrape_lock_key(name)).decode() == held


def test_a_scrape_takes_back_only_its_own_lock_and_not_once_its_chain_holds_it(redis_client):
    """A delivery of the same task takes back a lock its earlier delivery left; not
    another task's (even one whose id starts with this one's), and not the lock
    once the scrape handed it to its chain (a redelivery after the chain was sent
    would run beside the chain's insert)."""
    name = _unique_subreddit("lockowner")
    dead = pipeline.acquire_scrape_lock(name, ttl_s=60, task_id="task-1")
    assert dead is not None
    assert pipeline.acquire_scrape_lock(name, ttl_s=60, task_id="task-2") is None
    assert pipeline.acquire_scrape_lock(name, ttl_s=60, task_id="task") is None
    assert pipeline.acquire_scrape_lock(name, ttl_s=60) is None
    again = pipeline.acquire_scrape_lock(name, ttl_s=60, task_id="task-1")
    assert again is not None and again != dead

    chains = pipeline.hand_over_scrape_lock(name, again)

    assert chains is not None and not chains.startswith("task-1")
    assert 50 < redis_client.ttl(pipeline.scrape_lock_key(name)) <= 60  # the TTL goes on
    assert pipeline.acquire_scrape_lock(name, ttl_s=60, task_id="task-1") is None
    assert pipeline.hand_over_scrape_lock(name, again) is None  # not ours any more
    pipeline.release_scrape_lock(name, chains)
    assert pipeline.acquire_scrape_lock(name, ttl_s=60, task_id="task-3") is not None


@pytest.mark.parametrize("arriving", [(5, 12), (30, 70)], ids=["fewer", "as-many"])
def test_a_redelivered_scrape_is_a_new_batch(worker, simulator, db, csv_dir, arriving):
    """The worker died after `scrape` sent its chain, before the ack: Redis hands the
    same message, task id and all, out again. Its run is a batch of its own, whose
    new rows reach the CSV too (with the task id as batch id, the CSV ledger took
    them for written; a batch of the same size even replayed the old one's keys)."""
    name = _unique_subreddit("redeliver")
    simulator.add_subreddit(name, submissions=30, comments=70)
    task_id = uuid.uuid4().hex
    first = scrape.apply_async(args=[name], task_id=task_id)
    assert first.get(timeout=90)["exported"] == 100
    first.forget()  # so that .get() below waits for the second run's result

    submissions, comments = arriving
    simulator.add_items(name, submissions=submissions, comments=comments)
    again = scrape.apply_async(args=[name], task_id=task_id).get(timeout=90)

    assert again["inserted"] == again["exported"] == submissions + comments
    stored = _stored_ids(db, name)
    assert len(stored) == 100 + submissions + comments
    assert sorted(_csv_ids(csv_dir)) == sorted(stored)


@pytest.mark.parametrize("bad", ["../etc", "a", 123, None])
def test_a_bad_subreddit_name_fails_at_once_with_the_rule(worker, bad):
    with pytest.raises(Exception, match="is not a valid subreddit name") as caught:
        scrape.delay(bad).get(timeout=30)
    assert type(caught.value).__name__ == "InvalidSubreddit"


def test_a_private_subreddit_fails_clearly_and_is_backed_off(worker, simulator):
    name = _unique_subreddit("private")
    simulator.add_subreddit(name, kind="private", submissions=3)

    with pytest.raises(Exception, match=f"r/{name} is private") as caught:
        scrape.delay(name).get(timeout=30)
    assert type(caught.value).__name__ == "SubredditUnavailable"

    skipped = scrape.delay(name).get(timeout=30)
    assert skipped["skipped"].startswith(f"r/{name} is marked failing")


def test_mark_processed_through_the_task(worker, db):
    events = make_events(5)
    from sentiment.sinks.postgres import insert_batch as store

    store(events)
    keys = [[e.id, e.occurred_at.isoformat()] for e in events[:3]] + ["missing1"]
    bad = [[events[3].id, "not a time"], 42]  # refused one by one, never the call

    assert mark_processed.delay(keys + bad).get(timeout=30) == {
        "updated": 3,
        "already_processed": 0,
        "unknown": 1,
        "invalid": 2,
    }

    unscorable = [[events[4].id, events[4].occurred_at.isoformat()], events[0].id]
    assert set_aside.delay(unscorable, "model v1: no text").get(timeout=30) == {
        "updated": 1,
        "already_processed": 1,
        "unknown": 0,
        "invalid": 0,
    }
    with pytest.raises(Exception, match="needs a reason"):
        set_aside.delay([events[3].id], " ").get(timeout=30)
    with db.connect() as conn:
        errors = dict(conn.execute(text(
            "SELECT id, process_error FROM raw_events WHERE id = ANY(:ids)"
        ), {"ids": [e.id for e in events]}).all())  # fmt: skip
    assert errors == {e.id: None for e in events[:4]} | {events[4].id: "model v1: no text"}


def test_the_partition_keeper_steps_back_from_an_open_claim(db, timescale):
    """Creating a day's partition takes raw_events whole. Behind a sentiment worker's
    long claim it used to wait up to the 30 s lock_timeout, every insert queued
    behind it; now it waits a moment and its task retries later."""

    from sentiment.db import MAINTENANCE_LOCK_WAIT_S
    from sentiment.processing import claim_unprocessed
    from sentiment.sinks.postgres import insert_batch as store
    from sentiment.tasks import keep_partitions

    if timescale:
        pytest.skip("TimescaleDB makes its chunks itself; there is no partition keeper")
    store(make_events(3))
    day = datetime.now(UTC).date() + timedelta(days=3)
    with db.begin() as conn:  # a day the keeper has to make again
        conn.execute(text(f"DROP TABLE IF EXISTS raw_events_p{day:%Y%m%d}"))
    claimed, release = threading.Event(), threading.Event()

    def sentiment_worker() -> int:
        with claim_unprocessed(limit=10) as rows:
            claimed.set()
            # The model scores the rows, for longer than the keeper's short wait but
            # far shorter than the connections' own lock_timeout (30 s): if the
            # keeper waited that long, the claim would end first and it would succeed.
            release.wait(MAINTENANCE_LOCK_WAIT_S + 8)
            return len(rows)

    with ThreadPoolExecutor(2) as pool:
        worker_claim = pool.submit(sentiment_worker)
        assert claimed.wait(10)
        with pytest.raises(ServiceUnavailable, match=r"PostgreSQL: .*lock timeout"):
            keep_partitions()  # retried by Celery: OperationalError is transient
        assert not worker_claim.done()  # it gave up while the claim was still open
        release.set()
        assert worker_claim.result(timeout=30) == 3

    assert keep_partitions()["partitions_created"] >= 1
    with db.connect() as conn:
        assert conn.execute(text(f"SELECT to_regclass('raw_events_p{day:%Y%m%d}')")).scalar()


@pytest.mark.parametrize("keeper_locks_first", [True, False], ids=["as_is", "without_the_lock"])
def test_an_insert_racing_the_partition_keeper_lands_in_its_day(
    db, timescale, monkeypatch, keeper_locks_first
):
    """The keeper lifts a day's rows out of the default partition, then creates the
    day's partition. A row inserted into the default partition in between makes
    the creation fail; taking raw_events whole first makes the insert wait. Here
    an insert is in flight when the keeper starts; without the lock the keeper
    fails (the second case checks that the test can tell)."""
    import sqlalchemy.exc

    from sentiment import tasks
    from sentiment.tasks import keep_partitions

    if timescale:
        pytest.skip("TimescaleDB makes its chunks itself; there is no partition keeper")
    if not keeper_locks_first:
        monkeypatch.setattr(tasks, "lock_raw_events", lambda conn: None)
    day = datetime.now(UTC).date() + timedelta(days=3)
    partition = f"raw_events_p{day:%Y%m%d}"
    with db.begin() as conn:  # a day the keeper has to make again: its rows go to default
        conn.execute(text(f"DROP TABLE IF EXISTS {partition}"))
    event = make_events(1)[0]
    inserted, commit = threading.Event(), threading.Event()

    def scraper_insert() -> None:
        with db.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO raw_events (id, occurred_at, source, source_id, event_type,"
                    " payload) VALUES (:id, :at, 'reddit', 'stocks', 'comment', '{}')"
                ),
                {"id": event.id, "at": datetime.combine(day, datetime.min.time(), UTC)},
            )
            inserted.set()
            commit.wait(30)

    with ThreadPoolExecutor(2) as pool:
        insert = pool.submit(scraper_insert)
        assert inserted.wait(10)
        keeper = pool.submit(keep_partitions)
        wait_for_a_lock_wait(db, "the partition keeper")
        commit.set()
        insert.result(timeout=30)
        if not keeper_locks_first:
            with pytest.raises(sqlalchemy.exc.IntegrityError, match="default partition"):
                keeper.result(timeout=30)
            return
        assert keeper.result(timeout=30)["partitions_created"] >= 1

    with db.connect() as conn:
        where = conn.execute(
            text("SELECT tableoid::regclass::text FROM raw_events WHERE id = :id"),
            {"id": event.id},
        ).scalar()
        in_default = conn.execute(text("SELECT count(*) FROM raw_events_default")).scalar()
    assert (where, in_default) == (partition, 0)


def _big_batch(count: int) -> dict:
    events = make_events(count)
    ref = pipeline.stash_batch(events)
    return {
        "subreddit": "wallstreetbets",
        "fetched": count,
        "batch": ref,
        "batch_id": uuid.uuid4().hex,
        "watermarks": {},
        "lock": None,
        "started_at": time.time(),
        "gaps": 0,
        "malformed": 0,
        "requests": 0,
    }


def _wait_for_sink_activity(engine, timeout: float = 60) -> None:
    query = text(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'sentiment-sink'"
        " AND state = 'active' AND query NOT ILIKE '%pg_stat_activity%'"
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with engine.connect() as conn:
            if conn.execute(query).scalar():
                return
        time.sleep(0.02)
    raise AssertionError("the worker never started inserting")


def test_a_worker_killed_mid_insert_loses_and_duplicates_nothing(
    worker_factory, db, redis_client, csv_dir
):
    batch = _big_batch(60_000)
    first = worker_factory()
    result = chain(insert_batch.s(batch), export_csv.s()).apply_async()

    _wait_for_sink_activity(db)
    first.kill()  # SIGKILL, main process and pool: no chance to clean up
    partially = len(_stored_ids(db))
    assert partially < 60_000, "the insert finished before the kill; make the batch bigger"

    worker_factory()  # the message comes back once its visibility timeout passes
    summary = result.get(timeout=180)

    stored = _stored_ids(db)
    assert len(stored) == len(set(stored)) == 60_000
    written = _csv_ids(csv_dir)
    assert len(written) == len(set(written)) == 60_000
    assert summary["exported"] == 60_000


def test_postgres_stopped_for_20_seconds_the_tasks_retry_and_finish(
    worker, simulator, db, csv_dir, settings
):
    if not settings.uses_embedded_postgres:
        pytest.skip("needs the embedded PostgreSQL, which the test can stop")
    from sentiment.embedded import embedded_postgres

    server = embedded_postgres(settings, durable=False)
    name = _unique_subreddit("pgdown")
    simulator.add_subreddit(name, submissions=40, comments=60)
    server.stop()
    assert not server.accepts_connections()
    restart = threading.Timer(20, server.start)
    restart.start()
    try:
        summary = scrape.delay(name).get(timeout=180)
    finally:
        restart.join()

    assert summary["inserted"] == summary["exported"] == 100
    assert "retry: Retry in" in worker.output()  # the tasks met the outage, and retried
    stored = _stored_ids(db, name)
    assert len(stored) == len(set(stored)) == 100
    assert sorted(_csv_ids(csv_dir)) == sorted(stored)


def test_a_worker_that_cannot_write_to_csv_dir_stops_at_start_up_saying_so(
    worker_factory, tmp_path
):
    blocked = tmp_path / "csv"
    blocked.write_text("a file where the CSV folder should be")

    with pytest.raises(RuntimeError, match="worker exited at start-up") as caught:
        worker_factory(env={"CSV_DIR": str(blocked)})
    assert f"CSV_DIR={blocked}: cannot write CSV files there" in str(caught.value)

    # A worker that never exports (no export queue) does not need the folder.
    worker_factory(env={"CSV_DIR": str(blocked)}, queues="scrape,ingest")


def test_a_malformed_message_fails_its_task_clearly_and_parks_nothing(worker):
    for task, poison in ((insert_batch, {"subreddit": "stocks"}), (export_csv, {"x": 1})):
        with pytest.raises(Exception, match="malformed batch") as caught:
            task.delay(poison).get(timeout=30)
        assert type(caught.value).__name__ == "MalformedBatch"
    assert pipeline.parked_exports() == []
    assert worker.alive()


def test_an_export_that_fails_for_good_is_parked_and_retried_once_the_disk_is_back(
    worker_factory, simulator, db, redis_client, tmp_path
):
    from sentiment.tasks import retry_exports

    blocked = tmp_path / "csv"
    blocked.mkdir()
    worker_factory(env={"CSV_DIR": str(blocked), "TASK_MAX_RETRIES": "0"})
    blocked.rmdir()  # the disk goes bad after start-up: every export fails
    blocked.write_text("a file where the CSV folder should be")
    name = _unique_subreddit("parked")
    simulator.add_subreddit(name, submissions=30, comments=70)

    with pytest.raises(Exception, match="CSV disk unavailable"):
        scrape.delay(name).get(timeout=90)

    stored = _stored_ids(db, name)
    assert len(stored) == 100  # in PostgreSQL already; only the CSV is missing
    (parked,) = pipeline.parked_exports()
    assert parked["subreddit"] == name
    assert redis_client.exists(parked["batch"])
    assert retry_exports.delay().get(timeout=60) == {"exported": 0, "failing": 1, "lost": 0}

    blocked.unlink()
    blocked.mkdir()
    assert retry_exports.delay().get(timeout=60) == {"exported": 1, "failing": 0, "lost": 0}
    assert sorted(_csv_ids(blocked)) == sorted(stored)
    assert pipeline.parked_exports() == []
    assert not redis_client.exists(parked["batch"])

    # A late redelivery of the original export finds its batch gone from Redis,
    # reads the new rows back from PostgreSQL, and the ledger has them already.
    assert export_csv.delay(parked).get(timeout=60)["exported"] == 100
    assert retry_exports.delay().get(timeout=60) == {"exported": 0, "failing": 0, "lost": 0}
    assert sorted(_csv_ids(blocked)) == sorted(stored)


def test_an_insert_retried_after_its_lock_release_failed_still_releases_the_lock(
    db, redis_client, monkeypatch
):
    """A retry runs the message's arguments again: the insert must not have taken
    the lock's token out of them (else the subreddit stays locked for the TTL)."""
    import redis.exceptions

    batch = _big_batch(5)
    batch["lock"] = pipeline.acquire_scrape_lock(batch["subreddit"], ttl_s=600)
    real_release = pipeline.release_scrape_lock
    calls = []

    def release_once_failing(subreddit, token):
        calls.append(token)
        if len(calls) == 1:
            raise redis.exceptions.ConnectionError("Redis went away")
        real_release(subreddit, token)

    monkeypatch.setattr(pipeline, "release_scrape_lock", release_once_failing)
    with pytest.raises(ServiceUnavailable, match="Redis went away"):
        insert_batch(batch)  # in a worker: autoretry, with this same argument

    result = insert_batch(batch)

    assert calls[1] == calls[0] is not None
    assert pipeline.acquire_scrape_lock(batch["subreddit"], ttl_s=60) is not None
    assert "lock" not in result  # the token is not handed on down the chain


def test_an_export_whose_batch_is_gone_reads_its_new_rows_from_postgres(db, redis_client, csv_dir):
    batch = _big_batch(40)
    inserted = insert_batch(batch)  # run here, in this process
    redis_client.delete(batch["batch"])  # Redis lost it between the two links
    pipeline._cache.clear()  # and this process no longer remembers it

    summary = export_csv(inserted)

    assert summary["exported"] == 40
    assert sorted(_csv_ids(csv_dir)) == sorted(_stored_ids(db))
    assert export_csv(inserted)["exported"] == 40  # a redelivery: found in the ledger
    assert len(_csv_ids(csv_dir)) == 40


def test_retry_exports_stops_at_its_soft_time_limit(db, redis_client, monkeypatch):
    """Not counted as one failing export and carried on until the hard limit kills
    the process in the middle of a write."""
    from celery.exceptions import SoftTimeLimitExceeded

    from sentiment import tasks

    for _ in range(2):
        pipeline.park_export(_big_batch(2) | {"new": [0, 1]})
    attempts = []

    def out_of_time(batch):
        attempts.append(batch["batch_id"])
        raise SoftTimeLimitExceeded()

    monkeypatch.setattr(tasks, "_export", out_of_time)
    with pytest.raises(SoftTimeLimitExceeded):
        tasks.retry_exports()

    assert len(attempts) == 1
    assert len(pipeline.parked_exports()) == 2  # both still parked for the next run


def test_a_parked_export_whose_batch_expired_is_reported_lost(db, redis_client, caplog):
    from sentiment.tasks import retry_exports

    # Gone from Redis, and no record of which rows were new (pruned, or never made).
    pipeline.park_export(
        {
            "batch_id": "b-gone",
            "batch": "sentiment:batch:gone",
            "subreddit": "stocks",
            "new": [0, 1, 2],
            "started_at": time.time(),
        }
    )
    # Older than a blob lives: the CSV ledgers may no longer remember it.
    old = _big_batch(2) | {"subreddit": "stocks", "new": [0, 1]}
    old["started_at"] -= pipeline.BATCH_TTL_S + 60
    pipeline.park_export(old)  # fmt: skip

    assert retry_exports() == {"exported": 0, "failing": 0, "lost": 2}
    assert pipeline.parked_exports() == []
    assert "3 rows are in PostgreSQL but not in CSV" in caplog.text
    assert "2 rows are in PostgreSQL but not in CSV" in caplog.text


def test_an_export_that_cannot_be_parked_says_which_rows_are_missing(monkeypatch, caplog):
    import os

    import redis

    from tests.conftest import _free_port

    nothing_listens = redis.Redis(port=_free_port(), socket_connect_timeout=1)
    monkeypatch.setitem(pipeline._redis_clients, os.getpid(), nothing_listens)
    batch = {"batch_id": "b-unparked", "batch": None, "subreddit": "stocks", "new": [0, 1]}

    export_csv.on_failure(OSError("disk full"), "task-id", (batch,), {}, None)

    assert "could not be parked" in caplog.text
    assert "b-unparked" in caplog.text
    assert "2 new rows are in PostgreSQL but not in CSV" in caplog.text


def test_beat_retries_parked_exports_every_ten_minutes(settings):
    from sentiment.schedule import build_beat_schedule

    entry = build_beat_schedule(settings)["retry-exports"]
    assert entry["task"] == "sentiment.tasks.retry_exports"
    assert entry["schedule"] == 600.0
    assert entry["options"]["expires"] < 600


def test_beat_looks_for_missed_exports_every_hour(settings):
    from celery.schedules import crontab

    from sentiment.schedule import build_beat_schedule

    entry = build_beat_schedule(settings)["export-missing"]
    assert entry["task"] == "sentiment.tasks.export_missing"
    assert entry["schedule"] == crontab(minute=47)  # once an hour
    assert entry["options"]["expires"] < 3600


def test_missed_exports_through_the_task(worker, db, csv_dir):
    from sentiment.sinks.postgres import insert_batch as store
    from sentiment.tasks import export_missing

    store(make_events(6, subreddit="stocks"), batch_id="lost-export")
    with db.begin() as conn:
        conn.execute(text("UPDATE ingested_batches SET created_at = now() - interval '2 hours'"))

    assert export_missing.delay().get(timeout=60) == {
        "batches": 1, "missing": 1, "rows_written": 6, "failing": 0, "in_flight": 0
    }  # fmt: skip
    assert len(_csv_ids(csv_dir)) == 6


def test_redis_restarted_the_worker_reconnects_and_carries_on(worker, simulator, settings):
    if not settings.uses_embedded_redis:
        pytest.skip("needs the embedded Redis, which the test can restart")
    from sentiment.embedded import embedded_redis

    name = _unique_subreddit("redis")
    simulator.add_subreddit(name, submissions=4, comments=4)
    server = embedded_redis(settings)
    server.stop()
    assert not server.is_running()
    time.sleep(3)
    server.start()

    assert scrape.delay(name).get(timeout=120)["inserted"] == 8
    assert worker.alive()


def _wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def test_beat_scrapes_each_subreddit_on_its_schedule(worker, simulator, db, csv_dir, tmp_path):
    from tests.processes import CeleryProcess

    names = [_unique_subreddit("beat") for _ in range(2)]
    for name in names:
        simulator.add_subreddit(name, submissions=10, comments=10)
    env = {"SUBREDDITS": ",".join(f"{n}:10" for n in names)}
    beat = CeleryProcess("beat", ["beat", "--loglevel", "INFO", "-s", str(tmp_path / "one")], env)
    beat.start()
    try:
        _wait_until(
            lambda: all(len(_stored_ids(db, n)) == 20 for n in names), 60, "beat's scrapes to land"
        )
        _wait_until(lambda: len(_csv_ids(csv_dir)) == 40, 30, "the CSV export")
        simulator.add_items(names[0], submissions=3)
        _wait_until(lambda: len(_stored_ids(db, names[0])) == 23, 30, "the next scheduled scrape")

        second = CeleryProcess(
            "beat2", ["beat", "--loglevel", "INFO", "-s", str(tmp_path / "two")], env
        )
        second.start()
        assert second.process is not None
        assert second.process.wait(timeout=30) != 0
        assert "another celery beat" in second.output()
        assert beat.alive()
    finally:
        beat.stop()
    assert sorted(_csv_ids(csv_dir)) == sorted(_stored_ids(db))


def test_beat_with_no_subreddits_says_what_to_set(redis_client, tmp_path):
    """(Its schedule file's folder does not exist yet, as DATA_DIR on a fresh volume.)"""
    from tests.processes import CeleryProcess

    schedule = tmp_path / "state" / "celerybeat-schedule"
    beat = CeleryProcess("beat-empty", ["beat", "--loglevel", "INFO", "-s", str(schedule)],
                         {"SUBREDDITS": ""})  # fmt: skip
    beat.start()
    try:
        _wait_until(lambda: "SUBREDDITS is empty" in beat.output(), 30, "the warning")
        assert "set SUBREDDITS, e.g. SUBREDDITS=wallstreetbets:60,stocks" in beat.output()
        time.sleep(2)  # past opening the schedule file
        assert beat.alive(), beat.output()  # the maintenance entries still run
        assert schedule.parent.is_dir()
    finally:
        beat.stop()


def test_flower_serves_the_broker_behind_basic_auth(worker, settings):
    import base64
    import urllib.error
    import urllib.request

    from tests.conftest import _free_port
    from tests.processes import CeleryProcess

    port = _free_port()
    flower = CeleryProcess(
        "flower",
        ["flower", "--address=127.0.0.1", f"--port={port}"],
        {"FLOWER_BASIC_AUTH": "admin:s3cret"},
    )
    flower.start()
    try:

        def get(path: str, auth: str | None) -> tuple[int, bytes]:
            request = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
            if auth:
                request.add_header(
                    "Authorization", "Basic " + base64.b64encode(auth.encode()).decode()
                )
            try:
                with urllib.request.urlopen(request, timeout=5) as response:
                    return response.status, response.read()
            except urllib.error.HTTPError as exc:
                return exc.code, b""

        _wait_until(lambda: _reachable(port), 30, "Flower to listen")
        assert get("/api/workers", None)[0] == 401
        assert get("/api/workers", "admin:wrong")[0] == 401
        _wait_until(
            lambda: worker.hostname.encode() in get("/api/workers", "admin:s3cret")[1],
            30,
            "Flower to see the worker",
        )

        # A task run now shows up in Flower's task list (from the worker's task
        # events, which Flower also switches on by remote control), and the
        # pages people open are served behind the same auth.
        assert mark_processed.delay(["nosuchid"]).get(timeout=30)["unknown"] == 1
        _wait_until(
            lambda: b"sentiment.tasks.mark_processed" in get("/api/tasks", "admin:s3cret")[1],
            30,
            "Flower to list the task",
        )
        for page in ("/", "/tasks", "/broker"):
            status, body = get(page, "admin:s3cret")
            assert (page, status) == (page, 200)
            assert b"<html" in body.lower()
            assert get(page, None)[0] == 401
    finally:
        flower.stop()


def _reachable(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_with_retention_a_scrape_stores_nothing_retention_would_drop(
    db, redis_client, csv_dir, monkeypatch
):
    """RETENTION_DAYS=30: a scrape without a watermark (a first one, or after Redis was
    flushed once retention had emptied the subreddit) stops at the horizon."""
    from sentiment.reddit.simulator import Simulator, SimulatorThread

    # A simulator of its own: the shared one never creates items older than its last.
    sim = Simulator(seed=11, requests_per_window=None, history_seconds=40 * 86400)
    name = _unique_subreddit("retained")
    sim.add_subreddit(name, submissions=40, comments=40)
    with SimulatorThread(sim, port=_free_port()) as url:
        configured = pipeline.get_settings().model_copy(
            update={"retention_days": 30, "reddit_oauth_url": url, "reddit_url": url}
        )
        monkeypatch.setattr(pipeline, "get_settings", lambda: configured)
        monkeypatch.setattr(pipeline, "_runtimes", {})  # a client for this simulator
        try:
            summary = scrape.apply(args=[name]).get(timeout=60)
        finally:
            pipeline.close_runtime()

    horizon = datetime.now(UTC) - timedelta(days=30)
    with db.connect() as conn:
        oldest = conn.execute(
            text("SELECT min(occurred_at) FROM raw_events WHERE source_id = :s"), {"s": name}
        ).scalar_one()
    assert oldest >= horizon - timedelta(minutes=1)
    assert summary["too_old"] >= 2  # at least one a kind: where paging stopped
    assert 50 <= summary["inserted"] <= 62  # ~30 of 40 days of each kind
    assert summary["exported"] == summary["inserted"] == len(_csv_ids(csv_dir))


def test_an_item_reddit_lists_late_is_stored_and_exported_once(
    simulator, db, redis_client, csv_dir
):
    """Listed only after newer items (so after the watermark passed it), it is found
    on the next scrape's recheck of the page that reaches the watermark."""
    name = _unique_subreddit("late")
    simulator.add_subreddit(name, submissions=20, comments=20)
    scrape.apply(args=[name]).get(timeout=60)
    late_post, _, late_comment, _ = simulator.add_items(name, submissions=2, comments=2)
    simulator.set_listed([late_post, late_comment], listed=False)
    assert scrape.apply(args=[name]).get(timeout=60)["inserted"] == 2

    simulator.set_listed([late_post, late_comment])
    summary = scrape.apply(args=[name]).get(timeout=60)

    assert summary["fetched"] == 0  # nothing above the watermark
    assert summary["rechecked"] >= 4  # the watermark items and the two late ones
    assert summary["inserted"] == summary["exported"] == 2
    stored = _stored_ids(db, name)
    assert {late_post[3:], late_comment[3:]} <= set(stored)
    assert sorted(stored) == sorted(_csv_ids(csv_dir)) and len(stored) == 44


def test_a_pool_process_closes_its_reddit_client_on_the_way_out(simulator, redis_client):
    name = _unique_subreddit("closing")
    simulator.add_subreddit(name, submissions=2, comments=2)
    assert len(pipeline.fetch(name).events) == 4  # the process's client, connected
    runtime = pipeline._runtimes[os.getpid()]

    pipeline.close_runtime()  # what worker_process_shutdown runs

    assert runtime.loop.is_closed()
    assert runtime.reddit.requestor._http.closed
    assert os.getpid() not in pipeline._runtimes
    pipeline.close_runtime()  # nothing left to close: no error


def test_a_failed_scrape_lets_go_of_its_lock_and_says_why_and_shrugs_if_redis_is_gone(
    redis_client, monkeypatch, caplog
):
    import logging
    import os

    import redis

    from sentiment import tasks
    from tests.conftest import _free_port

    name = _unique_subreddit("letgo")
    token = pipeline.acquire_scrape_lock(name, ttl_s=60)
    tasks._let_go(name, token, error="RedditUnavailable: 503")
    assert pipeline.acquire_scrape_lock(name, ttl_s=60) is not None  # released
    assert "503" in redis_client.hget(pipeline.runs_key(name), "error").decode()

    nothing_listens = redis.Redis(port=_free_port(), socket_connect_timeout=1)
    monkeypatch.setitem(pipeline._redis_clients, os.getpid(), nothing_listens)
    with caplog.at_level(logging.WARNING):
        tasks._let_go(name, "token", error="ServiceUnavailable: Redis")  # logged, not raised
    assert f"r/{name}: could not release the scrape lock" in caplog.text


def test_an_outage_that_outlasts_the_retries_reaches_get_as_service_unavailable(monkeypatch):
    """SQLAlchemy's and redis-py's errors cannot be rebuilt from the result backend
    (`.get()` raised a bare Exception holding their repr): a task hands on an
    outage as ServiceUnavailable, naming the server and what it said."""
    import redis.exceptions
    import sqlalchemy.exc

    from sentiment import processing
    from sentiment.celery_app import app

    outages = {
        "PostgreSQL": sqlalchemy.exc.OperationalError(
            "UPDATE raw_events", {}, Exception("connection refused")
        ),
        "Redis": redis.exceptions.ConnectionError("Error 111 connecting to localhost:6379"),
    }
    for server, outage in outages.items():

        def down(keys, error=outage):
            raise error

        monkeypatch.setattr(processing, "mark_processed", down)
        with pytest.raises(ServiceUnavailable) as raised:
            mark_processed([["abc", "2024-03-01T00:00:00Z"]])  # retried in a worker; then this

        back = app.backend.exception_to_python(app.backend.prepare_exception(raised.value))
        assert type(back) is ServiceUnavailable
        assert str(back).startswith(f"{server}: ")
        assert str(outage.orig if server == "PostgreSQL" else outage) in str(back)
