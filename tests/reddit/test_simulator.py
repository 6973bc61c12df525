"""The Reddit simulator, exercised by the real asyncpraw/asyncprawcore and praw/prawcore.

No mocks: every test talks HTTP to a running simulator. Tests that need a
clean slate (rate limits, faults, growth) build their own small simulator;
the rest share one read-only world.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import aiohttp
import asyncpraw
import asyncprawcore
import praw
import pytest
import requests
from asyncprawcore import exceptions as aexc
from asyncprawcore.rate_limit import RateLimiter
from prawcore import exceptions as sexc

from sentiment.reddit.simulator import (
    DEFAULT_CLIENT_ID,
    DEFAULT_CLIENT_SECRET,
    LISTING_DEPTH,
    Simulator,
    SimulatorServer,
    SimulatorThread,
)

# asyncprawcore 4.0 still authenticates with aiohttp.BasicAuth, which aiohttp 3.14
# deprecates; nothing else may warn.
pytestmark = pytest.mark.filterwarnings(
    "ignore:BasicAuth is deprecated:DeprecationWarning",
    "ignore:The 'auth' parameter is deprecated:DeprecationWarning",
)

SUBMISSIONS, COMMENTS, DEEP = 250, 400, LISTING_DEPTH + 150


class FakeClock:
    """A wall clock the test moves, so rate-limit windows and growth are exact."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def world() -> Iterator[tuple[Simulator, str]]:
    sim = Simulator(seed=7, requests_per_window=None)
    sim.add_subreddit("Stocks", submissions=SUBMISSIONS, comments=COMMENTS)
    sim.add_subreddit("deep", submissions=DEEP)
    sim.add_subreddit("secret", kind="private", submissions=5)
    sim.add_subreddit("gone", kind="banned")
    sim.add_subreddit("edgy", kind="quarantined")
    with SimulatorThread(sim) as url:
        yield sim, url


@asynccontextmanager
async def reddit_at(url: str, **overrides: Any) -> AsyncIterator[asyncpraw.Reddit]:
    reddit = asyncpraw.Reddit(**(Simulator.reddit_kwargs(url) | overrides))
    try:
        yield reddit
    finally:
        await reddit.close()


@contextmanager
def sync_reddit(url: str, **overrides: Any) -> Iterator[praw.Reddit]:
    """praw on a session we own, so its sockets are closed when the test ends."""
    with requests.Session() as http:
        kwargs = Simulator.reddit_kwargs(url) | overrides
        yield praw.Reddit(**kwargs, requestor_kwargs={"session": http})


def rate_limiter(reddit: asyncpraw.Reddit) -> RateLimiter:
    """What asyncprawcore made of the last x-ratelimit-* headers it saw."""
    assert reddit._core is not None
    return reddit._core.rate_limiter


async def fetch(url: str, path: str, **params: Any) -> Any:
    """One GET through asyncpraw's raw-JSON entry point, the way the scraper calls it."""
    async with reddit_at(url) as reddit:
        return await reddit.request(method="GET", path=path, params={**params, "raw_json": 1})


async def page_through(reddit: asyncpraw.Reddit, path: str) -> list[list[dict[str, Any]]]:
    """Every page of a listing, following `after` until Reddit says there is no more."""
    pages, after = [], None
    while True:
        params: dict[str, str | int] = {"limit": 100, "raw_json": 1}
        if after:
            params["after"] = after
        listing = await reddit.request(method="GET", path=path, params=params)
        pages.append([child["data"] for child in listing["data"]["children"]])
        after = listing["data"]["after"]
        if after is None:
            return pages


async def raw_get(url: str, path: str, token: str | None) -> tuple[int, Mapping[str, str], Any]:
    """A bare aiohttp GET, for what a Reddit client does not let us see."""
    headers = {"Authorization": f"bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as http, http.get(url + path, headers=headers) as resp:
        body = await resp.json() if resp.content_length else None
        return resp.status, resp.headers.copy(), body  # a copy that still ignores case


async def raw_token(url: str, secret: str = DEFAULT_CLIENT_SECRET) -> tuple[int, Any]:
    auth = aiohttp.encode_basic_auth(DEFAULT_CLIENT_ID, secret)
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            url + "/api/v1/access_token",
            data={"grant_type": "client_credentials"},
            headers={"Authorization": auth},
        ) as resp,
    ):
        return resp.status, await resp.json()


