"""Incremental scraping of one subreddit: new submissions and new comments.

Each kind has a subreddit-wide listing, newest first (`/r/<sub>/new`,
`/r/<sub>/comments`). We page with `after` until we meet the watermark, the
newest item already stored; Reddit ids are sequential base36, so "older than
the watermark" is an integer comparison. Reddit stops every listing at about
1,000 items: when we get there without meeting the watermark, items were
missed (a gap), which we count and log so the subreddit can be scraped more
often.

The scraper knows nothing of Celery or SQL. It returns the events and the
watermarks it *proposes*; the caller commits them only after the events are
stored, so a crash in between re-fetches rather than loses.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any, Literal

import asyncpraw
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_random_exponential

from sentiment.config import valid_subreddit
from sentiment.dto import RawEventDTO
from sentiment.errors import InvalidSubreddit, RedditError
from sentiment.reddit.client import translate_error
from sentiment.reddit.ids import base36_to_int

__all__ = ["KINDS", "PAGE_SIZE", "Kind", "KindResult", "ScrapeResult", "scrape_subreddit"]

log = logging.getLogger(__name__)

Kind = Literal["submission", "comment"]
KINDS: tuple[Kind, ...] = ("submission", "comment")
_LISTING = {"submission": "new", "comment": "comments"}
PAGE_SIZE = 100  # Reddit's maximum


@dataclass
class KindResult:
    """What one listing gave: items newer than the watermark, newest first."""

    events: list[RawEventDTO] = field(default_factory=list)
    requests: int = 0
    gap: bool = False
    malformed: int = 0
    newest_id: str | None = None


@dataclass
class ScrapeResult:
    """Everything one scrape learned about a subreddit."""

    subreddit: str
    events: list[RawEventDTO]
    requests: int
    gaps: list[str]
    malformed: int
    watermarks: dict[str, str]  # kind -> newest id seen, to commit once stored

    def summary(self) -> dict[str, Any]:
        return {
            "subreddit": self.subreddit,
            "fetched": len(self.events),
            "requests": self.requests,
            "gaps": len(self.gaps),
            "malformed": self.malformed,
        }


async def scrape_subreddit(
    reddit: asyncpraw.Reddit,
    subreddit: str,
    watermarks: dict[str, str | None],
    *,
    depth: int = 1000,
    attempts: int = 5,
) -> ScrapeResult:
    """Fetch every submission and comment newer than `watermarks` (kind -> id).

    Without a watermark (first run) it backfills up to `depth` items a kind.
    """
    try:
        name = valid_subreddit(subreddit)
    except ValueError as exc:
        raise InvalidSubreddit(str(exc)) from None
    results = await asyncio.gather(
        *(
            _scrape_kind(reddit, name, kind, watermarks.get(kind), depth=depth, attempts=attempts)
            for kind in KINDS
        )
    )
    by_kind = dict(zip(KINDS, results, strict=True))
    for kind, result in by_kind.items():
        if result.gap:
            log.warning(
                "gap in r/%s %ss: the watermark was not reached within %d items; "
                "scrape it more often",
                name,
                kind,
                depth,
                extra={"subreddit": name, "kind": kind},
            )
    return ScrapeResult(
        subreddit=name,
        events=[e for r in results for e in r.events],
        requests=sum(r.requests for r in results),
        gaps=[k for k, r in by_kind.items() if r.gap],
        malformed=sum(r.malformed for r in results),
        watermarks={k: r.newest_id for k, r in by_kind.items() if r.newest_id is not None},
    )


async def _scrape_kind(
    reddit: asyncpraw.Reddit,
    subreddit: str,
    kind: Kind,
    watermark: str | None,
    *,
    depth: int,
    attempts: int,
) -> KindResult:
    result = KindResult()
    floor = base36_to_int(watermark) if watermark else None
    seen: set[str] = set()
    after: str | None = None
    listed = 0
    while True:
        page = await _fetch_page(reddit, subreddit, kind, after, attempts)
        result.requests += 1
        children = page.get("children") or []
        reached = False
        for child in children:
            listed += 1
            item = child.get("data") if isinstance(child, dict) else None
            item_id = item.get("id") if isinstance(item, dict) else None
            if not isinstance(item, dict) or not isinstance(item_id, str) or not item_id.isalnum():
                result.malformed += 1
                continue
            number = base36_to_int(item_id.lower())
            if floor is not None and number <= floor:
                # Stickied posts can sit out of order; only a regular item proves
                # we have reached what we already have.
                reached = reached or not item.get("stickied", False)
                continue
            if item_id in seen:  # repeated across a page boundary
                continue
            seen.add(item_id)
            event = _to_event(item, subreddit, kind)
            if event is None:
                result.malformed += 1
                continue
            result.events.append(event)
            if result.newest_id is None or number > base36_to_int(result.newest_id):
                result.newest_id = event.id
        after = page.get("after")
        if reached or not after or not children or listed >= depth:
            result.gap = floor is not None and not reached
            return result


async def _fetch_page(
    reddit: asyncpraw.Reddit, subreddit: str, kind: Kind, after: str | None, attempts: int
) -> dict[str, Any]:
    """One listing page as raw JSON, retried with backoff and jitter when Reddit falters."""
    params: dict[str, str | int] = {"limit": PAGE_SIZE, "raw_json": 1}
    if after:
        params["after"] = after
    path = f"r/{subreddit}/{_LISTING[kind]}"
    async for attempt in AsyncRetrying(
        retry=retry_if_exception(lambda exc: getattr(exc, "retryable", False)),
        wait=wait_random_exponential(multiplier=0.5, max=20),
        stop=stop_after_attempt(attempts),
        reraise=True,
    ):
        with attempt:
            try:
                body = await reddit.request(method="GET", path=path, params=params)
            except RedditError:
                raise
            except Exception as exc:  # asyncprawcore's errors, translated at the boundary
                raise await translate_error(exc, subreddit) from exc
    if not isinstance(body, dict) or not isinstance(body.get("data"), dict):
        raise RedditError(f"r/{subreddit}/{_LISTING[kind]} did not return a listing")
    return body["data"]  # type: ignore[no-any-return]


def _to_event(item: dict[str, Any], subreddit: str, kind: Kind) -> RawEventDTO | None:
    try:
        return RawEventDTO.from_reddit(item, subreddit, kind)
    except (KeyError, TypeError, ValueError, OverflowError, OSError):
        log.info("skipped a malformed %s in r/%s", kind, subreddit, extra={"subreddit": subreddit})
        return None
