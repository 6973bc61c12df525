"""What exists in the simulated Reddit: subreddits, their items, threads and growth.

Not thread-safe on its own: `Simulator` calls it under its lock. Ids are handed
out per kind from one counter, like Reddit's, so they strictly increase in
creation order across subreddits, and created_utc never goes backwards in id
order (a backlog added later is clamped, rather than interleaved, to keep that).
"""

from __future__ import annotations

import random
from bisect import bisect_left, bisect_right
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from sentiment.reddit._simulator_data import (
    ADVERSARIAL_VARIANTS,
    ItemFactory,
    LinkInfo,
    SubredditInfo,
    decode_data,
    encode_thing,
)
from sentiment.reddit.ids import to_base36

__all__ = [
    "LISTING_DEPTH", "READABLE", "Catalog", "Feed", "ItemKind", "Stored", "Subreddit",
    "SubredditKind", "about_payload",
]  # fmt: skip

LISTING_DEPTH: Final = 1000  # Reddit keeps only this many items reachable in a listing
READABLE: Final = frozenset({"public", "restricted"})
SubredditKind = Literal["public", "restricted", "private", "banned", "quarantined"]
ItemKind = Literal["submissions", "comments"]
# Reddit's ids are in the billions by now; start there so widths and sort orders look real.
_FIRST_NUM: Final = {"t3": int("1g00000", 36), "t1": int("m000000", 36), "t5": int("2q000", 36)}


@dataclass(frozen=True, slots=True)
class Stored:
    """A served thing: its payload bytes plus just enough to page, look up and thread it."""

    num: int
    fullname: str
    subreddit: str
    payload: bytes
    parent: str | None = None  # comments only: the parent's fullname


class Feed:
    """One subreddit's submissions or comments, oldest first; ids strictly increase."""

    __slots__ = ("hidden", "items", "nums")

    def __init__(self) -> None:
        self.items: list[Stored] = []
        self.nums: list[int] = []
        self.hidden: set[int] = set()  # not listed (yet): see Catalog.set_listed

    def append(self, item: Stored) -> None:
        """Add the newest item (the catalog hands out ids in increasing order)."""
        self.items.append(item)
        self.nums.append(item.num)

    def page(
        self, *, after: int | None, before: int | None, limit: int
    ) -> tuple[list[Stored], bool, bool]:
        """Newest-first children, and whether older/newer items remain reachable.

        Only the newest `LISTING_DEPTH` items can be reached, as on Reddit.
        """
        items, nums = self.items, self.nums
        if self.hidden:
            items = [item for item in items if item.num not in self.hidden]
            nums = [item.num for item in items]
        size = len(nums)
        floor = max(0, size - LISTING_DEPTH)
        if before is not None:
            low = max(floor, bisect_right(nums, before))
            high = min(size, low + limit)
        else:
            high = size if after is None else bisect_left(nums, after)
            low = max(floor, high - limit)
        if high <= low:
            return [], False, False
        return items[low:high][::-1], low > floor, high < size


@dataclass
class Subreddit:
    """One subreddit's settings and feeds."""

    info: SubredditInfo
    kind: SubredditKind
    about: bytes
    submissions: Feed = field(default_factory=Feed)
    comments: Feed = field(default_factory=Feed)
    links: list[LinkInfo] = field(default_factory=list)
    link_times: list[float] = field(default_factory=list)


@dataclass(slots=True)
class _Growth:
    submissions_per_second: float
    comments_per_second: float
    only: frozenset[str] | None
    since: float
    # per subreddit: when it started growing, submissions and comments made since
    started: dict[str, tuple[float, int, int]] = field(default_factory=dict)