def is_newest_first(items: list[dict[str, Any]]) -> bool:
    ids = [int(item["id"], 36) for item in items]
    times = [item["created_utc"] for item in items]
    return (
        ids == sorted(ids, reverse=True)
        and len(set(ids)) == len(ids)
        and times == sorted(times, reverse=True)
    )


# -- OAuth -----------------------------------------------------------------------


def test_token_endpoint_speaks_reddit_oauth(world):
    _, url = world
    status, body = asyncio.run(raw_token(url))
    assert status == 200
    assert (body["token_type"], body["expires_in"], body["scope"]) == ("bearer", 86400, "*")
    assert asyncio.run(raw_token(url, secret="wrong")) == (
        401, {"message": "Unauthorized", "error": 401}
    )  # fmt: skip


def test_application_only_and_password_grants(world):
    sim, url = world

    async def both() -> tuple[bool, bool]:
        async with (
            reddit_at(url) as app_only,
            reddit_at(url, **Simulator.reddit_kwargs(url, user=True)) as user,
        ):
            await app_only.request(method="GET", path="r/stocks/about")
            await user.request(method="GET", path="r/stocks/about")
            return app_only.read_only, user.read_only

    before = sim.stats.tokens_issued
    assert asyncio.run(both()) == (True, False)
    assert sim.stats.tokens_issued == before + 2


def test_bad_credentials_and_bad_password(world):
    _, url = world

    async def attempt(**overrides: Any) -> Exception:
        async with reddit_at(url, **overrides) as reddit:
            with pytest.raises(aexc.AsyncPrawcoreException) as caught:
                await reddit.request(method="GET", path="r/stocks/new")
            return caught.value

    bad_secret = asyncio.run(attempt(client_secret="wrong"))
    assert type(bad_secret) is aexc.ResponseException
    assert bad_secret.response.status == 401
    bad_password = asyncio.run(attempt(username="sim-user", password="wrong"))
    assert type(bad_password) is aexc.OAuthException
    assert bad_password.error == "invalid_grant"

    with (
        sync_reddit(url, client_secret="wrong") as sync,
        pytest.raises(sexc.ResponseException) as caught,
    ):
        _ = sync.subreddit("stocks").subscribers
    assert type(caught.value) is sexc.ResponseException
    assert caught.value.response.status_code == 401


def test_api_requires_a_live_bearer_token_and_clients_refresh(world):
    sim, url = world
    status, headers, body = asyncio.run(raw_get(url, "/r/stocks/new", token=None))
    assert (status, body) == (401, {"message": "Unauthorized", "error": 401})
    assert 'error="invalid_token"' in headers["www-authenticate"]
    assert asyncio.run(raw_get(url, "/r/stocks/new", token="made-up"))[0] == 401

    async def survives_revocation() -> int:
        async with reddit_at(url) as reddit:
            await reddit.request(method="GET", path="r/stocks/about")
            sim.revoke_tokens()  # asyncprawcore: 401 -> drop token -> fetch a new one -> retry
            about = await reddit.request(method="GET", path="r/stocks/about")
            return int(about["data"]["subscribers"])

    issued = sim.stats.tokens_issued
    assert asyncio.run(survives_revocation()) > 0
    assert sim.stats.tokens_issued == issued + 2


# -- listings ----------------------------------------------------------------------


def test_paging_new_returns_every_item_once_newest_first(world):
    sim, url = world

    async def crawl() -> list[list[dict[str, Any]]]:
        async with reddit_at(url) as reddit:
            return await page_through(reddit, "r/stocks/new")

    pages = asyncio.run(crawl())
    assert [len(page) for page in pages] == [100, 100, 50]
    seen = [item for page in pages for item in page]
    assert seen == sim.items("stocks")  # every field, in order, exactly once
    assert is_newest_first(seen)
    assert all(item["name"] == f"t3_{item['id']}" for item in seen)


def test_before_cursor_pages_towards_newer_items(world):
    sim, url = world
    items = sim.items("stocks")
    anchor = items[150]["name"]
    listing = asyncio.run(fetch(url, "r/stocks/new", limit=100, before=anchor))
    got = [child["data"]["name"] for child in listing["data"]["children"]]
    assert got == [item["name"] for item in items[50:150]]
    assert listing["data"]["before"] == items[50]["name"]
    assert listing["data"]["after"] == items[149]["name"]


