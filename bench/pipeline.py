"""How many events per second does ONE Celery worker move from Reddit to PostgreSQL and CSV?

The whole pipeline, as deployed: the Reddit simulator (no rate limit, served
from its own process on a port fixed before the worker starts), the embedded
PostgreSQL (durable: fsync and synchronous_commit on) and Redis under
`.sentiment-bench/`, and one real worker subprocess

    python -m celery -A sentiment worker --concurrency C -Q scrape,ingest,export

(one worker, C pool processes; C=2 is what `sentiment run` and docker-compose
start). The simulator holds --subreddits subreddits of --items submissions and
--items comments each (default 50 x (500 + 500) = 50,000 events).

  (The worker's shared Reddit limiter runs, with a budget of 10,000 requests
  a second, so it never waits: the simulator has no rate limit either.)

  events_per_s          From fresh state (TRUNCATE raw_events, rejected_events,
                        ingested_batches; the pipeline's Redis keys deleted; an
                        empty CSV folder), the clock runs from enqueuing
                        `scrape.delay(name)` for every subreddit until every
                        `.get()` has returned: each chain scrapes (backfill),
                        stashes the batch in Redis, inserts it and appends its
                        CSV files. events_per_s = rows inserted / elapsed.
  sink_only_events_per_s
                        The ceiling: the same events (scraped once in-process
                        with `scrape_subreddit`) stored by
                        `sentiment.sinks.postgres.insert_batch` in this process,
                        one call, default chunk size, into an empty raw_events
                        (what bench/insert.py calls `sink`).
  ratio                 events_per_s / sink_only_events_per_s; target >= 0.6.
  empty_chain_s         wall time of one scrape -> insert -> export chain of a
                        subreddit with nothing new (delay() to get()), median of
                        --empty-chains; the fixed cost every scheduled scrape pays.

Before each timed run, and before each sink-only run, raw_events is emptied and
CHECKPOINTed, so no run pays for the previous one's dirty pages. Each
concurrency gets its own worker (started, warmed up with a few chains, timed
--repeat times, stopped); each chain run is followed by a sink-only run, so
both see the same neighbours. Figures are medians.

Where the worker's time goes: each timed run also reports the cores every
process group kept busy (from /proc) and the seconds the pool spent in each
stage (from the worker's log). With --profile, every subreddit's chain then
runs in this process, stage by stage (fetch, stash, insert_batch, export_csv:
the tasks' bodies without Celery), for CPU microseconds per event, and one
cProfile of the chain.

    python bench/pipeline.py --repeat 3 --json [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import _common
from scrape import SimulatorProcess, free_port, point_reddit_at  # also configures the environment

RATIO_TARGET = 0.6
WARM_SUBREDDIT = "bench_pipe_warm"
_LOG_LINE = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}): [^\]]*\] (.*)$", re.M)
_RECEIVED = re.compile(r"Task sentiment\.tasks\.scrape\[([\w-]+)\] received")
_SCRAPED = re.compile(r"sentiment\.tasks\.scrape\[([\w-]+)\]: scraped r/")
_REPLACED = re.compile(r"Task sentiment\.tasks\.scrape\[([\w-]+)\] ignored")
_SUCCEEDED = re.compile(r"Task sentiment\.tasks\.(\w+)\[[\w-]+\] succeeded in ([0-9.]+)s")


# -- the worker ------------------------------------------------------------------------------


class Worker:
    """One `celery -A sentiment worker` in its own process group, logging to a file."""

    def __init__(self, concurrency: int, log_dir: Path) -> None:
        self.concurrency = concurrency
        self.hostname = f"bench-{uuid.uuid4().hex[:6]}@localhost"
        self.log = log_dir / f"worker-c{concurrency}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 90) -> None:
        from sentiment.celery_app import app

        self.log.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "sentiment", "worker",
                 "--loglevel", "INFO", "--concurrency", str(self.concurrency),
                 "-Q", "scrape,ingest,export", "--hostname", self.hostname,
                 "--without-mingle", "--without-gossip"],
                cwd=_common.ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the worker exited at start-up:\n{self.tail()}")
            if app.control.ping(destination=[self.hostname], timeout=0.5):
                return
        raise RuntimeError(f"the worker was not ready after {timeout:.0f}s:\n{self.tail()}")

    def tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""

    def log_size(self) -> int:
        return self.log.stat().st_size if self.log.exists() else 0

    def pool_seconds(self, since: int) -> dict[str, float]:
        """Seconds the pool processes spent in each stage, from the log written after `since`.

        insert_batch and export_csv log their run time; a replaced scrape logs none,
        so its stages come from the timestamps (ms) of "received", "scraped r/..."
        (the fetch is done) and "ignored" (stashed, replaced by the chain).
        """
        with self.log.open("rb") as f:
            f.seek(since)
            text = f.read().decode(errors="replace")
        out: dict[str, float] = {}
        marks: dict[str, dict[str, datetime]] = {}
        for stamp, message in _LOG_LINE.findall(text):
            if found := _SUCCEEDED.search(message):
                out[found[1]] = out.get(found[1], 0.0) + float(found[2])
                continue
            for name, pattern in (("received", _RECEIVED), ("scraped", _SCRAPED),
                                  ("replaced", _REPLACED)):  # fmt: skip
                if found := pattern.search(message):
                    at = datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f")
                    marks.setdefault(found[1], {})[name] = at
        for name, start, end in (("scrape: fetch", "received", "scraped"),
                                 ("scrape: stash + replace", "scraped", "replaced")):  # fmt: skip
            out[name] = sum(
                (m[end] - m[start]).total_seconds()
                for m in marks.values()
                if start in m and end in m
            )
        return {name: round(total, 2) for name, total in sorted(out.items())}

    def stop(self, timeout: float = 30) -> None:
        """Warm shutdown (SIGTERM to the group), then SIGKILL if it hangs."""
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


# -- state between runs ----------------------------------------------------------------------


class State:
    """Empties what a run leaves behind: tables, the pipeline's Redis keys, the CSV folder."""

    def __init__(self, settings: Any) -> None:
        import psycopg2
        import redis

        dsn = settings.database_url().replace("postgresql+psycopg2://", "postgresql://")
        self.admin = psycopg2.connect(dsn, application_name="bench-pipeline")
        self.admin.autocommit = True
        self.redis = redis.Redis.from_url(settings.redis_connection_url())
        self.csv_dir = Path(settings.csv_dir)

    def reset(self, *, csv: bool = True) -> None:
        with self.admin.cursor() as cur:
            cur.execute("TRUNCATE raw_events, rejected_events, ingested_batches")
            cur.execute("CHECKPOINT")
        # Not FLUSHDB: that would drop kombu's bindings under the running worker.
        keys = list(self.redis.scan_iter("sentiment:*", count=1000))
        if keys:
            self.redis.delete(*keys)
        if csv:
            shutil.rmtree(self.csv_dir, ignore_errors=True)
            self.csv_dir.mkdir(parents=True, exist_ok=True)

    def describe(self) -> dict[str, Any]:
        """PostgreSQL version, raw_events layout and durability settings."""
        with self.admin.cursor() as cur:
            return _common.describe_database(cur)

    def rows(self) -> int:
        with self.admin.cursor() as cur:
            cur.execute("SELECT count(*) FROM raw_events")
            return int(cur.fetchone()[0])

    def close(self) -> None:
        self.admin.close()
        self.redis.close()


