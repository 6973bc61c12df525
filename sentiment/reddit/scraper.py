"""Incremental scraping of one subreddit: new submissions and new comments.

Each kind has a subreddit-wide listing, newest first (`/r/<sub>/new`,
`/r/<sub>/comments`). We page with `after` until we meet the watermark, the
newest item already stored; Reddit ids are sequential base36, so "older than
the watermark" is an integer comparison. Reddit stops every listing at about
1,000 items: when we get there without meeting the watermark, items were
missed (a gap), which we count and log so the subreddit can be scraped more
often. `depth` (SCRAPE_BACKFILL_DEPTH) bounds only a first scrape; with a
watermark we read as deep as Reddit lists. `not_before` (now minus
RETENTION_DAYS) is a floor in time: older items are skipped and counted, and
paging stops at the first one, so a scrape without a watermark never stores
again what retention dropped.

Reddit builds its listings asynchronously, so an item can show up after a
newer one, which may already be the watermark: it would be below it for good.
So on the page that reaches the watermark, the items created up to `lookback`
seconds before it are handed back as well (`rechecked`, no extra request),
and the sink, which stores each event once, keeps whichever of them is new.

Reddit's cursor is an item: if the `after` item is removed between two pages,
the next page comes back empty. We then page on from the next-older item of
the page before (a few tries). If none is left, we cannot see down to the
watermark, so we propose none: the next scrape starts from the old one again
(what this one stored is skipped as duplicates), rather than jump over what
lies below.

The scraper knows nothing of Celery or SQL. It returns the events and the
watermarks it *proposes*; the caller commits them only after the events are
stored, so a crash in between re-fetches rather than loses.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

import asyncpraw
import msgspec
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_random_exponential

from sentiment.config import valid_subreddit
from sentiment.dto import RawEventDTO, canonical_id, to_utc
from sentiment.errors import InvalidSubreddit, RedditError, RedditUnavailable, ServiceUnavailable
from sentiment.reddit.client import innermost, translate_error
from sentiment.reddit.ids import base36_to_int
from sentiment.reddit.jsondecode import decode_json, no_huge_integers, raw_body

__all__ = [
    "KINDS", "LISTING_DEPTH", "PAGE_SIZE", "Kind", "KindResult", "ScrapeResult", "scrape_subreddit",
]  # fmt: skip

log = logging.getLogger(__name__)

Kind = Literal["submission", "comment"]
KINDS: tuple[Kind, ...] = ("submission", "comment")
_LISTING = {"submission": "new", "comment": "comments"}
_FULLNAME = {"submission": "t3_", "comment": "t1_"}
PAGE_SIZE = 100  # Reddit's maximum
LISTING_DEPTH = 1000  # where Reddit stops a listing
_CURSOR_TRIES = 3  # older items tried as `after` when Reddit lost the cursor


@dataclass
class KindResult:
    """What one listing gave: items newer than the watermark, newest first."""

    events: list[RawEventDTO] = field(default_factory=list)
    requests: int = 0
    gap: bool = False
    malformed: int = 0
    too_old: int = 0  # older than `not_before`
    newest_id: str | None = None
    rechecked: list[RawEventDTO] = field(default_factory=list)  # at or below the watermark


@dataclass
class ScrapeResult:
    """Everything one scrape learned about a subreddit."""

    subreddit: str
    events: list[RawEventDTO]
    requests: int
    gaps: list[str]
    malformed: int
    watermarks: dict[str, str]  # kind -> newest id seen, to commit once stored
    too_old: int = 0  # listed, but older than `not_before`: skipped
    # Listed at or just below the watermark (`lookback`): stored already unless
    # Reddit listed them late; the sink tells.
    rechecked: list[RawEventDTO] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {
            "subreddit": self.subreddit,
            "fetched": len(self.events),
            "requests": self.requests,
            "gaps": len(self.gaps),
            "malformed": self.malformed,
            "too_old": self.too_old,
            "rechecked": len(self.rechecked),
        }


async def scrape_subreddit(
    reddit: asyncpraw.Reddit,
    subreddit: str,
    watermarks: dict[str, str | None],
    *,
    depth: int = 1000,
    attempts: int = 5,
    not_before: datetime | None = None,
    lookback: float = 0.0,
) -> ScrapeResult:
    """Fetch every submission and comment newer than `watermarks` (kind -> id)
    and, if given, created at or after `not_before`; and, as `rechecked`, those
    created up to `lookback` seconds before the watermark, on the page reaching it.

    Without a watermark (first run) it backfills up to `depth` items a kind.
    """
    try:
        name = valid_subreddit(subreddit)
    except ValueError as exc:
        raise InvalidSubreddit(str(exc)) from None
    kinds = [
        asyncio.ensure_future(
            _scrape_kind(
                reddit,
                name,
                kind,
                watermarks.get(kind),
                depth=depth,
                attempts=attempts,
                not_before=not_before,
                lookback=lookback,
            )
        )
        for kind in KINDS
    ]
    try:
        results = await asyncio.gather(*kinds)
    except BaseException:
        # gather leaves the other kind running: in a worker's loop, which lives on
        # between tasks, it would page on during the next task, unlocked.
        for task in kinds:
            task.cancel()
        await asyncio.gather(*kinds, return_exceptions=True)
        raise
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
        too_old=sum(r.too_old for r in results),
        rechecked=[e for r in results for e in r.rechecked],
    )


async def _scrape_kind(
    reddit: asyncpraw.Reddit,
    subreddit: str,
    kind: Kind,
    watermark: str | None,
    *,
    depth: int,
    attempts: int,
    not_before: datetime | None,
    lookback: float,
) -> KindResult:
    floor = base36_to_int(watermark) if watermark else None
    reader = _PageReader(subreddit, kind, floor, not_before, lookback)
    result = reader.result
    cap = depth if floor is None else max(depth, LISTING_DEPTH)
    after: str | None = None
    cursors: list[str] = []  # the last page's items but its last, oldest last
    tries = 0
    while True:
        page = await _fetch_page(reddit, subreddit, kind, after, attempts)
        result.requests += 1
        children = page.children
        if not children and after is not None:
            # The cursor was removed since the last page (or the listing ended
            # right after a full page): go on from the next-older item we saw.
            if cursors and tries < _CURSOR_TRIES:
                after, tries = cursors.pop(), tries + 1
                continue
            log.warning(
                "r/%s %ss: lost Reddit's cursor %d items down; the next scrape "
                "starts from the same watermark", subreddit, kind, reader.listed,
                extra={"subreddit": subreddit, "kind": kind},
            )  # fmt: skip
            result.newest_id = None  # propose none: what lies below is unseen
            return result
        reached, page_ids = reader.take(children)
        after = page.after
        cursors = [_FULLNAME[kind] + item_id for item_id in page_ids[:-1]]
        if reached:
            return result
        # Reddit ends every listing near LISTING_DEPTH items: only a listing that
        # ends well short of that ended above the watermark with nothing missed.
        if reader.listed >= cap or (not after and reader.listed > LISTING_DEPTH - PAGE_SIZE):
            result.gap = floor is not None  # what lies below is beyond the listing
            return result
        if not after:
            return result


@dataclass
class _PageReader:
    """One kind's listing, page by page: keeps what is new, knows where to stop."""

    subreddit: str
    kind: Kind
    floor: int | None  # the watermark as a number
    not_before: datetime | None
    lookback: float  # seconds below the watermark's time to recheck
    result: KindResult = field(default_factory=KindResult)
    seen: set[str] = field(default_factory=set)
    listed: int = 0
    reference: float | None = None  # created_utc of the first item at or below the floor
    newest: int = -1  # the newest kept item's id as a number

    def take(self, children: list[Any]) -> tuple[bool, list[str]]:
        """Keep a page's new items. Return whether it reached what needs no reading
        (the watermark, or an item older than `not_before`), and its ids in order."""
        result = self.result
        reached = False
        page_ids: list[str] = []
        for child in children:
            self.listed += 1
            raw: msgspec.Raw | None = None  # the item's JSON, on the fast path
            if isinstance(child, _Child):
                raw = child.data
                try:
                    item: Any = _HEAD_DECODER.decode(raw)
                except msgspec.DecodeError:  # fields that need the general path
                    item, raw = decode_json(bytes(raw), lenient=True), None
            else:
                item = child.get("data") if isinstance(child, dict) else None
            item_id = item.get("id") if isinstance(item, dict | _Head) else None
            if not (
                isinstance(item, dict | _Head)
                and isinstance(item_id, str)
                and item_id.isascii()
                and item_id.isalnum()
            ):
                result.malformed += 1
                continue
            page_ids.append(item_id.lower())
            number = base36_to_int(page_ids[-1])
            if self.floor is not None and number <= self.floor:
                # Stickied posts can sit out of order; only a regular item proves
                # we have reached what we already have.
                if not item.get("stickied", False):
                    reached = True
                    self._recheck(item, raw, item_id)
                continue
            if item_id in self.seen:  # repeated across a page boundary
                continue
            self.seen.add(item_id)
            event = _to_event(item, raw, self.subreddit, self.kind)
            if event is None:
                result.malformed += 1
                continue
            if self.not_before is not None and event.occurred_at < self.not_before:
                result.too_old += 1  # newest first: what follows is older still
                reached = reached or not item.get("stickied", False)
                continue
            result.events.append(event)
            if number > self.newest:
                self.newest, result.newest_id = number, event.id
        return reached, page_ids

    def _recheck(self, item: dict[str, Any] | _Head, raw: msgspec.Raw | None, item_id: str) -> None:
        """Hand on an item at or below the watermark if it was created within
        `lookback` seconds of the first such item (the watermark, most often)."""
        created = item.get("created_utc")
        if not self.lookback or not isinstance(created, int | float) or item_id in self.seen:
            return
        if self.reference is None:
            self.reference = created
        if created < self.reference - self.lookback:
            return
        self.seen.add(item_id)
        event = _to_event(item, raw, self.subreddit, self.kind)
        if event is not None and (self.not_before is None or event.occurred_at >= self.not_before):
            self.result.rechecked.append(event)


