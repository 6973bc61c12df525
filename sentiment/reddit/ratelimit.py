"""One Reddit rate limiter for every process that shares an OAuth client id.

Reddit counts requests per client id in fixed windows (100 a minute today) and
says where it stands in `x-ratelimit-remaining` / `x-ratelimit-reset`.
asyncprawcore paces one process from those headers but knows nothing of the
others, and raises on 429 without waiting. So every request first takes a
token here; the state lives in one Redis hash, changed only by Lua scripts
(atomic across processes), and timed by Redis's own clock (immune to skew
between worker machines).

* `acquire` grants a token while the current window has some left, else says
  how long until the window resets.
* `observe` corrects the window from each response: the server's reset time
  aligns our window with Reddit's, and its `remaining` can only lower ours
  (minus requests other processes still have in flight). A header that
  belongs to an older window is ignored, and one read late (a slow response)
  is not taken for a newer window's.
* A 429 empties the window: every process waits until Reddit's reset.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
from dataclasses import dataclass

from redis.asyncio import Redis
from redis.exceptions import RedisError

from sentiment.errors import ServiceUnavailable

__all__ = ["LimiterState", "SharedRateLimiter", "limiter_key"]

log = logging.getLogger(__name__)

# Reddit's reset header is whole seconds; start our window this much later so a
# rounded-down reset never lets us spend the next window's budget early.
_RESET_MARGIN_S = 1.0

_ACQUIRE = """
local key = KEYS[1]
local limit, window = tonumber(ARGV[1]), tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local s = redis.call('HMGET', key, 'window_end', 'remaining', 'inflight', 'paused_until')
local window_end, remaining, inflight = tonumber(s[1]), tonumber(s[2]), tonumber(s[3]) or 0
local paused_until = tonumber(s[4]) or 0
if now < paused_until then
  return {0, tostring(paused_until - now)}
end
if window_end == nil or now >= window_end then
  -- Requests still in flight may reach Reddit in this window and count there:
  -- assume so until a response says where Reddit stands. (The count restarts at
  -- 0, so a process that died mid-request cannot shrink every later window.)
  window_end, remaining, inflight = now + window, math.max(0, limit - inflight), 0
  redis.call('HSET', key, 'aligned', '0')  -- a guess until a response says where Reddit is
end
if remaining <= 0 then
  redis.call('HSET', key, 'window_end', window_end, 'remaining', remaining, 'inflight', inflight)
  return {0, tostring(window_end - now)}
end
local granted = (tonumber(redis.call('HGET', key, 'granted')) or 0) + 1
redis.call('HSET', key, 'window_end', window_end, 'remaining', remaining - 1,
           'inflight', inflight + 1, 'granted', granted)
redis.call('EXPIRE', key, math.ceil(window_end - now) + 3600)
return {1, '0'}
"""

_OBSERVE = """
local key = KEYS[1]
local hdr_remaining, hdr_reset, margin = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local limited, window = ARGV[4] == '1', tonumber(ARGV[5])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local s = redis.call('HMGET', key, 'window_end', 'remaining', 'inflight', 'aligned')
local window_end, remaining = tonumber(s[1]), tonumber(s[2])
local others = math.max(0, (tonumber(s[3]) or 0) - 1)  -- in flight besides this one
local aligned = s[4] == '1'
redis.call('HSET', key, 'inflight', others)
if hdr_reset == nil then return 0 end
local server_end = now + hdr_reset + margin
if limited then
  redis.call('HSET', key, 'window_end', server_end, 'remaining', 0, 'paused_until', server_end,
             'aligned', '1')
  redis.call('HINCRBY', key, 'limited', 1)
  return 1
end
if hdr_remaining == nil then return 0 end
if aligned and window_end ~= nil and server_end < window_end - margin - 1 then
  return 0  -- a response from a window that has already closed
