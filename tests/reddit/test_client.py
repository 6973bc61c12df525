"""CountingRequestor: responses decoded by orjson, exactly as json.loads would."""

from __future__ import annotations

import asyncio
import gc
import json
import math
import uuid
from typing import Any, ClassVar

import aiohttp
import pytest
from redis.asyncio import Redis as AsyncRedis

from sentiment.config import Settings
from sentiment.errors import RedditAuthError, RedditRateLimited, RedditUnavailable
from sentiment.reddit import jsondecode
from sentiment.reddit.client import make_reddit, translate_error
from sentiment.reddit.ratelimit import SharedRateLimiter
from sentiment.reddit.scraper import scrape_subreddit
from sentiment.reddit.simulator import Simulator


def _name(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


def run_strictly(coro: Any) -> Any:
    """asyncio.run, failing on anything the loop reports (a task's exception never retrieved,
    a task destroyed while pending)."""
    reported: list[dict[str, Any]] = []
    loop = asyncio.new_event_loop()
    loop.set_exception_handler(lambda _, context: reported.append(context))
    try:
        result = loop.run_until_complete(coro)
        gc.collect()  # a task that ended with an unretrieved exception reports on collection
        loop.run_until_complete(asyncio.sleep(0))
    finally:
        loop.close()
    gc.collect()
    assert reported == []
    return result


def _limiter(
    settings: Settings,
    redis: AsyncRedis,
    cls: type[SharedRateLimiter] = SharedRateLimiter,
    limit: int | None = None,
) -> Any:
    """A limiter of `cls` on a client id of its own."""
    return cls(
        redis,
        _name("client-test"),
        limit=limit or settings.reddit_ratelimit_requests,
        window_seconds=settings.reddit_ratelimit_window_seconds,
    )


# -- orjson, through a real scrape ------------------------------------------------------------

# Fields no generated item has; each one is something orjson would decode differently.
HAZARDS = {
    "score": 2**70,
    "ups": -(2**63) - 1,
    "downs": 2**64,
    "upvote_ratio": math.nan,
    "gilded": math.inf,
    "total_awards_received": -math.inf,
    "author_flair_text": "lone \udc00 low",
}


def _with_hazards(simulator: Simulator, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """Serve r/<name>'s items with HAZARDS added, encoded as Reddit would (json, ASCII)."""
    page, target = simulator.page, simulator.subreddit(name)

    def hazardous_page(sub: Any, kind: Any, *args: Any) -> tuple[list[bytes], Any, Any]:
        children, after, before = page(sub, kind, *args)
        if sub is not target:
            return children, after, before
        things = [json.loads(child) for child in children]
        for thing in things:
            thing["data"].update(HAZARDS)
        return [json.dumps(t).encode() for t in things], after, before

    monkeypatch.setattr(simulator, "page", hazardous_page)


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in (k, *_strings(v))]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def test_a_scrape_decodes_every_page_as_json_loads_would(
    settings, simulator, redis_client, monkeypatch
):
    plain, evil = _name("plain"), _name("evil")
    simulator.add_subreddit(plain, submissions=150, comments=20)
    simulator.add_subreddit(evil, submissions=150, comments=20)
    simulator.add_items(evil, submissions=14, comments=14, adversarial=True)  # NUL, 200 KB, ...
    _with_hazards(simulator, monkeypatch, evil)
    fell_back: list[bool] = []  # per body decoded: by json rather than orjson

    class CountingJSON:
        calls = 0

        @classmethod
        def loads(cls, text: str) -> Any:
            cls.calls += 1
            return json.loads(text)

    real_decode = jsondecode.decode_json

    def watched_decode(body: bytes) -> Any:
        before = CountingJSON.calls
        value = real_decode(body)
        fell_back.append(CountingJSON.calls > before)
        return value

    monkeypatch.setattr(jsondecode, "json", CountingJSON)
    monkeypatch.setattr(jsondecode, "decode_json", watched_decode)

    async def run(response_class: type[aiohttp.ClientResponse]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        redis = AsyncRedis.from_url(settings.redis_connection_url())
        reddit = make_reddit(settings, _limiter(settings, redis))
        reddit.requestor.response_class = response_class  # before its session exists
        try:
            for name in (plain, evil):
                pages = out[f"{name} pages"] = []
                for listing in ("new", "comments"):
                    after = None
                    while True:
                        params = {"limit": 100, "raw_json": 1} | ({"after": after} if after else {})
                        body = await reddit.request(method="GET", path=f"r/{name}/{listing}",
                                                    params=params)  # fmt: skip
                        pages.append(body)
                        after = body["data"]["after"]
                        if not after:
                            break
                result = await scrape_subreddit(reddit, name, {})
                out[f"{name} events"] = [e.model_dump() for e in result.events]
        finally:
            await reddit.close()
            await redis.aclose()
        return out

    ours = run_strictly(run(jsondecode.OrjsonResponse))
    decoded = list(fell_back)
    theirs = run_strictly(run(aiohttp.ClientResponse))  # aiohttp's own json.loads
    assert fell_back == decoded, "aiohttp's response class does not use decode_json"

    assert ours.keys() == theirs.keys()
    for key in ours:
        assert repr(ours[key]) == repr(theirs[key]), key  # ints stay ints, NaN stays NaN
    assert len(ours[f"{plain} events"]) == 170
    assert len(ours[f"{evil} events"]) == 164 + 34
    pages = ours[f"{evil} pages"]
    assert len(pages) == 3
    text = "".join(_strings(pages))
    assert "\ud800" in text and "\udc00" in text and "\x00" in text and "🚀" in text
    assert max(map(len, _strings(pages))) >= 200_000
    assert all(
        child["data"]["score"] == 2**70 and math.isnan(child["data"]["upvote_ratio"])
        for page in pages
        for child in page["data"]["children"]
    )
    # Ordinary pages went to orjson, hazardous ones to json: both paths were compared.
    assert False in decoded and True in decoded


# -- the limiter's updates ----------------------------------------------------------------------


class _TokenRefused(Exception):
    """asyncprawcore's bare ResponseException for a token request, as auth._post raises it."""

    def __init__(self, status: int) -> None:
        class Response:
            url = "https://www.reddit.com/api/v1/access_token"
            headers: ClassVar[dict[str, str]] = {"retry-after": "7"}

            async def json(self, content_type: object = None) -> object:
                raise ValueError("not JSON")

        Response.status = status  # type: ignore[attr-defined]
        self.response = Response()


@pytest.mark.parametrize(
    ("status", "expected", "retryable"),
    [(403, RedditAuthError, False), (404, RedditAuthError, False),
     (429, RedditRateLimited, True), (408, RedditUnavailable, True)],
)  # fmt: skip
def test_a_refused_token_request_is_a_set_up_error_unless_it_says_try_later(
    status, expected, retryable
):
    error = asyncio.run(translate_error(_TokenRefused(status), "stocks"))

    assert type(error) is expected
    assert error.retryable is retryable
