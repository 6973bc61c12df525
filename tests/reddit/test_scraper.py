"""The incremental scraper: real asyncpraw against the simulator, real Redis."""

from __future__ import annotations

import asyncio
import re
import uuid
from typing import Any

import orjson
import pytest
from redis.asyncio import Redis as AsyncRedis

from sentiment.config import Settings
from sentiment.errors import (
    InvalidSubreddit,
    RedditAuthError,
    ServiceUnavailable,
    SubredditUnavailable,
)
from sentiment.reddit import scraper
from sentiment.reddit.client import make_reddit
from sentiment.reddit.ratelimit import SharedRateLimiter
from sentiment.reddit.scraper import ScrapeResult, scrape_subreddit
from sentiment.sinks.postgres import insert_batch


def _name(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


def scrape(
    settings: Settings,
    subreddit: str,
    marks: dict[str, Any] | None = None,
    *,
    redis_url: str | None = None,
    limiter_class: type[SharedRateLimiter] = SharedRateLimiter,
    **kwargs: Any,
):
    """One scrape with a fresh client, as a worker would run it (its limiter on
    `redis_url`, the test Redis unless given)."""

    async def run() -> tuple[ScrapeResult, int]:
        redis = AsyncRedis.from_url(redis_url or settings.redis_connection_url())
        limiter = limiter_class(
            redis,
            settings.reddit_client_id or "",
            limit=settings.reddit_ratelimit_requests,
            window_seconds=settings.reddit_ratelimit_window_seconds,
        )
        reddit = make_reddit(settings, limiter)
        try:
            result = await scrape_subreddit(reddit, subreddit, marks or {}, **kwargs)
            return result, reddit.requestor.requests_sent
        finally:
            await reddit.close()
            await redis.aclose()

    return asyncio.run(run())


def test_every_item_exactly_once_across_many_incremental_runs(settings, simulator, redis_client):
    name = _name("incr")
    simulator.add_subreddit(name, submissions=120, comments=250)
    marks: dict[str, str] = {}
    seen: list[str] = []
    for round_number in range(8):
        result, _ = scrape(settings, name, marks)
        seen += [f"{e.event_type}:{e.id}" for e in result.events]
        marks.update(result.watermarks)
        assert result.gaps == []
        simulator.add_items(name, submissions=round_number * 17, comments=round_number * 41)

    expected = [f"submission:{i['id']}" for i in simulator.items(name, "submissions")] + [
        f"comment:{i['id']}" for i in simulator.items(name, "comments")
    ]
    final, _ = scrape(settings, name, marks)
    seen += [f"{e.event_type}:{e.id}" for e in final.events]
    assert len(seen) == len(set(seen))
    assert sorted(seen) == sorted(expected)


def test_a_quiet_subreddit_costs_one_request_per_kind(settings, simulator, redis_client):
    name = _name("quiet")
    simulator.add_subreddit(name, submissions=30, comments=30)
    first, _ = scrape(settings, name)
    simulator.add_items(name, submissions=2, comments=3)

    result, _ = scrape(settings, name, first.watermarks)

    assert len(result.events) == 5
    assert result.requests == 2


def test_mapping_of_submissions_and_comments(settings, simulator, redis_client):
    name = _name("map")
    simulator.add_subreddit(name, submissions=3, comments=4)

    result, _ = scrape(settings, name)

    by_type = {
        t: [e for e in result.events if e.event_type == t] for t in ("submission", "comment")
    }
    assert len(by_type["submission"]) == 3 and len(by_type["comment"]) == 4
    for event in result.events:
        assert event.source == "reddit"
        assert event.source_id == name
        assert event.payload["id"] == event.id
        assert event.occurred_at.timestamp() == pytest.approx(event.payload["created_utc"])
        assert event.occurred_at.tzinfo is not None


def test_first_run_backfills_to_the_depth_and_reports_no_gap(settings, simulator, redis_client):
    name = _name("deep")
    simulator.add_subreddit(name, submissions=1500, comments=10)

    result, requests = scrape(settings, name, depth=1000)

    submissions = [e for e in result.events if e.event_type == "submission"]
    assert len(submissions) == 1000
    newest = sorted(
        (i["id"] for i in simulator.items(name, "submissions")), key=lambda i: int(i, 36)
    )
    assert {e.id for e in submissions} == set(newest[-1000:])
    assert result.gaps == []
    assert requests >= 11  # 10 pages of submissions, 1 of comments (and the token)


def test_a_watermark_beyond_the_listing_depth_is_reported_as_a_gap(
    settings, simulator, redis_client
):
    name = _name("gap")
    simulator.add_subreddit(name, submissions=20, comments=20)
    first, _ = scrape(settings, name)
    simulator.add_items(name, submissions=1200)

    result, _ = scrape(settings, name, first.watermarks)

    assert result.gaps == ["submission"]
    assert len([e for e in result.events if e.event_type == "submission"]) == 1000


def test_5xx_and_timeouts_are_retried(settings, simulator, redis_client):
    name = _name("flaky")
    simulator.add_subreddit(name, submissions=5, comments=5)
    simulator.inject_fault("status", status=503, count=4, subreddit=name)
    simulator.inject_fault("delay", delay=3.0, count=1, subreddit=name)
    quick = settings.model_copy(update={"reddit_timeout_seconds": 1.0})

    result, requests = scrape(quick, name)

    assert len(result.events) == 10
    # 4 answered 503, 1 timed out after 1 s, then one page of each kind.
    assert requests == 7


def test_a_dropped_connection_is_retried(settings, simulator, redis_client):
    name = _name("drop")
    simulator.add_subreddit(name, submissions=4, comments=0)
    simulator.inject_fault("drop", count=2, subreddit=name)

    result, _ = scrape(settings, name)

    assert len(result.events) == 4


def test_redis_gone_from_under_the_limiter_is_a_retryable_outage_not_a_reddit_error(
    settings, simulator
):
    simulator.add_subreddit(name := _name("noredis"), submissions=2)

    with pytest.raises(ServiceUnavailable, match="Redis") as caught:
        scrape(settings, name, redis_url="redis://127.0.0.1:1/0", attempts=2)  # nothing there
    assert caught.value.retryable


def test_redis_lost_while_a_response_is_noted_is_still_a_redis_outage(settings, simulator):
    # The limiter notes each response inside asyncprawcore's request, which wraps
    # whatever goes wrong there in its RequestException ("Reddit is unavailable").
    simulator.add_subreddit(name := _name("observe"), submissions=2)

    class LosesRedisAfterTheResponse(SharedRateLimiter):
        async def observe(self, headers: Any, *, status: int) -> None:
            raise ServiceUnavailable("Redis (127.0.0.1:1) is unreachable: the shared limiter")

    with pytest.raises(ServiceUnavailable, match="Redis") as caught:
        scrape(settings, name, limiter_class=LosesRedisAfterTheResponse, attempts=1)
    assert caught.value.retryable


def test_bad_credentials_give_a_clear_error(settings, simulator, redis_client):
    from pydantic import SecretStr

    wrong = settings.model_copy(update={"reddit_client_secret": SecretStr("wrong")})
    simulator.add_subreddit(name := _name("auth"), submissions=1)

    with pytest.raises(RedditAuthError, match="REDDIT_CLIENT_ID, REDDIT_CLIENT_SECRET"):
        scrape(wrong, name)


def test_a_token_request_refused_is_a_setup_error_not_the_subreddits(
    settings, simulator, redis_client, monkeypatch
):
    # Reddit answers 403 to a user agent or network it blocks, a wrong REDDIT_URL a
    # 404: neither says anything about the subreddit, which must not be marked failing.
    simulator.add_subreddit(name := _name("token"), submissions=1)
    monkeypatch.setattr(simulator, "issue_token", lambda *_: (403, b'{"error": 403}'))

    with pytest.raises(RedditAuthError, match=r"token request .* REDDIT_URL") as caught:
        scrape(settings, name)
    assert not caught.value.retryable


def test_a_request_timeout_408_is_retried(settings, simulator, redis_client):
    simulator.add_subreddit(name := _name("t408"), submissions=3, comments=0)
    # asyncprawcore tries a 408 three times itself; six, over the two listings, make
    # at least one of them run out of its first round.
    simulator.inject_fault("status", status=408, count=6, subreddit=name)

    result, _ = scrape(settings, name, attempts=3)

    assert len(result.events) == 3


def test_a_401_without_its_header_is_still_bad_credentials(settings, simulator, redis_client):
    # A proxy's 401 lacks Reddit's WWW-Authenticate; asyncprawcore then fails with a
    # KeyError of its own, which must not pass for an outage and be retried.
    simulator.add_subreddit(name := _name("h401"), submissions=1)
    simulator.inject_fault("status", status=401, count=None, subreddit=name)
    try:
        with pytest.raises(RedditAuthError, match="401"):
            scrape(settings, name, attempts=3)
    finally:
        simulator.clear_faults()


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("private", "is private (403)"),
        ("quarantined", "is quarantined (403)"),
        ("banned", "is banned (404)"),
    ],
)
def test_unreadable_subreddits_give_clear_errors(settings, simulator, redis_client, kind, message):
    name = _name(kind[:4])
    simulator.add_subreddit(name, kind=kind, submissions=2)

    with pytest.raises(SubredditUnavailable, match=re.escape(message)):
        scrape(settings, name)