# -- CPU by process group ----------------------------------------------------------------------

_TICK = os.sysconf("SC_CLK_TCK")


def _proc_table() -> dict[int, tuple[int, float]]:
    """pid -> (parent pid, CPU seconds incl. reaped children) for every process."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        ticks = sum(int(v) for v in fields[11:15])  # utime stime cutime cstime
        table[int(entry)] = (int(fields[1]), ticks / _TICK)
    return table


def _tree_cpu(table: dict[int, tuple[int, float]], root: int | None) -> float:
    if root is None or root not in table:
        return 0.0
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        total += table[pid][1]
        todo += children.get(pid, [])
    return total


def _pidfile(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


class CpuMeter:
    """CPU seconds of the worker, PostgreSQL, Redis, the simulator and this process."""

    def __init__(self, settings: Any, simulator_pid: int | None) -> None:
        data = Path(settings.data_dir).resolve()
        self.roots: dict[str, int | None] = {
            "postgres": _pidfile(data / "postgres" / "postmaster.pid"),
            "redis": _pidfile(data / "redis" / "redis.pid"),
            "simulator": simulator_pid,
            "bench": os.getpid(),
            "worker": None,
        }

    def snapshot(self) -> dict[str, float]:
        table = _proc_table()
        cpu = {
            group: _tree_cpu(table, pid) for group, pid in self.roots.items() if group != "bench"
        }
        # Only this process: its children (worker, simulator) are counted in their own groups.
        return {**cpu, "bench": time.process_time()}

    @staticmethod
    def share(
        before: dict[str, float], after: dict[str, float], seconds: float
    ) -> dict[str, float]:
        """Cores each group kept busy on average (2.0 = both cores of this machine)."""
        return {g: round((after[g] - before[g]) / seconds, 2) for g in after}


# -- the measurements ------------------------------------------------------------------------


@dataclass
class ChainRun:
    events: int
    seconds: float
    chain_seconds: list[float]
    cores: dict[str, float] = field(default_factory=dict)  # CPU per group / elapsed
    pool_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.events / self.seconds


def run_chains(subreddits: list[str], timeout: float) -> ChainRun:
    """Enqueue a scrape of every subreddit at once; wait for every summary."""
    from sentiment.tasks import scrape

    started = time.perf_counter()
    pending = [scrape.delay(name) for name in subreddits]
    summaries = [result.get(timeout=timeout) for result in pending]
    elapsed = time.perf_counter() - started
    problems = [s for s in summaries if "skipped" in s or s.get("rejected") or s.get("gaps")]
    if problems:
        raise RuntimeError(f"chains did not run cleanly: {problems[:3]}")
    inserted = sum(s["inserted"] for s in summaries)
    exported = sum(s["exported"] for s in summaries)
    if exported != inserted:
        raise RuntimeError(f"{inserted} rows inserted but {exported} exported")
    return ChainRun(inserted, elapsed, [s["seconds"] for s in summaries])


def check_stored(measured: ChainRun, state: State, expected: int) -> None:
    """Every event inserted once, and in the table."""
    rows = state.rows()
    if measured.events != expected or rows != expected:
        raise RuntimeError(f"{measured.events} events inserted ({rows} rows), expected {expected}")


def empty_chains(count: int, timeout: float) -> list[float]:
    """Wall seconds of `count` chains, one after another, of a subreddit with nothing new."""
    from sentiment.tasks import scrape

    seconds = []
    for _ in range(count):
        started = time.perf_counter()
        summary = scrape.delay(WARM_SUBREDDIT).get(timeout=timeout)
        seconds.append(time.perf_counter() - started)
        if summary.get("fetched") or summary.get("skipped"):
            raise RuntimeError(f"an empty chain was not empty: {summary}")
    return seconds


def sink_only(events: list[Any]) -> float:
    """Seconds for insert_batch to store `events` into an empty raw_events, in this process."""
    from sentiment.sinks.postgres import insert_batch

    started = time.perf_counter()
    result = insert_batch(events)
    seconds = time.perf_counter() - started
    if len(result.new) != len(events):
        raise RuntimeError(f"sink-only stored {len(result.new)} of {len(events)} events")
    return seconds


def scrape_in_process(settings: Any, subreddits: list[str]) -> list[Any]:
    """The events the chains will fetch, scraped here once (no limiter) for the sink-only runs."""
    from sentiment.reddit.client import make_reddit
    from sentiment.reddit.scraper import scrape_subreddit

    async def run() -> list[Any]:
        reddit = make_reddit(settings, None)
        try:
            events: list[Any] = []
            for name in subreddits:
                result = await scrape_subreddit(
                    reddit, name, {}, depth=settings.scrape_backfill_depth
                )
                events += result.events
            return events
        finally:
            await reddit.close()

    return asyncio.run(run())


@dataclass
class PerConcurrency:
    concurrency: int
    label: str
    runs: list[ChainRun] = field(default_factory=list)
    sink_seconds: list[float] = field(default_factory=list)
    sink_cores: list[dict[str, float]] = field(default_factory=list)
    empty_chain_seconds: list[float] = field(default_factory=list)


@dataclass
class Bench:
    """What every measurement needs."""

    args: argparse.Namespace
    state: State
    meter: CpuMeter
    subreddits: list[str]
    events: list[Any]
    log_dir: Path


def timed_fan_out(b: Bench, worker: Worker) -> ChainRun:
    """One timed run of every subreddit's chain from fresh state, with CPU and task times."""
    b.state.reset()
    offset, before = worker.log_size(), b.meter.snapshot()
    measured = run_chains(b.subreddits, b.args.timeout)
    measured.cores = CpuMeter.share(before, b.meter.snapshot(), measured.seconds)
    check_stored(measured, b.state, len(b.events))
    measured.pool_seconds = worker.pool_seconds(offset)
    return measured


