"""Plumbing shared by the benchmarks in bench/: environment, servers, data, timing, output.

Call `configure_environment()` before anything reads Settings: it points the
benchmark at its own embedded servers (`.sentiment-bench/`, ports 54359 and
63829), or, when PG_HOST is configured, at a separate `<PG_DB>_bench` database
on that server, so a benchmark never touches the pipeline's or the tests' data.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import random
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH_DATA_DIR = ROOT / ".sentiment-bench"


# -- environment and servers ----------------------------------------------------


def configure_environment() -> None:
    """Benchmark defaults; anything set explicitly (PG_HOST, DATA_DIR, ...) wins."""
    os.environ.setdefault("DATA_DIR", str(BENCH_DATA_DIR))
    os.environ.setdefault("EMBEDDED_PG_PORT", "54359")
    os.environ.setdefault("EMBEDDED_REDIS_PORT", "63829")
    os.environ.setdefault("CSV_DIR", str(BENCH_DATA_DIR / "csv"))
    from sentiment.config import get_settings

    get_settings.cache_clear()
    settings = get_settings()  # PG_HOST may also come from .env: decide on what Settings sees
    if settings.pg_host is not None and not settings.pg_db.endswith("_bench"):
        os.environ["PG_DB"] = f"{settings.pg_db}_bench"
        get_settings.cache_clear()


def _create_database(settings: Any) -> None:
    """On a configured server: create the `<PG_DB>_bench` database if it is missing."""
    import psycopg2
    from psycopg2 import sql

    conn = psycopg2.connect(
        host=settings.pg_host, port=settings.pg_port, user=settings.pg_user,
        password=settings.pg_password.get_secret_value(), dbname="postgres",
    )  # fmt: skip
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (settings.pg_db,))
            if cur.fetchone() is None:
                cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(settings.pg_db)))
    finally:
        conn.close()


@contextlib.contextmanager
def bench_servers() -> Iterator[Any]:
    """Running, migrated servers (durable: fsync and synchronous_commit stay on).

    Yields Settings. Stops, at exit, only the embedded servers it started.
    """
    from alembic.config import Config

    from alembic import command
    from sentiment.config import get_settings
    from sentiment.embedded import ensure_services, stop_services

    settings = get_settings()
    started = ensure_services(settings, durable=True)
    try:
        if not settings.uses_embedded_postgres:
            _create_database(settings)
        command.upgrade(Config(str(ROOT / "alembic.ini")), "head")
        yield settings
    finally:
        from sentiment.db import get_engine
        from sentiment.sinks.postgres import get_sink_engine

        get_engine().dispose()
        get_sink_engine().dispose()
        if started:
            print(f"stopping what the benchmark started: {', '.join(started)}", flush=True)
        stop_services(settings, started)


def describe_database(cur: Any) -> dict[str, Any]:
    """Server version, raw_events layout and the durability settings, from a DB-API cursor."""
    cur.execute("SHOW server_version")
    version = cur.fetchone()[0]
    cur.execute("SELECT extversion FROM pg_extension WHERE extname = 'timescaledb'")
    row = cur.fetchone()
    timescaledb = row[0] if row else None
    layout = "plain"
    if timescaledb:
        cur.execute(
            "SELECT count(*) FROM timescaledb_information.hypertables"
            " WHERE hypertable_name = 'raw_events'"
        )
        if cur.fetchone()[0]:
            layout = "hypertable"
    if layout == "plain":
        cur.execute(
            "SELECT count(*) FROM pg_partitioned_table WHERE partrelid = 'raw_events'::regclass"
        )
        if cur.fetchone()[0]:
            layout = "partitioned"
    settings = {}
    for name in (
        "fsync",
        "synchronous_commit",
        "full_page_writes",
        "shared_buffers",
        "max_wal_size",
    ):
        cur.execute(f"SHOW {name}")
        settings[name] = cur.fetchone()[0]
    return {
        "postgres_version": version,
        "timescaledb_version": timescaledb,
        "layout": layout,
        "server_settings": settings,
    }


# -- synthetic Reddit data --------------------------------------------------------

_WORDS = (  # noqa: SIM905 - a paragraph reads better than 150 quoted words
    "the a to and of in is it that for on you this with be are not have but was so just like "
    "they what if at my can all will about get one would there more do out up from your me "
    "think people time much really know now going because market stock stocks shares calls "
    "puts options earnings price buy sell hold holding bought sold moon tendies squeeze short "
    "shorts hedge fund funds retail apes diamond hands paper dip rally crash bubble inflation "
    "rates fed powell yield bonds treasury recession guidance revenue quarter margin growth "
    "valuation dividend portfolio index etf spy qqq volatility theta gamma delta strike expiry "
    "leverage margin call loss gains yolo dd analysis chart support resistance breakout trend "
    "bullish bearish sentiment news report filing sec insider ceo cfo board buyback split "
    "naïve résumé café über déjà façade jalapeño smörgåsbord 日本 株 ações Börse €uro £ ¥"
).split()
_TICKERS = ["$GME", "$AMC", "$TSLA", "$NVDA", "$AAPL", "$MSFT", "$PLTR", "$SPY", "$QQQ", "$BB",
            "$AMD", "$META", "$AMZN", "$COIN"]  # fmt: skip
_EMOJI = ["🚀", "💎🙌", "🦍", "📈", "📉", "🌕", "🤡", "🔥", "😂", "🐻", "🐂"]
_ODD = ['"quoted"', "it's", "back\\slash", "tab\there", "50%", "a,b,c", "<b>html</b>", "&amp;",
        "=SUM(A1)", "+1", "-1", "@mention", "C:\\path\\file"]  # fmt: skip
_FLAIRS = [
    None,
    "DD",
    "Discussion",
    "YOLO",
    "Gain",
    "Loss",
    "News",
    "Meme",
    "Chart",
    "Daily Thread",
]
_DOMAINS = ["self", "i.redd.it", "v.redd.it", "bloomberg.com", "reuters.com", "youtube.com",
            "twitter.com", "cnbc.com", "imgur.com", "sec.gov"]  # fmt: skip


def _sentences(rng: random.Random, count: int) -> list[str]:
    out = []
    for _ in range(count):
        words = rng.choices(_WORDS, k=rng.randint(4, 24))
        if rng.random() < 0.3:
            words.insert(rng.randrange(len(words)), rng.choice(_TICKERS))
        if rng.random() < 0.15:
            words.append(rng.choice(_EMOJI))
        if rng.random() < 0.06:
            words.insert(rng.randrange(len(words)), rng.choice(_ODD))
        sentence = " ".join(words)
        out.append(sentence[0].upper() + sentence[1:] + rng.choice(".....!?"))
    return out


def _subreddits(rng: random.Random, count: int) -> list[str]:
    stems = ["wallstreet", "stock", "invest", "option", "crypto", "finance", "trading", "penny",
             "dividend", "value", "bogle", "fire", "money", "market", "economy", "quant", "bet",
             "bull", "bear", "tech"]  # fmt: skip
    tails = ["bets", "s", "ing", "_daily", "market", "talk", "news", "_uk", "_eu", "_ca", "hub",
             "lounge", "club", "memes", "dd", "2", "_pro", "nerds", "plays", "chat"]  # fmt: skip
    names = [s + t for s, t in itertools.product(stems, tails)]
    rng.shuffle(names)
    return names[:count]


@dataclass
class SyntheticData:
    events: list[Any]
    subreddits: list[str]
    first_day: datetime
    last_day: datetime
    mean_payload_bytes: float
    seconds: float


def make_events(
    count: int, *, seed: int = 42, subreddit_count: int = 300, days: int = 28
) -> SyntheticData:
    """`count` validated RawEventDTOs with Reddit-shaped payloads (~1.5 KB of JSON each).

    Deterministic for a seed and a day: occurred_at is spread uniformly over the
    `days` whole UTC days before today; ids are unique base36 and grow with
    time, as Reddit's do; list order is shuffled (a batch mixes subreddits and
    times); 30% submissions (half of them link posts without selftext), 70%
    comments; subreddit popularity is Zipf-like.
    """
    import orjson

    from sentiment.dto import RawEventDTO
    from sentiment.reddit.ids import to_base36

    started = time.perf_counter()
    rng = random.Random(seed)
    corpus = _sentences(rng, 4000)
    subreddits = _subreddits(rng, subreddit_count)
    weights = [1 / (rank + 1) ** 0.8 for rank in range(len(subreddits))]
    subreddit_ids = {name: f"t5_{to_base36(1000 + i)}" for i, name in enumerate(subreddits)}
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    first_day = today - timedelta(days=days)
    span_us = days * 86_400 * 1_000_000
    times = sorted(first_day + timedelta(microseconds=rng.randrange(span_us)) for _ in range(count))
    first_id = 36**6  # seven base36 digits, like today's Reddit ids

    def text(mean_sentences: float) -> str:
        n = max(1, round(rng.lognormvariate(0, 0.9) * mean_sentences))
        parts = rng.choices(corpus, k=n)
        if n > 4 and rng.random() < 0.5:  # paragraphs
            cut = rng.randrange(1, n)
            return " ".join(parts[:cut]) + "\n\n" + " ".join(parts[cut:])
        return " ".join(parts)

    events = []
    total_bytes = 0
    for number, occurred_at in enumerate(times):
        event_id = to_base36(first_id + number)
        sub = rng.choices(subreddits, weights)[0]
        author = f"{rng.choice(_WORDS)}_{rng.choice(_WORDS)}{rng.randint(1, 9999)}"
        created = occurred_at.timestamp()
        if rng.random() < 0.3:
            kind = "submission"
            is_self = rng.random() < 0.5
            domain = "self." + sub if is_self else rng.choice(_DOMAINS)
            permalink = f"/r/{sub}/comments/{event_id}/{'_'.join(rng.choices(_WORDS, k=5))}/"
            payload: dict[str, Any] = {
                "id": event_id, "name": f"t3_{event_id}", "subreddit": sub,
                "subreddit_id": subreddit_ids[sub],
                "author": author, "author_fullname": f"t2_{to_base36(rng.randrange(36**7))}",
                "title": text(1.2)[:300], "selftext": text(14) if is_self else "",
                "created_utc": created, "score": int(rng.paretovariate(1.2)) - 1,
                "upvote_ratio": round(rng.uniform(0.4, 1.0), 2),
                "num_comments": int(rng.paretovariate(1.1)) - 1, "permalink": permalink,
                "url": f"https://www.reddit.com{permalink}" if is_self
                else f"https://{domain}/{to_base36(rng.randrange(36**8))}",
                "domain": domain, "is_self": is_self, "stickied": rng.random() < 0.01,
                "over_18": rng.random() < 0.02, "spoiler": False, "locked": rng.random() < 0.01,
                "edited": False if rng.random() < 0.9 else created + rng.randint(60, 86_400),
                "link_flair_text": rng.choice(_FLAIRS), "author_flair_text": rng.choice(_FLAIRS),
                "gilded": 0, "total_awards_received": int(rng.random() < 0.05),
                "thumbnail": "self" if is_self else "default",
            }  # fmt: skip
        else:
            kind = "comment"
            link = to_base36(first_id + rng.randrange(max(1, number)))
            parent = (
                link if rng.random() < 0.4 else to_base36(first_id + rng.randrange(max(1, number)))
            )
            payload = {
                "id": event_id, "name": f"t1_{event_id}", "subreddit": sub,
                "subreddit_id": subreddit_ids[sub],
                "author": author, "author_fullname": f"t2_{to_base36(rng.randrange(36**7))}",
                "body": text(7.5), "created_utc": created,
                "score": int(rng.paretovariate(1.3)) - 1
                - int(rng.random() < 0.1) * rng.randint(1, 50),  # a downvoted tenth
                "controversiality": int(rng.random() < 0.05), "link_id": f"t3_{link}",
                "parent_id": f"t3_{link}" if parent == link else f"t1_{parent}",
                "permalink": f"/r/{sub}/comments/{link}/comment/{event_id}/",
                "is_submitter": rng.random() < 0.1, "stickied": False,
                "edited": False if rng.random() < 0.93 else created + rng.randint(60, 86_400),
                "distinguished": None if rng.random() < 0.99 else "moderator",
                "author_flair_text": rng.choice(_FLAIRS), "depth": rng.randint(0, 8),
                "gilded": 0, "total_awards_received": int(rng.random() < 0.02),
            }  # fmt: skip
        total_bytes += len(orjson.dumps(payload))
        events.append(
            RawEventDTO(
                id=event_id,
                occurred_at=occurred_at,
                source_id=sub,
                event_type=kind,
                payload=payload,
            )
        )
    rng.shuffle(events)
    return SyntheticData(
        events=events,
        subreddits=subreddits,
        first_day=first_day,
        last_day=today - timedelta(days=1),
        mean_payload_bytes=total_bytes / max(1, count),
        seconds=time.perf_counter() - started,
    )


# -- timing -------------------------------------------------------------------------


@dataclass
class Measurement:
    """Every run of one method: rows, wall seconds and client CPU seconds."""

    name: str
    rows: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    cpu_seconds: list[float] = field(default_factory=list)
    note: str = ""

    @property
    def rates(self) -> list[float]:
        return [r / s for r, s in zip(self.rows, self.seconds, strict=True) if s > 0]

    @property
    def median(self) -> float | None:
        return statistics.median(self.rates) if self.rates else None

    def as_json(self) -> dict[str, Any]:
        return {
            "median_rows_per_s": round(self.median) if self.median else None,
            "runs_rows_per_s": [round(r) for r in self.rates],
            "rows": self.rows,
            "seconds": [round(s, 4) for s in self.seconds],
            "client_cpu_seconds": [round(s, 4) for s in self.cpu_seconds],
            "note": self.note,
        }


def timed(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    """Run fn; return its result, wall seconds and this process's CPU seconds."""
    cpu0, wall0 = time.process_time(), time.perf_counter()
    result = fn()
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    return result, wall, cpu


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if not numerator or not denominator:
        return None
    return numerator / denominator


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit, so a benchmark's cleanup (finally) runs when killed."""
    import signal

    def _exit(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _exit)
