"""How fast does the scraper turn Reddit listings into events, and how many requests does it spend?

Everything runs against the Reddit simulator WITHOUT a rate limit
(`requests_per_window=None`), served from its own process (its own core and
GIL), so the timings are the client's cost: what this process spends per item.
Every subreddit holds --items submissions and --items comments of the
simulator's default text sizes (200-1800 characters of body).

  scraper      the real path: asyncpraw built by `make_reddit`, with the shared
               Redis limiter (embedded Redis; a limit so high it never waits, so
               only its cost is measured: `acquire` before each request, `observe`
               after it), then
               `scrape_subreddit(..., depth=1000)` backfilling every subreddit:
               listing pages -> JSON (orjson, `sentiment.reddit.jsondecode`) ->
               RawEventDTO. Like the pipeline, the two kinds of one subreddit are
               fetched concurrently, subreddits one after the other.
  scraper_nolimiter
               the same with `limiter=None`, to show what the limiter costs.
  ceiling      plain aiohttp over the SAME pages: same URLs and query
               (limit=100, raw_json=1, after=...), same User-Agent, one bearer
               token fetched before the clock starts, `json.loads` of each body,
               no objects built; same concurrency (two kinds at once, subreddits
               in turn), same stop rule (no `after`, or `depth` items listed).

Each timed pass starts with a warm client (token and connection ready), and
ends, inside its timer, with a full `gc.collect()`: every pass pays for the
collection of its own garbage, none for the one before it (a pass that keeps
the collector off while it runs would otherwise leave its work to the next).
What the clients hold before the first pass is frozen (`gc.freeze()`, as the
worker does after start-up), so that final collection only covers the pass's
own objects. The passes are interleaved (a round runs each once, in rotating order) so a noisy
neighbour hits all of them alike; rates are the median of --repeat rounds.
Target: scraper / ceiling >= 0.8.

Requests (counted by the scraper, checked against the simulator's own count):

  requests_per_100_new
               after a backfill, --rounds times per K: add K new submissions and
               K new comments to every subreddit, scrape from the carried
               watermarks; report 100 * requests / new items, per K and overall.
               Target <= 1.05. Listings are newest first and the scraper has to
               see one item at or below the watermark to know it is done, so N
               new items cost ceil((N + 1) / 100) requests per kind, at most
               depth / 100 (then it reports a gap: it cannot see the watermark).
               Paging `before` the watermark costs the same on Reddit, whose
               cursor stays set after any full page (docs/decisions.md), so
               no client meets 1.05 at K = 100 or 250; `expected_per_100_new`
               is that floor, and the scraper should equal it.
  requests_per_idle_scrape
               requests per subreddit for a scrape with nothing new. Target 2
               (one page per kind).

Where the time goes (the scraper is far below the ceiling on this machine):

  breakdown    in process, no HTTP, on the bodies of one pass: microseconds per
               item of each step (fastest of --breakdown-reps): the ceiling's
               json.loads, aiohttp's default decode, the scraper's page read
               (msgspec splits it into items' raw JSON) and its items turned
               into events, all kept; the general path a page takes when
               msgspec refuses it (`decode_json`, `RawEventDTO.from_reddit`,
               clean_json); and the limiter's Redis round trips per request:
               acquire + observe back to back, and acquire alone (what a
               request waits for).
  profile      if the scraper misses its ratio (or with --profile), one extra
               scraper pass under cProfile: own time by area, top functions.
  decoding     `decode_json` is first checked to give exactly `json.loads`'s
               objects on every page of a pass and on adversarial items.

    python bench/scrape.py --repeat 3 --json
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import cProfile
import gc
import json
import logging
import math
import multiprocessing
import os
import platform
import pstats
import socket
import statistics
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import _common

_common.configure_environment()  # before anything reads Settings

import aiohttp  # noqa: E402
from redis.asyncio import Redis as AsyncRedis  # noqa: E402

from sentiment.config import Settings, get_settings  # noqa: E402
from sentiment.dto import RawEventDTO, clean_json  # noqa: E402
from sentiment.reddit import scraper as scraper_module  # noqa: E402
from sentiment.reddit.client import make_reddit  # noqa: E402
from sentiment.reddit.jsondecode import decode_json  # noqa: E402
from sentiment.reddit.ratelimit import SharedRateLimiter, limiter_key  # noqa: E402
from sentiment.reddit.scraper import KINDS, PAGE_SIZE, scrape_subreddit  # noqa: E402
from sentiment.reddit.simulator import (  # noqa: E402
    DEFAULT_CLIENT_ID,
    DEFAULT_CLIENT_SECRET,
    Simulator,
    SimulatorThread,
)

LISTINGS = {"submission": "new", "comment": "comments"}  # the scraper's endpoints per kind
RATIO_TARGET = 0.8
REQUESTS_PER_100_TARGET = 1.05
IDLE_TARGET = len(KINDS)  # one page per kind
NEVER_WAIT = 10**9  # a limiter budget no benchmark reaches: we measure its cost, not its waits
Page = tuple[str, str, bytes]  # subreddit, kind, the body as served


# -- the simulator, in its own process ---------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def point_reddit_at(url: str) -> Settings:
    """Settings (here and in any child process) that reach the simulator at `url`."""
    os.environ.update(
        REDDIT_CLIENT_ID=DEFAULT_CLIENT_ID, REDDIT_CLIENT_SECRET=DEFAULT_CLIENT_SECRET,
        REDDIT_OAUTH_URL=url, REDDIT_URL=url, REDDIT_USERNAME="", REDDIT_PASSWORD="",
        SUBREDDITS="",
    )  # fmt: skip
    get_settings.cache_clear()
    return get_settings()


def _simulator_main(conn: Any, port: int, seed: int) -> None:
    """Child process: serve a rate-limit-free Simulator, and obey commands from the pipe."""
    sim = Simulator(seed=seed, requests_per_window=None)
    commands: dict[str, Callable[..., Any]] = {
        "add_subreddit": lambda name, s, c: sim.add_subreddit(name, submissions=s, comments=c),
        "add_items": lambda name, s, c, evil=False: len(
            sim.add_items(name, submissions=s, comments=c, adversarial=evil)
        ),
        "stats": sim.stats.as_dict,
        "reset_stats": sim.reset_stats,
    }
    with SimulatorThread(sim, port=port) as url:
        conn.send(url)
        while True:
            try:
                command, args = conn.recv()
            except EOFError:
                return
            if command == "stop":
                conn.send(("ok", None))
                return
            try:
                conn.send(("ok", commands[command](*args)))
            except Exception as exc:  # noqa: BLE001 - handed back to the parent
                conn.send(("error", f"{type(exc).__name__}: {exc}"))


class SimulatorProcess:
    """A `Simulator` served from a child process on a fixed port, driven over a pipe.

    Serving from another process keeps the server's CPU (and GIL) out of the
    client's timings; on a 2-core machine each gets a core.
    """

    def __init__(self, port: int, seed: int = 0) -> None:
        self.port, self.seed = port, seed
        self.url = f"http://127.0.0.1:{port}"
        self._process: Any = None
        self._conn: Any = None

    def start(self, timeout: float = 60) -> str:
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._process = ctx.Process(
            target=_simulator_main, args=(child, self.port, self.seed), name="reddit-simulator",
            daemon=True,
        )  # fmt: skip
        self._process.start()
        if not self._conn.poll(timeout):
            self.stop()
            raise RuntimeError(f"the simulator did not start within {timeout:.0f}s")
        self.url = self._conn.recv()
        return str(self.url)

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def _call(self, command: str, *args: Any) -> Any:
        self._conn.send((command, args))
        status, value = self._conn.recv()
        if status != "ok":
            raise RuntimeError(f"simulator {command}: {value}")
        return value

    def add_subreddit(self, name: str, submissions: int, comments: int) -> None:
        self._call("add_subreddit", name, submissions, comments)

    def add_items(
        self, name: str, submissions: int, comments: int, *, adversarial: bool = False
    ) -> int:
        return int(self._call("add_items", name, submissions, comments, adversarial))

    def listing_requests(self) -> int:
        """Listing requests served so far (/new and /comments)."""
        requests = self._call("stats")["requests"]
        return int(requests.get("new", 0) + requests.get("comments", 0))

    def stop(self) -> None:
        if self._process is None:
            return
        with contextlib.suppress(OSError, EOFError):
            self._conn.send(("stop", ()))
            if self._conn.poll(5):
                self._conn.recv()
        self._process.join(5)
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(5)
        self._process = None

    def __enter__(self) -> SimulatorProcess:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


@contextlib.contextmanager
def bench_redis(settings: Settings) -> Iterator[None]:
    """The embedded Redis (the limiter's home), stopped at the end only if we started it."""
    from sentiment.embedded import embedded_redis

    if not settings.uses_embedded_redis:
        yield
        return
    server = embedded_redis(settings)
    started = not server.is_running()
    server.start()
    try:
        yield
    finally:
        if started:
            print("stopping the embedded Redis the benchmark started", flush=True)
            server.stop()


# -- the clients under test -----------------------------------------------------------------


@dataclass
class Pass:
    """One timed backfill of every subreddit."""

    items: int
    requests: int
    seconds: float
    cpu_seconds: float

    @property
    def rate(self) -> float:
        return self.items / self.seconds


class ScraperClient:
    """asyncpraw from `make_reddit`, kept warm across passes.

    `limiter`: with the shared Redis limiter (else `limiter=None`).
    """

    def __init__(self, settings: Settings, *, limiter: bool) -> None:
        self.settings = settings
        self.limiter_on = limiter
        self._redis: AsyncRedis | None = None
        self._limiter_id = f"bench-scrape-{uuid.uuid4().hex[:8]}"
        self.reddit: Any = None

    async def open(self, warm_subreddit: str) -> None:
        limiter = None
        if self.limiter_on:
            self._redis = AsyncRedis.from_url(self.settings.redis_connection_url())
            limiter = SharedRateLimiter(
                self._redis, self._limiter_id, limit=NEVER_WAIT, window_seconds=60
            )
        self.reddit = make_reddit(self.settings, limiter)
        # The token and a first connection, outside any timed region.
        await self.reddit.request(method="GET", path=f"r/{warm_subreddit}/new", params={"limit": 1})

    async def scrape(self, name: str, marks: dict[str, Any], depth: int) -> Any:
        return await scrape_subreddit(self.reddit, name, marks, depth=depth)

    async def close(self) -> None:
        if self.reddit is not None:
            await self.reddit.close()
        if self._redis is not None:
            await self._redis.delete(limiter_key(self._limiter_id))
            await self._redis.aclose()


async def scraper_pass(client: ScraperClient, subreddits: list[str], depth: int) -> Pass:
    """Backfill every subreddit from nothing, as the first scrape of each would."""
    items = requests = 0
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for name in subreddits:
        result = await client.scrape(name, {}, depth)
        items += len(result.events)
        requests += result.requests
    del result
    gc.collect()  # this pass's garbage, paid by this pass
    return Pass(items, requests, time.perf_counter() - wall0, time.process_time() - cpu0)


class CeilingClient:
    """Plain aiohttp: one token, then GET and json.loads, nothing else."""

    def __init__(self, settings: Settings, user_agent: str) -> None:
        self.settings = settings
        self.user_agent = user_agent
        self.session: aiohttp.ClientSession | None = None
        self.headers: dict[str, str] = {}

    async def open(self, warm_subreddit: str) -> None:
        settings = self.settings
        assert settings.reddit_client_secret is not None
        self.session = aiohttp.ClientSession(headers={"User-Agent": self.user_agent})
        login = f"{settings.reddit_client_id}:{settings.reddit_client_secret.get_secret_value()}"
        basic = {"Authorization": f"Basic {base64.b64encode(login.encode()).decode()}"}
        async with self.session.post(
            f"{settings.reddit_url}/api/v1/access_token", headers=basic,
            data={"grant_type": "client_credentials"},
        ) as response:  # fmt: skip
            token = json.loads(await response.read())["access_token"]
        self.headers = {"Authorization": f"bearer {token}"}
        await self.page(warm_subreddit, "submission", None, limit=1)

    async def page_bytes(
        self, name: str, kind: str, after: str | None, limit: int = PAGE_SIZE
    ) -> bytes:
        assert self.session is not None
        params: dict[str, str | int] = {"limit": limit, "raw_json": 1}
        if after:
            params["after"] = after
        url = f"{self.settings.reddit_oauth_url}/r/{name}/{LISTINGS[kind]}"
        async with self.session.get(url, params=params, headers=self.headers) as response:
            response.raise_for_status()
            return await response.read()

    async def page(
        self, name: str, kind: str, after: str | None, limit: int = PAGE_SIZE
    ) -> dict[str, Any]:
        return json.loads(await self.page_bytes(name, kind, after, limit))["data"]  # type: ignore[no-any-return]

    async def bodies(self, subreddits: list[str], depth: int) -> list[Page]:
        """The raw bodies of one pass (for the in-process breakdown)."""
        out = []
        for name in subreddits:
            for kind in KINDS:
                after: str | None = None
                listed = 0
                while True:
                    body = await self.page_bytes(name, kind, after)
                    out.append((name, kind, body))
                    data = json.loads(body)["data"]
                    listed += len(data["children"])
                    after = data["after"]
                    if not after or not data["children"] or listed >= depth:
                        break
        return out

    async def kind(self, name: str, kind: str, depth: int) -> tuple[int, int]:
        """Page one listing like the scraper does from no watermark: (items, requests)."""
        after: str | None = None
        listed = requests = 0
        while True:
            data = await self.page(name, kind, after)
            requests += 1
            children = data.get("children") or []
            listed += len(children)
            after = data.get("after")
            if not after or not children or listed >= depth:
                return listed, requests

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()


async def ceiling_pass(client: CeilingClient, subreddits: list[str], depth: int) -> Pass:
    items = requests = 0
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for name in subreddits:
        for listed, sent in await asyncio.gather(*(client.kind(name, k, depth) for k in KINDS)):
            items += listed
            requests += sent
    gc.collect()  # this pass's garbage, paid by this pass
    return Pass(items, requests, time.perf_counter() - wall0, time.process_time() - cpu0)


def check_decoding(pages: list[Page], evil: list[Page]) -> int:
    """`decode_json` gives exactly what `json.loads` gives; returns pages compared.

    Compared on every page of a pass and on the simulator's adversarial items
    (NUL, lone surrogates, 200 KB bodies, emoji, RTL, [deleted]).
    """
    for name, _, body in pages + evil:
        reference = json.loads(body.decode())
        if repr(decode_json(body)) != repr(reference):  # repr: ints stay ints, NaN equals NaN
            raise RuntimeError(f"decode_json decodes a page of r/{name} differently")
    return len(pages) + len(evil)


# -- where an item's time goes, in process (no HTTP) -------------------------------------------


def _best_us_per_item(fn: Callable[[], Any], items: int, reps: int) -> float:
    """Fastest of `reps` runs (the least disturbed by neighbours), in microseconds per item."""
    best = math.inf
    for _ in range(reps):
        gc.collect()
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return 1e6 * best / items


def cost_breakdown(pages: list[Page], reps: int) -> dict[str, float]:
    """Microseconds per item of each step, on the bodies of one pass."""
    decoded = [(name, kind, json.loads(body)) for name, kind, body in pages]
    items = [(name, kind, c["data"]) for name, kind, d in decoded for c in d["data"]["children"]]
    n = len(items)

    def scraper_pages(take: bool) -> list[Any]:
        """What the scraper does with each body: the page read, then (`take`) its
        items turned into events by the reader, from no watermark."""
        out = []
        for name, kind, body in pages:
            page = scraper_module._read_listing(body, name)
            assert page is not None
            if take:
                reader = scraper_module._PageReader(name, kind, None, None, 0.0)  # type: ignore[arg-type]
                reader.take(page.children)
                out.append(reader.result.events)
            else:
                out.append(page)
        return out

    # "kept": every result lives until the step ends, as the scraper keeps its events.
    steps: dict[str, Callable[[], Any]] = {
        "json.loads(bytes), discarded (the ceiling)": lambda: [
            json.loads(body) and None for _, _, body in pages
        ],
        "json.loads(body.decode()), kept (aiohttp's default)": lambda: [
            json.loads(body.decode()) for _, _, body in pages
        ],
        "the scraper: page read + items to events, kept": lambda: scraper_pages(take=True),
        "  of which the page read (msgspec split)": lambda: scraper_pages(take=False),
        "general path (a page msgspec refuses): decode_json": lambda: [
            decode_json(body) for _, _, body in pages
        ],
        "  then RawEventDTO.from_reddit per item": lambda: [
            RawEventDTO.from_reddit(i, name, k) for name, k, i in items
        ],
        "    of which clean_json (orjson.dumps + NUL check)": lambda: [
            clean_json(i) for _, _, i in items
        ],
    }
    return {label: round(_best_us_per_item(fn, n, reps), 2) for label, fn in steps.items()}


async def limiter_cost_us(settings: Settings, requests: int = 500) -> tuple[float, float]:
    """Microseconds per request of acquire + observe back to back (two Lua round trips to
    Redis), and of acquire alone."""
    redis = AsyncRedis.from_url(settings.redis_connection_url())
    key_id = f"bench-scrape-{uuid.uuid4().hex[:8]}"
    limiter = SharedRateLimiter(redis, key_id, limit=NEVER_WAIT, window_seconds=60)
    headers = {"content-type": "application/json"}
    try:
        await limiter.acquire()
        await limiter.observe(headers, status=200)
        started = time.perf_counter()
        for _ in range(requests):
            await limiter.acquire()
            await limiter.observe(headers, status=200)
        both = 1e6 * (time.perf_counter() - started) / requests
        started = time.perf_counter()
        for _ in range(requests):
            await limiter.acquire()
        return both, 1e6 * (time.perf_counter() - started) / requests
    finally:
        await redis.delete(limiter_key(key_id))
        await redis.aclose()


# -- requests at steady state ----------------------------------------------------------------


def expected_requests_per_kind(new: int, depth: int) -> int:
    """Pages to reach the watermark: the new items plus the one at or below it, depth-capped."""
    return min(math.ceil((new + 1) / PAGE_SIZE), math.ceil(depth / PAGE_SIZE))


@dataclass
class Incremental:
    """Every incremental scrape of one K (new items per kind per subreddit)."""

    k: int
    requests: int = 0
    new_items: int = 0
    added: int = 0
    scrapes: int = 0
    gaps: int = 0
    expected_requests: int = 0

    @property
    def per_100(self) -> float | None:
        return 100 * self.requests / self.new_items if self.new_items else None

    def as_json(self) -> dict[str, Any]:
        return {
            "k": self.k, "requests_per_100_new": _round(self.per_100, 3),
            "requests": self.requests, "new_items": self.new_items, "added": self.added,
            "scrapes": self.scrapes, "gaps": self.gaps,
            "expected_requests": self.expected_requests,
            "expected_per_100_new": _round(
                100 * self.expected_requests / self.added if self.added else None, 3
            ),
        }  # fmt: skip


async def measure_requests(
    client: ScraperClient,
    sim: SimulatorProcess,
    subreddits: list[str],
    *,
    ks: list[int],
    rounds: int,
    depth: int,
) -> tuple[list[Incremental], dict[str, Any]]:
    """Backfill; then per K, --rounds times: K new items per kind per subreddit, scrape them;
    then scrapes with nothing new."""
    marks: dict[str, dict[str, Any]] = {name: {} for name in subreddits}
    for name in subreddits:  # the backfill that steady state starts from
        marks[name].update((await client.scrape(name, {}, depth)).watermarks)
    incremental = []
    for k in ks:
        run = Incremental(k)
        for _ in range(rounds):
            for name in subreddits:
                run.added += sim.add_items(name, k, k)
                run.expected_requests += len(KINDS) * expected_requests_per_kind(k, depth)
            served, sent = sim.listing_requests(), 0
            for name in subreddits:
                result = await client.scrape(name, marks[name], depth)
                if len(result.events) != len(KINDS) * min(k, depth):
                    raise RuntimeError(f"r/{name}: {len(result.events)} new events, added {k}")
                marks[name].update(result.watermarks)
                sent += result.requests
                run.new_items += len(result.events)
                run.gaps += len(result.gaps)
                run.scrapes += 1
            _check_served(sim, served, sent)
            run.requests += sent
        incremental.append(run)
    idle_requests = idle_scrapes = 0
    served = sim.listing_requests()
    for _ in range(rounds):
        for name in subreddits:
            result = await client.scrape(name, marks[name], depth)
            if result.events:
                raise RuntimeError(f"an idle scrape of r/{name} found {len(result.events)} events")
            idle_requests += result.requests
            idle_scrapes += 1
    _check_served(sim, served, idle_requests)
    idle = {"requests": idle_requests, "scrapes": idle_scrapes,
            "per_scrape": idle_requests / idle_scrapes}  # fmt: skip
    return incremental, idle


def _check_served(sim: SimulatorProcess, served_before: int, counted: int) -> None:
    """The scraper's own count must match what the simulator served."""
    served = sim.listing_requests() - served_before
    if served != counted:
        raise RuntimeError(f"the scraper counted {counted} requests, the simulator served {served}")


# -- profile ---------------------------------------------------------------------------------

AREAS = (  # (area, path fragments), first match wins; the order matters
    ("scraper loop", ("sentiment/reddit/scraper.py",)),
    ("limiter (redis)", ("sentiment/reddit/ratelimit.py", "/redis/")),
    ("RawEventDTO (pydantic, clean_json)", ("sentiment/dto.py", "pydantic", "sentiment/config.py",
                                            "orjson.dumps", "fromtimestamp", "re.Pattern")),
    ("JSON decode", ("json/decoder.py", "json/__init__.py", "<method 'decode'",
                     "sentiment/reddit/jsondecode.py", "orjson.loads", "<method 'translate'")),
    ("asyncpraw/asyncprawcore", ("/asyncpraw", "sentiment/reddit/client.py", "/tenacity/")),
    ("aiohttp (HTTP client)", ("/aiohttp/", "/yarl/", "/multidict/")),
    ("asyncio and sockets", ("/asyncio/", "selectors.py", "<method 'recv", "<method 'send",
                             "<built-in method select", "<method 'poll'", "epoll")),
)  # fmt: skip


def _area(filename: str, name: str) -> str:
    where = f"{filename}:{name}"
    for area, fragments in AREAS:
        if any(fragment in where for fragment in fragments):
            return area
    return "other"


def _short(filename: str) -> str:
    for marker in ("site-packages/", "/lib/python3.11/", "/work/main/"):
        if marker in filename:
            return filename.split(marker, 1)[1]
    return filename


async def profiled_pass(client: ScraperClient, subreddits: list[str], depth: int) -> dict[str, Any]:
    """One extra scraper pass under cProfile (not part of the medians)."""
    profiler = cProfile.Profile()
    profiler.enable()
    try:
        measured = await scraper_pass(client, subreddits, depth)
    finally:
        profiler.disable()
    return _profile_report(profiler, measured)


def _profile_report(profiler: cProfile.Profile, measured: Pass) -> dict[str, Any]:
    stats = pstats.Stats(profiler)
    by_area: dict[str, float] = {}
    functions = []
    for (filename, line, name), (_, calls, tottime, cumtime, _) in stats.stats.items():  # type: ignore[attr-defined]
        area = _area(filename, name)
        by_area[area] = by_area.get(area, 0.0) + tottime
        functions.append((tottime, cumtime, calls, f"{_short(filename)}:{line}({name})"))
    total = sum(by_area.values()) or 1.0
    functions.sort(reverse=True)
    return {
        "items": measured.items,
        "profiled_seconds": round(measured.seconds, 3),
        "areas": {a: round(s / total, 3) for a, s in sorted(by_area.items(), key=lambda x: -x[1])},
        "top_functions": [
            {"function": f, "tottime_s": round(t, 4), "cumtime_s": round(c, 4), "calls": n}
            for t, c, n, f in functions[:15]
        ],
    }


# -- the benchmark ---------------------------------------------------------------------------


def _round(value: float | None, digits: int = 0) -> float | None:
    if value is None:
        return None
    return round(value, digits) if digits else float(round(value))


CLIENTS = {  # name: ScraperClient options; "ceiling" is the plain aiohttp client
    "scraper": {"limiter": True},
    "scraper_nolimiter": {"limiter": False},
}


@dataclass
class Results:
    passes: dict[str, list[Pass]] = field(default_factory=dict)

    def median_rate(self, name: str) -> float:
        return statistics.median(p.rate for p in self.passes[name])

    def median_cpu_us_per_item(self, name: str) -> float:
        return statistics.median(1e6 * p.cpu_seconds / p.items for p in self.passes[name])

    def paired_ratio(self, name: str) -> float:
        """Median of the per-round ratios (both measured within seconds of each other)."""
        return statistics.median(
            a.rate / b.rate for a, b in zip(self.passes[name], self.passes["ceiling"], strict=True)
        )


EVIL = "bench_scrape_evil"  # adversarial items, only to check the decoding


def make_world(sim: SimulatorProcess, count: int, items: int, seed: int) -> list[str]:
    """The timed subreddits (returned), and one of adversarial items beside them."""
    names = [f"bench_scrape_{seed}_{i}" for i in range(count)]
    for name in names:
        sim.add_subreddit(name, items, items)
    sim.add_subreddit(EVIL, 1, 1)
    sim.add_items(EVIL, 28, 28, adversarial=True)
    return names


async def timed_rounds(
    args: argparse.Namespace, clients: dict[str, Any], subreddits: list[str]
) -> Results:
    """Every client once per round, in rotating order; every pass must list every item."""
    results = Results({name: [] for name in clients})
    gc.collect()
    gc.freeze()  # the clients, modules and world: not collected again in every pass
    expected = len(subreddits) * len(KINDS) * min(args.items, args.depth)
    names = list(clients)
    for run in range(1, args.repeat + 1):
        shift = (run - 1) % len(names)
        for name in names[shift:] + names[:shift]:
            client = clients[name]
            if isinstance(client, CeilingClient):
                measured = await ceiling_pass(client, subreddits, args.depth)
            else:
                measured = await scraper_pass(client, subreddits, args.depth)
            if measured.items != expected:
                raise RuntimeError(f"{name}: {measured.items} items, expected {expected}")
            results.passes[name].append(measured)
            print(
                f"  round {run}/{args.repeat} {name:<18} {measured.rate:>9,.0f} items/s"
                f"  ({measured.items:,} items, {measured.requests} requests, "
                f"{measured.seconds:.2f} s, CPU {measured.cpu_seconds:.2f} s)",
                flush=True,
            )
    return results


async def open_clients(args: argparse.Namespace, settings: Settings, warm: str) -> dict[str, Any]:
    clients: dict[str, Any] = {}
    for name, kwargs in CLIENTS.items():
        clients[name] = ScraperClient(settings, **kwargs)
        await clients[name].open(warm)
    user_agent = clients["scraper"].reddit.requestor.headers["User-Agent"]
    clients["ceiling"] = CeilingClient(settings, user_agent)
    await clients["ceiling"].open(warm)
    return clients


async def run_all(args: argparse.Namespace, settings: Settings, sim: SimulatorProcess,
                  subreddits: list[str]) -> dict[str, Any]:  # fmt: skip
    clients = await open_clients(args, settings, subreddits[0])
    out: dict[str, Any] = {"profile": None}
    try:
        out["results"] = results = await timed_rounds(args, clients, subreddits)
        ratio = results.median_rate("scraper") / results.median_rate("ceiling")
        if args.profile or ratio < RATIO_TARGET:  # before steady state adds items
            print(f"profiling a scraper pass (ratio {ratio:.2f}) ...", flush=True)
            out["profile"] = await profiled_pass(clients["scraper"], subreddits, args.depth)
        print("cost per item, in process ...", flush=True)
        pages = await clients["ceiling"].bodies(subreddits, args.depth)
        evil = await clients["ceiling"].bodies([EVIL], args.depth)
        out["pages_checked"] = check_decoding(pages, evil)
        out["breakdown"] = cost_breakdown(pages, args.breakdown_reps)
        both, acquire = await limiter_cost_us(settings)
        out["limiter_us_per_request"] = round(both, 1)
        out["limiter_acquire_us_per_request"] = round(acquire, 1)
        print("requests at steady state ...", flush=True)
        gaps_log = logging.getLogger(scraper_module.__name__)
        level = gaps_log.level
        gaps_log.setLevel(logging.ERROR)  # K >= depth reports gaps by design; counted below
        try:
            out["incremental"], out["idle"] = await measure_requests(
                clients["scraper"], sim, subreddits, ks=args.k, rounds=args.rounds,
                depth=args.depth,
            )  # fmt: skip
        finally:
            gaps_log.setLevel(level)
    finally:
        for client in clients.values():
            await client.close()
    return out


def _status(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def request_targets(incremental: list[Incremental], idle: dict[str, Any]) -> dict[str, Any]:
    total_new = sum(r.new_items for r in incremental)
    aggregate = 100 * sum(r.requests for r in incremental) / total_new if total_new else None
    per_100 = REQUESTS_PER_100_TARGET
    targets = {
        f"requests_per_100_new K={r.k}": (r.per_100, f"<= {per_100}",
                                          r.per_100 is not None and r.per_100 <= per_100)
        for r in incremental
    }  # fmt: skip
    targets["requests_per_100_new aggregate"] = (
        aggregate,
        f"<= {per_100}",
        aggregate is not None and aggregate <= per_100,
    )
    targets["requests_per_idle_scrape"] = (
        idle["per_scrape"],
        f"<= {IDLE_TARGET}",
        idle["per_scrape"] <= IDLE_TARGET,
    )
    return {"aggregate": aggregate, "targets": targets}


def summarize(measured: dict[str, Any]) -> dict[str, Any]:
    results: Results = measured["results"]
    ceiling = results.median_rate("ceiling")
    rates = {name: results.median_rate(name) for name in results.passes}
    scraper, nolimiter = rates["scraper"], rates["scraper_nolimiter"]
    requests = request_targets(measured["incremental"], measured["idle"])
    targets = {
        "scraper/ceiling": (
            scraper / ceiling, f">= {RATIO_TARGET}", scraper / ceiling >= RATIO_TARGET
        ),
        "scraper_nolimiter/ceiling": (
            nolimiter / ceiling, f">= {RATIO_TARGET}", nolimiter / ceiling >= RATIO_TARGET
        ),
        **requests["targets"],
    }  # fmt: skip
    summary = {
        "scraper_items_per_s": round(scraper),
        "scraper_nolimiter_items_per_s": round(nolimiter),
        "ceiling_items_per_s": round(ceiling),
        "ratio": round(scraper / ceiling, 3),
        "ratio_nolimiter": round(nolimiter / ceiling, 3),
        "ratio_paired": round(results.paired_ratio("scraper"), 3),
        "limiter_cost": round(1 - scraper / nolimiter, 3),
        "requests_per_100_new": {
            **{str(r.k): _round(r.per_100, 3) for r in measured["incremental"]},
            "aggregate": _round(requests["aggregate"], 3),
        },
        "requests_per_idle_scrape": round(measured["idle"]["per_scrape"], 3),
        "targets": {
            label: {"value": _round(value, 3), "target": target, "status": _status(ok)}
            for label, (value, target, ok) in targets.items()
        },
        "clients": {
            name: {
                "items_per_s": round(rate), "over_ceiling": round(rate / ceiling, 3),
                "paired_over_ceiling": round(results.paired_ratio(name), 3),
                "cpu_us_per_item": round(results.median_cpu_us_per_item(name), 1),
                "runs_items_per_s": [round(p.rate) for p in results.passes[name]],
            }
            for name, rate in rates.items()
        },
        "breakdown_us_per_item": measured["breakdown"],
        "limiter_us_per_request": measured["limiter_us_per_request"],
        "limiter_acquire_us_per_request": measured["limiter_acquire_us_per_request"],
        "decoding_checked_pages": measured["pages_checked"],
        "incremental": [r.as_json() for r in measured["incremental"]],
        "idle": measured["idle"],
    }  # fmt: skip
    if measured["profile"] is not None:
        summary["profile"] = measured["profile"]
    return summary


def print_tables(summary: dict[str, Any], args: argparse.Namespace, items: int) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=120, highlight=False)
    rates = Table(
        title=f"bench/scrape.py: {args.subreddits} subreddits x ({args.items} + {args.items}) "
        f"items = {items:,} a pass, depth {args.depth}, median of {args.repeat}, "
        f"{os.cpu_count()} cores",
        title_justify="left",
    )
    for column in ("client", "median items/s", "runs (items/s)", "/ ceiling", "paired",
                   "CPU us/item"):  # fmt: skip
        rates.add_column(column, justify="left" if column == "client" else "right")
    for name, c in summary["clients"].items():
        rates.add_row(
            name, f"{c['items_per_s']:,}", "  ".join(f"{r:,}" for r in c["runs_items_per_s"]),
            f"{c['over_ceiling']:.2f}", f"{c['paired_over_ceiling']:.2f}",
            f"{c['cpu_us_per_item']:.1f}",
        )  # fmt: skip
    console.print(rates)
    console.print(
        f"the limiter costs {summary['limiter_cost']:.0%} of the scraper's rate here "
        f"(two Redis round trips: {summary['limiter_us_per_request']:.0f} us per request back "
        f"to back, {summary['limiter_acquire_us_per_request']:.0f} us of it the awaited acquire)"
    )
    breakdown = Table(title="cost per item in process, no HTTP (fastest of "
                            f"{args.breakdown_reps}; decoding checked on "
                            f"{summary['decoding_checked_pages']:,} pages)",
                      title_justify="left")  # fmt: skip
    breakdown.add_column("step")
    breakdown.add_column("us/item", justify="right")
    for step, us in summary["breakdown_us_per_item"].items():
        breakdown.add_row(step, f"{us:.2f}")
    breakdown.add_row("limiter: acquire + observe, per item",
                      f"{summary['limiter_us_per_request'] / PAGE_SIZE:.2f}")  # fmt: skip
    breakdown.add_row("  of which acquire (awaited by the request), per item",
                      f"{summary['limiter_acquire_us_per_request'] / PAGE_SIZE:.2f}")  # fmt: skip
    console.print(breakdown)
    steady = Table(title="requests at steady state (K new items per kind per subreddit)",
                   title_justify="left")  # fmt: skip
    for column in ("K", "scrapes", "new items", "requests", "per 100 new", "expected", "gaps"):
        steady.add_column(column, justify="right")
    for r in summary["incremental"]:
        steady.add_row(
            str(r["k"]), str(r["scrapes"]), f"{r['new_items']:,}", str(r["requests"]),
            f"{r['requests_per_100_new']:.3f}", f"{r['expected_per_100_new']:.3f}", str(r["gaps"]),
        )  # fmt: skip
    console.print(steady)
    targets = Table(title="targets", title_justify="left")
    for column in ("measure", "value", "target", "result"):
        targets.add_column(column, justify="left" if column == "measure" else "right")
    for label, t in summary["targets"].items():
        style = "green" if t["status"] == "PASS" else "bold red"
        value = "-" if t["value"] is None else f"{t['value']:.3f}"
        targets.add_row(label, value, t["target"], f"[{style}]{t['status']}[/{style}]")
    console.print(targets)
    if "profile" in summary:
        print_profile(console, summary["profile"])


def print_profile(console: Any, profile: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table(title=f"where a scraper pass spends its time (cProfile own time, "
                        f"{profile['items']:,} items)", title_justify="left")  # fmt: skip
    table.add_column("area")
    table.add_column("share", justify="right")
    for area, share in profile["areas"].items():
        table.add_row(area, f"{share:.0%}")
    console.print(table)
    top = Table(title="top functions by own time", title_justify="left")
    for column in ("function", "own s", "cumulative s", "calls"):
        top.add_column(column, justify="left" if column == "function" else "right")
    for f in profile["top_functions"]:
        top.add_row(f["function"], f"{f['tottime_s']:.3f}", f"{f['cumtime_s']:.3f}",
                    f"{f['calls']:,}")  # fmt: skip
    console.print(top)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subreddits", type=int, default=6, help="subreddits (default 6)")
    parser.add_argument(
        "--items",
        type=int,
        default=1000,
        help="submissions and comments each per subreddit (default 1000)",
    )
    parser.add_argument("--depth", type=int, default=1000, help="scrape depth (default 1000)")
    parser.add_argument("--repeat", type=int, default=3, help="timed rounds; medians reported")
    parser.add_argument(
        "--k",
        default="100,250,1000",
        help="new items per kind per subreddit at steady state (100,250,1000)",
    )
    parser.add_argument("--rounds", type=int, default=3, help="incremental scrapes per K (3)")
    parser.add_argument(
        "--breakdown-reps",
        type=int,
        default=7,
        help="runs of each in-process step; the fastest counts (7)",
    )
    parser.add_argument("--seed", type=int, default=0, help="the simulator's seed")
    parser.add_argument(
        "--profile", action="store_true", help="profile a scraper pass even if the ratio is met"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    args = parser.parse_args(argv)  # fmt: skip
    args.k = [int(k) for k in args.k.split(",") if k.strip()]
    if min(args.subreddits, args.items, args.repeat, args.rounds, args.breakdown_reps,
           *args.k) < 1:  # fmt: skip
        parser.error("--subreddits, --items, --repeat, --rounds, --breakdown-reps and K >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _common.exit_on_sigterm()
    settings = point_reddit_at(f"http://127.0.0.1:{free_port()}")
    port = int(settings.reddit_oauth_url.rsplit(":", 1)[1])
    started = time.perf_counter()
    with SimulatorProcess(port, seed=args.seed) as sim, bench_redis(settings):
        print(f"simulator on {sim.url}; building {args.subreddits} subreddits ...", flush=True)
        subreddits = make_world(sim, args.subreddits, args.items, args.seed)
        measured = asyncio.run(run_all(args, settings, sim, subreddits))
    summary = summarize(measured)
    items = len(subreddits) * len(KINDS) * min(args.items, args.depth)
    print_tables(summary, args, items)
    print(f"measured in {time.perf_counter() - started:.0f} s", flush=True)
    if args.json:
        out = {
            **summary,
            "subreddits": args.subreddits, "items_per_kind": args.items, "depth": args.depth,
            "items_per_pass": items, "repeat": args.repeat, "k": args.k, "rounds": args.rounds,
            "seed": args.seed, "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
        }  # fmt: skip
        print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
