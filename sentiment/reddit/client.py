"""Reddit clients built from Settings, and Reddit's errors in our own terms.

The async client is asyncpraw with two changes, both in its requestor:

* it takes a token from the shared limiter before every HTTP request (token
  requests excepted) and feeds every response's rate-limit headers back to
  it before the response is used;
* its aiohttp session decodes JSON bodies with orjson, into the objects
  `json.loads` would give (`sentiment.reddit.jsondecode`); inside
  `jsondecode.raw_body` a listing's body comes back as bytes, for the
  scraper to split itself.

asyncpraw keeps its authentication, token refresh and 5xx retries.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import asyncpraw
import asyncprawcore
import praw

from sentiment.config import Settings
from sentiment.errors import (
    RedditAuthError,
    RedditError,
    RedditRateLimited,
    RedditUnavailable,
    SubredditUnavailable,
)
from sentiment.reddit.jsondecode import OrjsonResponse
from sentiment.reddit.ratelimit import SharedRateLimiter

__all__ = ["CountingRequestor", "innermost", "make_reddit", "make_sync_reddit", "translate_error"]


_TOKEN_PATH = "/api/v1/access_token"  # noqa: S105 - a URL path, not a password


class CountingRequestor(asyncprawcore.Requestor):
    """An asyncprawcore Requestor that obeys the shared limiter and counts requests."""

    response_class: type[aiohttp.ClientResponse] = OrjsonResponse

    def __init__(self, *args: Any, limiter: SharedRateLimiter | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limiter = limiter
        self.requests_sent = 0

    async def _ensure_session(self) -> None:
        # asyncprawcore's own session, with our response class.
        if self._http is None or self._http.closed:
            self._http = aiohttp.ClientSession(
                headers=self.headers,
                timeout=aiohttp.ClientTimeout(total=None),
                response_class=self.response_class,
            )

    @asynccontextmanager
    async def request(self, *args: Any, **kwargs: Any) -> AsyncIterator[aiohttp.ClientResponse]:
        url = str(args[1] if len(args) > 1 else kwargs.get("url", ""))
        if url.endswith(_TOKEN_PATH):  # Reddit does not count token requests against the budget
            async with super().request(*args, **kwargs) as response:
                yield response
            return
        if self.limiter is not None:
            await self.limiter.acquire()
        self.requests_sent += 1
        # asyncprawcore always passes its import-time default (16 s, PRAWCORE_TIMEOUT)
        # and ignores asyncpraw's `timeout` setting; ours is the one that counts.
        kwargs["timeout"] = self.timeout
        headers: dict[str, str] | None = None
        status = 0
        try:
            async with super().request(*args, **kwargs) as response:
                status = response.status
                headers = {k.lower(): v for k, v in response.headers.items()}
                if self.limiter is not None:
                    # Correct the shared window before the caller reads the body:
                    # the sooner other processes learn of a 429, the better.
                    await self.limiter.observe(headers, status=status)
                if 400 <= status < 500:
                    # asyncprawcore raises on these after the response is released;
                    # reading now keeps the body (Reddit's "reason") for the error.
                    await response.read()
                yield response
        except BaseException:
            if self.limiter is not None and headers is None:
                await self.limiter.observe(None, status=status)  # frees our in-flight slot
            raise


def _common_config(settings: Settings) -> dict[str, Any]:
    if not settings.has_reddit_credentials:
        raise RedditAuthError(
            "REDDIT_CLIENT_ID and REDDIT_CLIENT_SECRET are not set: create a 'script' app at "
            "https://www.reddit.com/prefs/apps, or run against the simulator (`sentiment run`)"
        )
    assert settings.reddit_client_secret is not None
    config: dict[str, Any] = {
        "client_id": settings.reddit_client_id,
        "client_secret": settings.reddit_client_secret.get_secret_value(),
        "user_agent": settings.reddit_user_agent,
        "oauth_url": settings.reddit_oauth_url,
        "reddit_url": settings.reddit_url,
        "timeout": settings.reddit_timeout_seconds,
        "check_for_updates": False,
    }
    if settings.reddit_username and settings.reddit_password:
        config["username"] = settings.reddit_username
        config["password"] = settings.reddit_password.get_secret_value()
    return config


def make_reddit(settings: Settings, limiter: SharedRateLimiter | None) -> asyncpraw.Reddit:
    """An asyncpraw client: application-only OAuth, or the password grant when a user is set."""
    config = _common_config(settings)
    return asyncpraw.Reddit(
        requestor_class=CountingRequestor,
        requestor_kwargs={"limiter": limiter, "timeout": settings.reddit_timeout_seconds},
        **config,
    )


def make_sync_reddit(settings: Settings) -> praw.Reddit:
    """A praw client, for short synchronous checks (`sentiment reddit check`)."""
    return praw.Reddit(check_for_async=False, **_common_config(settings))


def innermost(exc: BaseException) -> BaseException:
    """The error under asyncprawcore's RequestException wrappers (one per retry)."""
    while (inner := getattr(exc, "original_exception", None)) is not None:
        exc = inner
    return exc


