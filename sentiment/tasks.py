"""The Celery tasks. Thin: delivery options on the decorator, work in the modules.

    scrape(subreddit)            [scrape]  fetch new items, stash them, then become
      └─ insert_batch(batch)     [ingest]  store; advance watermarks; release the lock
          └─ export_csv(batch)   [export]  append the new rows to CSV; return the summary
    mark_processed(keys)         [ingest]  for the sentiment workers
    set_aside(keys, reason)      [ingest]  for the sentiment workers: rows they cannot score
    keep_partitions()            [ingest]  hourly: future partitions (plain PostgreSQL)
    apply_retention()            [ingest]  hourly when RETENTION_DAYS is set: drop old days
    retry_exports()              [export]  every 10 minutes: CSV exports parked after failing
    export_missing()             [export]  hourly: batches stored but never exported (lost exports)

`scrape` replaces itself with the chain, so `scrape.delay("stocks").get()`
returns the summary of the whole run. Every task is idempotent, so a
redelivery after a worker died is harmless.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

import redis.exceptions
from celery import Task, chain
from celery.exceptions import SoftTimeLimitExceeded
from celery.utils.log import get_task_logger
from celery.utils.time import get_exponential_backoff_interval
from sqlalchemy import text

from sentiment import audit, pipeline, processing, retention
from sentiment.celery_app import PipelineTask, app
from sentiment.config import get_settings, valid_subreddit
from sentiment.db import get_engine, lock_raw_events
from sentiment.errors import (
    InvalidSubreddit,
    RedditAuthError,
    ServiceUnavailable,
    SubredditUnavailable,
)
from sentiment.outages import POSTGRES_DOWN, REDIS_DOWN
from sentiment.sinks import csv as csv_sink
from sentiment.sinks import postgres as pg_sink

__all__ = [
    "apply_retention",
    "export_csv",
    "export_missing",
    "insert_batch",
    "keep_partitions",
    "mark_processed",
    "retry_exports",
    "scrape",
    "set_aside",
]

log: logging.Logger = get_task_logger(__name__)
_settings = get_settings()

# Failures that pass: the database, Redis or the disk is back in a while.
_TRANSIENT = (ServiceUnavailable, *POSTGRES_DOWN, *REDIS_DOWN)
_RETRY = {
    "autoretry_for": _TRANSIENT,
    "retry_backoff": 2,
    "retry_backoff_max": _settings.retry_backoff_max,
    "retry_jitter": True,
    "max_retries": _settings.task_max_retries,
}


def _let_go(subreddit: str, token: str | None, *, error: str, blob: str | None = None) -> None:
    """After a failed scrape or insert: release the scrape lock, drop the batch's
    blob if given, and record why, if Redis lets us.

    With Redis down this fails too; then the failure that brought us here, not
    this one, decides whether the task is retried (the lock and the blob expire
    anyway)."""
    try:
        pipeline.release_scrape_lock(subreddit, token)
        pipeline.drop_batch(blob)
        pipeline.record_run(subreddit, error=error)
    except redis.exceptions.RedisError as exc:
        log.warning("r/%s: could not release the scrape lock, drop the batch or record "
                    "the error: %s", subreddit, exc)  # fmt: skip


@app.task(bind=True, name="sentiment.tasks.scrape", max_retries=_settings.task_max_retries)
def scrape(self: Task, subreddit: str) -> dict[str, Any]:
    """Scrape one subreddit, then hand the batch to insert_batch → export_csv."""
    try:
        name = valid_subreddit(subreddit)
    except ValueError as exc:
        raise InvalidSubreddit(str(exc)) from None
    started = time.time()
    if reason := pipeline.failing_reason(name):
        log.info("skipping r/%s: %s", name, reason)
        return {"subreddit": name, "skipped": f"r/{name} is marked failing: {reason}"}
    token = pipeline.acquire_scrape_lock(
        name, ttl_s=_settings.task_soft_time_limit * 3, task_id=self.request.id
    )
    if token is None:
        log.info("skipping r/%s: another scrape of it is in progress", name)
        return {"subreddit": name, "skipped": f"another scrape of r/{name} is in progress"}
    # One per run, not the task id: a redelivered scrape message keeps its id but
    # fetches other items, and the sinks' replay records and the CSV ledger know a
    # batch by this id (as does export_missing, which leaves a batch alone while
    # its blob, under this id, is still in Redis).
    batch_id = uuid.uuid4().hex
    try:
        result = pipeline.fetch(name)
        # Rechecked items go to the sink too: it stores those Reddit listed late.
        ref = pipeline.stash_batch(result.events + result.rechecked, batch_id)
    except (SubredditUnavailable, RedditAuthError) as exc:
        _let_go(name, token, error=str(exc))
        if isinstance(exc, SubredditUnavailable):
            seconds = pipeline.mark_failing(name, str(exc))
            log.warning("r/%s marked failing for %ds: %s", name, seconds, exc)
        raise
    except Exception as exc:
        _let_go(name, token, error=f"{type(exc).__name__}: {exc}")
        if getattr(exc, "retryable", False) or isinstance(exc, _TRANSIENT):
            # As the other tasks' autoretry: exponential, full jitter, capped.
            countdown = get_exponential_backoff_interval(
                2, self.request.retries, _settings.retry_backoff_max, full_jitter=True
            )
            # Not beat's `expires`: that would drop the retry of a scrape whose
            # attempts took most of its interval. A retry is one message, not a
            # backlog, and the scrape lock keeps it from overlapping a newer scrape.
            raise self.retry(exc=exc, countdown=countdown, expires=None) from exc
        raise
    pipeline.clear_failing(name)
    # From here the chain holds the lock: a redelivery of this message (the ack
    # may yet be lost) must not take it back while the insert runs.
    token = pipeline.hand_over_scrape_lock(name, token) or token
    batch = {
        **result.summary(),
        "batch": ref,
        "batch_id": batch_id,
        "watermarks": result.watermarks,
        "lock": token,
        "started_at": started,
    }
    log.info("scraped r/%s: %d new items in %d requests", name, len(result.events), result.requests)
    # In a worker `replace` raises (the chain inherits this task's id, so .get()
    # waits for the export); run eagerly it runs the chain and returns its result.
    return self.replace(chain(insert_batch.s(batch), export_csv.s()))  # type: ignore[no-any-return]


class _InsertTask(PipelineTask):
    """insert_batch: an insert that fails for good lets go of its batch.

    The scrape lock goes, so the next scrape of the subreddit fetches the items
    again at once (the watermarks did not move) instead of after the lock's TTL;
    the blob goes, so `export_missing` writes to CSV whatever chunks of it were
    committed (while the blob is there it waits for the chain)."""

    def on_failure(self, exc: BaseException, task_id: str, args: tuple[Any, ...],
                   kwargs: dict[str, Any], einfo: Any) -> None:  # fmt: skip
        batch = args[0] if args else None
        if not isinstance(batch, dict) or not isinstance(batch.get("subreddit"), str):
            return  # a malformed message: no lock or blob of ours to let go of
        lock, blob = batch.get("lock"), batch.get("batch")
        _let_go(batch["subreddit"], lock if isinstance(lock, str) else None,
                error=f"insert failed for good: {type(exc).__name__}: {exc}",
                blob=blob if isinstance(blob, str) else None)  # fmt: skip


@app.task(bind=True, base=_InsertTask, name="sentiment.tasks.insert_batch", **_RETRY)
def insert_batch(self: Task, batch: dict[str, Any]) -> dict[str, Any]:
    """Store a stashed batch; pass on which of its events were new."""
    pipeline.check_batch("insert_batch", batch, pipeline.INSERT_NEEDS)
    events = pipeline.load_batch(batch["batch"])
    result = pg_sink.insert_batch(events, batch_id=batch["batch_id"])
    position = {event.key: index for index, event in enumerate(events)}
    # Only now, with the rows committed, may the scraper move past them.
    pipeline.advance_watermarks(batch["subreddit"], batch["watermarks"])
    pipeline.release_scrape_lock(batch["subreddit"], batch.get("lock"))
    # `batch` is the message's argument, which a retry sends again: left whole, and
    # the token not handed on (the export has no lock to let go of).
    passed_on = {key: value for key, value in batch.items() if key != "lock"}
    return {**passed_on, **result.summary(), "new": sorted(position[e.key] for e in result.new)}


class _ExportTask(PipelineTask):
    """export_csv: an export that fails for good is parked for `retry_exports`."""

    def on_failure(self, exc: BaseException, task_id: str, args: tuple[Any, ...],
                   kwargs: dict[str, Any], einfo: Any) -> None:  # fmt: skip
        if isinstance(exc, pipeline.BatchExpired | pipeline.MalformedBatch) or not args:
            return  # no blob and no record of its new rows, or no batch: nothing to retry
        batch = args[0]
        try:
            pipeline.park_export(batch)
            pipeline.record_run(batch["subreddit"], error=f"CSV export parked: {exc}")
        except redis.exceptions.RedisError as parking:
            log.error(  # noqa: TRY400 - both errors are in the message
                "r/%s: the CSV export of batch %s failed for good (%s) and could not be "
                "parked (%s): its %d new rows are in PostgreSQL but not in CSV",
                batch["subreddit"], batch["batch_id"], exc, parking, len(batch["new"]),
            )  # fmt: skip
            return
        log.error("r/%s: the CSV export of %d new rows failed for good (%s); parked, "
                  "retried every 10 minutes for up to 3 days",
                  batch["subreddit"], len(batch["new"]), exc)  # fmt: skip


@app.task(bind=True, base=_ExportTask, name="sentiment.tasks.export_csv", **_RETRY)
def export_csv(self: Task, batch: dict[str, Any]) -> dict[str, Any]:
    """Append the batch's new rows to the CSV files; return the run's summary."""
    return _export(pipeline.check_batch("export_csv", batch, pipeline.EXPORT_NEEDS))


def _export(batch: dict[str, Any]) -> dict[str, Any]:
    try:
        events = pipeline.load_batch(batch["batch"])
        new = [events[index] for index in batch["new"]]
    except pipeline.BatchExpired:
        # Gone from Redis, but stored: ingested_batches knows which rows were new.
        stored = pg_sink.stored_new_events(batch["batch_id"])
        if stored is None:
            raise
        log.warning("r/%s: batch %s is gone from Redis; exporting its %d new rows from "
                    "PostgreSQL", batch["subreddit"], batch["batch_id"], len(stored))  # fmt: skip
        new = stored
    exported = csv_sink.export_events(new, csv_dir=_settings.csv_dir, batch_id=batch["batch_id"])
    pipeline.drop_batch(batch["batch"])
    summary = {
        "subreddit": batch["subreddit"],
        "fetched": batch["fetched"],
        "inserted": batch["inserted"],
        "duplicates": batch["duplicates"],
        "rejected": batch["rejected"] + exported.rejected,
        "exported": exported.written + exported.skipped,
        "gaps": batch["gaps"],
        "malformed": batch["malformed"],
        "too_old": batch.get("too_old", 0),  # these two are absent from batches made
        "rechecked": batch.get("rechecked", 0),  # before they existed
        "requests": batch["requests"],
        "seconds": round(time.time() - batch["started_at"], 3),
    }
    pipeline.record_run(batch["subreddit"], summary=summary)
    log.info("r/%s done: %s", batch["subreddit"], summary)
    return summary


@app.task(name="sentiment.tasks.retry_exports")
def retry_exports() -> dict[str, int]:
    """Retry the parked CSV exports: "exported", still "failing", or "lost" (blob expired)."""
    counts = dict.fromkeys(("exported", "failing", "lost"), 0)
    for batch in pipeline.parked_exports():
        name = batch["subreddit"]
        # Retried only while its blob would live: the CSV ledgers remember a batch a
        # day longer, which is what makes a retry after a committed attempt safe.
        lost = time.time() - batch.get("started_at", 0) > pipeline.BATCH_TTL_S
        try:
            if not lost:
                _export(batch)
        except pipeline.BatchExpired:
            lost = True
        except SoftTimeLimitExceeded:
            raise  # out of time: the rest stay parked for the next run
        except Exception as exc:  # noqa: BLE001 - one export's trouble must not stop the others
            log.warning("r/%s: a parked CSV export still fails: %s", name, exc)
            counts["failing"] += 1
            continue
        # Done, or beyond retrying. A crash before this is harmless: the next retry
        # finds the batch in the CSV ledger.
        pipeline.unpark_export(batch["batch_id"])
        if lost:
            log.error("r/%s: a parked CSV export can no longer be retried (too old, or its "
                      "batch is gone): its %d rows are in PostgreSQL but not in CSV",
                      name, len(batch["new"]))  # fmt: skip
            counts["lost"] += 1
        else:
            log.info("r/%s: a parked CSV export is done", name)
            counts["exported"] += 1
    return counts


@app.task(bind=True, name="sentiment.tasks.mark_processed", **_RETRY)
def mark_processed(self: Task, keys: list[Any]) -> dict[str, int]:
    """Mark rows processed: keys are [id, ISO time] pairs or bare ids; bad ones are counted."""
    return processing.mark_processed(keys).summary()


@app.task(bind=True, name="sentiment.tasks.set_aside", **_RETRY)
def set_aside(self: Task, keys: list[Any], reason: str) -> dict[str, int]:
    """Mark rows processed unscored, with why (keys as for mark_processed)."""
    return processing.set_aside(keys, reason).summary()


@app.task(name="sentiment.tasks.export_missing")
def export_missing() -> dict[str, int]:
    """Export the batches of the last 3.5 days that are stored but not in CSV."""
    return audit.export_missing().summary()


@app.task(bind=True, name="sentiment.tasks.keep_partitions", **_RETRY)
def keep_partitions(self: Task) -> dict[str, int]:
    """Create future daily partitions (plain PostgreSQL) and prune old chunk records."""
    return _maintained("partitions", _keep_partitions)


def _keep_partitions() -> dict[str, int]:
    with get_engine().begin() as conn:
        created = 0
        if conn.execute(text("SELECT to_regproc('raw_events_ensure_partitions')")).scalar():
            # Creating a partition takes raw_events whole: wait briefly, else retry
            # later. And take it first, before the keeper lifts a day's rows out of
            # the default partition: an insert landing there in between would make
            # creating that day's partition fail.
            lock_raw_events(conn)
            created = conn.execute(
                text("SELECT count(*) FROM raw_events_ensure_partitions(:days)"),
                {"days": _settings.partition_days_ahead},
            ).scalar_one()
        pruned = conn.execute(
            text("DELETE FROM ingested_batches WHERE created_at < now() - interval '7 days'")
        ).rowcount
    return {"partitions_created": created, "batch_records_pruned": pruned}


def _maintained(job: str, work: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run a maintenance job and record how it went for `sentiment status`.

    Retention that back-to-back claims keep out fails every hour (and retries);
    without this, only the worker's log would say so.
    """
    try:
        summary = work()
    except Exception as exc:
        with contextlib.suppress(redis.exceptions.RedisError):
            pipeline.record_maintenance(job, result=f"{type(exc).__name__}: {exc}", ok=False)
        raise
    pipeline.record_maintenance(job, result=json.dumps(summary), ok=True)
    return summary


@app.task(bind=True, name="sentiment.tasks.apply_retention", **_RETRY)
def apply_retention(self: Task) -> dict[str, object]:
    """Drop raw events older than RETENTION_DAYS that are processed (no-op when unset)."""
    if _settings.retention_days is None:
        return {"skipped": "RETENTION_DAYS is not set"}
    days = _settings.retention_days
    return _maintained("retention", lambda: retention.apply_retention(days).summary())
