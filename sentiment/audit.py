"""Rows stored in PostgreSQL whose batch never reached the CSV files, exported now.

A chain's export can be lost without anything failing where a retry or the
parked exports would see it: Redis loses everything between the insert and
the export (the queued export goes with it), or an insert commits part of a
split batch and then fails for good. Two records make that visible:
`ingested_batches` knows, for 7 days, which rows each batch stored as new, and
each subreddit's CSV ledger knows which batches it committed.

`export_missing` compares them for the batches between an hour and three and
a half days old (the ledgers remember a batch for four, so a batch is never
written twice) whose blob is gone from Redis, and exports what is missing through the
normal path: `export_events` under the batch's own id. A batch whose blob is
still there is left to its chain: its insert may still be retrying, or be
redelivered after a worker died, and store more chunks, and a ledger that
committed the batch's first chunks under its id would make the chain's own
export skip the rest. The blob goes when the export has written the batch,
when the insert fails for good, or when it expires (three days: a chain
that died without letting go of it, with Redis down say, is looked for half a
day past that). Beat runs it hourly.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

from sqlalchemy import text

from sentiment.config import get_settings
from sentiment.db import get_engine
from sentiment.errors import SentimentError
from sentiment.pipeline import BATCH_TTL_S, batch_key, get_redis
from sentiment.sinks.csv import KEEP_BATCHES_S, committed_batches, export_events
from sentiment.sinks.postgres import stored_new_events

__all__ = ["AuditResult", "export_missing"]

log = logging.getLogger(__name__)

_MIN_AGE_S = 3600
# Past the blob's expiry (a batch whose blob lived at the last look is looked at
# again once it expired), within what the CSV ledgers remember.
_MAX_AGE_S = BATCH_TTL_S + 12 * 3600
assert _MAX_AGE_S < KEEP_BATCHES_S

# Each batch with new rows, and its subreddit (that of its first new row: a
# batch is one scrape of one subreddit).
_BATCHES = text(
    """
    SELECT b.batch_id, min(r.source_id)
    FROM ingested_batches AS b
    JOIN raw_events AS r
      ON r.id = b.new_keys->0->>0
     AND r.occurred_at = timestamptz 'epoch'
                         + (b.new_keys->0->>1)::bigint * interval '1 microsecond'
    WHERE b.created_at < now() - make_interval(secs => :min_age)
      AND b.created_at > now() - make_interval(secs => :max_age)
      AND jsonb_array_length(b.new_keys) > 0
    GROUP BY b.batch_id
    """
)


@dataclass(frozen=True, slots=True)
class AuditResult:
    """Batches looked at, those missing from the CSV, rows written now, batches still
    failing, and batches missing but left to their chains (blob still in Redis)."""

    batches: int
    missing: int
    rows_written: int
    failing: int
    in_flight: int = 0

    def summary(self) -> dict[str, int]:
        return asdict(self)


def export_missing(*, csv_dir: Path | None = None) -> AuditResult:
    """Export every batch of the last 3.5 days (but the last hour) that is stored
    in PostgreSQL, missing from its subreddit's CSV ledger, and no longer held by a
    chain (its blob is gone from Redis)."""
    csv_dir = csv_dir or get_settings().csv_dir
    with get_engine().connect() as conn:
        rows = conn.execute(_BATCHES, {"min_age": _MIN_AGE_S, "max_age": _MAX_AGE_S}).all()
    by_subreddit: dict[str, list[str]] = defaultdict(list)
    for batch_id, subreddit in rows:
        by_subreddit[subreddit].append(batch_id)
    missing = written = failing = in_flight = 0
    redis = get_redis()
    for subreddit, batch_ids in sorted(by_subreddit.items()):
        try:
            done = committed_batches(csv_dir, subreddit)
        except SentimentError as exc:
            log.warning("r/%s: cannot read its CSV ledger: %s", subreddit, exc)
            failing += len(batch_ids)
            continue
        for batch_id in batch_ids:
            if batch_id in done:
                continue
            if redis.exists(batch_key(batch_id)):
                log.info("r/%s: batch %s is not in CSV yet; its chain still holds it",
                         subreddit, batch_id)  # fmt: skip
                in_flight += 1
                continue
            missing += 1
            try:
                result = export_events(stored_new_events(batch_id) or [],
                                       csv_dir=csv_dir, batch_id=batch_id)  # fmt: skip
            except SentimentError as exc:  # one directory's trouble must not stop the others
                log.warning("r/%s: batch %s is stored but not in CSV, and its export fails: %s",
                            subreddit, batch_id, exc)  # fmt: skip
                failing += 1
                continue
            written += result.written
            log.warning("r/%s: batch %s was stored but never exported; wrote its %d rows now",
                        subreddit, batch_id, result.written)  # fmt: skip
    return AuditResult(len(rows), missing, written, failing, in_flight)
