"""A local stand-in for Reddit's OAuth API that the real asyncpraw and praw talk to.

Point a client at it by configuration alone (`Simulator.reddit_kwargs` builds
the keyword arguments): prawcore and asyncprawcore accept plain ``http://`` URLs,
take tokens from ``<reddit_url>/api/v1/access_token`` and send API calls to
``<oauth_url>/<path>``.

It reproduces what a scraper has to cope with: Listing paging with
``after``/``before`` and the 1,000-item depth cap, ids that only grow, private,
quarantined, banned and missing subreddits, Reddit's ``x-ratelimit-*`` headers and
429s, and injected 5xx, slow and dropped responses. A missing subreddit answers a
listing with a 302 to ``/subreddits/search.json?q=<name>`` (what Reddit's JSON API
does, and what prawcore reports as ``Redirect``) and ``/about`` with a plain 404.

All state sits behind one lock, so a test may add items or faults from its own
thread while `SimulatorThread` serves from another.
"""

from __future__ import annotations

import asyncio
import math
import random
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson

from sentiment.reddit._simulator_http import SimulatorServer, SimulatorThread
from sentiment.reddit._simulator_store import (
    LISTING_DEPTH,
    Catalog,
    ItemKind,
    Stored,
    Subreddit,
    SubredditKind,
)

__all__ = [
    "DEFAULT_CLIENT_ID",
    "DEFAULT_CLIENT_SECRET",
    "DEFAULT_PASSWORD",
    "DEFAULT_USERNAME",
    "LISTING_DEPTH",
    "Fault",
    "FaultKind",
    "ItemKind",
    "Simulator",
    "SimulatorServer",
    "SimulatorStats",
    "SimulatorThread",
    "SubredditKind",
    "run_simulator",
]

DEFAULT_CLIENT_ID = "sim-client-id"
DEFAULT_CLIENT_SECRET = "sim-client-secret"
DEFAULT_USERNAME = "sim-user"
DEFAULT_PASSWORD = "sim-password"

FaultKind = Literal["status", "delay", "drop"]


@dataclass(slots=True)
class Fault:
    """One injected failure; `count` is how many more requests it hits (None: no limit)."""

    kind: FaultKind
    status: int = 503
    delay: float = 0.0
    count: int | None = 1
    probability: float = 1.0
    subreddit: str | None = None


