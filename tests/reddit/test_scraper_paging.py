"""Paging edge cases of Reddit's listings that the simulator does not produce.

The simulator's cursors are positions and never vanish. Reddit's are items: an
`after` that is no longer listed (removed between two pages) gives an empty
page (`IDBuilder._get_after` in reddit's open-sourced r2). A small fake with
those rules stands in for Reddit here; everything else about the scraper is
tested against the simulator in test_scraper.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest

from sentiment.dto import dump_events, load_events
from sentiment.errors import RedditUnavailable
from sentiment.reddit.ids import to_base36
from sentiment.reddit.scraper import ScrapeResult, scrape_subreddit

BASE = 10_000_000  # seven-digit base36 ids, like Reddit's


@pytest.fixture(autouse=True, params=["bytes", "decoded"])
def answers(request, monkeypatch):
    """Every test runs twice: with the body's bytes, as asyncprawcore hands them
    to the scraper (the fast path), and with decoded JSON (the general path)."""
    monkeypatch.setattr(ListingReddit, "as_bytes", request.param == "bytes")


class BadJSON(Exception):  # asyncprawcore's name: the scraper translates it by name
    """Stands in for asyncprawcore's BadJSON."""


class ListingReddit:
    """Newest-first listings with Reddit's cursor rules; `removals` take items out
    of a listing after a given request, as a moderator would between two pages."""

    as_bytes = False
    garbage = 0  # this many answers, first, are not JSON

    def __init__(self, submissions: list[int], comments: list[int] | None = None) -> None:
        self.listed = {"new": sorted(submissions, reverse=True),
                       "comments": sorted(comments or [], reverse=True)}  # fmt: skip
        self.requests = {"new": 0, "comments": 0}
        self.removals: dict[int, list[int]] = {}  # after the n-th request for /new: removed
        self.item: Callable[[int, str], dict[str, Any]] = self._item

    @staticmethod
    def _item(number: int, listing: str) -> dict[str, Any]:
        text = "title" if listing == "new" else "body"
        return {"id": to_base36(number), "created_utc": 1_700_000_000 + number - BASE,
                text: f"item {number}", "stickied": False}  # fmt: skip

    async def request(self, *, method: str, path: str, params: dict[str, Any]) -> Any:
        if self.garbage:
            self.garbage -= 1
            if not self.as_bytes:
                raise BadJSON  # asyncprawcore decodes, and raises this
            return b'{"kind": "Listing", "data": {"children": ['  # the scraper decodes
        body = self._listing(path, params)
        return orjson.dumps(body) if self.as_bytes else body

    def _listing(self, path: str, params: dict[str, Any]) -> dict[str, Any]:
        listing = path.rsplit("/", 1)[1]
        prefix = "t3_" if listing == "new" else "t1_"
        numbers = self.listed[listing]
        page: list[int] = []
        if (after := params.get("after")) is None:
            page = numbers[: params["limit"]]
        elif (anchor := int(after.removeprefix(prefix), 36)) in numbers:
            start = numbers.index(anchor) + 1
            page = numbers[start : start + params["limit"]]
        self.requests[listing] += 1
        if listing == "new":
            for number in self.removals.get(self.requests["new"], []):
                self.listed["new"].remove(number)
        full = len(page) == params["limit"]
        return {"data": {
            "children": [{"kind": prefix[:2], "data": self.item(n, listing)} for n in page],
            "after": f"{prefix}{to_base36(page[-1])}" if full else None,
        }}  # fmt: skip


def _scrape(
    reddit: ListingReddit, watermark: int | None, depth: int = 1000, **kwargs: Any
) -> ScrapeResult:
    marks = {"submission": to_base36(watermark)} if watermark else {}
    kwargs.setdefault("attempts", 1)
    return asyncio.run(scrape_subreddit(reddit, "somesub", marks, depth=depth, **kwargs))  # type: ignore[arg-type]


def _numbers(result: ScrapeResult) -> set[int]:
    return {int(e.id, 36) for e in result.events if e.event_type == "submission"}


def test_a_cursor_removed_between_two_pages_loses_nothing():
    watermark = BASE + 100
    reddit = ListingReddit(list(range(BASE + 1, BASE + 351)))  # 250 newer than the watermark
    reddit.removals = {1: [BASE + 251]}  # page 1's last item, the next page's `after`

    result = _scrape(reddit, watermark)

    assert _numbers(result) == set(range(BASE + 101, BASE + 351))  # 251 was on page 1
    assert result.gaps == []
    assert result.watermarks["submission"] == to_base36(BASE + 350)


def test_when_no_cursor_is_left_the_watermark_stays_and_the_next_scrape_gets_the_rest():
    watermark = BASE + 100
    reddit = ListingReddit(list(range(BASE + 1, BASE + 351)))
    reddit.removals = {n: [BASE + 250 + n] for n in range(1, 10)}  # every cursor it tries, in turn

    first = _scrape(reddit, watermark)
    second = _scrape(reddit, int(first.watermarks.get("submission", to_base36(watermark)), 36))

    assert "submission" not in first.watermarks  # it could not see down to the watermark
    still_listed = {n for n in reddit.listed["new"] if n > watermark}
    assert still_listed <= _numbers(first) | _numbers(second)  # nothing jumped over
    assert second.watermarks["submission"] == to_base36(BASE + 350)


def test_the_backfill_depth_does_not_cut_an_incremental_scrape():
    watermark = BASE + 100
    reddit = ListingReddit(list(range(BASE + 1, BASE + 251)))  # 150 new, all listed

    result = _scrape(reddit, watermark, depth=100)  # SCRAPE_BACKFILL_DEPTH=100

    assert _numbers(result) == set(range(BASE + 101, BASE + 251))
    assert result.gaps == []