def test_listing_depth_is_capped_at_1000(world):
    sim, url = world

    async def crawl() -> list[list[dict[str, Any]]]:
        async with reddit_at(url) as reddit:
            return await page_through(reddit, "r/deep/new.json")

    seen = [item for page in asyncio.run(crawl()) for item in page]
    assert len(seen) == LISTING_DEPTH
    assert seen == sim.items("deep")[:LISTING_DEPTH]
    beyond = sim.items("deep")[LISTING_DEPTH]["name"]
    listing = asyncio.run(fetch(url, "r/deep/new", limit=100, after=beyond))
    assert listing["data"]["children"] == []
    assert listing["data"]["after"] is None


def test_subreddit_comments_listing(world):
    sim, url = world

    async def crawl() -> list[list[dict[str, Any]]]:
        async with reddit_at(url) as reddit:
            return await page_through(reddit, "r/Stocks/comments/")

    seen = [item for page in asyncio.run(crawl()) for item in page]
    assert seen == sim.items("stocks", "comments")
    assert is_newest_first(seen)
    links = {item["name"]: item for item in sim.items("stocks")}
    comments = {item["name"]: item for item in seen}
    for comment in seen:
        link = links[comment["link_id"]]
        assert comment["created_utc"] >= link["created_utc"]
        parent = comment["parent_id"]
        assert parent == comment["link_id"] or comments[parent]["link_id"] == comment["link_id"]
        assert comment["permalink"].startswith(link["permalink"])


def test_api_info_returns_things_in_the_order_asked(world):
    sim, url = world
    submission, comment = sim.items("stocks")[3], sim.items("stocks", "comments")[5]
    hidden = sim.items("secret")[0]["name"]  # private subreddits' things are not shown
    ids = ",".join([comment["name"], "t3_zzzzzzzz", submission["name"], hidden])
    listing = asyncio.run(fetch(url, "api/info", id=ids))
    assert [child["data"] for child in listing["data"]["children"]] == [comment, submission]
    assert [child["kind"] for child in listing["data"]["children"]] == ["t1", "t3"]


def test_comments_endpoint_returns_the_thread(world):
    sim, url = world
    comments = sim.items("stocks", "comments")
    busiest = Counter(comment["link_id"] for comment in comments).most_common(1)
    link_id = busiest[0][0]
    expected = {c["name"] for c in comments if c["link_id"] == link_id}

    async def thread() -> tuple[Any, int, str]:
        async with reddit_at(url) as reddit:
            raw = await reddit.request(method="GET", path=f"comments/{link_id[3:]}")
            submission = await reddit.submission(link_id[3:])
            await submission.comments.replace_more(limit=0)
            return raw, len(submission.comments.list()), submission.title

    raw, count, title = asyncio.run(thread())
    post_listing, comment_listing = raw
    assert post_listing["data"]["children"][0]["data"]["name"] == link_id
    assert title == post_listing["data"]["children"][0]["data"]["title"]

    def walk(listing: Any, depth: int) -> Iterator[str]:
        for child in listing["data"]["children"]:
            assert child["data"]["depth"] == depth
            yield child["data"]["name"]
            if child["data"]["replies"]:
                yield from walk(child["data"]["replies"], depth + 1)

    assert set(walk(comment_listing, 0)) == expected
    assert count == len(expected) > 1


def test_about_ignores_case_suffix_and_trailing_slash(world):
    _, url = world
    about = asyncio.run(fetch(url, "r/STOCKS/about.json/"))
    assert about["kind"] == "t5"
    assert about["data"]["display_name"] == "Stocks"
    assert about["data"]["subreddit_type"] == "public"


def test_praw_sync_client_reads_listings_and_about(world):
    sim, url = world
    with sync_reddit(url) as reddit:
        subreddit = reddit.subreddit("stocks")
        submissions = list(subreddit.new(limit=150))
        assert subreddit.display_name == "stocks"  # as asked, until /about is fetched
        subscribers = subreddit.subscribers
        assert subreddit.display_name == "Stocks"
    assert [s.id for s in submissions] == [item["id"] for item in sim.items("stocks")[:150]]
    assert subscribers == asyncio.run(fetch(url, "r/stocks/about"))["data"]["subscribers"]


