"""Processing state for the sentiment workers that consume raw_events.

A worker claims unprocessed rows, scores them, and marks them processed:

    with claim_unprocessed(limit=500) as rows:
        scores = model(rows)
        ... store scores ...
        mark_processed([r.key for r in rows], connection=rows.connection)

Claims use `FOR UPDATE SKIP LOCKED`: concurrent workers get disjoint rows and
never wait on each other; a worker that dies releases its claim when its
transaction ends, so the rows go to the next claimer.

A claim is an open transaction holding a lock on raw_events, so keep it to
one batch's scoring (seconds). Retention and the partition keeper need the
table to themselves for a moment and wait at most 2 s for it: claims that
overlap without a pause, each longer than that, keep them out (they retry,
and `sentiment status` shows the oldest unprocessed row held back).

A row the model cannot score goes to `set_aside(keys, reason)`: it is marked
processed, with the reason in `process_error`, so it no longer heads every
claim (they take the oldest first). `requeue_set_aside()` (`sentiment
requeue`) puts such rows back once the model can read them:

    with claim_unprocessed() as rows:
        scored, failed = score_each(rows)        # failed: [(key, reason)]
        mark_processed(scored, connection=rows.connection)
        for key, reason in failed:
            set_aside([key], reason, connection=rows.connection)

Mark inside the claim, on `claim.connection`: the `mark_processed` and
`set_aside` Celery tasks are for consumers that do not claim. A claimer that
ends its block and leaves the marking to the queued task would get the same
rows from its next claim, as oldest unprocessed, until that task has run.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

from sqlalchemy import Connection, Engine, text

from sentiment.config import get_settings, valid_subreddit
from sentiment.db import get_engine
from sentiment.dto import canonical_id, clean_text, to_utc

__all__ = [
    "Claim", "ClaimedEvent", "MarkResult", "claim_unprocessed", "mark_processed",
    "requeue_set_aside", "set_aside",
]  # fmt: skip

_REASON_MAX = 2000  # characters of a set-aside reason kept

log = logging.getLogger(__name__)

_CLAIM = text(
    """
    SELECT id, occurred_at, source_id, event_type, payload
    FROM raw_events
    WHERE NOT processed
    ORDER BY occurred_at
    LIMIT :limit
    FOR UPDATE SKIP LOCKED
    """
)

# One statement: every CTE sees the same snapshot, taken before the update.
# Rows are counted once however many keys name them (an id and its (id, time)
# pair; a bare id may name one id at two times); `unknown` counts keys.
_MARK = text(
    """
    WITH keys AS (
        SELECT DISTINCT k.id, k.occurred_at
        FROM unnest(CAST(:ids AS text[]), CAST(:times AS timestamptz[])) AS k(id, occurred_at)
    ),
    matched AS (
        SELECT DISTINCT r.id, r.occurred_at, r.processed
        FROM raw_events AS r
        JOIN keys AS k
          ON r.id = k.id AND (k.occurred_at IS NULL OR r.occurred_at = k.occurred_at)
    ),
    updated AS (
        UPDATE raw_events AS r
        SET processed = true, processed_at = now(), process_error = CAST(:error AS text)
        FROM matched AS m
        WHERE r.id = m.id AND r.occurred_at = m.occurred_at AND NOT r.processed
        RETURNING r.id
    )
    SELECT
        (SELECT count(*) FROM updated) AS updated,
        -- Not `WHERE processed`: a row another transaction marks after our snapshot
        -- is neither in that nor updated here, and it is already processed.
        (SELECT count(*) FROM matched) - (SELECT count(*) FROM updated) AS already_processed,
        (SELECT count(*) FROM keys AS k WHERE NOT EXISTS (
            SELECT 1 FROM matched AS m
            WHERE m.id = k.id AND (k.occurred_at IS NULL OR m.occurred_at = k.occurred_at)
        )) AS unknown
    """
)


@dataclass(frozen=True)
class ClaimedEvent:
    id: str
    occurred_at: datetime
    source_id: str
    event_type: str
    payload: dict[str, Any]

    @property
    def key(self) -> tuple[str, datetime]:
        return (self.id, self.occurred_at)


class Claim(list[ClaimedEvent]):
    """Claimed rows, locked until the claiming transaction ends."""

    def __init__(self, rows: Iterable[ClaimedEvent], connection: Connection) -> None:
        super().__init__(rows)
        self.connection = connection


@dataclass(frozen=True)
class MarkResult:
    updated: int
    already_processed: int
    unknown: int
    invalid: int = 0  # keys that are not an id or an (id, time) pair: logged, skipped

    def summary(self) -> dict[str, int]:
        return {
            "updated": self.updated,
            "already_processed": self.already_processed,
            "unknown": self.unknown,
            "invalid": self.invalid,
        }


@contextmanager
def claim_unprocessed(limit: int | None = None, *, engine: Engine | None = None) -> Iterator[Claim]:
    """Lock up to `limit` (CLAIM_BATCH_SIZE) unprocessed rows, oldest first, for the
    length of the block. Keep the block short: see the module's note on claims.

    The transaction commits when the block ends (so marks made on
    `claim.connection` are kept) and rolls back on an exception (so the rows
    are free for another worker).
    """
    if limit is None:
        limit = get_settings().claim_batch_size
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"limit must be a whole number of rows >= 1, not {limit!r}")
    with (engine or get_engine()).begin() as connection:
        rows = connection.execute(_CLAIM, {"limit": limit}).all()
        yield Claim((ClaimedEvent(*row) for row in rows), connection)


def mark_processed(
    keys: Iterable[Any],
    *,
    connection: Connection | None = None,
    engine: Engine | None = None,
) -> MarkResult:
    """Set processed = true, processed_at = now() for each key, in one statement.

    A key is an `(id, occurred_at)` pair or a bare id (then every row with that
    id), read as `RawEventDTO` reads them: a `t1_`/`t3_` fullname or upper case
    is fine, the time may be a datetime (naive means UTC), ISO 8601 text (what
    JSON carries) or epoch seconds. A key that is none of these is counted in
    `invalid` and logged; the others are marked all the same. A row already
    processed keeps its first `processed_at`.
    """
    return _mark(keys, None, connection=connection, engine=engine)


def set_aside(
    keys: Iterable[Any],
    reason: str,
    *,
    connection: Connection | None = None,
    engine: Engine | None = None,
) -> MarkResult:
    """Mark rows processed without a score, keeping why in `process_error`.

    For rows a sentiment worker cannot score: they leave the queue instead of
    heading every claim, and `requeue_set_aside` puts them back. Keys and
    counts are as for `mark_processed`; a row already processed (scored or set
    aside) is left as it is. `reason` must say something (NULs are dropped, lone
    surrogates replaced, and it is cut at 2,000 characters).
    """
    reason = clean_text(str(reason)).strip()[:_REASON_MAX]
    if not reason:
        raise ValueError("set_aside needs a reason: say why the rows cannot be scored")
    return _mark(keys, reason, connection=connection, engine=engine)


def requeue_set_aside(subreddit: str | None = None, *, engine: Engine | None = None) -> int:
    """Put rows set aside back in the queue (all, or one subreddit's); how many."""
    query = """
        UPDATE raw_events SET processed = false, processed_at = NULL, process_error = NULL
        WHERE process_error IS NOT NULL
    """
    params: dict[str, Any] = {}
    if subreddit is not None:
        query += " AND source_id = :source_id"
        params["source_id"] = valid_subreddit(subreddit)
    with (engine or get_engine()).begin() as conn:
        return conn.execute(text(query), params).rowcount


def _mark(
    keys: Iterable[Any],
    error: str | None,
    *,
    connection: Connection | None,
    engine: Engine | None,
) -> MarkResult:
    ids, times, problems = _split_keys(keys)
    if problems:
        shown = "; ".join(problems[:3]) + ("; ..." if len(problems) > 3 else "")
        what = "set_aside" if error is not None else "mark_processed"
        log.warning("%s: skipped %d invalid keys: %s", what, len(problems), shown)
    params = {"ids": ids, "times": times, "error": error}
    if connection is not None:
        row = connection.execute(_MARK, params).one()
    else:
        with (engine or get_engine()).begin() as conn:
            row = conn.execute(_MARK, params).one()
    updated, already_processed, unknown = row
    return MarkResult(updated=updated, already_processed=already_processed, unknown=unknown,
                      invalid=len(problems))  # fmt: skip


def _split_keys(keys: Iterable[Any]) -> tuple[list[str], list[datetime | None], list[str]]:
    """The ids and times of the valid keys, and what is wrong with each other key.

    TypeError for one key given where a list of keys belongs: iterated, a string
    would be one-letter ids, and an (id, time) pair a bare id (every row with it).
    """
    if isinstance(keys, str | bytes) or _one_pair(keys):
        raise TypeError(f"keys must be a list of keys, not one key: pass [{keys!r}]")
    ids: list[str] = []
    times: list[datetime | None] = []
    problems: list[str] = []
    for key in keys:
        try:
            key_id, when = _parse_key(key)
        except (ValueError, OverflowError, OSError) as exc:
            problems.append(f"{key!r}: {exc}")
            continue
        ids.append(key_id)
        times.append(when)
    return ids, times, problems


def _one_pair(keys: Iterable[Any]) -> bool:
    """Whether `keys` is an (id, time) pair rather than two keys: two items, an id
    first, then a time: a date or datetime, epoch seconds, text with - or : (no
    Reddit id has them), or upper-case text that reads as an ISO time (ids are
    lower case). Anything else second is a key of its own, counted as invalid if
    it is not one."""
    if not (isinstance(keys, list | tuple) and len(keys) == 2 and isinstance(keys[0], str)):
        return False
    second = keys[1]
    if isinstance(second, str):
        if "-" in second or ":" in second:
            return True
        if second == second.lower():
            return False  # an id, or a bad key to count
        try:
            to_utc(second)
        except ValueError:
            return False
        return True
    # A date or datetime, or epoch seconds.
    return isinstance(second, date | int | float) and not isinstance(second, bool)


def _parse_key(key: Any) -> tuple[str, datetime | None]:
    if isinstance(key, str):
        return canonical_id(key), None
    if isinstance(key, list | tuple) and len(key) == 2 and isinstance(key[0], str):
        return canonical_id(key[0]), to_utc(key[1])
    raise ValueError("a key is an id or an [id, occurred_at] pair")