def timed_sink_only(b: Bench, out: PerConcurrency) -> None:
    b.state.reset(csv=False)
    before = b.meter.snapshot()
    seconds = sink_only(b.events)
    out.sink_seconds.append(seconds)
    out.sink_cores.append(CpuMeter.share(before, b.meter.snapshot(), seconds))


def measure_concurrency(b: Bench, concurrency: int) -> PerConcurrency:
    """Start a worker, warm it, time --repeat fan-outs, each followed by a sink-only run."""
    label = str(concurrency)
    out = PerConcurrency(concurrency, label)
    worker = Worker(concurrency, b.log_dir)
    print(f"concurrency {label}: starting the worker ...", flush=True)
    worker.start()
    b.meter.roots["worker"] = worker.process.pid if worker.process else None
    try:
        b.state.reset()
        # Warm-up: a first chain backfills the small warm subreddit (token, connections,
        # the stage table in a pool process), then a few empty chains; then the timed ones.
        run_chains([WARM_SUBREDDIT], b.args.timeout)
        empty_chains(concurrency * 2, b.args.timeout)
        out.empty_chain_seconds += empty_chains(b.args.empty_chains, b.args.timeout)
        for _ in range(b.args.repeat):
            measured = timed_fan_out(b, worker)
            out.runs.append(measured)
            timed_sink_only(b, out)
            print(
                f"  run {len(out.runs)}: pipeline {measured.rate:>8,.0f} events/s "
                f"({measured.events:,} in {measured.seconds:.1f} s, cores busy "
                f"{measured.cores}, pool seconds {measured.pool_seconds}); sink only "
                f"{len(b.events) / out.sink_seconds[-1]:>8,.0f} events/s",
                flush=True,
            )
    except Exception:
        print(f"worker log (tail):\n{worker.tail()}", flush=True)
        raise
    finally:
        worker.stop()
        b.meter.roots["worker"] = None
    return out


