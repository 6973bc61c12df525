"""Synthetic Reddit things for the simulator, serialized once at creation.

Every item is built as the dict Reddit would send and encoded to bytes right
away, so serving a page is a join of ready-made bytes. Clean items go through
orjson (fast); adversarial ones through `json`, because they may hold lone
surrogates, which orjson refuses and `json` writes as the `\\ud800` escapes that
Reddit really sends.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import orjson

from sentiment.reddit.ids import to_base36

__all__ = [
    "ADVERSARIAL_VARIANTS",
    "ItemFactory",
    "LinkInfo",
    "SubredditInfo",
    "decode_data",
    "encode_thing",
]

# One hazard per variant, assigned in turn, so any run of len(VARIANTS)
# adversarial items holds every hazard at least once.
ADVERSARIAL_VARIANTS: Final = ("nul", "surrogate", "huge", "emoji", "rtl", "deleted", "removed")
_DELETED_SHARE: Final = 0.02  # ordinary items that were deleted or removed, as on Reddit
_HUGE_CHARS: Final = 200_000
_EMOJI: Final = "🚀🌕 💎🙌 👨‍👩‍👧‍👦 🏳️‍🌈 👍🏽 🇺🇦 "
_RTL: Final = "\u202eسوق الأسهم صاعد\u202c \u200fשוק המניות יורד\u200e "  # noqa: RUF001 - RTL on purpose
_WORDS: Final = (  # noqa: SIM905 - a word list reads better as prose
    "the market stock price buy sell hold bullish bearish moon crash earnings report "
    "today yesterday week think really good bad great terrible love hate fund index "
    "option call put short squeeze retail bank rate inflation fed news company "
    "growth dividend portfolio risk loss gain profit chart volume trend support "
    "resistance because while though maybe never always people everyone nobody just "
    "still again and or but so if then when what why how this that these those it is "
    "was will"
).split()
_ADJECTIVES: Final = ("quiet", "brave", "lucky", "salty", "happy", "lazy", "rapid", "odd")
_ANIMALS: Final = ("otter", "badger", "falcon", "lemur", "heron", "bison", "gecko", "yak")


def encode_thing(kind: str, data: dict[str, Any], *, clean: bool) -> bytes:
    """Serialize one `{"kind", "data"}` thing; see the module docstring for why two encoders."""
    thing = {"kind": kind, "data": data}
    if clean:
        return orjson.dumps(thing)
    return json.dumps(thing, separators=(",", ":")).encode("ascii")


def decode_data(payload: bytes) -> Any:
    """The `data` of an encoded thing; `json` only where orjson would refuse a lone surrogate."""
    loads = json.loads if b"\\ud" in payload else orjson.loads
    return loads(payload)["data"]


@dataclass(frozen=True, slots=True)
class SubredditInfo:
    """What every item repeats about its subreddit."""

    display_name: str
    fullname: str
    subreddit_type: str
    subscribers: int


@dataclass(frozen=True, slots=True)
class LinkInfo:
    """What a comment (or a crosspost) repeats about its submission."""

    num: int
    subreddit: str
    title: str
    author: str
    permalink: str
    url: str
    created_utc: float


class ItemFactory:
    """Builds submissions and comments from one seeded RNG, so runs are reproducible."""

    def __init__(self, *, seed: int, text_chars: tuple[int, int]) -> None:
        self._rng = random.Random(seed)
        self._text_chars = text_chars
        # ~6 characters a word: always room for the longest text asked for
        words = self._rng.choices(_WORDS, k=max(20_000, text_chars[1] // 5 + 1_000))
        self._corpus = " ".join(words)
        self._authors = [
            f"{a.title()}_{b.title()}_{n}" for a in _ADJECTIVES for b in _ANIMALS for n in range(8)
        ]

    def _text(self, low: int, high: int) -> str:
        """A slice of the corpus: fast to make, and compresses like real prose."""
        size = self._rng.randint(low, high)
        start = self._rng.randrange(0, len(self._corpus) - size - 1)
        return self._corpus[start : start + size].strip()

    def _author(self) -> tuple[str, str]:
        index = self._rng.randrange(len(self._authors))
        return self._authors[index], f"t2_{to_base36(1_000_000 + index * 7919)}"

    def _deletion(self) -> str | None:
        if self._rng.random() < _DELETED_SHARE:
            return self._rng.choice(("deleted", "removed"))
        return None

    def _edited(self, created: float, now: float) -> float | bool:
        """About 1 in 20 items was edited, always in the past, never before creation."""
        if now - created < 2 or self._rng.random() >= 0.05:
            return False
        return round(self._rng.uniform(created + 1, now), 3)

    def _common(self, sub: SubredditInfo, created: float, now: float) -> dict[str, Any]:
        author, author_fullname = self._author()
        score = int(self._rng.paretovariate(1.3)) - 1
        return {
            "all_awardings": [], "approved_at_utc": None, "archived": False, "author": author,
            "author_flair_text": None, "author_fullname": author_fullname, "banned_at_utc": None,
            "can_gild": False, "created": created, "created_utc": created, "distinguished": None,
            "downs": 0, "edited": self._edited(created, now), "gilded": 0, "locked": False,
            "score": score, "send_replies": True, "stickied": False,
            "subreddit": sub.display_name, "subreddit_id": sub.fullname,
            "subreddit_name_prefixed": f"r/{sub.display_name}",
            "subreddit_type": sub.subreddit_type, "total_awards_received": 0, "ups": score,
        }  # fmt: skip

    def submission(
        self,
        num: int,
        sub: SubredditInfo,
        *,
        created: float,
        now: float,
        variant: str | None,
        crosspost_of: LinkInfo | None,
    ) -> tuple[dict[str, Any], LinkInfo]:
        """A t3 data dict, and the summary its comments will repeat."""
        id36 = to_base36(num)
        title = self._text(20, 120) or "untitled"
        is_self = crosspost_of is None and self._rng.random() < 0.7
        slug = "_".join(title.lower().split()[:8])[:50]
        permalink = f"/r/{sub.display_name}/comments/{id36}/{slug}/"
        url = f"https://www.reddit.com{permalink}" if is_self else f"https://example.com/{id36}"
        data = self._common(sub, created, now)
        data.update({
            "clicked": False, "domain": f"self.{sub.display_name}" if is_self else "example.com",
            "hidden": False, "hide_score": False, "id": id36, "is_crosspostable": True,
            "is_meta": False, "is_original_content": False, "is_reddit_media_domain": False,
            "is_robot_indexable": True, "is_self": is_self, "is_video": False,
            "link_flair_text": self._rng.choice((None, None, "Discussion", "News", "DD")),
            "media": None, "name": f"t3_{id36}", "num_comments": self._rng.randint(0, 40),
            "num_crossposts": 0, "over_18": self._rng.random() < 0.02, "permalink": permalink,
            "pinned": False, "selftext": self._text(*self._text_chars) if is_self else "",
            "spoiler": False, "subreddit_subscribers": sub.subscribers,
            "thumbnail": "self" if is_self else "default", "title": title,
            "upvote_ratio": round(self._rng.uniform(0.5, 1.0), 2), "url": url, "view_count": None,
        })  # fmt: skip
        if crosspost_of is not None:
            data["crosspost_parent"] = f"t3_{to_base36(crosspost_of.num)}"
            data["crosspost_parent_list"] = [_crosspost_summary(crosspost_of)]
        _make_adversarial(data, "selftext", variant or self._deletion(), self._text)
        link = LinkInfo(
            num, sub.display_name, data["title"], data["author"], permalink, url, created
        )
        return data, link

    def comment(
        self,
        num: int,
        sub: SubredditInfo,
        *,
        created: float,
        now: float,
        link: LinkInfo,
        parent: str,
        variant: str | None,
    ) -> dict[str, Any]:
        """A t1 data dict as `/r/<sub>/comments` sends it (with the link_* fields)."""
        id36 = to_base36(num)
        link_fullname = f"t3_{to_base36(link.num)}"
        data = self._common(sub, created, now)
        data.update({
            "body": self._text(self._text_chars[0] // 4, self._text_chars[1]), "collapsed": False,
            "controversiality": 0, "id": id36, "is_submitter": False, "link_author": link.author,
            "link_id": link_fullname, "link_permalink": f"https://www.reddit.com{link.permalink}",
            "link_title": link.title, "link_url": link.url, "name": f"t1_{id36}",
            "no_follow": True, "parent_id": parent, "permalink": f"{link.permalink}{id36}/",
            "replies": "", "saved": False, "score_hidden": False,
        })  # fmt: skip
        _make_adversarial(data, "body", variant or self._deletion(), self._text)
        return data


def _crosspost_summary(parent: LinkInfo) -> dict[str, Any]:
    """The trimmed copy of the parent that Reddit nests in crosspost_parent_list."""
    id36 = to_base36(parent.num)
    return {
        "author": parent.author, "created_utc": parent.created_utc, "id": id36,
        "name": f"t3_{id36}", "permalink": parent.permalink, "subreddit": parent.subreddit,
        "title": parent.title, "url": parent.url,
    }  # fmt: skip


def _make_adversarial(
    data: dict[str, Any], text_key: str, variant: str | None, text: Callable[[int, int], str]
) -> None:
    """Plant one hazard a scraper must survive (None: none); `text` makes filler prose."""
    if variant is None:
        return
    if variant in {"deleted", "removed"}:
        data["author"] = "[deleted]"
        data.pop("author_fullname", None)
        data[text_key] = f"[{variant}]"
        return
    hazard = {
        "nul": "before\x00after",
        "surrogate": "lone \ud800 high and \udfff low",
        "emoji": _EMOJI * 3,
        "rtl": _RTL * 3,
    }.get(variant)
    if variant == "huge":
        data[text_key] = (text(2000, 2000) + " ") * (_HUGE_CHARS // 2001 + 1)
    elif hazard is None:
        raise ValueError(f"unknown adversarial variant {variant!r}")
    else:
        data[text_key] = f"{hazard} {data[text_key]}"
        if "title" in data:
            data["title"] = f"{hazard} {data['title']}"
