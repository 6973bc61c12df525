"""Session fixtures: a real PostgreSQL and a real Redis, migrated once.

With PG_HOST / REDIS_URL set (in the environment or in `.env`), tests use
those servers, but a separate `<PG_DB>_test` database and Redis database 15,
so a configured production database is never touched. Otherwise embedded
servers start under `.sentiment-test/` on their own ports (they do not clash
with `make run`). DATA_DIR, CSV_DIR and the embedded ports are always the
tests' own, whatever is configured.

Each test starts from empty tables. We truncate rather than roll back a
per-test transaction because the code under test commits on its own pooled
connections, from several threads and processes.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _configured() -> Any:
    """Where Settings would point: PG_HOST, PG_DB and REDIS_URL read as it reads them
    (the environment first, then `.env`)."""
    from pydantic_settings import BaseSettings, SettingsConfigDict

    class Where(BaseSettings):
        model_config = SettingsConfigDict(
            env_file=".env", env_file_encoding="utf-8", extra="ignore", case_sensitive=False
        )
        pg_host: str = ""
        pg_db: str = "sentiment"
        redis_url: str = ""

    return Where()


def _configure_environment() -> None:
    """Point every Settings read (here and in subprocesses) at the test servers.

    Assigned outright, whatever the environment or `.env` says: a DATA_DIR or
    CSV_DIR meant for `make run`, or a PG_HOST / REDIS_URL in `.env` only, must
    never lead the tests (which truncate tables and delete files) to them."""
    os.environ["DATA_DIR"] = str(ROOT / ".sentiment-test")
    os.environ["CSV_DIR"] = str(ROOT / ".sentiment-test" / "csv")
    os.environ["EMBEDDED_PG_PORT"] = "54339"
    os.environ["EMBEDDED_REDIS_PORT"] = "63809"
    where = _configured()
    if where.pg_host:
        os.environ["PG_HOST"] = where.pg_host
        base = where.pg_db or "sentiment"
        os.environ["PG_DB"] = base if base.endswith("_test") else f"{base}_test"
    if where.redis_url:
        url = where.redis_url.rstrip("/")
        head, _, last = url.rpartition("/")
        os.environ["REDIS_URL"] = f"{head}/15" if last.isdigit() else f"{url}/15"
    os.environ["SUBREDDITS"] = os.environ.get("TEST_SUBREDDITS", "")
    # The Reddit edge is the simulator, at a port fixed now so every process
    # (this one, workers, beat) is configured alike.
    from sentiment.reddit.simulator import DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET

    simulator_url = f"http://127.0.0.1:{_free_port()}"
    os.environ.update(
        REDDIT_CLIENT_ID=DEFAULT_CLIENT_ID,
        REDDIT_CLIENT_SECRET=DEFAULT_CLIENT_SECRET,
        REDDIT_OAUTH_URL=simulator_url,
        REDDIT_URL=simulator_url,
        REDDIT_USERNAME="",
        REDDIT_PASSWORD="",
        # Short limits, so redelivery after a killed worker takes seconds, not an hour.
        TASK_SOFT_TIME_LIMIT="20",
        RETRY_BACKOFF_MAX="2",
        CELERY_VISIBILITY_TIMEOUT="30",
        TASK_MAX_RETRIES="60",
    )


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


_configure_environment()

from sentiment.config import Settings, get_settings  # noqa: E402 - after the environment


def _create_test_database(settings: Settings) -> None:
    import psycopg2
    from psycopg2 import sql

    conn = psycopg2.connect(
        host=settings.pg_host,
        port=settings.pg_port,
        user=settings.pg_user,
        password=settings.pg_password.get_secret_value(),
        dbname="postgres",
    )
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (settings.pg_db,))
        if cur.fetchone() is None:
            cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(settings.pg_db)))
    conn.close()


def alembic_config():  # type: ignore[no-untyped-def]
    from alembic.config import Config

    return Config(str(ROOT / "alembic.ini"))


def run_alembic(scratch, *args: str) -> None:  # type: ignore[no-untyped-def]
    """`alembic <verb> <args>` against the database of engine `scratch`."""
    from alembic import command

    verb, *rest = args
    config = alembic_config()
    with scratch.connect() as conn:
        config.attributes["connection"] = conn
        getattr(command, verb)(config, *rest)


def raw_events_partitions(scratch) -> list[str]:  # type: ignore[no-untyped-def]
    """The partitions of raw_events in the database of engine `scratch`, sorted."""
    from sqlalchemy import text

    with scratch.connect() as conn:
        return sorted(
            conn.execute(
                text(
                    "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
                    " WHERE i.inhparent = 'raw_events'::regclass"
                )
            ).scalars()
        )


def wait_for_a_lock_wait(scratch, waiter: str) -> None:  # type: ignore[no-untyped-def]
    """Return once a session of engine `scratch`'s database waits for a lock; else fail,
    saying that `waiter` never waited. Each look ends its transaction: pg_stat_activity
    is a snapshot taken once per transaction."""
    import time

    from sqlalchemy import text

    query = text(
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE datname = current_database() AND wait_event_type = 'Lock'"
    )
    deadline = time.monotonic() + 10
    with scratch.connect() as conn:
        while not conn.execute(query).scalar():
            assert time.monotonic() < deadline, f"{waiter} never waited for a lock"
            time.sleep(0.05)
            conn.rollback()


def use_layout(monkeypatch: pytest.MonkeyPatch, layout: str) -> None:
    """Make the next migration use STORAGE_LAYOUT `layout`."""
    from sentiment.config import get_settings

    monkeypatch.setenv("STORAGE_LAYOUT", layout)
    get_settings.cache_clear()


@pytest.fixture
def scratch_engine(settings, engine):  # type: ignore[no-untyped-def]
    """A fresh, empty database of its own (settings cache cleared and the
    database dropped afterwards)."""
    import uuid

    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    from sentiment.config import get_settings

    name = f"scratch_{uuid.uuid4().hex[:8]}"
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    scratch = create_engine(make_url(settings.database_url()).set(database=name))
    yield scratch
    scratch.dispose()
    get_settings.cache_clear()
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))


@pytest.fixture(scope="session")
def settings() -> Iterator[Settings]:
    """Running, migrated servers and the Settings that reach them.

    Servers this session started are stopped at its end; ones already running
    (a developer's earlier run) are left as they were.
    """
    from alembic import command
    from sentiment.embedded import ensure_services, stop_services

    get_settings.cache_clear()
    settings = get_settings()
    started = ensure_services(settings, durable=False)
    if not settings.uses_embedded_postgres:
        _create_test_database(settings)
    command.upgrade(alembic_config(), "head")
    yield settings
    from sentiment.db import get_engine
    from sentiment.sinks.postgres import get_sink_engine

    get_engine().dispose()
    get_sink_engine().dispose()
    stop_services(settings, started)


@pytest.fixture(scope="session")
def engine(settings: Settings):  # type: ignore[no-untyped-def]
    from sentiment.db import get_engine

    return get_engine()


@pytest.fixture
def db(engine):  # type: ignore[no-untyped-def]
    """An empty raw_events and rejected_events, and the engine to look at them."""
    from sqlalchemy import text

    with engine.begin() as conn:
        conn.execute(text("TRUNCATE raw_events, rejected_events, ingested_batches"))
    return engine


@pytest.fixture
def redis_client(settings: Settings):  # type: ignore[no-untyped-def]
    """The test Redis, with the pipeline's own keys removed.

    Not FLUSHDB: that would also drop kombu's queue bindings under a running worker.
    """
    import redis

    client = redis.Redis.from_url(settings.redis_connection_url())
    for key in client.scan_iter("sentiment:*", count=1000):
        client.delete(key)
    yield client
    client.close()


@pytest.fixture(scope="session")
def simulator(settings: Settings):  # type: ignore[no-untyped-def]
    """The Reddit simulator, serving at REDDIT_OAUTH_URL, without a rate limit."""
    from urllib.parse import urlsplit

    from sentiment.reddit.simulator import Simulator, SimulatorThread

    sim = Simulator(seed=7, requests_per_window=None)
    port = urlsplit(settings.reddit_oauth_url).port
    with SimulatorThread(sim, port=port):
        yield sim


@pytest.fixture
def csv_dir(settings: Settings) -> Path:
    import shutil

    shutil.rmtree(settings.csv_dir, ignore_errors=True)
    settings.csv_dir.mkdir(parents=True, exist_ok=True)
    return settings.csv_dir


@pytest.fixture
def worker_factory(settings: Settings, simulator):  # type: ignore[no-untyped-def]
    """Start real `celery -A sentiment worker` processes; all are stopped afterwards."""
    from tests.processes import CeleryWorker

    workers: list[CeleryWorker] = []

    def start(**kwargs):  # type: ignore[no-untyped-def]
        worker = CeleryWorker(**kwargs)
        workers.append(worker)  # before start(): a worker that fails to come up is stopped too
        worker.start()
        return worker

    yield start
    for worker in workers:
        worker.stop()


@pytest.fixture
def worker(worker_factory, db, redis_client, csv_dir):  # type: ignore[no-untyped-def]
    """One running worker, on empty tables, Redis keys and CSV folder."""
    return worker_factory()


@pytest.fixture(scope="session")
def timescale(engine) -> bool:  # type: ignore[no-untyped-def]
    """True when raw_events is a hypertable on this server."""
    from sqlalchemy import text

    with engine.connect() as conn:
        return bool(
            conn.execute(
                text(
                    "SELECT count(*) FROM pg_extension e WHERE e.extname = 'timescaledb'"
                    " AND to_regclass('timescaledb_information.hypertables') IS NOT NULL"
                )
            ).scalar()
        )