def test_a_missing_subreddit_is_reported(settings, simulator, redis_client):
    with pytest.raises(SubredditUnavailable, match="missing or banned"):
        scrape(settings, _name("nothere"))


def test_an_invalid_name_is_refused_before_any_request(settings, simulator, redis_client):
    before = sum(simulator.stats.requests.values())
    with pytest.raises(InvalidSubreddit, match="not a valid subreddit name"):
        scrape(settings, "../etc/passwd")
    assert sum(simulator.stats.requests.values()) == before


def test_adversarial_content_is_scraped_and_stored(settings, simulator, redis_client, db):
    name = _name("evil")
    simulator.add_subreddit(name)
    simulator.add_items(name, submissions=14, comments=14, adversarial=True)

    result, _ = scrape(settings, name)
    stored = insert_batch(result.events)

    assert len(result.events) == 28 and result.malformed == 0
    assert stored.rejected == 0 and len(stored.new) == 28
    texts = [str(e.payload) for e in result.events]
    assert not any("\x00" in t for t in texts)
    assert any("\ufffd" in t for t in texts)  # the lone surrogate, replaced
    assert any(
        len(e.payload.get("body", "") or e.payload.get("selftext", "")) >= 200_000
        for e in result.events
    )


def test_the_fast_path_gives_what_the_general_path_gives(
    settings, simulator, redis_client, monkeypatch
):
    """Pages msgspec splits into raw items, and pages it cannot vouch for (a NUL,
    a lone surrogate: decoded and cleaned instead), give the same events."""
    name = _name("paths")
    simulator.add_subreddit(name, submissions=150, comments=150)
    simulator.add_items(name, submissions=7, comments=7, adversarial=True)
    simulator.add_items(name, submissions=60, comments=60)
    pages = {"fast": 0, "general": 0}
    fast_listing = scraper._fast_listing

    def counted(body: bytes) -> Any:
        page = fast_listing(body)
        pages["fast" if page is not None else "general"] += 1
        return page

    monkeypatch.setattr(scraper, "_fast_listing", counted)
    fast, _ = scrape(settings, name)
    monkeypatch.setattr(scraper, "_fast_listing", lambda body: None)
    general, _ = scrape(settings, name)

    assert pages["fast"] >= 2 and pages["general"] >= 2  # both paths were taken
    assert len(fast.events) == 2 * (150 + 7 + 60)
    assert fast.events == general.events  # ids, times, kinds and payloads alike
    assert [orjson.loads(e.payload_json) for e in fast.events] == [
        orjson.loads(e.payload_json) for e in general.events
    ]
    assert (fast.watermarks, fast.malformed, fast.gaps) == (
        general.watermarks, general.malformed, general.gaps,
    )  # fmt: skip
    stored = insert_batch(fast.events)
    assert stored.rejected == 0 and len(stored.new) == len(fast.events)


class _OneKindFails:
    """/new is private; /comments answers, slowly and empty."""

    async def request(self, method: str, path: str, params: dict[str, Any]) -> Any:
        if path.endswith("/new"):
            raise SubredditUnavailable("r/somesub is private (403)")
        await asyncio.sleep(0.2)
        return {"kind": "Listing", "data": {"children": [], "after": None}}


def test_a_kind_that_fails_leaves_no_other_kind_running():
    # A worker's loop lives on between tasks: a listing left running there would
    # page on in the next task, after the scrape lock was released.
    loop = asyncio.new_event_loop()
    try:
        with pytest.raises(SubredditUnavailable):
            loop.run_until_complete(scrape_subreddit(_OneKindFails(), "somesub", {}, attempts=1))
        assert not asyncio.all_tasks(loop)
    finally:
        loop.close()