async def translate_error(  # noqa: PLR0911 - one return per kind of error reads best
    exc: BaseException, subreddit: str
) -> RedditError:
    """Turn an asyncprawcore/prawcore error into ours, with what to do about it."""
    response = getattr(exc, "response", None)
    status = getattr(response, "status", None) or getattr(response, "status_code", None)
    url = str(getattr(response, "url", ""))
    reason = await _reason(exc)
    name = type(exc).__name__
    # A 401 without Reddit's WWW-Authenticate header (a proxy's) fails inside
    # asyncprawcore with KeyError(401), wrapped: still bad credentials, not an outage.
    without_header = isinstance(inner := innermost(exc), KeyError) and inner.args == (401,)
    if name in {"OAuthException", "InvalidToken"} or status == 401 or without_header:
        return RedditAuthError(
            "Reddit refused the credentials (401): check REDDIT_CLIENT_ID, REDDIT_CLIENT_SECRET"
            " (and REDDIT_USERNAME / REDDIT_PASSWORD if set)"
        )
    if (
        status is not None
        and 400 <= status < 500
        and status not in {408, 429}
        and _TOKEN_PATH in url
    ):
        # About the set-up, not the subreddit: a wrong REDDIT_URL, or a user agent or
        # network that Reddit blocks (it answers those 403).
        return RedditAuthError(
            f"Reddit refused the token request ({status}) at {url}: check REDDIT_URL,"
            " REDDIT_USER_AGENT (Reddit blocks generic ones) and the credentials"
        )
    if name == "TooManyRequests" or status == 429:
        headers = getattr(response, "headers", {}) or {}
        retry_after = float(headers.get("x-ratelimit-reset") or headers.get("retry-after") or 60)
        return RedditRateLimited(f"Reddit rate limit hit while scraping r/{subreddit}", retry_after)
    if name in {"Forbidden", "InsufficientScope"} or status == 403:
        kind = reason or "private"
        return SubredditUnavailable(
            f"r/{subreddit} is {kind} (403): drop it from SUBREDDITS "
            "or use an account that can read it"
        )
    if name in {"NotFound", "Redirect", "UnavailableForLegalReasons"} or status in {404, 302, 451}:
        kind = "banned" if reason == "banned" else "missing or banned"
        return SubredditUnavailable(f"r/{subreddit} is {kind} ({status}): drop it from SUBREDDITS")
    # 408 is a request timeout: asyncprawcore retries it too, then raises it bare.
    if (
        name in {"ServerError", "RequestException", "BadJSON"}
        or (status or 0) >= 500
        or status == 408
    ):
        return RedditUnavailable(f"Reddit is unavailable ({name}) while scraping r/{subreddit}")
    return RedditError(f"Reddit answered {status or name} while scraping r/{subreddit}")


async def _reason(exc: BaseException) -> str | None:
    """Reddit says why in the body: {"reason": "private" | "banned" | "quarantined"}."""
    response = getattr(exc, "response", None)
    if response is None:
        return None
    try:
        body = await response.json(content_type=None)
    except Exception:  # noqa: BLE001 - the body is a courtesy; the status decides
        return None
    return body.get("reason") if isinstance(body, dict) else None