class Catalog:
    """Subreddits and items, created through one seeded RNG so runs are reproducible."""

    def __init__(self, *, seed: int, text_chars: tuple[int, int]) -> None:
        self.subreddits: dict[str, Subreddit] = {}
        self.things: dict[str, Stored] = {}
        self._threads: dict[int, list[Stored]] = {}
        self._rng = random.Random(seed)
        self._factory = ItemFactory(seed=seed, text_chars=text_chars)
        self._next_num = dict(_FIRST_NUM)
        self._last_created = {"t3": 0.0, "t1": 0.0}
        self._last_link: LinkInfo | None = None
        self._adversarial_turn = 0
        self._growth: _Growth | None = None

    def add_subreddit(
        self, name: str, kind: SubredditKind, subscribers: int | None, *, now: float
    ) -> None:
        """Register an empty subreddit; under growth, it grows from `now` on."""
        if name.lower() in self.subreddits:
            raise ValueError(f"r/{name} exists")
        fullname = f"t5_{to_base36(self._take_num('t5'))}"
        count = self._rng.randint(1_000, 5_000_000) if subscribers is None else subscribers
        info = SubredditInfo(name, fullname, kind, count)
        self.subreddits[name.lower()] = Subreddit(info, kind, about_payload(info, kind))
        if self._growth is not None:
            self._growth.started[name.lower()] = (now, 0, 0)

    def get(self, name: str) -> Subreddit:
        """The subreddit called `name`, any case; KeyError when there is none."""
        try:
            return self.subreddits[name.lower()]
        except KeyError:
            raise KeyError(f"no r/{name} in the simulator") from None

    def set_kind(self, name: str, kind: SubredditKind) -> None:
        """Change a subreddit's access; its items keep the JSON they were born with."""
        sub = self.get(name)
        sub.kind = kind
        sub.about = about_payload(sub.info, kind)

    def create(
        self, name: str, kind: ItemKind, count: int, *, start: float, now: float, adversarial: bool
    ) -> list[str]:
        """`count` items with created_utc spread evenly from `start` to `now`; their fullnames."""
        sub = self.get(name)
        if kind == "comments" and count and not sub.links:
            raise ValueError(f"r/{name} has no submissions for comments to reply to")
        made: list[str] = []
        for i in range(count):
            created = start + (now - start) * (i + 1) / count
            variant = self._next_variant() if adversarial else None
            new = self._new_submission if kind == "submissions" else self._new_comment
            made.append(new(sub, created, now, variant))
        return made

    def items(self, name: str, kind: ItemKind) -> list[dict[str, Any]]:
        """Every item of `kind`, newest first, decoded the way a client would."""
        feed: Feed = getattr(self.get(name), kind)
        return [decode_data(item.payload) for item in reversed(feed.items)]

    @staticmethod
    def page(
        sub: Subreddit, kind: ItemKind, after: str | None, before: str | None, limit: int
    ) -> tuple[list[bytes], str | None, str | None]:
        """Children payloads and the after/before cursors of one listing page.

        A cursor of the wrong kind, or garbage, gets an empty page, as on Reddit.
        """
        prefix = "t3_" if kind == "submissions" else "t1_"
        cursors = [_cursor_num(c, prefix) for c in (after, before)]
        if -1 in cursors:
            return [], None, None
        feed: Feed = getattr(sub, kind)
        items, older, newer = feed.page(after=cursors[0], before=cursors[1], limit=limit)
        return (
            [item.payload for item in items],
            items[-1].fullname if older else None,
            items[0].fullname if newer else None,
        )

    def set_listed(self, fullnames: list[str], *, listed: bool) -> None:
        """Take items out of their listing, or put them back (KeyError if unknown)."""
        for fullname in fullnames:
            thing = self.things[fullname]
            feed: Feed = self.get(thing.subreddit).submissions if fullname.startswith("t3_") \
                else self.get(thing.subreddit).comments  # fmt: skip
            (feed.hidden.discard if listed else feed.hidden.add)(thing.num)

    def lookup(self, fullnames: list[str]) -> list[bytes]:
        """Payloads of the readable things among `fullnames`, in the order asked."""
        found = [self.things.get(name) for name in fullnames]
        return [t.payload for t in found if t and self.subreddits[t.subreddit].kind in READABLE]

    def thread(self, id36: str) -> tuple[Stored, list[Stored]] | None:
        """A submission and its comments (oldest first), or None if there is no such post."""
        link = self.things.get(f"t3_{id36.lower()}")
        if link is None:
            return None
        return link, list(self._threads.get(int(id36, 36), ()))

    def start_growth(
        self,
        submissions_per_second: float,
        comments_per_second: float,
        only: frozenset[str] | None,
        *,
        now: float,
    ) -> None:
        """Grow at these rates from `now` on (see `catch_up`); zero rates stop growth."""
        if submissions_per_second <= 0 and comments_per_second <= 0:
            self._growth = None
        else:
            self._growth = _Growth(submissions_per_second, comments_per_second, only, now)

    def catch_up(self, now: float) -> None:
        """Create the items growth made due by `now`, with evenly spaced created_utc."""
        growth = self._growth
        if growth is None:
            return
        for key, sub in self.subreddits.items():
            if sub.kind in READABLE and (growth.only is None or key in growth.only):
                self._grow(key, sub, growth, now)

    def _grow(self, key: str, sub: Subreddit, growth: _Growth, now: float) -> None:
        start, made_s, made_c = growth.started.setdefault(key, (growth.since, 0, 0))
        rate_s, rate_c = growth.submissions_per_second, growth.comments_per_second
        due_s = int((now - start) * rate_s) - made_s if rate_s > 0 else 0
        due_c = int((now - start) * rate_c) - made_c if rate_c > 0 else 0
        for i in range(due_s):
            self._new_submission(sub, start + (made_s + i + 1) / rate_s, now, None)
        for i in range(due_c if sub.links else 0):
            self._new_comment(sub, start + (made_c + i + 1) / rate_c, now, None)
        growth.started[key] = (start, made_s + due_s, made_c + due_c)

    def _take_num(self, prefix: str) -> int:
        num = self._next_num[prefix]
        self._next_num[prefix] = num + 1
        return num

    def _next_variant(self) -> str:
        variant = ADVERSARIAL_VARIANTS[self._adversarial_turn % len(ADVERSARIAL_VARIANTS)]
        self._adversarial_turn += 1
        return variant

    def _new_submission(
        self, sub: Subreddit, created: float, now: float, variant: str | None
    ) -> str:
        created = max(created, self._last_created["t3"])
        self._last_created["t3"] = created
        num = self._take_num("t3")
        crosspost = self._last_link if self._rng.random() < 0.05 else None
        data, link = self._factory.submission(
            num, sub.info, created=created, now=now, variant=variant, crosspost_of=crosspost
        )
        payload = encode_thing("t3", data, clean=variant is None)
        item = Stored(num, data["name"], sub.info.display_name.lower(), payload)
        sub.submissions.append(item)
        sub.links.append(link)
        sub.link_times.append(created)
        self.things[item.fullname] = item
        self._last_link = link
        return item.fullname

    def _new_comment(self, sub: Subreddit, created: float, now: float, variant: str | None) -> str:
        """A comment on one of the 50 posts newest at `created`, half of them replies."""
        newest = max(0, bisect_right(sub.link_times, created) - 1)
        link = sub.links[self._rng.randint(max(0, newest - 49), newest)]
        created = max(created, self._last_created["t1"], link.created_utc)
        self._last_created["t1"] = created
        thread = self._threads.setdefault(link.num, [])
        reply_to = self._rng.choice(thread[-20:]) if thread and self._rng.random() < 0.5 else None
        parent = reply_to.fullname if reply_to else f"t3_{to_base36(link.num)}"
        num = self._take_num("t1")
        data = self._factory.comment(
            num, sub.info, created=created, now=now, link=link, parent=parent, variant=variant
        )
        payload = encode_thing("t1", data, clean=variant is None)
        item = Stored(num, data["name"], sub.info.display_name.lower(), payload, parent)
        sub.comments.append(item)
        thread.append(item)
        self.things[item.fullname] = item
        return item.fullname


def about_payload(info: SubredditInfo, kind: SubredditKind) -> bytes:
    """The /r/<sub>/about thing; quarantined and banned subreddits are "public" underneath."""
    data = {
        "display_name": info.display_name, "display_name_prefixed": f"r/{info.display_name}",
        "id": info.fullname[3:], "name": info.fullname, "subscribers": info.subscribers,
        "subreddit_type": "public" if kind in {"banned", "quarantined"} else kind,
        "quarantine": kind == "quarantined", "over18": False, "lang": "en",
        "title": info.display_name, "public_description": f"All about {info.display_name}",
        "url": f"/r/{info.display_name}/", "created_utc": 1_230_768_000.0,
        "accounts_active": None, "active_user_count": None, "user_is_banned": None,
    }  # fmt: skip
    return encode_thing("t5", data, clean=True)


def _cursor_num(fullname: str | None, prefix: str) -> int | None:
    """The id number of an after/before cursor; -1 when it is not a `prefix` fullname."""
    if not fullname:
        return None
    if not fullname.startswith(prefix):
        return -1
    try:
        return int(fullname[len(prefix) :], 36)
    except ValueError:
        return -1
