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
from typing import Any

import aiohttp
import orjson

__all__ = ["OrjsonResponse", "decode_json"]

_DIGITS_TO_ZERO = bytes.maketrans(b"123456789", b"000000000")
_NINETEEN_DIGITS = b"0" * 19
_TWENTY_DIGITS = b"0" * 20
_MINUS_NINETEEN_DIGITS = b"-" + _NINETEEN_DIGITS
_AIOHTTP_LOADS = json.loads  # aiohttp's default `loads`, the one asyncprawcore leaves in place


def decode_json(body: bytes) -> Any:
    """What `json.loads(body.decode("utf-8"))` returns (or raises), mostly decoded by orjson."""
    masked = body.translate(_DIGITS_TO_ZERO)
    # The common case costs one search: no run of 19 digits at all.
    if _NINETEEN_DIGITS not in masked or (
        _TWENTY_DIGITS not in masked and _MINUS_NINETEEN_DIGITS not in masked
    ):
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError:
            pass  # lone surrogates, NaN, invalid JSON: json's answer, below
    return json.loads(body.decode("utf-8"))


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
        return decode_json(stripped) if stripped else None