@dataclass
class _Page:
    """One listing page: its children (`_Child`, or decoded JSON on the general
    path) and Reddit's cursor to the next page."""

    children: list[Any]
    after: Any


async def _fetch_page(
    reddit: asyncpraw.Reddit, subreddit: str, kind: Kind, after: str | None, attempts: int
) -> _Page:
    """One listing page, retried with backoff and jitter when Reddit falters."""
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
                with raw_body(path):  # the body's bytes: `_read_listing` decodes them
                    body = await reddit.request(method="GET", path=path, params=params)
            except (RedditError, ServiceUnavailable):  # ours already (the limiter's Redis)
                raise
            except Exception as exc:  # asyncprawcore's errors, translated at the boundary
                if isinstance(inner := innermost(exc), ServiceUnavailable):
                    raise inner from exc  # the limiter's Redis, after the response
                raise await translate_error(exc, subreddit) from exc
            page = _read_listing(body, subreddit)
    if page is None:
        raise RedditError(f"r/{subreddit}/{_LISTING[kind]} did not return a listing")
    return page


# -- decoding a listing page ---------------------------------------------------
#
# A page is ~100 items of ~2 KB of JSON, and an event needs its item as JSON
# bytes (for the database, the batch blob and the CSV) far more often than as
# a dict. So the fast path never builds the dicts: msgspec splits the page
# into each item's raw bytes and reads from each only the three fields the
# scraper needs; the event keeps the bytes as its payload JSON and decodes
# them only if something reads `payload` (`RawEventDTO.from_trusted_json`).
# The bytes go to the database as Reddit sent them, so the fast path takes
# only pages it can vouch for: valid UTF-8, no escaped NUL (PostgreSQL refuses
# it), no lone surrogate (msgspec refuses those), no integer beyond 64 bits
# (`payload` decodes like `json` would), no line break between tokens (see
# `_fast_listing`). Any other page, and any item whose three fields are not
# what they should be, goes the general way: decoded JSON, checked and cleaned
# by `RawEventDTO.from_reddit`.