def test_the_backfill_depth_still_bounds_a_first_scrape():
    reddit = ListingReddit(list(range(BASE + 1, BASE + 251)))

    result = _scrape(reddit, None, depth=100)

    assert len(_numbers(result)) == 100
    assert result.requests == 2  # one page of submissions, one of comments


def test_a_listing_that_ends_above_the_watermark_is_no_gap():
    """A quiet subreddit whose watermark post was removed and nothing older is
    listed, or only a stickied one: nothing was missed, and no gap is reported."""
    reddit = ListingReddit([BASE + 1, BASE + 5])
    sticky = reddit.item
    reddit.item = lambda n, listing: {**sticky(n, listing), "stickied": n == BASE + 1}

    result = _scrape(reddit, BASE + 3)

    assert _numbers(result) == {BASE + 5}
    assert result.gaps == []
    assert result.requests == 2


def test_an_id_with_non_ascii_letters_is_malformed_not_fatal():
    reddit = ListingReddit([BASE + 1, BASE + 2])
    plain = reddit.item
    reddit.item = lambda n, listing: {
        **plain(n, listing),
        **({"id": "abc\u00e9"} if n == BASE + 2 else {}),
    }

    result = _scrape(reddit, None)

    assert result.malformed == 1
    assert _numbers(result) == {BASE + 1}


def _at(number: int) -> datetime:
    """When the fake listing's item `number` was created."""
    return datetime.fromtimestamp(1_700_000_000 + number - BASE, tz=UTC)


def test_items_older_than_not_before_are_skipped_and_paging_stops_there():
    """RETENTION_DAYS: a first scrape (or one after Redis was flushed, with retention
    having emptied the subreddit) must not store again what retention dropped."""
    reddit = ListingReddit(list(range(BASE + 1, BASE + 501)))
    sticky = reddit.item
    # An old stickied post sits at the top of the listing: it is skipped, not an end.
    reddit.listed["new"].insert(0, BASE + 2)
    reddit.item = lambda n, listing: {**sticky(n, listing), "stickied": n == BASE + 2}

    result = _scrape(reddit, None, not_before=_at(BASE + 450))

    assert _numbers(result) == set(range(BASE + 450, BASE + 501))
    assert result.too_old >= 2  # the stickied one and the first one below the horizon
    assert result.summary()["too_old"] == result.too_old
    assert result.gaps == []
    assert reddit.requests["new"] == 1  # the first page already went below the horizon
    assert result.watermarks == {"submission": to_base36(BASE + 500)}


def test_not_before_does_not_cut_what_lies_above_it():
    reddit = ListingReddit(list(range(BASE + 1, BASE + 251)))

    result = _scrape(reddit, None, not_before=_at(BASE))

    assert _numbers(result) == set(range(BASE + 1, BASE + 251))
    assert result.too_old == 0


def test_an_item_listed_late_below_the_watermark_is_rechecked():
    """Reddit builds its listings asynchronously: item N can show up after N+1, which
    is then the watermark. Items just below it, on the page that reached it, are
    handed on again (`rechecked`); the sink stores whichever is new."""
    reddit = ListingReddit([n for n in range(BASE + 1, BASE + 201) if n != BASE + 195])
    first = _scrape(reddit, None)
    assert first.watermarks["submission"] == to_base36(BASE + 200)
    arrived = [BASE + 195, *range(BASE + 201, BASE + 211)]  # the late one, and ten new
    reddit.listed["new"] = sorted([*reddit.listed["new"], *arrived], reverse=True)

    result = _scrape(reddit, BASE + 200, lookback=60)

    assert _numbers(result) == set(range(BASE + 201, BASE + 211))
    rechecked = {int(e.id, 36) for e in result.rechecked}
    assert rechecked == set(range(BASE + 140, BASE + 201))  # created within 60 s of it
    assert result.summary()["rechecked"] == len(result.rechecked)
    assert result.watermarks == {"submission": to_base36(BASE + 210)}
    assert reddit.requests["new"] == 3  # two for the first scrape, one for this one


def test_without_lookback_nothing_is_rechecked():
    reddit = ListingReddit(list(range(BASE + 1, BASE + 201)))

    result = _scrape(reddit, BASE + 190, lookback=0)

    assert _numbers(result) == set(range(BASE + 191, BASE + 201))
    assert result.rechecked == []


def test_a_body_that_is_not_a_listing_is_retried_then_reported():
    reddit = ListingReddit([BASE + 1, BASE + 2])
    reddit.garbage = 1

    result = _scrape(reddit, None, attempts=3)  # the second try gets the page

    assert _numbers(result) == {BASE + 1, BASE + 2}

    reddit.garbage = 10
    with pytest.raises(RedditUnavailable, match="somesub"):
        _scrape(reddit, None, attempts=2)


class IndentedReddit(ListingReddit):
    """Its JSON has line breaks between tokens, as JSON may."""

    async def request(self, *, method: str, path: str, params: dict[str, Any]) -> Any:
        body = self._listing(path, params)
        return orjson.dumps(body, option=orjson.OPT_INDENT_2) if self.as_bytes else body


def test_a_page_spread_over_lines_still_makes_a_batch_that_loads_back():
    """A batch blob is one event a line: no item's JSON may hold a line break."""
    reddit = IndentedReddit([BASE + 1, BASE + 2, BASE + 3])

    result = _scrape(reddit, None)

    assert _numbers(result) == {BASE + 1, BASE + 2, BASE + 3}
    assert all(b"\n" not in e.payload_json for e in result.events)
    assert load_events(dump_events(result.events)) == result.events
