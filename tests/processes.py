"""Real Celery processes for tests: started as a user would, stopped (or killed) for real."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOGS = ROOT / ".sentiment-test" / "logs"


def pid_running(pid: int | str) -> bool:
    """Whether process `pid` runs: not gone, and not a zombie nobody has reaped yet."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"  # the state, after "(name)"


class CeleryProcess:
    """A `celery -A sentiment …` child in its own process group, logging to a file."""

    def __init__(self, name: str, args: list[str], env: dict[str, str] | None = None) -> None:
        self.name = name
        self.args = args
        self.env = {**os.environ, **(env or {})}
        self.log = LOGS / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        LOGS.mkdir(parents=True, exist_ok=True)
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "sentiment", *self.args],
                cwd=ROOT,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL the whole process group: the main process and its pool children."""
        if self.process is not None and self.alive():
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def stop(self, timeout: float = 20) -> None:
        if self.process is None or not self.alive():
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()


class CeleryWorker(CeleryProcess):
    """`celery -A sentiment worker`, ready once it answers a ping."""

    def __init__(
        self,
        concurrency: int = 2,
        env: dict[str, str] | None = None,
        queues: str = "scrape,ingest,export",
    ) -> None:
        self.hostname = f"test-{uuid.uuid4().hex[:6]}@localhost"
        super().__init__(
            self.hostname.split("@")[0],
            [
                "worker",
                "--loglevel",
                "INFO",
                "--concurrency",
                str(concurrency),
                "-Q",
                queues,
                "--hostname",
                self.hostname,
                "--without-mingle",
                "--without-gossip",
            ],
            env,
        )

    def start(self, timeout: float = 60) -> None:
        super().start()
        from kombu.exceptions import OperationalError
        from redis.exceptions import ConnectionError as RedisConnectionError

        from sentiment.celery_app import app

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"worker exited at start-up:\n{self.output()[-3000:]}")
            try:
                # A fresh connection each time: a pooled one may predate a Redis restart.
                with app.connection_for_write() as connection:
                    if app.control.ping([self.hostname], timeout=0.5, connection=connection):
                        return
            except (OperationalError, RedisConnectionError):
                time.sleep(0.5)
        raise RuntimeError(f"worker not ready after {timeout}s:\n{self.output()[-3000:]}")


def scrape_loop(
    env: dict[str, str], subreddits: list[str], start_at: float, deadline: float
) -> int:
    """Scrape `subreddits` round-robin from `start_at` until `deadline`, as one worker process.

    Run in a spawned process: the environment is set before Settings is read.
    Returns the requests this process sent.
    """
    os.environ.update(env)
    import asyncio

    from redis.asyncio import Redis as AsyncRedis

    from sentiment.config import get_settings
    from sentiment.reddit.client import make_reddit
    from sentiment.reddit.ratelimit import SharedRateLimiter
    from sentiment.reddit.scraper import scrape_subreddit

    async def run() -> int:
        settings = get_settings()
        limiter = SharedRateLimiter(
            AsyncRedis.from_url(settings.redis_connection_url()),
            settings.reddit_client_id or "",
            limit=settings.reddit_ratelimit_requests,
            window_seconds=settings.reddit_ratelimit_window_seconds,
        )
        reddit = make_reddit(settings, limiter)
        marks: dict[str, dict[str, str | None]] = {name: {} for name in subreddits}
        try:
            await asyncio.sleep(max(0.0, start_at - time.time()))
            index = 0
            while time.time() < deadline:
                name = subreddits[index % len(subreddits)]
                index += 1
                result = await scrape_subreddit(reddit, name, marks[name], depth=100)
                marks[name].update(result.watermarks)
            return int(reddit.requestor.requests_sent)
        finally:
            await reddit.close()

    return asyncio.run(run())