# -- unreadable subreddits -------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "async_error", "sync_error", "reason"),
    [
        ("r/secret/new", aexc.Forbidden, sexc.Forbidden, "private"),
        ("r/edgy/new", aexc.Forbidden, sexc.Forbidden, "quarantined"),
        ("r/gone/new", aexc.NotFound, sexc.NotFound, "banned"),
        ("r/nosuchsub/new", aexc.Redirect, sexc.Redirect, None),
        ("r/nosuchsub/about", aexc.NotFound, sexc.NotFound, None),
    ],
)
def test_unreadable_subreddits_raise_the_client_exceptions(
    world, path, async_error, sync_error, reason
):
    sim, url = world
    with pytest.raises(async_error) as caught:
        asyncio.run(fetch(url, path))
    assert type(caught.value) is async_error
    if async_error is aexc.Redirect:
        assert caught.value.path == "/subreddits/search"

    with sync_reddit(url) as reddit, pytest.raises(sync_error) as sync_caught:
        reddit.request(method="GET", path=path)
    if reason is not None:
        assert sync_caught.value.response.json()["reason"] == reason
    assert sim.stats.rate_limited == 0


# -- rate limiting -----------------------------------------------------------------


def test_rate_limit_headers_reach_the_client_and_429_past_budget():
    # One second before a 600 s window ends: asyncprawcore (window_size 600 by
    # default) then sees no reason to pace, so nothing here sleeps.
    clock = FakeClock(600 * 2_900_000 - 1.0)
    sim = Simulator(requests_per_window=5, window_seconds=600, clock=clock)
    sim.add_subreddit("a", submissions=3)

    async def scenario(url: str) -> None:
        async with reddit_at(url) as first, reddit_at(url) as second, reddit_at(url) as third:
            await first.request(method="GET", path="r/a/new")
            limiter = rate_limiter(first)
            assert (limiter.remaining, limiter.used) == (4, 1)
            for _ in range(4):
                await first.request(method="GET", path="r/a/new")
            assert (limiter.remaining, limiter.used) == (0, 5)
            # The budget is per client id, so a fresh client of the same app hits it.
            with pytest.raises(aexc.TooManyRequests) as caught:
                await second.request(method="GET", path="r/a/new")
            assert caught.value.response.headers["x-ratelimit-remaining"] == "0.0"
            assert caught.value.response.headers["x-ratelimit-reset"] == "1"
            clock.now += 1.0  # the next window
            await third.request(method="GET", path="r/a/new")
            assert rate_limiter(third).remaining == 4

    with SimulatorThread(sim) as url:
        asyncio.run(scenario(url))
        token = asyncio.run(raw_token(url))[1]["access_token"]
        _, headers, _ = asyncio.run(raw_get(url, "/r/a/about", token))
    assert headers["x-ratelimit-used"] == "2"
    assert headers["x-ratelimit-remaining"] == "3.0"
    assert headers["x-ratelimit-reset"] == "600"
    assert sim.stats.rate_limited == 1 == sim.stats.statuses[429]


# -- faults ----------------------------------------------------------------------------


@pytest.fixture
def small() -> Iterator[tuple[Simulator, str]]:
    sim = Simulator(requests_per_window=None)
    sim.add_subreddit("a", submissions=20, comments=20)
    sim.add_subreddit("b", submissions=20)
    with SimulatorThread(sim) as url:
        yield sim, url


def test_server_errors_are_retried_then_raised(small):
    sim, url = small

    async def scenario() -> None:
        async with reddit_at(url) as reddit:
            sim.inject_fault(status=503, count=3)
            with pytest.raises(aexc.ServerError):  # 1 try + 2 retries, all 503
                await reddit.request(method="GET", path="r/a/new")
            sim.inject_fault(status=502, count=1)
            await reddit.request(method="GET", path="r/a/new")  # the retry succeeds

    asyncio.run(scenario())
    assert sim.stats.faults == 4
    assert sim.stats.statuses[503] == 3
    assert sim.stats.statuses[502] == 1
    assert sim.stats.requests["new"] == 5


def test_faults_can_target_one_subreddit(small):
    sim, url = small
    token = asyncio.run(raw_token(url))[1]["access_token"]
    sim.inject_fault(status=500, count=None, subreddit="A")
    assert asyncio.run(raw_get(url, "/r/b/new", token))[0] == 200
    status, _, body = asyncio.run(raw_get(url, "/r/a/new", token))
    assert (status, body) == (500, {"message": "Internal Server Error", "error": 500})
    assert asyncio.run(raw_get(url, "/r/a/new", token))[0] == 500
    sim.clear_faults()
    assert asyncio.run(raw_get(url, "/r/a/new", token))[0] == 200