# -- where the worker's time goes: the chain's stages in process (--profile) --------------------

CHAIN_STAGES = ("fetch", "stash", "insert_batch", "export_csv")


def chain_in_process(name: str) -> dict[str, float]:
    """One subreddit's chain, stage by stage, in this process: what the tasks run, minus
    Celery (no messages, no lock). Returns the CPU seconds of each stage."""
    from sentiment import pipeline as pl
    from sentiment import tasks

    cpu: dict[str, float] = {}
    started = time.process_time()
    result = pl.fetch(name)  # watermarks (Redis, then the table), then scrape_subreddit
    cpu["fetch"], started = time.process_time() - started, time.process_time()
    batch = {
        **result.summary(), "batch": pl.stash_batch(result.events),
        "batch_id": uuid.uuid4().hex, "watermarks": result.watermarks, "lock": None,
        "started_at": time.time(),
    }  # fmt: skip
    cpu["stash"], started = time.process_time() - started, time.process_time()
    stored = tasks.insert_batch(batch)  # the task's body, run here
    cpu["insert_batch"], started = time.process_time() - started, time.process_time()
    tasks.export_csv(stored)
    cpu["export_csv"] = time.process_time() - started
    return cpu


def profile_chains(b: Bench) -> dict[str, Any]:
    """CPU microseconds per event of each stage, then one cProfile of the chain."""
    import cProfile
    import pstats

    out: dict[str, Any] = {}
    b.state.reset()
    totals = dict.fromkeys(CHAIN_STAGES, 0.0)
    chain_in_process(WARM_SUBREDDIT)  # a new client's token and connections: not counted
    for name in b.subreddits:
        for stage, seconds in chain_in_process(name).items():
            totals[stage] += seconds
    out["stages"] = {st: round(1e6 * v / len(b.events), 1) for st, v in totals.items()}
    out["stages"]["total"] = round(sum(out["stages"].values()), 1)
    print(f"  in process: CPU us/event {out['stages']}", flush=True)
    b.state.reset()
    profiler = cProfile.Profile()
    profiler.enable()
    for name in b.subreddits:
        chain_in_process(name)
    profiler.disable()
    _drop_runtimes()
    stats = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    top = sorted(stats.items(), key=lambda kv: -kv[1][2])[:20]
    events = len(b.events)
    out["top_functions"] = [
        {"function": f"{_short(f)}:{line}({fn})", "own_us_per_event": round(1e6 * t / events, 2),
         "calls": n}
        for (f, line, fn), (_, n, t, _, _) in top
    ]  # fmt: skip
    return out


