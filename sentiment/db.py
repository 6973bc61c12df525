"""Engine and session factory: one pooled engine per process."""

from __future__ import annotations

import os
from functools import lru_cache

from sqlalchemy import Connection, Engine, create_engine, text

from sentiment.config import Settings, get_settings

__all__ = [
    "MAINTENANCE_LOCK_WAIT_S", "connect_args", "dispose_after_fork", "get_engine",
    "lock_raw_events", "make_engine",
]  # fmt: skip

# How long retention and the partition keeper wait to take raw_events whole. Every
# query that comes later queues behind such a wait, so it stays short; a
# transaction that holds the table longer (a sentiment worker's claim) makes the
# job step back and retry, instead of stalling inserts or deadlocking the claim.
MAINTENANCE_LOCK_WAIT_S = 2


def lock_raw_events(conn: Connection) -> None:
    """Take raw_events whole (ACCESS EXCLUSIVE) for this transaction, first of all its
    locks, waiting at most MAINTENANCE_LOCK_WAIT_S: else OperationalError (lock timeout)."""
    conn.execute(text(f"SET LOCAL lock_timeout = '{MAINTENANCE_LOCK_WAIT_S}s'"))
    conn.execute(text("LOCK TABLE raw_events IN ACCESS EXCLUSIVE MODE"))


def connect_args(application_name: str) -> dict[str, object]:
    """libpq connection parameters every engine here uses (psycopg2 and psycopg 3 alike)."""
    return {
        "connect_timeout": 5,
        "application_name": application_name,
        # A server that vanishes (no FIN, no RST) is noticed in ~2 min instead of
        # leaving a worker waiting for an answer for ever.
        "keepalives": 1,
        "keepalives_idle": 60,
        "keepalives_interval": 10,
        "keepalives_count": 6,
        # Never let one statement hold a worker (and its locks) for ever; and let the
        # server notice a client machine that vanished mid-claim (its locks would
        # otherwise keep retention and the partition keeper out for hours).
        "options": "-c statement_timeout=120000 -c lock_timeout=30000"
        " -c tcp_keepalives_idle=60 -c tcp_keepalives_interval=10 -c tcp_keepalives_count=6",
    }


def make_engine(settings: Settings) -> Engine:
    """A pooled engine. Pool size is a setting; connections are checked before use."""
    engine = create_engine(
        settings.database_url(),
        pool_size=settings.pg_pool_size,
        max_overflow=settings.pg_pool_max_overflow,
        # A worker outlives database restarts: test each connection on checkout
        # rather than fail the first task after one.
        pool_pre_ping=True,
        pool_recycle=1800,
        connect_args=connect_args("sentiment"),
    )
    dispose_after_fork(engine)
    return engine


def dispose_after_fork(engine: Engine) -> None:
    """Celery's prefork pool forks workers: a child must open its own connections.

    `dispose(close=False)` drops the inherited pool without closing the parent's
    sockets (SQLAlchemy's recommended pattern for multiprocessing).
    """
    os.register_at_fork(after_in_child=lambda: engine.dispose(close=False))


@lru_cache(maxsize=1)
def get_engine() -> Engine:
    """The process-wide engine (`get_engine.cache_clear()` after changing settings)."""
    return make_engine(get_settings())