def test_dropped_connections_raise_request_exception(small):
    sim, url = small

    async def scenario() -> BaseException:
        async with reddit_at(url) as reddit:
            await reddit.request(method="GET", path="r/a/new")  # a keep-alive connection
            # aiohttp quietly retries a GET once when a reused connection drops,
            # so it takes two drops in a row for the client to see one.
            sim.inject_fault("drop", count=2)
            with pytest.raises(aexc.RequestException) as caught:
                await reddit.request(method="GET", path="r/a/new")
            return caught.value.original_exception

    assert isinstance(asyncio.run(scenario()), aiohttp.ServerDisconnectedError)
    assert sim.stats.faults == 2


def test_slow_responses_and_client_timeouts(small):
    sim, url = small

    async def timed_out() -> BaseException:
        # asyncprawcore's Session takes a per-request timeout; asyncpraw never passes one.
        requestor = asyncprawcore.Requestor(
            user_agent="simulator-tests/1.0", oauth_url=url, reddit_url=url
        )
        authenticator = asyncprawcore.TrustedAuthenticator(
            client_id=DEFAULT_CLIENT_ID, client_secret=DEFAULT_CLIENT_SECRET, requestor=requestor
        )
        authorizer = asyncprawcore.ReadOnlyAuthorizer(authenticator=authenticator)
        session = asyncprawcore.Session(authorizer=authorizer)
        try:
            sim.inject_fault("delay", delay=1.0)
            with pytest.raises(aexc.RequestException) as caught:
                await session.request(method="GET", path="r/a/new", timeout=0.3)
            return caught.value.original_exception
        finally:
            await session.close()

    assert isinstance(asyncio.run(timed_out()), TimeoutError)

    async def not_bounded_by_asyncpraw_settings() -> float:
        async with reddit_at(url, timeout=1, requestor_kwargs={"timeout": 0.2}) as reddit:
            sim.inject_fault("delay", delay=1.3)
            started = time.monotonic()
            await reddit.request(method="GET", path="r/a/new")
            return time.monotonic() - started

    assert asyncio.run(not_bounded_by_asyncpraw_settings()) >= 1.3


def test_latency_applies_to_every_request(small):
    sim, url = small
    sim.latency = 0.15
    started = time.monotonic()
    asyncio.run(fetch(url, "r/a/about"))  # token + request
    assert time.monotonic() - started >= 0.3


# -- content ---------------------------------------------------------------------------


def test_adversarial_items_arrive_intact(small):
    sim, url = small
    made = sim.add_items("a", submissions=7, comments=7, adversarial=True)

    async def both() -> tuple[Any, Any]:
        async with reddit_at(url) as reddit:
            posts = await reddit.request(method="GET", path="r/a/new", params={"limit": 7})
            comments = await reddit.request(method="GET", path="r/a/comments", params={"limit": 7})
            return posts, comments

    posts, comments = asyncio.run(both())
    got = [
        c["data"] for listing in (posts, comments) for c in reversed(listing["data"]["children"])
    ]
    assert [item["name"] for item in got] == made
    assert got == sim.items("a")[:7][::-1] + sim.items("a", "comments")[:7][::-1]
    for key, items in (("selftext", got[:7]), ("body", got[7:])):
        texts = [item[key] for item in items]
        assert any("\x00" in text for text in texts)
        assert any("\ud800" in text for text in texts)  # a lone surrogate, as a Python str
        assert any(len(text) >= 200_000 for text in texts)
        assert any("👨‍👩‍👧‍👦" in text for text in texts)
        assert any("\u202e" in text for text in texts)
        assert {"[deleted]", "[removed]"} <= set(texts)
        assert sum(item["author"] == "[deleted]" for item in items) == 2


