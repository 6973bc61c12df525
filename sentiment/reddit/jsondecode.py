"""Response bodies decoded by orjson, into exactly the objects `json` would give.

asyncprawcore reads every response with aiohttp's `ClientResponse.json()`: the
body decoded to a str, then `json.loads`. orjson parses the bytes in C, with
no str copy, and gives the same objects, except in these cases, where
`json.loads` decodes instead:

* lone surrogate escapes (`"\\ud800"`, which Reddit does send): orjson refuses
  them, `json` keeps them (clean_json replaces them later);
* `NaN`, `Infinity`, `-Infinity` and numbers that overflow a double: orjson
  refuses them, `json` reads floats;
* integers outside [-2**63, 2**64): orjson reads them as lossy floats, `json`
  as exact ints. Such a literal has at least 20 digits, or a minus and 19, so
  a body where no run of digits is that long cannot hold one. One C translate
  (digits to "0") and a substring search find out; a regex over a ~200 KB page
  costs ten times as much. Digits inside strings (a tweet's 19-digit id in a
  URL) match too: such a page merely takes the slower path.

Errors stay those of `json.loads(body.decode("utf-8"))`: whatever orjson
refuses goes to `json`, which raises what it raised before. One difference
remains: arrays or objects nested about 1,000 deep, where `json` runs out of
recursion (RecursionError) and orjson (up to 1,024) returns the value.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import aiohttp
import orjson

from sentiment.dto import loads_lenient

__all__ = ["OrjsonResponse", "decode_json", "no_huge_integers", "raw_body"]

_DIGITS_TO_ZERO = bytes.maketrans(b"123456789", b"000000000")
_NINETEEN_DIGITS = b"0" * 19
_TWENTY_DIGITS = b"0" * 20
_MINUS_NINETEEN_DIGITS = b"-" + _NINETEEN_DIGITS
_AIOHTTP_LOADS = json.loads  # aiohttp's default `loads`, the one asyncprawcore leaves in place


def decode_json(body: bytes, *, lenient: bool = False) -> Any:
    """What `json.loads(body.decode("utf-8"))` returns (or raises), mostly decoded by
    orjson. `lenient`: NaN, Infinity and numbers beyond a double become None, as
    an event stores them (for listing pages, whose items become events)."""
    if no_huge_integers(body):
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError:
            pass  # lone surrogates, NaN, invalid JSON: json's answer, below
    text = body.decode("utf-8")
    return loads_lenient(text) if lenient else json.loads(text)


def no_huge_integers(body: bytes) -> bool:
    """Whether `body` surely holds no integer literal outside [-2**63, 2**64), the
    range in which orjson reads integers as `json` does (exactly)."""
    masked = body.translate(_DIGITS_TO_ZERO)
    # The common case costs one search: no run of 19 digits at all.
    return _NINETEEN_DIGITS not in masked or (
        _TWENTY_DIGITS not in masked and _MINUS_NINETEEN_DIGITS not in masked
    )


_RAW_PATH: ContextVar[str | None] = ContextVar("sentiment_raw_body_path", default=None)


@contextmanager
def raw_body(path: str) -> Iterator[None]:
    """Within this block (in this task), a successful JSON response from a URL
    ending in `path` comes back from `json()` as its undecoded bytes.

    For a caller that decodes the body its own way but wants it fetched through
    asyncprawcore (authentication, token refresh, retries), which hands back
    whatever `json()` returns. Any other response (the token endpoint, errors)
    is decoded as always.
    """
    token = _RAW_PATH.set("/" + path.strip("/"))
    try:
        yield
    finally:
        _RAW_PATH.reset(token)


def _codec(name: str) -> str:
    try:
        return codecs.lookup(name).name
    except LookupError:
        return name


class OrjsonResponse(aiohttp.ClientResponse):
    """A ClientResponse whose `json()` decodes UTF-8 JSON bodies with `decode_json`.

    Anything else (another `loads`, another charset or content type) goes to
    aiohttp's own `json()`, so the content-type check and its errors are
    aiohttp's.
    """

    async def json(
        self,
        *,
        encoding: str | None = None,
        loads: Any = _AIOHTTP_LOADS,
        content_type: str | None = "application/json",
    ) -> Any:
        if (
            loads is not _AIOHTTP_LOADS
            or content_type not in (None, "application/json")
            or self.content_type != "application/json"
            or _codec(encoding or self.get_encoding()) != "utf-8"
        ):
            return await super().json(encoding=encoding, loads=loads, content_type=content_type)
        # As aiohttp does: a body already read stays readable after the release
        # (error handlers read a 4xx's reason once the response is closed).
        body = self._body if self._body is not None else await self.read()
        stripped = body.strip()
        raw_path = _RAW_PATH.get()
        if raw_path is not None and self.status == 200 and self.url.path.endswith(raw_path):
            return stripped
        return decode_json(stripped) if stripped else None
