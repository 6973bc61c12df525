"""What the Celery tasks do, without Celery: scrape, stash, lock, remember.

* Each worker process keeps one event loop, one asyncpraw client and one
  shared-limiter handle for its life, so a scrape does not pay for a new
  OAuth token and a new connection pool every time.
* A scraped batch travels by reference: a zstd-compressed blob in Redis with
  an expiry, deleted once the chain has exported it. Messages carry its key.
* A lock per subreddit stops two scrapes of it from overlapping; it is held
  until the batch is stored and the watermarks advanced.
* A subreddit that answers 403/404 is marked failing and skipped, with a
  backoff that doubles up to six hours, instead of being hammered.
* A CSV export that fails for good (its retries spent, or a corrupt ledger) is
  parked, and retried every 10 minutes for up to `BATCH_TTL_S`: its rows are in
  PostgreSQL already, and the watermarks have moved past them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpraw
import redis
from redis.asyncio import Redis as AsyncRedis

from sentiment.config import Settings, get_settings
from sentiment.db import get_engine
from sentiment.dto import RawEventDTO, dump_events, load_events
from sentiment.errors import SentimentError
from sentiment.reddit.client import make_reddit
from sentiment.reddit.ratelimit import SharedRateLimiter
from sentiment.reddit.scraper import KINDS, ScrapeResult, scrape_subreddit
from sentiment.reddit.watermarks import Watermarks

try:  # Python 3.14 has it in the standard library
    from compression import zstd
except ImportError:  # pragma: no cover - depends on the Python version
    from backports import zstd

__all__ = [
    "BATCH_TTL_S",
    "EXPORT_NEEDS",
    "INSERT_NEEDS",
    "MAINTENANCE_KEY",
    "PARKED_EXPORTS_KEY",
    "BatchExpired",
    "MalformedBatch",
    "acquire_scrape_lock",
    "advance_watermarks",
    "batch_key",
    "check_batch",
    "clear_failing",
    "close_runtime",
    "drop_batch",
    "failing_key",
    "failing_reason",
    "fetch",
    "get_redis",
    "hand_over_scrape_lock",
    "load_batch",
    "mark_failing",
    "park_export",
    "parked_exports",
    "record_maintenance",
    "record_run",
    "release_scrape_lock",
    "runs_key",
    "scrape_lock_key",
    "stash_batch",
    "unpark_export",
]

log = logging.getLogger(__name__)

BATCH_TTL_S = 3 * 24 * 3600  # outlives any retry schedule; a crashed chain's blob still expires
PARKED_EXPORTS_KEY = "sentiment:exports:parked"  # hash: batch_id -> export_csv's argument
MAINTENANCE_KEY = "sentiment:maintenance"  # hash: job -> its last outcome (JSON)
_FAILING_BASE_S = 300
_FAILING_MAX_S = 6 * 3600

# Free, or held by an earlier delivery of the same task: the value is ARGV[3] (its
# id and ':') and a uuid, nothing more (a task 'a' must not take task 'a:b''s).
_TAKE_SCRAPE_LOCK = """
local held = redis.call('GET', KEYS[1])
local ours = held and ARGV[3] ~= '' and string.sub(held, 1, #ARGV[3]) == ARGV[3]
             and not string.find(held, ':', #ARGV[3] + 1, true)
if held and not ours then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
if ours then return 2 end
return 1
"""
# Ours (ARGV[1]): becomes ARGV[2], the TTL going on.
_HAND_OVER = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'KEEPTTL')
return 1
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class BatchExpired(SentimentError):
    """The batch blob is gone (expired or Redis lost its data); the scrape must run again."""


class MalformedBatch(SentimentError, ValueError):
    """A task got a batch that `scrape` did not make (a hand-written or damaged message)."""


# What each link of the chain reads from the batch dict it is handed.
INSERT_NEEDS = frozenset({"batch", "batch_id", "subreddit", "watermarks"})
EXPORT_NEEDS = frozenset({
    "batch", "batch_id", "subreddit", "new", "fetched", "inserted", "duplicates", "rejected",
    "gaps", "malformed", "requests", "started_at",
})  # fmt: skip


def check_batch(task: str, batch: Any, needs: frozenset[str]) -> dict[str, Any]:
    """`batch` itself, or MalformedBatch naming what is missing (never retried, never parked)."""
    if not isinstance(batch, dict):
        raise MalformedBatch(f"{task} got a malformed batch: a {type(batch).__name__}, not the "
                             "dict scrape hands on")  # fmt: skip
    if missing := sorted(needs - batch.keys()):
        raise MalformedBatch(f"{task} got a malformed batch: no {', '.join(missing)} (batches "
                             "come from scrape; run scrape.delay(subreddit) instead)")  # fmt: skip
    return batch


_redis_clients: dict[int, redis.Redis] = {}


def get_redis() -> redis.Redis:
    """This process's Redis client (a new one after a fork)."""
    pid = os.getpid()
    if pid not in _redis_clients:
        _redis_clients.clear()
        _redis_clients[pid] = redis.Redis.from_url(
            get_settings().redis_connection_url(), socket_timeout=10, health_check_interval=10
        )
    return _redis_clients[pid]


# -- scraping ---------------------------------------------------------------


@dataclass
class _Runtime:
    loop: asyncio.AbstractEventLoop
    reddit: asyncpraw.Reddit
    limiter: SharedRateLimiter


_runtimes: dict[int, _Runtime] = {}


def _runtime(settings: Settings) -> _Runtime:
    pid = os.getpid()
    if pid not in _runtimes:
        _runtimes.clear()  # inherited from a parent process: unusable here
        loop = asyncio.new_event_loop()
        limiter = SharedRateLimiter(
            AsyncRedis.from_url(settings.redis_connection_url()),
            settings.reddit_client_id or "anonymous",
            limit=settings.reddit_ratelimit_requests,
            window_seconds=settings.reddit_ratelimit_window_seconds,
        )
        _runtimes[pid] = _Runtime(loop, make_reddit(settings, limiter), limiter)
    return _runtimes[pid]


def close_runtime() -> None:
    """Close this process's Reddit client, limiter connection and loop, if it made them."""
    runtime = _runtimes.pop(os.getpid(), None)
    if runtime is None:
        return
    try:
        runtime.loop.run_until_complete(runtime.reddit.close())
        runtime.loop.run_until_complete(runtime.limiter.close())
    finally:
        runtime.loop.close()


def fetch(subreddit: str) -> ScrapeResult:
    """Scrape `subreddit` from its watermarks (they are advanced later, once stored).

    With RETENTION_DAYS set, nothing older than retention keeps is fetched: after a
    Redis flush, a subreddit whose rows retention dropped has no watermark left
    anywhere, and its backfill must not store (and export) those items again.
    """
    settings = get_settings()
    marks = Watermarks(get_redis(), get_engine()).get(subreddit, KINDS)
    not_before = None
    if settings.retention_days is not None:
        not_before = datetime.now(UTC) - timedelta(days=settings.retention_days)
    runtime = _runtime(settings)
    try:
        return runtime.loop.run_until_complete(
            scrape_subreddit(
                runtime.reddit,
                subreddit,
                marks,
                depth=settings.scrape_backfill_depth,
                attempts=settings.reddit_max_attempts,
                not_before=not_before,
                lookback=settings.scrape_lookback_seconds,
            )
        )
    finally:
        _cancel_leftovers(runtime.loop)


def _cancel_leftovers(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel what a scrape left in the loop. An exception raised into the loop
    from outside (Celery's soft time limit, from a signal handler) leaves the
    scrape's tasks pending; the loop lives on, and they would resume, unlocked,
    in the next task."""
    leftovers = asyncio.all_tasks(loop)
    if not leftovers:
        return
    for task in leftovers:
        task.cancel()
    loop.run_until_complete(asyncio.gather(*leftovers, return_exceptions=True))


def advance_watermarks(subreddit: str, marks: dict[str, str]) -> None:
    Watermarks(get_redis(), get_engine()).advance(subreddit, marks)


# -- batches by reference ---------------------------------------------------


# The last few batches this process stashed or decoded, oldest first. A chain's
# insert_batch and export_csv often run in the pool process that scraped or
# inserted it, but not right after: the worker takes from its three queues in
# turn, so other chains' tasks come in between. Hits reuse the events instead of
# fetching, decompressing and decoding the blob again. A blob never changes
# under its key (a fresh uuid) and events are frozen, so an entry cannot go
# stale. Bounded by events, not entries: an event of ~2 KB of JSON takes ~7 KB
# of memory (tracemalloc), so ~35 MB, or one batch if that alone is larger.
_CACHE_MAX_EVENTS = 5_000
_cache: OrderedDict[str, list[RawEventDTO]] = OrderedDict()


def _remember(key: str, events: list[RawEventDTO]) -> None:
    _cache[key] = events
    _cache.move_to_end(key)
    cached = sum(map(len, _cache.values()))
    while cached > _CACHE_MAX_EVENTS and len(_cache) > 1:  # the newest stays, however big
        cached -= len(_cache.popitem(last=False)[1])


def batch_key(batch_id: str) -> str:
    """Where the blob of batch `batch_id` lives while its chain may still use it."""
    return f"sentiment:batch:{batch_id}"


def stash_batch(events: list[RawEventDTO], batch_id: str | None = None) -> str | None:
    """Store events as a compressed blob under `batch_key(batch_id)` (a fresh id if
    None); return its key (None for no events)."""
    if not events:
        return None
    key = batch_key(batch_id or uuid.uuid4().hex)
    get_redis().set(key, zstd.compress(dump_events(events)), ex=BATCH_TTL_S)
    _remember(key, list(events))
    return key


def load_batch(key: str | None) -> list[RawEventDTO]:
    if key is None:
        return []
    events = _cache.get(key)
    if events is None:
        blob = get_redis().get(key)
        if blob is None:
            raise BatchExpired(
                f"batch {key} is gone from Redis (expired or flushed); "
                "the next scrape fetches it again"
            )
        events = load_events(zstd.decompress(blob))
    _remember(key, events)
    return list(events)  # a caller may change its list, never the cache's


def drop_batch(key: str | None) -> None:
    if key is not None:
        get_redis().delete(key)
        _cache.pop(key, None)


# -- exports that failed for good -------------------------------------------


def park_export(batch: dict[str, Any]) -> None:
    """Keep an export that failed for good (`batch` is export_csv's argument) to retry.

    `retry_exports` tries it for up to `BATCH_TTL_S` after the scrape: the CSV
    ledgers remember a batch for longer than that, which is what makes a retry
    safe after a partial or even complete earlier attempt.
    """
    get_redis().hset(PARKED_EXPORTS_KEY, batch["batch_id"], json.dumps(batch))


def parked_exports() -> list[dict[str, Any]]:
    """The parked exports, oldest batch first."""
    batches = [json.loads(value) for value in get_redis().hvals(PARKED_EXPORTS_KEY)]
    return sorted(batches, key=lambda batch: batch.get("started_at", 0))


def unpark_export(batch_id: str) -> None:
    get_redis().hdel(PARKED_EXPORTS_KEY, batch_id)


# -- locks and subreddit health ---------------------------------------------


def scrape_lock_key(subreddit: str) -> str:
    """Held while a scrape of `subreddit` runs (until its insert commits)."""
    return f"sentiment:lock:scrape:{subreddit}"


def runs_key(subreddit: str) -> str:
    """A hash: when the last run ended, its summary, its error."""
    return f"sentiment:runs:{subreddit}"


def failing_key(subreddit: str) -> str:
    """Set while the subreddit is skipped after a non-retryable error; holds the reason."""
    return f"sentiment:failing:{subreddit}"


def acquire_scrape_lock(subreddit: str, ttl_s: int, *, task_id: str | None = None) -> str | None:
    """A token if this scrape may run, None if another holds the subreddit.

    A lock taken under the same `task_id` is taken back: it belongs to an
    earlier delivery of this very message, whose process died (or whose worker
    lost the broker, which hands the message out again), or to an attempt of it
    that could not let go before its retry. Once the scrape has sent its chain
    the lock is the chain's (`hand_over_scrape_lock`): no delivery takes it back.
    """
    owner = f"{task_id}:" if task_id else ""
    token = f"{owner}{uuid.uuid4().hex}"
    taken = get_redis().eval(_TAKE_SCRAPE_LOCK, 1, scrape_lock_key(subreddit), token, ttl_s, owner)
    if int(taken) == 2:
        log.warning("r/%s: taking back the scrape lock of an earlier delivery of task %s (its "
                    "process died, or its worker lost the broker)", subreddit, task_id)  # fmt: skip
    return token if int(taken) else None


def hand_over_scrape_lock(subreddit: str, token: str) -> str | None:
    """The lock, now under a token no delivery of the scrape task can take back (its
    chain holds it from here to the insert's commit); None if it is not ours."""
    chains = uuid.uuid4().hex
    handed = get_redis().eval(_HAND_OVER, 1, scrape_lock_key(subreddit), token, chains)
    return chains if int(handed) else None


def release_scrape_lock(subreddit: str, token: str | None) -> None:
    """Release our lock only: after a TTL expiry it may belong to another scrape."""
    if token:
        get_redis().eval(_RELEASE, 1, scrape_lock_key(subreddit), token)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def failing_reason(subreddit: str) -> str | None:
    value = get_redis().get(failing_key(subreddit))
    return _text(value) if value else None


def mark_failing(subreddit: str, reason: str) -> int:
    """Skip the subreddit for a while (5 min, doubling to 6 h); return the seconds."""
    client = get_redis()
    failures = int(client.incr(f"sentiment:failures:{subreddit}"))
    client.expire(f"sentiment:failures:{subreddit}", _FAILING_MAX_S * 4)
    seconds = int(min(_FAILING_MAX_S, _FAILING_BASE_S * 2 ** (failures - 1)))
    client.set(failing_key(subreddit), reason, ex=seconds)
    return seconds


def clear_failing(subreddit: str) -> None:
    get_redis().delete(f"sentiment:failures:{subreddit}", failing_key(subreddit))


def record_maintenance(job: str, *, result: str, ok: bool) -> None:
    """Remember how a maintenance job (retention, partitions) last went, for `sentiment status`."""
    get_redis().hset(
        MAINTENANCE_KEY, job, json.dumps({"at": time.time(), "ok": ok, "result": result})
    )


def record_run(
    subreddit: str, summary: dict[str, Any] | None = None, error: str | None = None
) -> None:
    """Remember the last run and the last error of a subreddit (for `sentiment status`)."""
    fields: dict[Any, str] = {"at": str(time.time())}
    if summary is not None:
        fields["summary"] = json.dumps(summary)
    if error is not None:
        fields["error"] = error
        fields["error_at"] = fields["at"]
    get_redis().hset(runs_key(subreddit), mapping=fields)