def test_an_item_can_be_listed_late(small):
    """As on Reddit, whose listings are built asynchronously: the item exists
    (`/api/info` finds it) before `/new` and `/comments` show it."""
    sim, url = small
    late_post, _, late_comment, _ = sim.add_items("a", submissions=2, comments=2)
    sim.set_listed([late_post, late_comment], listed=False)

    def listed() -> tuple[list[str], list[str], list[str]]:
        new = asyncio.run(fetch(url, "r/a/new", limit=5))
        comments = asyncio.run(fetch(url, "r/a/comments", limit=5))
        info = asyncio.run(fetch(url, "api/info", id=f"{late_post},{late_comment}"))
        return tuple(
            [child["data"]["name"] for child in listing["data"]["children"]]
            for listing in (new, comments, info)
        )  # type: ignore[return-value]

    new, comments, info = listed()
    assert late_post not in new and len(new) == 5
    assert late_comment not in comments and len(comments) == 5
    assert info == [late_post, late_comment]

    sim.set_listed([late_post, late_comment])
    new, comments, _ = listed()
    assert new[1] == late_post and comments[1] == late_comment  # where their ids belong


def test_items_look_like_reddit_json(world):
    sim, _ = world
    submission, comment = sim.items("stocks")[0], sim.items("stocks", "comments")[0]
    assert {"id", "name", "subreddit", "subreddit_id", "author", "title", "selftext", "created_utc",
            "score", "num_comments", "permalink", "url", "is_self", "stickied", "edited", "over_18",
            "link_flair_text"} <= submission.keys()  # fmt: skip
    assert {"id", "name", "link_id", "parent_id", "body", "author", "created_utc", "score",
            "permalink", "subreddit", "edited"} <= comment.keys()  # fmt: skip
    assert isinstance(submission["created_utc"], float)
    every = sim.items("stocks") + sim.items("deep") + sim.items("secret")
    assert any(item.get("crosspost_parent_list") for item in every)
    assert any(item["edited"] for item in every)
    assert all(item["edited"] is False or item["edited"] > item["created_utc"] for item in every)
    # ids are one sequence across subreddits, and time never runs backwards along it
    ordered = sorted(every, key=lambda item: int(item["id"], 36))
    assert [item["created_utc"] for item in ordered] == sorted(i["created_utc"] for i in ordered)
    sizes = [len(sim.items("stocks")[i]["selftext"]) for i in range(100)]
    assert 0 < sum(sizes) / len(sizes) < 3000


def test_growth_adds_items_as_time_passes():
    clock = FakeClock(1_700_000_000.0)
    sim = Simulator(requests_per_window=None, clock=clock)
    sim.add_subreddit("a", submissions=10, comments=10)
    sim.start_growth(2.0, 5.0)
    clock.now += 10
    with SimulatorThread(sim) as url:
        listing = asyncio.run(fetch(url, "r/a/new", limit=100))
    children = [child["data"] for child in listing["data"]["children"]]
    assert len(children) == 30
    assert [item["created_utc"] for item in children[:20]] == [
        clock.now - i * 0.5 for i in range(20)
    ]
    assert len(sim.items("a", "comments")) == 60
    sim.stop_growth()
    clock.now += 10
    assert len(sim.items("a")) == 30


# -- runners ---------------------------------------------------------------------------


def test_in_process_async_server():
    sim = Simulator(requests_per_window=None)
    sim.add_subreddit("a", submissions=3)

    async def scenario() -> int:
        async with SimulatorServer(sim) as url, reddit_at(url) as reddit:
            subreddit = await reddit.subreddit("a")
            return len([s async for s in subreddit.new(limit=None)])

    assert asyncio.run(scenario()) == 3


def test_binds_to_loopback_only():
    with pytest.raises(ValueError, match="loopback"):
        SimulatorServer(Simulator(), host="0.0.0.0")


def test_admin_stats_endpoint(small):
    _, url = small
    asyncio.run(fetch(url, "r/a/new"))
    status, _, body = asyncio.run(raw_get(url, "/_sim/stats", token=None))
    assert status == 200
    assert (body["requests"]["new"], body["tokens_issued"], body["rate_limited"]) == (1, 1, 0)


def test_run_simulator_serves_until_stopped():
    code = (
        "from sentiment.reddit.simulator import run_simulator;"
        "run_simulator(port=0, subreddits=['cli'], submissions=30, comments=10)"
    )
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    with subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env
    ) as proc:
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            url = line.split(" on ", 1)[1].split(" ", 1)[0]
            assert url.startswith("http://127.0.0.1:")
            with sync_reddit(url) as reddit:
                assert len(list(reddit.subreddit("cli").new(limit=None))) == 30
        finally:
            proc.terminate()
            proc.wait(timeout=10)