def _short(filename: str) -> str:
    for marker in ("site-packages/", "/lib/python3.11/", str(_common.ROOT) + "/"):
        if marker in filename:
            return filename.split(marker, 1)[1]
    return filename


def _drop_runtimes() -> None:
    """Close and forget this process's asyncpraw client (the next fetch builds a new one)."""
    from sentiment import pipeline as pl

    for runtime in pl._runtimes.values():
        runtime.loop.run_until_complete(runtime.reddit.close())
    pl._runtimes.clear()


def summarize(per: list[PerConcurrency], events: int, headline: int) -> dict[str, Any]:
    by_c = {}
    all_sink = [events / s for p in per for s in p.sink_seconds]
    for p in per:
        rates = [r.rate for r in p.runs]
        sink_rates = [events / s for s in p.sink_seconds]
        median = statistics.median(rates)
        by_c[p.label] = {
            "events_per_s": round(median),
            "runs_events_per_s": [round(r) for r in rates],
            "seconds": [round(r.seconds, 2) for r in p.runs],
            "sink_only_runs_events_per_s": [round(r) for r in sink_rates],
            "ratio": round(median / statistics.median(all_sink), 3),
            "ratio_paired": round(
                statistics.median(a / b for a, b in zip(rates, sink_rates, strict=True)), 3
            ),
            "empty_chain_s": round(statistics.median(p.empty_chain_seconds), 3),
            "empty_chain_runs_s": [round(s, 3) for s in p.empty_chain_seconds],
            "chain_seconds_median": round(
                statistics.median(s for r in p.runs for s in r.chain_seconds), 3
            ),
            "cores_busy_runs": [r.cores for r in p.runs],
            "pool_seconds_runs": [r.pool_seconds for r in p.runs],
            "pool_busy_share": round(
                statistics.median(
                    sum(r.pool_seconds.get(st, 0.0) for st in STAGES) / (r.seconds * p.concurrency)
                    for r in p.runs
                ),
                3,
            ),
            "sink_only_cores_busy_runs": p.sink_cores,
        }
    head = by_c[str(headline)]
    sink = statistics.median(all_sink)
    return {
        "events_per_s": head["events_per_s"],
        "sink_only_events_per_s": round(sink),
        "ratio": head["ratio"],
        "empty_chain_s": head["empty_chain_s"],
        "concurrency": headline,
        "events": events,
        "status": "PASS" if head["ratio"] >= RATIO_TARGET else "MISS",
        "target": RATIO_TARGET,
        "by_concurrency": by_c,
    }


