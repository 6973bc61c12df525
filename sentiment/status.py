"""What `sentiment status` and the live view of `sentiment run` show."""

from __future__ import annotations

import copy
import json
import time
from datetime import UTC
from functools import lru_cache
from typing import Any

import redis
import sqlalchemy.exc
from rich.console import Console, Group
from rich.table import Table
from sqlalchemy import Engine, create_engine, text

from sentiment.config import SIMULATOR_CLIENT_ID, Settings
from sentiment.pipeline import (
    MAINTENANCE_KEY,
    PARKED_EXPORTS_KEY,
    failing_key,
    runs_key,
    scrape_lock_key,
)
from sentiment.reddit.ratelimit import limiter_key

__all__ = ["QUEUES", "collect_status", "healthy", "render_status", "status_table"]

QUEUES = ("scrape", "ingest", "export")

# Index-only on (source_id, event_type, occurred_at): a count of every row all the
# same: 0.49 s for 2 million rows here, median of 3 (with max(ingested_at) it read
# the table: 1.14 s).
_ROWS = text(
    """
    SELECT source_id, event_type, count(*), max(occurred_at)
    FROM raw_events GROUP BY source_id, event_type
    """
)
# The live view reuses the database's part of a report for this many times as
# long as collecting it took: a table that takes 2 s to count is counted every
# 20 s, not every 2 s, while a small one is still counted at every refresh.
_REUSE_FOR = 10
_REUSE_AT_MOST_S = 30.0  # and never longer; a failure is never reused
_last_database: dict[str, tuple[float, dict[str, Any]]] = {}  # url -> (until, the part)


def collect_status(
    settings: Settings, subreddits: list[str] | None = None, *, reuse_database: bool = False
) -> dict[str, Any]:
    """A snapshot of the pipeline; each part says "error" rather than fail the whole.

    `reuse_database` (the live view, asking every 2 s) takes the database's part
    from an earlier healthy call while that is younger than `_REUSE_FOR` times
    what it cost (`_REUSE_AT_MOST_S` at most); Redis's part is always fresh.
    """
    names = subreddits or [s.name for s in settings.subreddits]
    report: dict[str, Any] = {
        "settings": settings.safe_summary(), "health": {}, "problems": [], "subreddits": {}
    }  # fmt: skip
    url = settings.database_url()
    until, part = _last_database.get(url, (0.0, {}))
    if not (reuse_database and time.monotonic() < until):
        started = time.monotonic()
        part = {"health": {}, "problems": [], "subreddits": {}}
        _collect_database(settings, part)
        took = time.monotonic() - started
        healthy = part["health"].get("postgres") == "ok"
        reuse = min(_REUSE_FOR * took, _REUSE_AT_MOST_S) if healthy else 0.0
        _last_database[url] = (time.monotonic() + reuse, part)
    part = copy.deepcopy(part)
    report["health"].update(part.pop("health"))
    report["problems"].extend(part.pop("problems"))
    report.update(part)
    for name in names:
        report["subreddits"].setdefault(name, {})
    _collect_redis(settings, names, report)
    return report


def _down(report: dict[str, Any], key: str, what: str, *, hint: str,
          exc: Exception) -> None:  # fmt: skip
    """Record a server as down: a short reason in `health`, a sentence in `problems`."""
    cause = getattr(exc, "orig", None) or exc  # SQLAlchemy wraps the driver's error
    reason = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
    report["health"][key] = f"error: {reason}"
    report["problems"].append(f"{what}: {reason}{hint}")


_START_EMBEDDED = " (the embedded servers start with `sentiment services start` or `make run`)"


@lru_cache(maxsize=4)
def _engine(url: str) -> Engine:
    """One small pool per server: the live view asks every two seconds."""
    return create_engine(url, pool_size=1, pool_pre_ping=True, connect_args={"connect_timeout": 3})


def _collect_database(settings: Settings, report: dict[str, Any]) -> None:
    try:
        with _engine(settings.database_url()).connect() as conn:
            for source_id, kind, count, newest in conn.execute(_ROWS):
                entry = report["subreddits"].setdefault(source_id, {})
                entry[f"{kind}s"] = count
                entry[f"newest_{kind}"] = newest
            # Both from the partial index on unprocessed rows. The oldest one shows
            # a stalled consumer, and it is what holds retention back.
            report["unprocessed"], report["oldest_unprocessed"] = conn.execute(
                text("SELECT count(*), min(occurred_at) FROM raw_events WHERE NOT processed")
            ).one()
            # Rows sentiment workers could not score (a partial index holds just these).
            report["set_aside"] = conn.execute(
                text("SELECT count(*) FROM raw_events WHERE process_error IS NOT NULL")
            ).scalar()
            report["rejected"] = conn.execute(text("SELECT count(*) FROM rejected_events")).scalar()
        report["health"]["postgres"] = "ok"
    except Exception as exc:  # noqa: BLE001 - a status report shows errors, never raises them
        where = settings.postgres_address
        if isinstance(exc, sqlalchemy.exc.ProgrammingError):  # it answers; a table is missing
            what, hint = f"PostgreSQL ({where}) is not migrated", " (run `sentiment migrate`)"
        else:
            what = f"PostgreSQL ({where}) is not reachable"
            hint = _START_EMBEDDED if settings.uses_embedded_postgres else ""
        _down(report, "postgres", what, hint=hint, exc=exc)