end
local allowed
if aligned and remaining ~= nil and server_end <= window_end + window / 2 then
  -- Same window. Our count already includes every grant, in flight or not;
  -- the server seeing fewer left means someone outside this limiter spent
  -- budget: then trust it, minus what we still have in flight. Reddit stamps
  -- its headers when it takes a request, so a response read late computes a
  -- later end than the window's: every estimate ends at or after the real
  -- end, and the earliest is the best.
  allowed = remaining
  if hdr_remaining < remaining then allowed = math.max(0, hdr_remaining - others) end
  server_end = math.min(server_end, window_end)
else
  -- Our window was a guess (or the server is already in a later one).
  allowed = math.max(0, hdr_remaining - others)
  if remaining ~= nil and not (server_end > window_end + margin + 1) then
    allowed = math.min(allowed, remaining)
  end
end
redis.call('HSET', key, 'window_end', server_end, 'remaining', allowed, 'aligned', '1')
return 1
"""


def _unavailable(exc: RedisError) -> ServiceUnavailable:
    return ServiceUnavailable(f"Redis (the shared Reddit rate limit) is unavailable: {exc}")


def limiter_key(client_id: str) -> str:
    """The Redis key of a client id's window (a digest: the id itself stays out of Redis)."""
    return f"sentiment:reddit:ratelimit:{hashlib.sha256(client_id.encode()).hexdigest()[:16]}"


@dataclass(frozen=True)
class LimiterState:
    """What the limiter knows now (for `sentiment status` and the live view)."""

    remaining: int | None
    seconds_to_reset: float | None
    granted: int
    limited: int


class SharedRateLimiter:
    """Tokens for one OAuth client id, shared by every process through Redis."""

    def __init__(self, redis: Redis, client_id: str, *, limit: int, window_seconds: int) -> None:
        self.key = limiter_key(client_id)
        self.limit = limit
        self.window_seconds = window_seconds
        self._redis = redis
        self._acquire = redis.register_script(_ACQUIRE)
        self._observe = redis.register_script(_OBSERVE)

    async def acquire(self) -> None:
        """Wait until this process may send one request.

        ServiceUnavailable (retryable) if Redis cannot be reached: that is not
        Reddit's fault, and the scrape is retried like any other outage."""
        while True:
            try:
                granted, wait = await self._acquire(
                    keys=[self.key], args=[self.limit, self.window_seconds]
                )
            except RedisError as exc:
                raise _unavailable(exc) from exc
            if int(granted):
                return
            # Jitter so the processes that waited do not all wake in the same instant.
            delay = float(wait) + random.uniform(0.0, 0.05)
            log.debug("rate limit: waiting %.2fs for the next window", delay)
            await asyncio.sleep(delay)

    async def observe(self, headers: dict[str, str] | None, *, status: int) -> None:
        """Correct the shared window from one response (or note a failed request)."""
        remaining = reset = ""
        if headers is not None:
            remaining = headers.get("x-ratelimit-remaining", "")
            reset = headers.get("x-ratelimit-reset", "")
            if status == 429 and not reset:
                reset = headers.get("retry-after", str(self.window_seconds))
        try:
            await self._observe(
                keys=[self.key],
                args=[
                    remaining or "nil",
                    reset or "nil",
                    _RESET_MARGIN_S,
                    "1" if status == 429 else "0",
                    self.window_seconds,
                ],
            )
        except RedisError as exc:
            raise _unavailable(exc) from exc

    async def close(self) -> None:
        """Close the Redis connection this limiter was given."""
        await self._redis.aclose()

    async def state(self) -> LimiterState:
        values = await self._redis.hmget(self.key, "remaining", "window_end", "granted", "limited")
        now_s, now_us = await self._redis.time()
        now = now_s + now_us / 1e6
        remaining, window_end, granted, limited = values
        return LimiterState(
            remaining=int(float(remaining)) if remaining is not None else None,
            seconds_to_reset=max(0.0, float(window_end) - now) if window_end is not None else None,
            granted=int(granted or 0),
            limited=int(limited or 0),
        )
