"""Batch insert into raw_events: binary COPY straight in, or through a stage table.

`insert_batch(events)` returns exactly the events that were new, so the CSV
export writes each row once however often a batch is re-sent.

Events are split into chunks of the deduplicated batch, oldest first (in
Reddit's id order); each chunk is stored in one transaction, its rows in (id,
occurred_at) order. Oldest first because a batch can die between two chunks
(or two halves of a chunk split around a refused record): what is stored is
then always the older part of each subreddit and kind, so the watermarks'
fallback to the newest stored id never lies above an item that is not. A
chunk is first tried the fast way:

* direct path: one binary COPY of the whole chunk straight into `raw_events`,
  with no look-up. If the COPY succeeds, every row of the chunk was new.

A COPY cannot skip rows that exist already: one stored key fails it with a
unique violation (a re-sent batch, or a concurrent writer of overlapping
events, which may also surface as a deadlock). The chunk is then rolled back
and stored the exact way:

* stage path: binary COPY into `raw_events_stage`, a temporary table kept per
  connection (`ON COMMIT DELETE ROWS`, so it never bloats the catalog or
  leaks rows), then `INSERT INTO raw_events SELECT … FROM raw_events_stage
  ORDER BY id COLLATE "C", occurred_at ON CONFLICT DO NOTHING RETURNING id,
  occurred_at`, whose RETURNING names the rows that were new.

A failed COPY costs the encoding of its chunk, and the rows it had written
before the conflict become dead tuples; so once a COPY has met stored rows,
the next chunks of the same call go straight to the stage path, until one of
them turns out to hold no stored row at all (a re-sent batch costs one failed
COPY; a batch that only starts with rows seen before goes back to COPY).

Both paths write a chunk's rows in the same order, (id, occurred_at) by code
point (`COLLATE "C"`, as Python sorts str): two transactions inserting
overlapping chunks in different orders could deadlock on each other's
uncommitted keys; in one order they queue. DO NOTHING on conflict because a
retried task re-sends rows we already have.

With a `batch_id`, each chunk's outcome (which keys were new, how many were
rejected) is written to `ingested_batches` in the chunk's transaction, whichever
path stored it. A re-run of the batch takes a recorded chunk the stage way,
which stores nothing when all is there (and anything that is not: that range
may have held other rows when it was recorded, as under an earlier version
that kept the batch's order), adds what it stored to the record, and hands on
every row of the chunk that any record names as new.

A chunk the database refuses for any other reason (a record it cannot take)
goes to the stage path, where it is split in halves until the refusing record
is alone; that record goes to `rejected_events` with the reason, and the rest
is stored. A database that is down raises `ServiceUnavailable` (retryable).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from operator import attrgetter
from typing import Any

import orjson
import psycopg
from psycopg import errors
from psycopg.adapt import Dumper
from psycopg.pq import Format
from psycopg.types.json import Jsonb
from sqlalchemy import Engine, create_engine

from sentiment.config import get_settings
from sentiment.db import connect_args, dispose_after_fork
from sentiment.dto import RawEventDTO
from sentiment.errors import ServiceUnavailable

__all__ = ["InsertResult", "get_sink_engine", "insert_batch", "stored_new_events"]

log = logging.getLogger(__name__)

_JSONB_OID = 3802
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
_COLUMNS = "id, occurred_at, source, source_id, event_type, payload"
_CREATE_STAGE = """
CREATE TEMP TABLE IF NOT EXISTS raw_events_stage (
    id text, occurred_at timestamptz, source text, source_id text, event_type text, payload jsonb
) ON COMMIT DELETE ROWS
"""
_TYPES = ["text", "timestamptz", "text", "text", "text", "jsonb"]
_COPY_STAGE = f"COPY raw_events_stage ({_COLUMNS}) FROM STDIN (FORMAT BINARY)"
_COPY_DIRECT = f"COPY raw_events ({_COLUMNS}) FROM STDIN (FORMAT BINARY)"
# "C" orders text by code point, as Python orders str: the direct path sorts its
# rows in Python, and both paths must take a chunk's keys in one order.
_INSERT_NEW = f"""
INSERT INTO raw_events ({_COLUMNS})
SELECT {_COLUMNS} FROM raw_events_stage
ORDER BY id COLLATE "C", occurred_at
ON CONFLICT (id, occurred_at) DO NOTHING
RETURNING id, occurred_at
"""
_RECORDED = "SELECT first_row, last_row, new_keys FROM ingested_batches WHERE batch_id = %s"
_HAS_RECORD = "SELECT 1 FROM ingested_batches WHERE batch_id = %s LIMIT 1"
_NEW_EVENTS = """
SELECT r.id, r.occurred_at, r.source_id, r.event_type, r.payload
FROM ingested_batches AS b
CROSS JOIN LATERAL jsonb_array_elements(b.new_keys) WITH ORDINALITY AS k(key, n)
JOIN raw_events AS r
  ON r.id = k.key->>0
 AND r.occurred_at = timestamptz 'epoch' + (k.key->>1)::bigint * interval '1 microsecond'