def _collect_redis(settings: Settings, names: list[str], report: dict[str, Any]) -> None:
    client = redis.Redis.from_url(
        settings.redis_connection_url(), socket_timeout=3, socket_connect_timeout=3
    )
    try:
        client.ping()
        report["queues"] = {queue: client.llen(queue) for queue in QUEUES}
        report["parked_exports"] = client.hlen(PARKED_EXPORTS_KEY)
        report["maintenance"] = _maintenance(client, report)
        # Without credentials the only scrapers are `sentiment run`'s, on the simulator.
        limiter = client.hgetall(limiter_key(settings.reddit_client_id or SIMULATOR_CLIENT_ID))
        now = time.time()
        if limiter:
            window_end = float(limiter.get(b"window_end", now))
            report["rate_limit"] = {
                "remaining": int(float(limiter.get(b"remaining", 0))),
                "limit": settings.reddit_ratelimit_requests,
                "resets_in_s": max(0, round(window_end - now)),
                "requests_granted": int(limiter.get(b"granted", 0)),
                "times_limited": int(limiter.get(b"limited", 0)),
            }
        # No names given or configured (`sentiment status` beside the demo `sentiment
        # run`): those with a run on record or a scrape in progress.
        found = set() if names else _scraped(client)
        for name in sorted({*names, *report["subreddits"], *found}):
            entry = report["subreddits"].setdefault(name, {})
            run = {_text(k): _text(v) for k, v in client.hgetall(runs_key(name)).items()}
            if "at" in run:
                entry["last_run_s_ago"] = round(now - float(run["at"]))
            if "error" in run:
                entry["last_error"] = run["error"]
            # A scrape holds its lock until its insert commits, also while it waits
            # for the rate limit: without this a first scrape just shows "never".
            entry["scraping"] = bool(client.exists(scrape_lock_key(name)))
            failing = client.get(failing_key(name))
            if failing:
                entry["failing"] = _text(failing)
        report["health"]["redis"] = "ok"
    except redis.RedisError as exc:
        _down(report, "redis", f"Redis ({settings.redis_address}) is not reachable",
              hint=_START_EMBEDDED if settings.uses_embedded_redis else "", exc=exc)  # fmt: skip
    finally:
        client.close()


def _maintenance(client: redis.Redis, report: dict[str, Any]) -> dict[str, Any]:
    """How retention and the partition keeper last went; a failure is a problem."""
    jobs = {}
    for job, raw in sorted(client.hgetall(MAINTENANCE_KEY).items()):
        outcome = json.loads(raw)
        name = _text(job)
        jobs[name] = {"ok": outcome["ok"], "result": outcome["result"],
                      "last_s_ago": round(time.time() - outcome["at"])}  # fmt: skip
        if not outcome["ok"]:
            report["problems"].append(
                f"{name} failed {jobs[name]['last_s_ago']}s ago ({outcome['result']}); it "
                "retries, and runs again within the hour"
            )
    return jobs


def _scraped(client: redis.Redis) -> set[str]:
    """Subreddits with a run on record or a scrape in progress."""
    names = set()
    for pattern in (runs_key("*"), scrape_lock_key("*")):
        prefix = pattern[:-1]
        names |= {_text(key)[len(prefix) :] for key in client.scan_iter(pattern, count=1000)}
    return names


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def status_table(report: dict[str, Any]) -> Group:
    """The report as rich tables."""
    subs = Table(
        "subreddit", "submissions", "comments", "last run", "last error", title="subreddits"
    )
    for name, entry in sorted(report["subreddits"].items()):
        ago = entry.get("last_run_s_ago")
        last_run = "never" if ago is None else f"{ago}s ago"
        subs.add_row(
            name,
            f"{entry.get('submissions', 0):,}",
            f"{entry.get('comments', 0):,}",
            f"{last_run}, scraping now" if entry.get("scraping") else last_run,
            entry.get("failing") or entry.get("last_error", ""),
        )
    overview = Table(
        "postgres",
        "redis",
        "queues (scrape/ingest/export)",
        "unprocessed",
        "set aside",
        "rejected",
        "parked CSV exports",
        "rate limit",
        title="pipeline",
    )
    queues = report.get("queues", {})
    limit = report.get("rate_limit")
    health = {server: "ok" if state == "ok" else "down"
              for server, state in report["health"].items()}  # fmt: skip
    overview.add_row(
        health.get("postgres", "?"),
        health.get("redis", "?"),
        "/".join(str(queues.get(q, "?")) for q in QUEUES),
        _backlog(report),
        str(report.get("set_aside", "?")),
        str(report.get("rejected", "?")),
        str(report.get("parked_exports", "?")),
        f"{limit['remaining']}/{limit['limit']} left, resets in {limit['resets_in_s']}s"
        if limit
        else "-",
    )
    jobs = report.get("maintenance") or {}
    if not jobs:
        return Group(overview, subs)
    maintenance = Table("job", "last run", "result", title="maintenance")
    for name, job in jobs.items():
        verdict = "ok" if job["ok"] else "[red]failed[/red]"
        maintenance.add_row(name, f"{job['last_s_ago']}s ago", f"{verdict}: {job['result']}")
    return Group(overview, subs, maintenance)


def _backlog(report: dict[str, Any]) -> str:
    count, oldest = report.get("unprocessed"), report.get("oldest_unprocessed")
    if not isinstance(count, int):
        return "?"
    if oldest is None:
        return f"{count:,}"
    return f"{count:,} (oldest {oldest.astimezone(UTC):%Y-%m-%d %H:%M} UTC)"


def render_status(report: dict[str, Any], console: Console) -> None:
    console.print(status_table(report))
    for problem in report.get("problems", []):
        console.print(f"[red]error:[/red] {problem}", highlight=False)


def healthy(report: dict[str, Any]) -> bool:
    """True when PostgreSQL and Redis both answered."""
    return all(state == "ok" for state in report["health"].values())
