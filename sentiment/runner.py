"""`sentiment run`: every process of the pipeline on one machine, with a live view.

Servers that are configured (PG_HOST, REDIS_URL, Reddit credentials) are used
as they are; whatever is missing is provided: embedded PostgreSQL and Redis,
and the Reddit simulator. Then migrations, one worker, beat and Flower run as
child processes, logging to `<DATA_DIR>/logs/`. Ctrl-C (or --duration) stops
them in order: beat first (no new work), then the worker (warm shutdown:
running tasks finish), then Flower and the simulator, then the servers this
command started.

Before anything starts it checks what would otherwise fail later in a child:
no other run holds DATA_DIR, CSV_DIR is writable, and its ports are free.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from rich.console import Console
from rich.live import Live

from sentiment.config import SIMULATOR_CLIENT_ID, Settings
from sentiment.embedded import ensure_services, port_taken, stop_services
from sentiment.sinks.csv import check_csv_dir

__all__ = ["DEMO_SUBREDDITS", "Runner", "only_run"]

DEMO_SUBREDDITS = "wallstreetbets:30,stocks:30,investing:60,cryptocurrency:30,personalfinance:60"
_SIMULATOR_SECRET = "simulator-secret"  # noqa: S105 - the local simulator's, not Reddit's


@contextlib.contextmanager
def only_run(data_dir: Path) -> Iterator[None]:
    """Hold DATA_DIR for one `sentiment run`: a second would share its servers, ports and logs.

    An flock on `<data_dir>/run.pid`, which holds the owner's pid; the kernel
    releases it when the owner dies, so a crashed run never blocks the next."""
    data_dir.mkdir(parents=True, exist_ok=True)
    with (data_dir / "run.pid").open("a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "?"
            raise RuntimeError(
                f"another `sentiment run` (pid {owner}) is using {data_dir}; stop it "
                "(Ctrl-C), or give this one a DATA_DIR of its own"
            ) from None
        handle.truncate(0)
        handle.write(str(os.getpid()))
        handle.flush()
        try:
            yield
        finally:
            handle.truncate(0)


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def _handling(signals: list[signal.Signals], handler: Any) -> Iterator[None]:
    """`handler` for `signals` inside the block; their own handlers back afterwards."""
    previous = {sig: signal.signal(sig, handler) for sig in signals}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _terminate_as_interrupt() -> contextlib.AbstractContextManager[None]:
    """SIGTERM and SIGHUP (a supervisor, `timeout`, a closed terminal) stop a run as
    Ctrl-C does: the children live in sessions of their own and would be orphaned.
    A signal inherited as ignored stays so: `nohup sentiment run` outlives its terminal."""

    def interrupt(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    caught = [s for s in _STOP_SIGNALS[1:] if signal.getsignal(s) is not signal.SIG_IGN]
    return _handling(caught, interrupt)


def _signals_ignored() -> contextlib.AbstractContextManager[None]:
    return _handling(list(_STOP_SIGNALS), signal.SIG_IGN)


@dataclass
class _Child:
    name: str
    process: subprocess.Popen[bytes]
    log: Path


@dataclass
class Runner:
    settings: Settings
    concurrency: int = 2
    flower_port: int = 5555
    simulator_port: int = 8765
    console: Console = field(default_factory=Console)
    children: list[_Child] = field(default_factory=list)

    @property
    def log_dir(self) -> Path:
        return self.settings.data_dir.resolve() / "logs"

    def run(self, duration: float | None = None) -> None:
        with only_run(self.settings.data_dir), _terminate_as_interrupt():
            # What would otherwise fail in a child process, checked before anything starts.
            check_csv_dir(self.settings.csv_dir)
            self._check_ports()
            self._run(duration)

    def _check_ports(self) -> None:
        """Ports we would listen on must be free: fail now rather than with a child's traceback."""
        wanted = [(self.flower_port, "Flower", "--flower-port")]
        if not self.settings.has_reddit_credentials:
            wanted.append((self.simulator_port, "the Reddit simulator", "--simulator-port"))
        for port, what, option in wanted:
            if port_taken(port):
                raise RuntimeError(f"port {port} ({what}) is in use; choose another with {option}")

    def _run(self, duration: float | None) -> None:
        started: list[str] = []
        env = self._child_environment()
        try:
            ensure_services(self.settings, started=started)
            # A Redis that is configured but down: one line now, not a child's traceback.
            with redis.Redis.from_url(self.settings.redis_connection_url(), socket_timeout=5) as r:
                r.ping()
            self._migrate(env)
            if not self.settings.has_reddit_credentials:
                self._spawn(
                    "simulator",
                    [
                        "simulator",
                        "--port",
                        str(self.simulator_port),
                        "--subreddits",
                        ",".join(s.split(":")[0] for s in env["SUBREDDITS"].split(",")),
                        "--client-id",
                        SIMULATOR_CLIENT_ID,
                        "--client-secret",
                        _SIMULATOR_SECRET,
                    ],
                    env,
                    sentiment_cli=True,
                )
                self._wait_for_port(self.simulator_port)
            self._spawn(
                "worker",
                [
                    "-A",
                    "sentiment",
                    "worker",
                    "--loglevel",
                    "INFO",
                    "--concurrency",
                    str(self.concurrency),
                    "-Q",
                    "scrape,ingest,export",
                    "--hostname",
                    "worker@%h",
                ],
                env,
            )
            self._spawn("beat", ["-A", "sentiment", "beat", "--loglevel", "INFO"], env)
            self._kick_off(env)
            self._spawn(
                "flower",
                [
                    "-A",
                    "sentiment",
                    "flower",
                    "--address=127.0.0.1",
                    f"--port={self.flower_port}",
                ],
                env,
            )
            self._announce(env)
            self._watch(duration, env)
        except KeyboardInterrupt:
            self.console.print("\nstopping… (the worker gets up to 30 s to finish its tasks)")
        finally:
            with _signals_ignored():  # a second Ctrl-C must not cut the clean-up short
                self._stop_children()
                if started:
                    stop_services(self.settings, started)
            self.console.print(f"stopped; logs are in {self.log_dir}")

    def _child_environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env["DATA_DIR"] = str(self.settings.data_dir.resolve())
        env["CSV_DIR"] = str(self.settings.csv_dir.resolve())
        env["PYTHONUNBUFFERED"] = "1"
        if not self.settings.subreddits:
            env["SUBREDDITS"] = DEMO_SUBREDDITS
        else:
            env["SUBREDDITS"] = ",".join(
                f"{s.name}:{s.interval_seconds}" for s in self.settings.subreddits
            )
        if not self.settings.has_reddit_credentials:
            base = f"http://127.0.0.1:{self.simulator_port}"
            env.update(
                REDDIT_CLIENT_ID=SIMULATOR_CLIENT_ID,
                REDDIT_CLIENT_SECRET=_SIMULATOR_SECRET,
                REDDIT_OAUTH_URL=base,
                REDDIT_URL=base,
            )
        return env

    def _migrate(self, env: dict[str, str]) -> None:
        self.console.print("migrating the database…")
        migrate = [sys.executable, "-m", "sentiment.cli", "migrate"]
        if subprocess.run(migrate, env=env, check=False).returncode:
            raise RuntimeError("the database could not be migrated (the reason is above)")

    def _spawn(
        self, name: str, args: list[str], env: dict[str, str], *, sentiment_cli: bool = False
    ) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_dir / f"{name}.log"
        program = (
            [sys.executable, "-m", "sentiment.cli"]
            if sentiment_cli
            else [sys.executable, "-m", "celery"]
        )
        with log.open("ab") as out:
            guarded = [sys.executable, "-m", "sentiment._orphan_guard", str(os.getpid())]
            process = subprocess.Popen(
                [*guarded, *program, *args],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches us only; we stop children in order
            )
        self.children.append(_Child(name, process, log))

    def _kick_off(self, env: dict[str, str]) -> None:
        """Scrape every subreddit now; beat's first tick comes only one interval later."""
        script = (
            "import os; from sentiment.tasks import scrape\n"
            "for s in os.environ['SUBREDDITS'].split(','): scrape.delay(s.split(':')[0])"
        )
        try:
            subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=60,
                           capture_output=True, text=True)  # fmt: skip
        except subprocess.CalledProcessError as exc:
            lines = (exc.stderr or "").strip().splitlines()
            raise RuntimeError(
                f"could not enqueue the first scrapes: {lines[-1] if lines else exc}"
            ) from None
        except subprocess.TimeoutExpired:
            raise RuntimeError(
                "could not enqueue the first scrapes within 60 s: does Redis accept writes? "
                "(`sentiment status` checks it)"
            ) from None

    def _wait_for_port(self, port: int, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    return
            time.sleep(0.2)
        raise RuntimeError(
            f"the simulator did not listen on port {port}; see {self.log_dir}/simulator.log"
        )

    def _announce(self, env: dict[str, str]) -> None:
        reddit = env.get("REDDIT_OAUTH_URL", self.settings.reddit_oauth_url)
        self.console.print(
            f"[bold]running[/bold]: Flower http://127.0.0.1:{self.flower_port}"
            f"  ·  Reddit {reddit}  ·  CSV {env['CSV_DIR']}  ·  logs {self.log_dir}\n"
            "Ctrl-C stops everything."
        )

    def _watch(self, duration: float | None, env: dict[str, str]) -> None:
        from sentiment.status import collect_status, status_table

        deadline = None if duration is None else time.monotonic() + duration
        names = [s.split(":")[0].lower() for s in env["SUBREDDITS"].split(",")]
        # What the children see (the simulator's client id, for the limiter's key).
        seen_by_children = self.settings.model_copy(
            update={"reddit_client_id": env.get("REDDIT_CLIENT_ID", self.settings.reddit_client_id)}
        )
        with Live(console=self.console, refresh_per_second=1, transient=False) as live:
            while deadline is None or time.monotonic() < deadline:
                for child in self.children:
                    if child.process.poll() is not None:
                        raise RuntimeError(
                            f"{child.name} exited with {child.process.returncode}; see {child.log}"
                        )
                report = collect_status(seen_by_children, names, reuse_database=True)
                live.update(status_table(report))
                time.sleep(2)

    def _stop_children(self) -> None:
        order = {"beat": 0, "worker": 1, "flower": 2, "simulator": 3}
        for child in sorted(self.children, key=lambda c: order.get(c.name, 9)):
            if child.process.poll() is None:
                child.process.send_signal(signal.SIGTERM)
                try:
                    child.process.wait(timeout=30 if child.name == "worker" else 10)
                except subprocess.TimeoutExpired:
                    child.process.kill()
                    child.process.wait()
        self.children.clear()