class _Child(msgspec.Struct):
    data: msgspec.Raw


class _ListingData(msgspec.Struct):
    children: list[_Child] = msgspec.field(default_factory=list)
    after: str | None = None


class _Listing(msgspec.Struct):
    data: _ListingData


class _Head(msgspec.Struct):
    """What the scraper reads of an item; msgspec skips the rest unread."""

    id: str
    created_utc: float
    stickied: bool = False

    def get(self, key: str, default: Any = None) -> Any:  # as on a decoded item
        return getattr(self, key, default)


_LISTING_DECODER = msgspec.json.Decoder(_Listing)
_HEAD_DECODER = msgspec.json.Decoder(_Head)
_NUL_ESCAPE = b"\\u0000"


def _read_listing(body: Any, subreddit: str) -> _Page | None:
    """A listing page from a response body (bytes, or JSON asyncprawcore decoded);
    None when the body is not a listing."""
    if isinstance(body, bytes):
        page = _fast_listing(body)
        if page is not None:
            return page
        try:
            body = decode_json(body, lenient=True) if body else None
        except ValueError:  # what asyncprawcore reports as BadJSON
            raise RedditUnavailable(
                f"Reddit is unavailable (BadJSON) while scraping r/{subreddit}"
            ) from None
    if not isinstance(body, dict) or not isinstance(body.get("data"), dict):
        return None
    data = body["data"]
    return _Page(children=data.get("children") or [], after=data.get("after"))


def _fast_listing(body: bytes) -> _Page | None:
    # A line break can only be whitespace between tokens (a JSON string holds none
    # raw): such a page goes the general path, which stores compact JSON, so that
    # an item's JSON never holds one (a batch blob is one event a line).
    if _NUL_ESCAPE in body or b"\n" in body or b"\r" in body or not no_huge_integers(body):
        return None
    try:
        body.decode("utf-8")  # msgspec checks the UTF-8 only of what it decodes
        listing = _LISTING_DECODER.decode(body)
    except (UnicodeDecodeError, msgspec.DecodeError):
        return None
    return _Page(children=listing.data.children, after=listing.data.after)


def _to_event(
    item: dict[str, Any] | _Head, raw: msgspec.Raw | None, subreddit: str, kind: Kind
) -> RawEventDTO | None:
    try:
        if raw is not None:  # the fast path: `item` is its _Head
            assert isinstance(item, _Head)
            return RawEventDTO.from_trusted_json(
                id=canonical_id(item.id),
                occurred_at=to_utc(item.created_utc),
                source_id=subreddit,
                event_type=kind,
                payload_json=bytes(raw),  # a copy: the page's buffer is not kept
            )
        assert isinstance(item, dict)
        return RawEventDTO.from_reddit(item, subreddit, kind)
    except (KeyError, TypeError, ValueError, OverflowError, OSError):
        log.info("skipped a malformed %s in r/%s", kind, subreddit, extra={"subreddit": subreddit})
        return None
