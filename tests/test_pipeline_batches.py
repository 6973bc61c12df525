"""Batches by reference: the blob in Redis and this process's cache of recent batches."""

from __future__ import annotations

import pytest

from sentiment import pipeline
from sentiment.dto import load_events
from tests.factories import make_events

try:
    from compression import zstd
except ImportError:  # pragma: no cover - depends on the Python version
    from backports import zstd


def test_a_stashed_batch_loads_back_equal_from_redis(redis_client):
    events = make_events(20)
    key = pipeline.stash_batch(events)
    assert key is not None
    pipeline._cache.clear()  # as in another process

    assert pipeline.load_batch(key) == events
    assert load_events(zstd.decompress(redis_client.get(key))) == events


def test_the_export_reuses_the_batch_this_process_decoded(redis_client):
    events = make_events(5)
    key = pipeline.stash_batch(events)
    pipeline._cache.clear()
    first = pipeline.load_batch(key)
    redis_client.delete(key)  # only the cache can answer now

    again = pipeline.load_batch(key)

    assert again == first == events
    assert all(a is b for a, b in zip(again, first, strict=True))  # not decoded twice
    assert again is not first  # a caller may change its list, never the cache's


def test_a_dropped_batch_is_gone_from_the_cache_too(redis_client):
    key = pipeline.stash_batch(make_events(3))

    pipeline.drop_batch(key)

    assert redis_client.exists(key) == 0
    with pytest.raises(pipeline.BatchExpired, match="gone from Redis"):
        pipeline.load_batch(key)


def test_recent_batches_are_reused_up_to_a_number_of_events(redis_client, monkeypatch):
    monkeypatch.setattr(pipeline, "_CACHE_MAX_EVENTS", 10)
    batches = {pipeline.stash_batch(make_events(4)): 4 for _ in range(3)}
    oldest, *recent = batches
    for key in batches:
        redis_client.delete(key)  # only the cache can answer now

    for key in recent:
        assert len(pipeline.load_batch(key)) == 4
    with pytest.raises(pipeline.BatchExpired):  # 12 events > 10: the oldest went
        pipeline.load_batch(oldest)


def test_a_batch_larger_than_the_cache_is_still_kept_alone(redis_client, monkeypatch):
    monkeypatch.setattr(pipeline, "_CACHE_MAX_EVENTS", 10)
    small = pipeline.stash_batch(make_events(3))
    large = pipeline.stash_batch(make_events(25))
    redis_client.delete(small, large)

    assert len(pipeline.load_batch(large)) == 25  # its insert and export reuse it
    with pytest.raises(pipeline.BatchExpired):
        pipeline.load_batch(small)


def test_the_csv_ledger_remembers_a_batch_longer_than_its_blob_lives():
    from sentiment.sinks.csv import KEEP_BATCHES_S

    # A chain can re-run its export only while the blob exists; after that the
    # ledger may forget the batch without risking a second append.
    assert pipeline.BATCH_TTL_S < KEEP_BATCHES_S


class _Interrupted(Exception):
    pass


def test_a_scrape_interrupted_in_the_loop_leaves_nothing_running_in_it(settings, redis_client,
                                                                       monkeypatch):  # fmt: skip
    # Celery's soft time limit raises in the middle of whatever runs, here the loop.
    import asyncio
    import signal

    async def pages_forever(*args: object, **kwargs: object) -> None:
        asyncio.get_running_loop().create_task(asyncio.sleep(3600))  # a kind's listing
        await asyncio.sleep(3600)

    def interrupt(*_: object) -> None:
        raise _Interrupted

    monkeypatch.setattr(pipeline, "scrape_subreddit", pages_forever)
    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, 0.3)
    try:
        with pytest.raises(_Interrupted):
            pipeline.fetch("somesub")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)

    loop = pipeline._runtime(settings).loop
    assert not asyncio.all_tasks(loop)
