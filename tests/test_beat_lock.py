"""The single-beat guard: one beat per broker, and a beat that outlives a Redis outage."""

from __future__ import annotations

import logging

import pytest
import redis
from celery.beat import PersistentScheduler
from redis.backoff import NoBackoff
from redis.retry import Retry

from sentiment.celery_app import app
from sentiment.schedule import BEAT_LOCK_KEY, SingleBeatScheduler
from tests.conftest import _free_port


@pytest.fixture
def scheduler(redis_client, tmp_path, monkeypatch):  # type: ignore[no-untyped-def]
    # Celery's own tick (sending due entries) is not what is tested here.
    monkeypatch.setattr(PersistentScheduler, "tick", lambda self, *a, **kw: 5.0)
    beat = SingleBeatScheduler(app=app, schedule_filename=str(tmp_path / "schedule"), lazy=True)
    yield beat
    redis_client.delete(BEAT_LOCK_KEY)


def _redis_gone(beat: SingleBeatScheduler) -> None:
    beat._redis = redis.Redis(port=_free_port(), retry=Retry(NoBackoff(), 0))


def test_a_second_beat_is_refused_and_the_first_keeps_its_lock(scheduler, tmp_path, redis_client):
    scheduler.setup_schedule()
    second = SingleBeatScheduler(app=app, schedule_filename=str(tmp_path / "two"), lazy=True)
    second._token = "elsewhere:1"

    with pytest.raises(SystemExit, match="another celery beat"):
        second.setup_schedule()

    assert redis_client.get(BEAT_LOCK_KEY).decode() == scheduler._token
    assert scheduler.tick() == 5.0


def test_a_beat_restarted_with_its_own_token_takes_its_lock_back(scheduler, redis_client):
    # A container's beat comes back as the same host and pid 1: its old lock is its own.
    redis_client.set(BEAT_LOCK_KEY, scheduler._token, ex=60)

    scheduler.setup_schedule()

    assert redis_client.get(BEAT_LOCK_KEY).decode() == scheduler._token


def test_redis_gone_at_a_tick_is_logged_and_beat_keeps_going(scheduler, caplog):
    scheduler.setup_schedule()
    _redis_gone(scheduler)

    with caplog.at_level(logging.WARNING, logger="sentiment.schedule"):
        assert scheduler.tick() == 5.0
        assert scheduler.tick() == 5.0

    assert "could not refresh the beat lock" in caplog.text
    scheduler.close()  # Redis still gone: the schedule file is closed all the same


def test_a_lock_taken_over_stops_this_beat_and_says_why(scheduler, redis_client, caplog):
    scheduler.setup_schedule()
    redis_client.set(BEAT_LOCK_KEY, "elsewhere:1", ex=60)

    with caplog.at_level(logging.ERROR, logger="sentiment.schedule"), pytest.raises(SystemExit):
        scheduler.tick()

    assert "beat lock taken over by elsewhere:1" in caplog.text
    scheduler.close()
    assert redis_client.get(BEAT_LOCK_KEY) == b"elsewhere:1"  # not ours to release


def test_each_tick_refreshes_the_lock(scheduler, redis_client):
    scheduler.setup_schedule()
    redis_client.expire(BEAT_LOCK_KEY, 5)  # as if the last refresh were 55 s ago

    scheduler.tick()

    assert redis_client.ttl(BEAT_LOCK_KEY) > 5


def test_a_lock_lost_to_a_flush_is_taken_back(scheduler, redis_client):
    scheduler.setup_schedule()
    redis_client.delete(BEAT_LOCK_KEY)

    scheduler.tick()

    assert redis_client.get(BEAT_LOCK_KEY).decode() == scheduler._token
    assert 0 < redis_client.ttl(BEAT_LOCK_KEY) <= 60
