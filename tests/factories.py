"""Factories for realistic events (Reddit-shaped payloads)."""

from __future__ import annotations

import itertools
import random
from datetime import UTC, datetime, timedelta
from typing import Any

from sentiment.dto import RawEventDTO
from sentiment.reddit.ids import to_base36 as base36

_counter = itertools.count(1_000_000)


def submission_payload(
    event_id: str, subreddit: str, created: datetime, **extra: Any
) -> dict[str, Any]:
    payload = {
        "id": event_id,
        "name": f"t3_{event_id}",
        "subreddit": subreddit,
        "author": f"user_{random.randint(1, 10_000)}",
        "title": f"Post {event_id} about $GME",
        "selftext": "to the moon " * random.randint(5, 60),
        "created_utc": created.timestamp(),
        "score": random.randint(-5, 5000),
        "num_comments": random.randint(0, 500),
        "permalink": f"/r/{subreddit}/comments/{event_id}/post/",
        "url": f"https://www.reddit.com/r/{subreddit}/comments/{event_id}/post/",
        "is_self": True,
        "stickied": False,
        "edited": False,
        "over_18": False,
        "link_flair_text": "DD",
    }
    payload.update(extra)
    return payload


def make_event(
    *,
    event_id: str | None = None,
    subreddit: str = "wallstreetbets",
    occurred_at: datetime | None = None,
    event_type: str = "submission",
    **extra: Any,
) -> RawEventDTO:
    event_id = event_id or base36(next(_counter))
    occurred_at = occurred_at or datetime.now(UTC) - timedelta(minutes=random.randint(0, 600))
    payload = submission_payload(event_id, subreddit, occurred_at, **extra)
    if event_type == "comment":
        payload = {
            "id": event_id,
            "name": f"t1_{event_id}",
            "subreddit": subreddit,
            "author": payload["author"],
            "body": payload["selftext"],
            "created_utc": payload["created_utc"],
            "score": payload["score"],
            "link_id": "t3_abc",
            "parent_id": "t3_abc",
            "permalink": f"/r/{subreddit}/comments/abc/post/{event_id}/",
            **extra,
        }
    return RawEventDTO(
        id=event_id,
        occurred_at=occurred_at,
        source_id=subreddit,
        event_type=event_type,
        payload=payload,
    )


def make_events(count: int, **kwargs: Any) -> list[RawEventDTO]:
    return [make_event(**kwargs) for _ in range(count)]


def make_poison(*, event_id: str, payload: dict[str, Any] | None = None) -> RawEventDTO:
    """An event built without validation, as a buggy scraper might: PostgreSQL refuses its NUL."""
    return RawEventDTO.model_construct(
        id=event_id,
        occurred_at=datetime.now(UTC),
        source="reddit",
        source_id="stocks",
        event_type="comment",
        payload=payload or {"body": "\x00"},
    )
