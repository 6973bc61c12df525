"""Celery beat: the schedule built from Settings, and a guard against two beats.

One `scrape-<subreddit>` entry per configured subreddit, each with its own
interval and an `expires` a little shorter than it, so a backlog built up
while workers were down is dropped instead of replayed in a burst.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from typing import Any

import redis
from celery.beat import PersistentScheduler
from celery.schedules import crontab

from sentiment.config import Settings, get_settings

__all__ = ["BEAT_LOCK_KEY", "SingleBeatScheduler", "build_beat_schedule"]

log = logging.getLogger(__name__)

BEAT_LOCK_KEY = "sentiment:beat:lock"
_BEAT_LOCK_TTL = 60


def build_beat_schedule(settings: Settings) -> dict[str, dict[str, Any]]:
    """The beat entries: one scrape per subreddit, the partition keeper, the retry
    of parked CSV exports, the search for missed ones and, when RETENTION_DAYS is
    set, retention."""
    schedule: dict[str, dict[str, Any]] = {
        f"scrape-{sub.name}": {
            "task": "sentiment.tasks.scrape",
            "schedule": float(sub.interval_seconds),
            "args": (sub.name,),
            "options": {"expires": max(5.0, sub.interval_seconds * 0.9), "queue": "scrape"},
        }
        for sub in settings.subreddits
    }
    schedule["keep-partitions"] = {
        "task": "sentiment.tasks.keep_partitions",
        "schedule": crontab(minute=7),  # hourly; partitions are made days ahead
        "options": {"expires": 3000.0},
    }
    schedule["retry-exports"] = {
        "task": "sentiment.tasks.retry_exports",
        "schedule": 600.0,  # parked CSV exports; a no-op (one Redis read) when there are none
        "options": {"expires": 540.0},
    }
    schedule["export-missing"] = {
        "task": "sentiment.tasks.export_missing",
        "schedule": crontab(minute=47),  # hourly: batches stored but never exported
        "options": {"expires": 3000.0},
    }
    if settings.retention_days is not None:
        schedule["apply-retention"] = {
            "task": "sentiment.tasks.apply_retention",
            "schedule": crontab(minute=37),  # hourly: a day drops within the hour it expires
            "options": {"expires": 3000.0},
        }
    return schedule


# Take the lock if it is free or already ours (a restarted container's beat has
# the same host and pid); answer its holder. One script: a check and a set
# apart could overwrite a newer beat's lock.
_TAKE = """
local holder = redis.call('GET', KEYS[1])
if not holder or holder == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
  return ARGV[1]
end
return holder
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class SingleBeatScheduler(PersistentScheduler):  # type: ignore[misc]  # celery is untyped
    """A beat scheduler that refuses to run while another beat holds the lock.

    Two beats would send every scrape twice. The scrape lock would turn the
    second into a no-op, but the queues would still fill with noise, so a
    second beat stops at start-up and says why. The lock expires a minute
    after its beat dies, so a crashed beat never blocks its successor for long.
    A Redis outage does not stop beat (it could not send anything meanwhile
    either): it logs and takes its lock back once Redis answers.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._redis = redis.Redis.from_url(get_settings().redis_connection_url())
        self._token = f"{socket.gethostname()}:{os.getpid()}"
        self._redis_failing = False
        # The schedule file lives in DATA_DIR, which a fresh volume or checkout
        # may not have yet: celery would fail to open it, after taking our lock.
        filename = (
            kwargs.get("schedule_filename") or get_settings().data_dir / "celerybeat-schedule"
        )
        Path(filename).parent.mkdir(parents=True, exist_ok=True)
        super().__init__(*args, **kwargs)

    def setup_schedule(self) -> None:
        holder = self._take()
        if holder != self._token:
            raise SystemExit(
                f"another celery beat ({holder}) is already running for this broker; "
                "run exactly one beat (stop the other, or wait a minute if it crashed)"
            )
        if not get_settings().subreddits:
            log.warning("SUBREDDITS is empty: this beat schedules no scrapes, only maintenance; "
                        "set SUBREDDITS, e.g. SUBREDDITS=wallstreetbets:60,stocks")  # fmt: skip
        try:
            super().setup_schedule()
        except BaseException:
            self._release()  # a beat that did not start must not keep the next one out
            raise

    def tick(self, *args: Any, **kwargs: Any) -> float:
        # Refresh our lock; if it was lost (Redis flushed), take it back.
        try:
            holder = self._take()
        except redis.RedisError as exc:
            if not self._redis_failing:
                log.warning("could not refresh the beat lock (%s); scheduling on, and taking "
                            "the lock back once Redis answers", exc)  # fmt: skip
            self._redis_failing = True
        else:
            if holder != self._token:
                message = f"beat lock taken over by {holder}; stopping this beat"
                log.error(message)  # celery's beat service exits on SystemExit without a word
                raise SystemExit(message)
            if self._redis_failing:
                log.info("Redis answers again; the beat lock is ours")
            self._redis_failing = False
        return min(float(super().tick(*args, **kwargs)), _BEAT_LOCK_TTL / 3)

    def close(self) -> None:
        try:
            self._release()
        except redis.RedisError as exc:
            log.warning("could not release the beat lock (%s); it expires in a minute", exc)
        super().close()

    def _take(self) -> str:
        holder = self._redis.eval(_TAKE, 1, BEAT_LOCK_KEY, self._token, _BEAT_LOCK_TTL)
        return holder.decode() if isinstance(holder, bytes) else str(holder)

    def _release(self) -> None:
        self._redis.eval(_RELEASE, 1, BEAT_LOCK_KEY, self._token)