@dataclass
class SimulatorStats:
    """What was served, so tests can assert e.g. "zero 429s" or "one token"."""

    requests: Counter[str] = field(default_factory=Counter)  # by endpoint
    statuses: Counter[int] = field(default_factory=Counter)
    rate_limited: int = 0
    tokens_issued: int = 0
    faults: int = 0

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready copy, for the admin endpoint."""
        return {
            "requests": dict(self.requests),
            "statuses": {str(k): v for k, v in self.statuses.items()},
            "rate_limited": self.rate_limited,
            "tokens_issued": self.tokens_issued,
            "faults": self.faults,
        }


class Simulator:
    """Reddit's state: subreddits and items, tokens, rate-limit windows, faults and stats.

    `requests_per_window=None` turns rate limiting off (and the headers with it).
    asyncprawcore paces itself assuming a window of its `window_size` setting
    (600 s unless given to asyncpraw.Reddit): with a longer `window_seconds` it
    sleeps up to 10 s before every request, with a shorter one it bursts until
    the budget is gone and then waits for the reset.
    `clock` is injectable so tests can pin rate-limit windows and timestamps.
    """

    def __init__(
        self,
        *,
        seed: int = 0,
        requests_per_window: int | None = 100,
        window_seconds: int = 60,
        token_ttl: int = 86400,
        text_chars: tuple[int, int] = (200, 1800),
        history_seconds: float = 3600.0,
        latency: float = 0.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.requests_per_window = requests_per_window
        self.window_seconds = window_seconds
        self.token_ttl = token_ttl
        self.history_seconds = history_seconds
        self.latency = latency
        self.clock = clock
        self.stats = SimulatorStats()
        self._lock = threading.RLock()
        self._catalog = Catalog(seed=seed, text_chars=text_chars)
        self._fault_rng = random.Random(seed + 1)
        self._clients = {DEFAULT_CLIENT_ID: DEFAULT_CLIENT_SECRET}
        self._users = {DEFAULT_USERNAME: DEFAULT_PASSWORD}
        self._tokens: dict[str, tuple[str, float]] = {}  # token -> (client id, expiry)
        self._windows: dict[str, tuple[int, int]] = {}  # client id -> (window, used)
        self._faults: list[Fault] = []

    @staticmethod
    def reddit_kwargs(url: str, *, user: bool = False) -> dict[str, str]:
        """Keyword arguments for asyncpraw/praw.Reddit that reach a simulator at `url`.

        With `user`, the password grant is used (an "authorized" instance).
        """
        kwargs = {
            "client_id": DEFAULT_CLIENT_ID,
            "client_secret": DEFAULT_CLIENT_SECRET,
            "user_agent": "sentiment-simulator-client/1.0",
            "oauth_url": url,
            "reddit_url": url,
        }
        if user:
            kwargs |= {"username": DEFAULT_USERNAME, "password": DEFAULT_PASSWORD}
        return kwargs

    # -- shaping the world -------------------------------------------------------

    def add_client(self, client_id: str, secret: str) -> None:
        """Register an OAuth "script" app; both grants work for it."""
        with self._lock:
            self._clients[client_id] = secret

    def add_user(self, username: str, password: str) -> None:
        """Register an account for the password grant."""
        with self._lock:
            self._users[username] = password

    def add_subreddit(
        self,
        name: str,
        *,
        kind: SubredditKind = "public",
        submissions: int = 0,
        comments: int = 0,
        subscribers: int | None = None,
    ) -> None:
        """Create a subreddit with a backlog spread over the last `history_seconds`."""
        with self._lock:
            now = self.clock()
            self._catalog.add_subreddit(name, kind, subscribers, now=now)
            start = now - self.history_seconds
            catalog = self._catalog
            catalog.create(
                name, "submissions", submissions, start=start, now=now, adversarial=False
            )
            catalog.create(name, "comments", comments, start=start, now=now, adversarial=False)

    def set_kind(self, name: str, kind: SubredditKind) -> None:
        """Turn a subreddit private, banned, quarantined or public again, mid-run."""
        with self._lock:
            self._catalog.set_kind(name, kind)

    def add_items(
        self, name: str, submissions: int = 0, comments: int = 0, *, adversarial: bool = False
    ) -> list[str]:
        """Items arriving now (higher ids, created_utc = now); returns their fullnames.

        With `adversarial`, each item carries one hazard of
        `_simulator_data.ADVERSARIAL_VARIANTS` in turn: NUL, lone surrogate,
        200 KB body, emoji, RTL text, [deleted], [removed].
        """
        with self._lock:
            now = self.clock()
            made = self._catalog.create(
                name, "submissions", submissions, start=now, now=now, adversarial=adversarial
            )
            return made + self._catalog.create(
                name, "comments", comments, start=now, now=now, adversarial=adversarial
            )

    def set_listed(self, fullnames: Sequence[str], *, listed: bool = True) -> None:
        """Hold items back from `/new` and `/comments`, or list them again.

        Reddit builds its listings asynchronously: an item can exist (`/api/info`
        and its thread find it) and show up in its listing only after newer ones.
        """
        with self._lock:
            self._catalog.set_listed(list(fullnames), listed=listed)

    def start_growth(
        self,
        submissions_per_second: float,
        comments_per_second: float = 0.0,
        *,
        subreddits: Iterable[str] | None = None,
    ) -> None:
        """Let every (or each named) readable subreddit grow at these rates from now on.

        Growth is lazy: the items due are created, with evenly spaced created_utc,
        whenever a request or `items()` looks. There is no task or thread to manage,
        and it behaves the same under every runner.
        """
        only = None if subreddits is None else frozenset(s.lower() for s in subreddits)
        with self._lock:
            self._catalog.start_growth(
                submissions_per_second, comments_per_second, only, now=self.clock()
            )

    def stop_growth(self) -> None:
        """Stop creating items, after creating those already due."""
        with self._lock:
            self._catalog.catch_up(self.clock())
            self._catalog.start_growth(0, 0, None, now=self.clock())

    def inject_fault(
        self,
        kind: FaultKind = "status",
        *,
        status: int = 503,
        delay: float = 0.0,
        count: int | None = 1,
        probability: float = 1.0,
        subreddit: str | None = None,
    ) -> Fault:
        """Fail the next `count` API requests (each with `probability`), maybe of one subreddit.

        "status" answers `status` without rate-limit headers, like Reddit's CDN
        does; "drop" closes the connection without answering; "delay" waits
        `delay` seconds, then serves normally. Faults spend no rate-limit budget.
        """
        fault = Fault(kind, status, delay, count, probability, subreddit and subreddit.lower())
        with self._lock:
            self._faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        """Remove every pending fault."""
        with self._lock:
            self._faults.clear()

    def revoke_tokens(self) -> None:
        """Forget every access token, as if all had expired."""
        with self._lock:
            self._tokens.clear()

    def reset_stats(self) -> None:
        """Start counting from zero."""
        with self._lock:
            self.stats = SimulatorStats()

    def items(self, name: str, kind: ItemKind = "submissions") -> list[dict[str, Any]]:
        """Every item of `kind` in r/`name`, newest first, decoded as a client would."""
        with self._lock:
            self._catalog.catch_up(self.clock())
            return self._catalog.items(name, kind)

    # -- what the HTTP layer asks ---------------------------------------------

    def issue_token(self, client_id: str, secret: str, form: dict[str, str]) -> tuple[int, bytes]:
        """Answer POST /api/v1/access_token as Reddit does: grant errors come in a 200."""
        with self._lock:
            if client_id not in self._clients or self._clients[client_id] != secret:
                return 401, b'{"message": "Unauthorized", "error": 401}'
            grant = form.get("grant_type")
            if grant == "password":
                user = form.get("username", "")
                if user not in self._users or self._users[user] != form.get("password"):
                    return 200, b'{"error": "invalid_grant"}'
            elif grant != "client_credentials":
                return 200, b'{"error": "unsupported_grant_type"}'
            token = secrets.token_urlsafe(24)
            self._tokens[token] = (client_id, self.clock() + self.token_ttl)
            self.stats.tokens_issued += 1
        body = {"access_token": token, "token_type": "bearer", "expires_in": self.token_ttl}
        return 200, orjson.dumps(body | {"scope": form.get("scope", "*")})

    def client_for(self, authorization: str | None) -> str | None:
        """The client id behind a live ``bearer`` token, or None (a 401)."""
        scheme, _, token = (authorization or "").partition(" ")
        entry = self._tokens.get(token.strip()) if scheme.lower() == "bearer" else None
        if entry is None or entry[1] <= self.clock():
            return None
        return entry[0]

    def charge(self, client_id: str) -> tuple[bool, dict[str, str]]:
        """Spend one request of the client's window; False when over budget (a 429).

        Windows are aligned to wall-clock multiples of `window_seconds`, as on
        Reddit, and requests past the budget still count as used.
        """
        budget = self.requests_per_window
        if budget is None:
            return True, {}
        now = self.clock()
        window = int(now // self.window_seconds)
        with self._lock:
            index, used = self._windows.get(client_id, (window, 0))
            used = used + 1 if index == window else 1
            self._windows[client_id] = (window, used)
        reset = max(1, math.ceil((window + 1) * self.window_seconds - now))
        return used <= budget, {
            "x-ratelimit-used": str(used),
            "x-ratelimit-remaining": f"{max(0, budget - used):.1f}",
            "x-ratelimit-reset": str(reset),
        }

    def take_fault(self, subreddit: str | None) -> Fault | None:
        """The fault this request suffers, if any, using up one of its hits."""
        if not self._faults:
            return None
        with self._lock:
            for fault in self._faults:
                if fault.subreddit not in {None, subreddit}:
                    continue
                if fault.probability < 1 and self._fault_rng.random() >= fault.probability:
                    continue
                if fault.count is not None:
                    fault.count -= 1
                    if fault.count <= 0:
                        self._faults.remove(fault)
                self.stats.faults += 1
                return fault
        return None

    def subreddit(self, name: str) -> Subreddit | None:
        """The subreddit's state (any case), or None when it does not exist."""
        return self._catalog.subreddits.get(name.lower())

    def page(
        self, sub: Subreddit, kind: ItemKind, after: str | None, before: str | None, limit: int
    ) -> tuple[list[bytes], str | None, str | None]:
        """One listing page: children payloads and the after/before cursors."""
        with self._lock:
            self._catalog.catch_up(self.clock())
            return self._catalog.page(sub, kind, after, before, limit)

    def lookup(self, fullnames: Sequence[str]) -> list[bytes]:
        """Payloads of the readable things among `fullnames`, in the order asked."""
        with self._lock:
            return self._catalog.lookup(list(fullnames))

    def thread(self, id36: str) -> tuple[Stored, list[Stored]] | None:
        """A submission and its comments oldest first, or None."""
        with self._lock:
            return self._catalog.thread(id36)


