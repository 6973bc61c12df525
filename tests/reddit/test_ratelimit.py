"""One rate limiter shared by every process, against a server that enforces its budget."""

from __future__ import annotations

import asyncio
import math
import multiprocessing
import time

import pytest
from redis.asyncio import Redis as AsyncRedis

from sentiment.reddit.ratelimit import SharedRateLimiter
from sentiment.reddit.simulator import Simulator, SimulatorThread
from tests.processes import scrape_loop

pytestmark = pytest.mark.slow

BUDGET, WINDOW = 20, 5  # Reddit's is 100 a minute; same mechanics, a quicker test


def test_four_processes_twenty_subreddits_no_429_and_the_budget_used(settings, redis_client):
    sim = Simulator(seed=3, requests_per_window=BUDGET, window_seconds=WINDOW)
    sim.add_client("limiter-test", "limiter-secret")
    names = [f"busy_{i:02d}" for i in range(20)]
    for name in names:
        sim.add_subreddit(name, submissions=50, comments=50)
    sim.start_growth(2.0, 4.0)  # always work to do
    with SimulatorThread(sim) as url:
        env = {
            "REDDIT_CLIENT_ID": "limiter-test",
            "REDDIT_CLIENT_SECRET": "limiter-secret",
            "REDDIT_OAUTH_URL": url,
            "REDDIT_URL": url,
            "REDDIT_RATELIMIT_REQUESTS": str(BUDGET),
            "REDDIT_RATELIMIT_WINDOW_SECONDS": str(WINDOW),
        }
        # Start on a window boundary, far enough ahead for the processes to load.
        start = (math.floor(time.time() / WINDOW) + 2) * WINDOW
        windows = 4
        deadline = start + windows * WINDOW
        slices = [names[i::4] for i in range(4)]
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(4) as pool:
            pending = pool.starmap_async(scrape_loop, [(env, s, start, deadline) for s in slices])
            time.sleep(max(0.0, start - time.time()))
            before = _api_requests(sim)
            time.sleep(max(0.0, deadline - time.time()))
            during = _api_requests(sim) - before
            sent = pending.get(timeout=60)

    assert sim.stats.rate_limited == 0
    assert all(n > 0 for n in sent), "every process got requests through"
    used = during / (BUDGET * windows)
    assert used >= 0.9, f"only {during} of {BUDGET * windows} requests used ({used:.0%})"


def _api_requests(sim: Simulator) -> int:
    return sum(n for endpoint, n in sim.stats.requests.items() if "access_token" not in endpoint)


def test_a_429_pauses_every_process_until_the_reset(settings, redis_client):
    async def run() -> tuple[float, float]:
        redis = AsyncRedis.from_url(settings.redis_connection_url())
        one = SharedRateLimiter(redis, "pause-test", limit=100, window_seconds=60)
        other = SharedRateLimiter(redis, "pause-test", limit=100, window_seconds=60)
        await one.acquire()
        await one.observe({"x-ratelimit-remaining": "0", "x-ratelimit-reset": "1"}, status=429)
        began = time.monotonic()
        await other.acquire()  # another process: must wait for the reset (1 s + margin)
        waited = time.monotonic() - began
        state = await other.state()
        await redis.aclose()
        return waited, state.limited

    waited, limited = asyncio.run(run())
    assert waited >= 1.5  # the reset: 1 s, plus the margin
    assert waited < 30  # then it goes on
    assert limited == 1


def test_the_server_can_only_lower_what_is_left(settings, redis_client):
    async def run() -> list[int | None]:
        redis = AsyncRedis.from_url(settings.redis_connection_url())
        limiter = SharedRateLimiter(redis, "lower-test", limit=100, window_seconds=60)
        seen = []
        await limiter.acquire()
        await limiter.observe(
            {"x-ratelimit-remaining": "40.0", "x-ratelimit-reset": "30"}, status=200
        )
        seen.append((await limiter.state()).remaining)
        await limiter.acquire()
        await limiter.observe(
            {"x-ratelimit-remaining": "90.0", "x-ratelimit-reset": "29"}, status=200
        )
        seen.append((await limiter.state()).remaining)
        await redis.aclose()
        return seen

    assert asyncio.run(run()) == [40, 39]


def test_a_response_read_late_neither_raises_the_count_nor_hides_later_headers(
    settings, redis_client
):
    """Reddit stamps its headers when it takes a request; a slow response is read
    seconds later, so its reset looks like a later window's. It used to reset our
    count from its stale `remaining` (30 grants too many here) and then make every
    correct header of the window look like an older window's."""

    async def run() -> tuple[int, int]:
        redis = AsyncRedis.from_url(settings.redis_connection_url())
        limiter = SharedRateLimiter(redis, "late-test", limit=100, window_seconds=60)
        reddit_end = time.time() + 50.5  # where Reddit's fixed window ends
        used = 0  # what Reddit has counted

        def stamped() -> dict[str, str]:  # the headers of a request Reddit takes now
            nonlocal used
            used += 1
            return {"x-ratelimit-remaining": f"{100 - used:.1f}",
                    "x-ratelimit-reset": str(math.ceil(reddit_end - time.time()))}  # fmt: skip

        await limiter.acquire()
        await limiter.observe(stamped(), status=200)
        await limiter.acquire()
        slow = stamped()  # this response takes 3 s to arrive
        for _ in range(30):  # meanwhile, quick ones
            await limiter.acquire()
            await limiter.observe(stamped(), status=200)
        await asyncio.sleep(3)
        await limiter.observe(slow, status=200)
        used += 10  # spent by a client this limiter does not know: only headers tell
        for _ in range(5):
            await limiter.acquire()
            await limiter.observe(stamped(), status=200)
        ours = (await limiter.state()).remaining
        await redis.aclose()
        assert ours is not None
        return ours, 100 - used

    ours, reddits = asyncio.run(run())
    assert ours == reddits  # the later headers were believed, the late one did not raise it


def test_the_client_id_never_reaches_redis(settings, redis_client):
    async def touch() -> None:
        redis = AsyncRedis.from_url(settings.redis_connection_url())
        await SharedRateLimiter(redis, "my-client-id", limit=5, window_seconds=5).acquire()
        await redis.aclose()

    asyncio.run(touch())
    assert not list(redis_client.scan_iter("*my-client-id*"))
    assert list(redis_client.scan_iter("sentiment:reddit:ratelimit:*"))


def test_a_new_window_counts_the_requests_still_in_flight_from_the_last(settings, redis_client):
    """Granted at the end of one window, a request may reach Reddit in the next and
    count there; until a response says where Reddit stands, the new window assumes so."""

    async def run() -> int | None:
        redis = AsyncRedis.from_url(settings.redis_connection_url())
        limiter = SharedRateLimiter(redis, "rollover-test", limit=10, window_seconds=1)
        for _ in range(3):
            await limiter.acquire()  # sent; no response yet
        await asyncio.sleep(1.2)  # our window has ended
        await limiter.acquire()
        remaining = (await limiter.state()).remaining
        await redis.aclose()
        return remaining

    assert asyncio.run(run()) == 10 - 3 - 1