def print_tables(summary: dict[str, Any], args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=120, highlight=False)
    table = Table(
        title=f"bench/pipeline.py: {args.subreddits} subreddits x ({args.items} + {args.items}), "
        f"{summary['events']:,} events, one worker, median of {args.repeat}, "
        f"{os.cpu_count()} cores",
        title_justify="left",
    )
    for column in ("concurrency", "events/s", "runs", "sink only", "ratio", "paired",
                   "target", "result", "empty chain s"):  # fmt: skip
        table.add_column(column, justify="right")
    sink = summary["sink_only_events_per_s"]
    for c, r in summary["by_concurrency"].items():
        ok = r["ratio"] >= RATIO_TARGET
        style = "green" if ok else "bold red"
        table.add_row(
            c, f"{r['events_per_s']:,}", "  ".join(f"{x:,}" for x in r["runs_events_per_s"]),
            f"{sink:,}", f"{r['ratio']:.2f}", f"{r['ratio_paired']:.2f}", f">= {RATIO_TARGET}",
            f"[{style}]{'PASS' if ok else 'MISS'}[/{style}]", f"{r['empty_chain_s']:.3f}",
        )  # fmt: skip
    console.print(table)
    console.print(cpu_table(summary))
    console.print(pool_table(summary))
    if "profile" in summary:
        console.print(*profile_tables(summary["profile"]))


GROUPS = ("worker", "postgres", "redis", "simulator", "bench")
STAGES = ("scrape: fetch", "scrape: stash + replace", "insert_batch", "export_csv")


def cpu_table(summary: dict[str, Any]) -> Any:
    """Cores each process group kept busy, medians over the runs."""
    from rich.table import Table

    table = Table(title=f"cores kept busy during the timed runs (medians; this machine has "
                        f"{os.cpu_count()})", title_justify="left")  # fmt: skip
    for column in ("run", *GROUPS, "total"):
        table.add_column(column, justify="left" if column == "run" else "right")
    for c, r in summary["by_concurrency"].items():
        rows = [(f"pipeline c={c}", r["cores_busy_runs"]),
                (f"sink only (c={c} round)", r["sink_only_cores_busy_runs"])]  # fmt: skip
        for label, runs in rows:
            med = {g: statistics.median(run.get(g, 0.0) for run in runs) for g in GROUPS}
            table.add_row(label, *(f"{med[g]:.2f}" for g in GROUPS), f"{sum(med.values()):.2f}")
    return table


def pool_table(summary: dict[str, Any]) -> Any:
    """Seconds the pool processes spent per stage (medians), and how busy the pool was."""
    from rich.table import Table

    title = ("pool seconds per stage (from the worker log; medians) and pool busy share ="
             " their sum / (elapsed x concurrency)")  # fmt: skip
    table = Table(title=title, title_justify="left")
    for column in ("concurrency", "elapsed s", *STAGES, "pool busy"):
        table.add_column(column, justify="right")
    for c, r in summary["by_concurrency"].items():
        stages = {st: statistics.median(x.get(st, 0.0) for x in r["pool_seconds_runs"])
                  for st in STAGES}  # fmt: skip
        table.add_row(
            c, f"{statistics.median(r['seconds']):.1f}", *(f"{v:.1f}" for v in stages.values()),
            f"{r['pool_busy_share']:.0%}",
        )  # fmt: skip
    return table