WHERE b.batch_id = %s
ORDER BY b.first_row, k.n
"""
_RECORD = """
INSERT INTO ingested_batches (batch_id, first_row, last_row, new_keys, rejected)
VALUES (%s, %s, %s, %s, %s)
ON CONFLICT (batch_id, first_row, last_row) DO UPDATE
SET new_keys = ingested_batches.new_keys || EXCLUDED.new_keys, rejected = EXCLUDED.rejected
"""
_REJECT = """
INSERT INTO rejected_events (event_id, source_id, occurred_at, reason, record)
VALUES (%s, %s, %s, %s, %s)
ON CONFLICT (event_id, occurred_at) DO NOTHING
"""


@dataclass
class InsertResult:
    """What one call stored: the new events, and counts of the rest."""

    new: list[RawEventDTO] = field(default_factory=list)
    duplicates: int = 0
    rejected: int = 0

    def summary(self) -> dict[str, int]:
        return {"inserted": len(self.new), "duplicates": self.duplicates, "rejected": self.rejected}


class _OrjsonJsonbDumper(Dumper):
    """jsonb in binary COPY is a version byte and the JSON text.

    The COPY hands it each event's `payload_json`, encoded once already; anything
    else is encoded with orjson, the fastest encoder.
    """

    format = Format.BINARY
    oid = _JSONB_OID

    def dump(self, obj: Any) -> bytes:
        return b"\x01" + (obj if isinstance(obj, bytes) else orjson.dumps(obj))


@lru_cache(maxsize=1)
def get_sink_engine() -> Engine:
    """A pool of psycopg 3 connections, used only here, for its C-speed binary COPY."""
    settings = get_settings()
    engine = create_engine(
        settings.database_url(driver="psycopg"),
        pool_size=2,
        max_overflow=2,
        pool_pre_ping=True,
        pool_recycle=1800,
        connect_args=connect_args("sentiment-sink"),
    )
    dispose_after_fork(engine)
    return engine


def insert_batch(
    events: Sequence[RawEventDTO],
    *,
    batch_id: str | None = None,
    engine: Engine | None = None,
    chunk_size: int | None = None,
) -> InsertResult:
    """Store `events` once each; return the ones that were new.

    Safe to call again with the same or overlapping events, from any number of
    processes at once. With a `batch_id`, a second call for the same batch
    returns the same new events as the first did, even if the first died
    after committing: each chunk's outcome is recorded with its rows. (A run
    with another chunk size finds them too: a row of the batch that any
    earlier run recorded as new is new.)
    """
    engine = engine or get_sink_engine()
    chunk_size = chunk_size or get_settings().insert_batch_size
    unique = _oldest_first(_dedupe(events))
    batch = _Batch(unique, batch_id, InsertResult(duplicates=len(events) - len(unique)))
    with _pooled(engine) as raw:
        conn: psycopg.Connection[Any] = raw.driver_connection
        _prepare(conn, raw.info)
        if batch_id is not None:
            batch.recorded, batch.recorded_keys = _recorded(conn, batch_id)
        for start in range(0, len(unique), chunk_size):
            _store_chunk(conn, batch, start, min(start + chunk_size, len(unique)))
    return batch.result


def stored_new_events(batch_id: str, *, engine: Engine | None = None) -> list[RawEventDTO] | None:
    """The events `insert_batch(..., batch_id=batch_id)` reported new, read back from
    raw_events (chunk by chunk, each in key order), or None if the batch left no record.

    For an export whose batch is gone from Redis: the rows are stored, and
    `ingested_batches` (kept 7 days) knows which of them were new.
    """
    with _pooled(engine or get_sink_engine()) as raw:
        conn: psycopg.Connection[Any] = raw.driver_connection
        with conn.transaction():
            if not conn.execute(_HAS_RECORD, (batch_id,)).fetchone():
                return None
            rows = conn.execute(_NEW_EVENTS, (batch_id,)).fetchall()
    return [
        RawEventDTO.model_construct(
            id=event_id, occurred_at=occurred_at.astimezone(UTC), source="reddit",
            source_id=source_id, event_type=event_type, payload=payload,
        )
        for event_id, occurred_at, source_id, event_type, payload in rows
    ]  # fmt: skip


# What a record can be to blame for: bad data (SQLSTATE class 22: a NUL in jsonb, a
# value out of range) or a broken constraint (class 23). Anything else (no
# privilege, a missing table, the server going away) is no record's fault: the
# batch fails whole, and retries, instead of every record being quarantined.
_RECORD_REFUSED = (psycopg.DataError, psycopg.IntegrityError)


@contextlib.contextmanager
def _pooled(engine: Engine) -> Iterator[Any]:
    """A pooled connection (`driver_connection` is psycopg's). A server that is down, or
    drops the connection, raises ServiceUnavailable, and the connection is discarded."""
    try:
        raw = engine.raw_connection()
    except Exception as exc:
        raise _unavailable(exc) from exc
    try:
        yield raw
    except psycopg.OperationalError as exc:
        raw.invalidate()
        raise _unavailable(exc) from exc
    finally:
        raw.close()


@dataclass
class _Batch:
    events: list[RawEventDTO]
    batch_id: str | None
    result: InsertResult
    recorded: set[tuple[int, int]] = field(default_factory=set)  # chunk bounds with a record
    recorded_keys: set[tuple[str, datetime]] = field(default_factory=set)  # new in any record
    # Try the direct COPY first: at the start of a call, and again after a chunk
    # the stage path found to hold no stored row.
    copy_first: bool = True


def _dedupe(events: Sequence[RawEventDTO]) -> list[RawEventDTO]:
    seen: dict[tuple[str, datetime], RawEventDTO] = {}
    for event in events:
        seen.setdefault(event.key, event)
    return list(seen.values())


def _oldest_first(events: list[RawEventDTO]) -> list[RawEventDTO]:
    """`events` in Reddit's order of creation: base36 ids by length, then by text.

    Two stable sorts on one key each, faster than one on a tuple.
    """
    ordered = sorted(events, key=attrgetter("id"))
    ordered.sort(key=lambda event: len(event.id))
    return ordered


def _prepare(conn: psycopg.Connection[Any], info: dict[str, Any]) -> None:
    """Once per pooled connection: register the jsonb dumper and create the stage table."""
    if info.get("stage_ready"):
        return
    conn.adapters.register_dumper(dict, _OrjsonJsonbDumper)
    with conn.transaction():
        conn.execute(_CREATE_STAGE)
    info["stage_ready"] = True


def _recorded(
    conn: psycopg.Connection[Any], batch_id: str
) -> tuple[set[tuple[int, int]], set[tuple[str, datetime]]]:
    """The chunk bounds an earlier run of the batch recorded, and the keys it stored as new."""
    with conn.transaction():
        rows = conn.execute(_RECORDED, (batch_id,)).fetchall()
    return {(first, last) for first, last, _ in rows}, {
        key for _, _, keys in rows for key in _decoded(keys)
    }


def _store_chunk(conn: psycopg.Connection[Any], batch: _Batch, first: int, last: int) -> None:
    """Store events[first:last] in one transaction: a direct COPY if it may be new, else staged."""
    if (first, last) in batch.recorded:  # a re-run: the COPY would meet the stored rows
        _stage_chunk(conn, batch, first, last)
        return
    if batch.copy_first:
        try:
            copied = _copy_direct(conn, batch, first, last)
        except (errors.UniqueViolation, errors.DeadlockDetected) as exc:
            # Some keys are stored already (or being stored by a concurrent
            # writer): only the stage path can tell which rows are new.
            batch.copy_first = False
            _log_path(first, last, "stage", f"direct COPY met stored rows ({type(exc).__name__})")
        except _RECORD_REFUSED as exc:
            # A record the database refuses: the stage path finds and quarantines it.
            _log_path(first, last, "stage", f"direct COPY refused ({type(exc).__name__})")
        else:
            batch.result.new.extend(copied)
            _log_path(first, last, "copy", "direct COPY")
            return
    else:
        _log_path(first, last, "stage", "stored rows seen earlier in this call")
    duplicates = batch.result.duplicates
    _stage_chunk(conn, batch, first, last)
    if batch.result.duplicates == duplicates:
        batch.copy_first = True


def _decoded(keys: list[Any]) -> list[tuple[str, datetime]]:
    """Keys as `_record` stores them ([id, microseconds since the epoch]) as (id, time)."""
    return [(k[0], _EPOCH + k[1] * _MICROSECOND) for k in keys]


def _stored_earlier(
    batch: _Batch, chunk: list[RawEventDTO], new_keys: list[tuple[str, datetime]]
) -> list[tuple[str, datetime]]:
    """Keys of `chunk` beyond `new_keys` that an earlier run of this batch stored as new
    (under these chunk bounds or others, as with another INSERT_BATCH_SIZE): still
    new to the batch, so they are handed on again. Records never share a key: each
    holds only the rows its own chunk inserted."""
    if not batch.recorded_keys:
        return []
    known = set(new_keys)
    return [e.key for e in chunk if e.key in batch.recorded_keys and e.key not in known]


def _log_path(first: int, last: int, path: str, why: str) -> None:
    log.debug(
        "rows %d-%d: %s path (%s)",
        first,
        last,
        path,
        why,
        extra={"sink_rows": (first, last), "sink_path": path, "sink_reason": why},
    )


def _copy_direct(
    conn: psycopg.Connection[Any], batch: _Batch, first: int, last: int
) -> list[RawEventDTO]:
    """COPY events[first:last] straight into raw_events and record them, in one transaction.

    Returns the events in the order written; raises (and rolls back) if any of
    them is stored already, or refused.
    """
    chunk = _in_key_order(batch.events[first:last])
    with conn.transaction():
        with conn.cursor() as cur, cur.copy(_COPY_DIRECT) as copy:
            copy.set_types(_TYPES)
            write_row = copy.write_row
            for row in _rows(chunk):
                write_row(row)
        if batch.batch_id is not None:
            _record(conn, batch, first, last, [event.key for event in chunk], rejected=0)
    return chunk


def _in_key_order(events: list[RawEventDTO]) -> list[RawEventDTO]:
    """`events` sorted by (id, occurred_at).

    Two stable sorts on one attribute each: twice as fast as one on a tuple key.
    """
    ordered = sorted(events, key=attrgetter("occurred_at"))
    ordered.sort(key=attrgetter("id"))
    return ordered


def _stage_chunk(conn: psycopg.Connection[Any], batch: _Batch, first: int, last: int) -> None:
    """Store events[first:last] through the stage table; on a refused record, split and retry."""
    chunk = batch.events[first:last]
    try:
        with conn.transaction():
            new_keys = _copy_and_insert(conn, chunk)
            _record(conn, batch, first, last, new_keys, rejected=0)
    except _RECORD_REFUSED as exc:
        if len(chunk) == 1:
            with conn.transaction():
                _reject(conn, chunk[0], exc)
                _record(conn, batch, first, last, [], rejected=1)
            batch.result.rejected += 1
            return
        middle = (first + last) // 2
        _stage_chunk(conn, batch, first, middle)
        _stage_chunk(conn, batch, middle, last)
        return
    _count(batch.result, chunk, new_keys + _stored_earlier(batch, chunk, new_keys), 0)


def _count(
    result: InsertResult,
    chunk: list[RawEventDTO],
    new_keys: list[tuple[str, datetime]],
    rejected: int,
) -> None:
    by_key = {event.key: event for event in chunk}
    result.new.extend(by_key[key] for key in new_keys)
    result.rejected += rejected
    result.duplicates += len(chunk) - len(new_keys) - rejected


def _record(
    conn: psycopg.Connection[Any],
    batch: _Batch,
    first: int,
    last: int,
    new_keys: list[tuple[str, datetime]],
    *,
    rejected: int,
) -> None:
    if batch.batch_id is None:
        return
    keys = [[event_id, (at - _EPOCH) // _MICROSECOND] for event_id, at in new_keys]
    conn.execute(_RECORD, (batch.batch_id, first, last, Jsonb(keys), rejected))


def _copy_and_insert(
    conn: psycopg.Connection[Any], chunk: list[RawEventDTO]
) -> list[tuple[str, datetime]]:
    with conn.cursor() as cur:
        with cur.copy(_COPY_STAGE) as copy:
            copy.set_types(_TYPES)
            for row in _rows(chunk):
                copy.write_row(row)
        cur.execute(_INSERT_NEW)
        return [(event_id, occurred_at) for event_id, occurred_at in cur.fetchall()]


def _rows(chunk: list[RawEventDTO]) -> Iterator[tuple[Any, ...]]:
    for e in chunk:
        yield (e.id, e.occurred_at, e.source, e.source_id, e.event_type, e.payload_json)


def _reject(conn: psycopg.Connection[Any], event: RawEventDTO, exc: psycopg.Error) -> None:
    """Keep a refused record, with the reason, where people can look at it."""
    diag = exc.diag
    reason = (
        " - ".join(part for part in (diag.message_primary, diag.message_detail) if part)
        or type(exc).__name__
    )
    record = json.dumps(
        {
            "id": event.id,
            "occurred_at": event.occurred_at.isoformat(),
            "source": event.source,
            "source_id": event.source_id,
            "event_type": event.event_type,
            "payload": event.payload,
        },
        ensure_ascii=True,  # every NUL or lone surrogate becomes a plain \\uXXXX escape
        default=str,
    )
    log.warning(
        "rejected event %s from r/%s: %s",
        event.id,
        event.source_id,
        reason,
        extra={"event_id": event.id, "subreddit": event.source_id},
    )
    conn.execute(
        _REJECT,
        (event.id[:64], str(event.source_id)[:64], event.occurred_at, reason[:1000], record),
    )


def _unavailable(exc: BaseException) -> ServiceUnavailable:
    # psycopg counts deadlocks and lock or statement timeouts as operational too:
    # name what happened, since every one of them is worth a retry.
    return ServiceUnavailable(
        f"PostgreSQL could not take the batch now ({type(exc).__name__}); it will be retried"
    )
