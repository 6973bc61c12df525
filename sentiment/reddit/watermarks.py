"""Watermarks: the newest item stored per subreddit and kind.

Kept in Redis (one hash per subreddit) for speed, with the database as the
fallback: if Redis was flushed, the newest stored id tells us where we were,
so a lost Redis never sets off a storm of full re-scrapes.
"""

from __future__ import annotations

from collections.abc import Mapping

import redis
from sqlalchemy import Engine, text

__all__ = ["Watermarks"]

# Ids are sequential, times nearly so: the newest id is among the newest rows.
_NEWEST_STORED = text(
    """
    SELECT id FROM raw_events
    WHERE source_id = :subreddit AND event_type = :kind
    ORDER BY occurred_at DESC
    LIMIT 50
    """
)

# Only ever move a watermark forward, atomically, whoever commits last.
_ADVANCE = """
local current = redis.call('HGET', KEYS[1], ARGV[1])
local known = current and tonumber(current, 36)
if not known or tonumber(ARGV[2], 36) > known then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
  return 1
end
return 0
"""


class Watermarks:
    """Read and advance watermarks for subreddits."""

    def __init__(self, client: redis.Redis, engine: Engine) -> None:
        self._redis = client
        self._engine = engine
        self._advance = client.register_script(_ADVANCE)

    @staticmethod
    def key(subreddit: str) -> str:
        return f"sentiment:watermark:{subreddit}"

    def get(self, subreddit: str, kinds: tuple[str, ...]) -> dict[str, str | None]:
        """The watermark of each kind: Redis first, then the newest row stored."""
        stored = self._redis.hmget(self.key(subreddit), list(kinds))
        marks: dict[str, str | None] = {
            kind: (value.decode() if isinstance(value, bytes) else value) or None
            for kind, value in zip(kinds, stored, strict=True)
        }
        missing = [kind for kind, value in marks.items() if value is None]
        if missing:
            with self._engine.connect() as conn:
                for kind in missing:
                    ids = conn.execute(
                        _NEWEST_STORED, {"subreddit": subreddit, "kind": kind}
                    ).scalars()
                    marks[kind] = max(ids, key=lambda i: int(i, 36), default=None)
        return marks

    def advance(self, subreddit: str, marks: Mapping[str, str]) -> None:
        """Move each kind's watermark forward to `marks` (never backward)."""
        for kind, value in marks.items():
            self._advance(keys=[self.key(subreddit)], args=[kind, value])
