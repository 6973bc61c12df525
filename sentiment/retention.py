"""Retention: drop raw events older than RETENTION_DAYS, never one still unprocessed.

Whole days go at once, the way time-series storage is meant to shrink: on
TimescaleDB `drop_chunks` removes the chunks that lie wholly before the
cutoff; on plain PostgreSQL the daily partitions (``raw_events_pYYYYMMDD``)
that end by the cutoff are dropped, and old rows that landed in the default
partition are deleted. Either way no row is deleted one by one from a day
partition, so a run costs milliseconds and leaves no bloat.

The sentiment workers must see every row, so the oldest unprocessed row
holds the cutoff back: nothing from its day on is dropped until it is marked
processed. The result says when that happens (`held_back_by`), and so does
the log.

The run takes raw_events whole (ACCESS EXCLUSIVE) while it decides and
drops, so a row inserted or un-processed meanwhile cannot be lost; that
takes milliseconds. Dropping a partition needs that lock on the parent
anyway, and taking it first, before any other, is what keeps the run out of
deadlocks: a sentiment worker that holds a claim and then marks its rows
would otherwise wait for the run while the run waits for it. The run waits
at most `MAINTENANCE_LOCK_WAIT_S` for the table (every query that comes after
queues behind it meanwhile); if a transaction still holds it (a long claim), the
run gives up with a retryable `ServiceUnavailable` and changes nothing.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import OperationalError

from sentiment.db import MAINTENANCE_LOCK_WAIT_S, get_engine, lock_raw_events
from sentiment.dto import to_utc
from sentiment.errors import ServiceUnavailable

__all__ = ["RetentionResult", "apply_retention"]

log = logging.getLogger(__name__)

_PARTITION = re.compile(r"raw_events_p(\d{8})")
_LOCK_NOT_AVAILABLE = "55P03"  # SQLSTATE of a lock_timeout


@dataclass(frozen=True, slots=True)
class RetentionResult:
    """What a run removed, and the cutoff it used: everything older than it is gone."""

    cutoff: datetime
    held_back_by: datetime | None  # the oldest unprocessed row, when it moved the cutoff
    dropped: tuple[str, ...]  # partitions or chunks
    rows_deleted: int  # from the default partition

    def summary(self) -> dict[str, object]:
        return {
            "cutoff": self.cutoff.isoformat(),
            "held_back_by": self.held_back_by.isoformat() if self.held_back_by else None,
            "dropped": len(self.dropped),
            "rows_deleted": self.rows_deleted,
        }


def apply_retention(
    days: int,
    *,
    engine: Engine | None = None,
    now: datetime | None = None,
    dry_run: bool = False,
) -> RetentionResult:
    """Drop what is older than `days` days (and processed); see the module doc.

    With `dry_run` the very same statements run and are rolled back (DROP is
    transactional in PostgreSQL), so the result says exactly what a real run
    would drop now, and nothing is dropped.
    """
    if days < 1:
        raise ValueError("retention must keep at least one day")
    cutoff = (datetime.now(UTC) if now is None else to_utc(now)) - timedelta(days=days)
    with (engine or get_engine()).connect() as conn, conn.begin() as transaction:
        _lock_raw_events(conn)
        oldest = conn.execute(text("SELECT min(occurred_at) FROM raw_events WHERE NOT processed"))
        held_back_by = oldest.scalar()
        if held_back_by is not None and held_back_by < cutoff:
            cutoff = held_back_by = held_back_by.astimezone(UTC)  # whatever the session's zone
            log.warning(
                "retention: an unprocessed row from %s holds back the cutoff; "
                "rows from then on stay until the sentiment workers mark them processed",
                held_back_by.isoformat(),
            )
        else:
            held_back_by = None
        if _is_hypertable(conn):
            dropped = tuple(
                conn.execute(
                    text(
                        "SELECT * FROM drop_chunks('raw_events',"
                        " older_than => CAST(:cutoff AS timestamptz))"
                    ),
                    {"cutoff": cutoff},
                ).scalars()
            )
            deleted = 0
        else:
            dropped = _drop_partitions(conn, cutoff)
            deleted = conn.execute(
                text("DELETE FROM raw_events_default WHERE occurred_at < :cutoff"),
                {"cutoff": cutoff},
            ).rowcount
        if dry_run:
            transaction.rollback()
    result = RetentionResult(cutoff, held_back_by, dropped, deleted)
    if (dropped or deleted) and not dry_run:
        log.info("retention: before %s: dropped %s, deleted %d rows from the default partition",
                 cutoff.isoformat(), ", ".join(dropped) or "nothing", deleted)  # fmt: skip
    return result


def _lock_raw_events(conn: Connection) -> None:
    """Take raw_events whole (see the module doc); a transaction holding it is a retry."""
    try:
        lock_raw_events(conn)
    except OperationalError as exc:
        if getattr(exc.orig, "pgcode", None) != _LOCK_NOT_AVAILABLE:
            raise
        raise ServiceUnavailable(
            f"retention: raw_events is in use (a transaction held it for"
            f" {MAINTENANCE_LOCK_WAIT_S}s, such as a sentiment worker's open claim);"
            " nothing was dropped, try again later"
        ) from None


def _is_hypertable(conn: Connection) -> bool:
    if conn.execute(text("SELECT to_regclass('timescaledb_information.hypertables')")).scalar():
        return bool(
            conn.execute(
                text(
                    "SELECT count(*) FROM timescaledb_information.hypertables"
                    " WHERE hypertable_name = 'raw_events'"
                    " AND hypertable_schema = current_schema()"
                )
            ).scalar()
        )
    return False


def _drop_partitions(conn: Connection, cutoff: datetime) -> tuple[str, ...]:
    """Drop the daily partitions that end on or before `cutoff`."""
    names = conn.execute(
        text(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
            " WHERE i.inhparent = 'raw_events'::regclass ORDER BY 1"
        )
    ).scalars()
    dropped = []
    for name in names:
        match = _PARTITION.fullmatch(name)
        if match is None:  # the default partition, or one we did not make
            continue
        day_starts = datetime.strptime(match[1], "%Y%m%d").replace(tzinfo=UTC)
        if day_starts + timedelta(days=1) <= cutoff:
            conn.execute(text(f'DROP TABLE "{name}"'))  # the name matched the pattern above
            dropped.append(name)
    return tuple(dropped)