def profile_tables(profile: dict[str, Any]) -> list[Any]:
    from rich.table import Table

    stages = Table(title="the chain's stages in process, CPU us per event (--profile)",
                   title_justify="left")  # fmt: skip
    for column in ("", *CHAIN_STAGES, "total"):
        stages.add_column(column, justify="left" if not column else "right")
    for label, row in profile.items():
        if label != "top_functions":
            stages.add_row(label, *(f"{row[c]:.1f}" for c in (*CHAIN_STAGES, "total")))
    top = Table(title="top functions of the chain as is, by own time", title_justify="left")
    for column in ("function", "own us/event", "calls"):
        top.add_column(column, justify="left" if column == "function" else "right")
    for f in profile["top_functions"]:
        top.add_row(f["function"], f"{f['own_us_per_event']:.2f}", f"{f['calls']:,}")
    return [stages, top]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subreddits", type=int, default=50, help="subreddits (default 50)")
    parser.add_argument(
        "--items",
        type=int,
        default=500,
        help="submissions and comments each per subreddit (default 500)",
    )
    parser.add_argument(
        "--concurrency",
        default="1,2",
        help="worker pool sizes to measure, one worker each (default 1,2)",
    )
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per concurrency")
    parser.add_argument("--empty-chains", type=int, default=10, help="empty chains timed (10)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds to wait for a chain")
    parser.add_argument("--seed", type=int, default=0, help="the simulator's seed")
    parser.add_argument(
        "--profile", action="store_true",
        help="also run the chain's stages in process: CPU per stage, cProfile",
    )  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    args = parser.parse_args(argv)  # fmt: skip
    args.concurrency = [int(c) for c in args.concurrency.split(",") if c.strip()]
    if min(args.subreddits, args.items, args.repeat, args.empty_chains, *args.concurrency) < 1:
        parser.error("every count must be >= 1")
    if args.items > 1000:
        parser.error("--items above 1000 would be cut by the 1,000-item listing depth")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _common.exit_on_sigterm()
    # The shared limiter still takes a token per request, but with a budget this run
    # never reaches (Settings' maximum, per second): the simulator has no rate limit.
    os.environ.update(REDDIT_RATELIMIT_REQUESTS="10000", REDDIT_RATELIMIT_WINDOW_SECONDS="1")
    settings = point_reddit_at(f"http://127.0.0.1:{free_port()}")  # before the worker reads it
    port = int(settings.reddit_oauth_url.rsplit(":", 1)[1])
    subreddits = [f"bench_pipe_{i}" for i in range(args.subreddits)]
    headline = 2 if 2 in args.concurrency else args.concurrency[-1]
    started = time.perf_counter()
    with SimulatorProcess(port, seed=args.seed) as sim:
        print(f"simulator on {sim.url}; building {len(subreddits)} subreddits ...", flush=True)
        for name in subreddits:
            sim.add_subreddit(name, args.items, args.items)
        sim.add_subreddit(WARM_SUBREDDIT, 10, 10)
        events = scrape_in_process(settings, subreddits)
        print(f"  {len(events):,} events in the simulator", flush=True)
        with _common.bench_servers():
            from sentiment.sinks.postgres import insert_batch

            insert_batch([])  # the sink's pooled connection and stage table, outside the timing
            state = State(settings)
            try:
                server = state.describe()
                meter = CpuMeter(settings, sim.pid)
                bench = Bench(args, state, meter, subreddits, events, settings.data_dir / "logs")
                per = [measure_concurrency(bench, c) for c in args.concurrency]
                profile = None
                if args.profile:
                    print("the chain's stages in process ...", flush=True)
                    profile = profile_chains(bench)
                state.reset()
            finally:
                state.close()
    summary = {**summarize(per, len(events), headline), "server": server}
    if profile is not None:
        summary["profile"] = profile
    print_tables(summary, args)
    print(f"measured in {time.perf_counter() - started:.0f} s", flush=True)
    if args.json:
        out = {
            **summary, "subreddits": args.subreddits, "items_per_kind": args.items,
            "repeat": args.repeat, "seed": args.seed, "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
        }  # fmt: skip
        print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