def run_simulator(
    host: str = "127.0.0.1",
    port: int = 8765,
    subreddits: Sequence[str] = ("python", "wallstreetbets", "worldnews"),
    *,
    submissions: int = 1000,
    comments: int = 3000,
    growth: float = 0.0,
    comment_ratio: float = 4.0,
    rpm: int | None = 100,
    client_id: str = DEFAULT_CLIENT_ID,
    client_secret: str = DEFAULT_CLIENT_SECRET,
    seed: int = 0,
    on_ready: Callable[[str], None] = print,
) -> None:
    """Serve a populated simulator until interrupted (what ``sentiment simulator`` runs).

    `growth` is new items per second per subreddit, `comment_ratio` comments for
    each submission; `rpm` is the per-client budget per 60 s window (None:
    unlimited). `client_id`/`client_secret` are accepted besides the defaults.
    `on_ready` gets one line with the base URL and credentials once it listens.
    """
    sim = Simulator(seed=seed, requests_per_window=rpm, window_seconds=60)
    sim.add_client(client_id, client_secret)
    for name in subreddits:
        sim.add_subreddit(name, submissions=submissions, comments=comments if submissions else 0)
    if growth > 0:
        sim.start_growth(growth / (1 + comment_ratio), growth * comment_ratio / (1 + comment_ratio))

    async def serve() -> None:
        async with SimulatorServer(sim, host=host, port=port) as url:
            on_ready(
                f"Reddit simulator on {url} (client_id={client_id},"
                f" client_secret={client_secret}, username={DEFAULT_USERNAME},"
                f" password={DEFAULT_PASSWORD})"
            )
            await asyncio.Event().wait()

    asyncio.run(serve())
