"""Batches by reference: the blob in Redis and this process's one-entry cache."""

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
    pipeline._last_batch = None  # as in another process

    assert pipeline.load_batch(key) == events
    assert load_events(zstd.decompress(redis_client.get(key))) == events


def test_the_export_reuses_the_batch_this_process_decoded(redis_client):
    events = make_events(5)
    key = pipeline.stash_batch(events)
    pipeline._last_batch = None
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


def test_another_batch_is_read_from_redis(redis_client):
    ours = pipeline.stash_batch(make_events(2))
    other_events = make_events(4)
    other = pipeline.stash_batch(other_events)  # the cache now holds this one
    pipeline._last_batch = None
    assert pipeline.load_batch(other) == other_events

    redis_client.delete(ours)
    with pytest.raises(pipeline.BatchExpired):
        pipeline.load_batch(ours)


def test_the_csv_ledger_remembers_a_batch_longer_than_its_blob_lives():
    from sentiment.sinks.csv import KEEP_BATCHES_S

    # A chain can re-run its export only while the blob exists; after that the
    # ledger may forget the batch without risking a second append.
    assert pipeline.BATCH_TTL_S < KEEP_BATCHES_S
