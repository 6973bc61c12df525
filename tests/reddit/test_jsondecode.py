"""decode_json and OrjsonResponse give exactly what `json.loads` (aiohttp's default) gives."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from hypothesis import given, settings
from hypothesis import strategies as st

from sentiment.reddit import jsondecode
from sentiment.reddit.jsondecode import OrjsonResponse, decode_json


def reference(body: bytes) -> Any:
    """What aiohttp's `ClientResponse.json()` does with a UTF-8 JSON body."""
    return json.loads(body.decode("utf-8"))


def same(a: Any, b: Any) -> bool:
    """Equal and of the same types all the way down (an int is not a float), NaN equal to NaN."""
    return repr(a) == repr(b)


def outcome(decode: Callable[[bytes], Any], body: bytes) -> tuple[Any, ...]:
    """The value (as its repr, see `same`), or the error's type and message."""
    try:
        return ("value", repr(decode(body)))
    except ValueError as exc:
        return ("error", type(exc), str(exc))


HUGE = "x" * 200_000
ADVERSARIAL = {
    "lone surrogates": json.dumps({"body": "lone \ud800 high and \udfff low"}),
    "lone surrogate at the end": json.dumps(["\ud83d"]),
    "surrogate pair, escaped": json.dumps({"body": "🚀"}),
    "emoji, raw UTF-8": json.dumps({"body": "🚀🌕 💎🙌 👨‍👩‍👧‍👦 🏳️‍🌈 👍🏽 🇺🇦"}, ensure_ascii=False),
    "RTL": json.dumps({"body": "\u202eسوق\u202c \u200fשוק\u200e"}, ensure_ascii=False),  # noqa: RUF001
    "NUL, escaped": json.dumps({"body": "a\x00b", "\x00": 1}),
    "NaN": json.dumps({"upvote_ratio": math.nan}),
    "Infinity": json.dumps({"a": math.inf, "b": -math.inf}),
    "a double overflowing": '{"a": 1e400, "b": -1e400}',
    "2**70": json.dumps({"score": 2**70, "neg": -(2**70)}),
    "2**64": json.dumps([2**64, 2**64 - 1]),
    "just below -2**63": json.dumps([-(2**63) - 1, -(10**19) + 1]),
    "-2**63": json.dumps([-(2**63), 2**63 - 1]),
    "20 digits in a string": json.dumps({"url": "https://example.com/" + "1" * 25}),
    "19 digits in a string": json.dumps({"url": "https://x.com/a/status/1790000000000000000"}),
    "long float mantissas": json.dumps([0.1, 1 / 3, 1e-320, 5e-324, 1.7976931348623157e308]),
    "200 KB body": json.dumps({"body": HUGE + "🚀", "n": 2**70}, ensure_ascii=False),
    "200 KB body, escaped": json.dumps({"selftext": HUGE + "\ud800"}),
    "duplicate keys": '{"a": 1, "a": 2}',
    "scalars": '[true, false, null, 0, -0, -0.0, 1E5, 1e-5, ""]',
}


@pytest.mark.parametrize("text", list(ADVERSARIAL.values()), ids=list(ADVERSARIAL))
def test_adversarial_bodies_decode_as_json_loads(text: str) -> None:
    body = text.encode("utf-8", "surrogatepass")
    assert same(decode_json(body), reference(body))


INVALID = {
    "UTF-8 BOM": b'\xef\xbb\xbf{"a": 1}',
    "invalid UTF-8": b'{"a": "\xff"}',
    "raw surrogate bytes": '"\ud800"'.encode("utf-8", "surrogatepass"),
    "truncated": b'{"a": [1, 2',
    "trailing comma": b"[1, 2,]",
    "leading zero": b"[01]",
    "control character": b'"a\x01b"',
    "empty": b"",
    "two values": b"1 2",
}


@pytest.mark.parametrize("body", list(INVALID.values()), ids=list(INVALID))
def test_invalid_bodies_raise_what_json_loads_raises(body: bytes) -> None:
    expected = outcome(reference, body)
    assert expected[0] == "error"
    assert outcome(decode_json, body) == expected


def test_ordinary_bodies_never_reach_json(monkeypatch: pytest.MonkeyPatch) -> None:
    """The point of it all: a page without a hazard is orjson's alone."""

    class NoJSON:
        @staticmethod
        def loads(_: Any) -> Any:
            raise AssertionError("json.loads was called")

    monkeypatch.setattr(jsondecode, "json", NoJSON)
    page = {"data": {"children": [{"data": {"id": "abc", "score": 2**63 - 1, "body": "🚀"}}]}}
    assert decode_json(json.dumps(page).encode()) == page


# Text with lone surrogates now and then, as Reddit sends.
_text = st.text(
    st.characters(codec=None, exclude_categories=["Cs"]) | st.sampled_from("\ud800\udfff")
)
_numbers = (
    st.integers(min_value=-(2**80), max_value=2**80)
    | st.integers(min_value=-(2**64) - 10, max_value=-(2**63) + 10)
    | st.integers(min_value=2**64 - 10, max_value=2**64 + 10)
    | st.floats(allow_nan=True, allow_infinity=True)
)
_json_values = st.recursive(
    st.none() | st.booleans() | _numbers | _text,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(_text, inner, max_size=5),
    max_leaves=30,
)


@settings(max_examples=400, deadline=None)
@given(value=_json_values, ensure_ascii=st.booleans())
def test_any_json_decodes_as_json_loads(value: Any, ensure_ascii: bool) -> None:
    # With ensure_ascii=False a lone surrogate goes out raw: not UTF-8, an error either way.
    body = json.dumps(value, ensure_ascii=ensure_ascii).encode("utf-8", "surrogatepass")
    assert outcome(decode_json, body) == outcome(reference, body)


# -- the response class, against aiohttp's own -----------------------------------------------


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _serve(body: bytes, content_type: str, status: int = 200) -> Handler:
    async def handler(_: web.Request) -> web.StreamResponse:
        return web.Response(body=body, status=status, headers={"Content-Type": content_type})

    return handler


RESPONSES = {
    "application/json": (ADVERSARIAL["200 KB body"].encode(), "application/json"),
    "surrogates and big ints": (ADVERSARIAL["lone surrogates"].encode(), "application/json"),
    "charset=utf-8": (b'{"a": 2e400}', "application/json; charset=UTF-8"),
    "charset=latin-1": ('{"a": "é"}'.encode("latin-1"), "application/json; charset=latin-1"),
    "vendor +json": (b'{"a": 1}', "application/vnd.reddit+json"),
    "text/html": (b"<html>busy</html>", "text/html"),
    "whitespace only": (b" \r\n ", "application/json"),
    "invalid": (b'{"a": ', "application/json"),
}


async def _json_both(
    handler: Handler, **json_kwargs: Any
) -> tuple[tuple[str, Any], tuple[str, Any]]:
    """`json()` of the same response by aiohttp's ClientResponse and by OrjsonResponse."""
    app = web.Application()
    app.router.add_get("/", handler)
    async with TestServer(app) as server:
        results = []
        for response_class in (aiohttp.ClientResponse, OrjsonResponse):
            async with (
                aiohttp.ClientSession(response_class=response_class) as session,
                session.get(server.make_url("/")) as response,
            ):
                try:
                    results.append(("value", await response.json(**json_kwargs)))
                except Exception as exc:  # noqa: BLE001 - compared below
                    results.append(("error", f"{type(exc).__name__}: {exc}"))
    return results[0], results[1]


@pytest.mark.parametrize(("body", "content_type"), list(RESPONSES.values()), ids=list(RESPONSES))
@pytest.mark.parametrize("json_kwargs", [{}, {"content_type": None}], ids=["default", "any type"])
def test_the_response_class_answers_as_aiohttp_does(
    body: bytes, content_type: str, json_kwargs: dict[str, Any]
) -> None:
    theirs, ours = asyncio.run(_json_both(_serve(body, content_type), **json_kwargs))
    assert theirs[0] == ours[0]
    assert same(ours[1], theirs[1]) if ours[0] == "value" else ours[1] == theirs[1]


def test_a_body_read_before_the_release_still_decodes_after_it() -> None:
    """Error handlers read a 4xx's reason once asyncprawcore has released the response."""

    async def run() -> Any:
        app = web.Application()
        app.router.add_get("/", _serve(b'{"reason": "quarantined"}', "application/json", 403))
        async with (
            TestServer(app) as server,
            aiohttp.ClientSession(response_class=OrjsonResponse) as session,
        ):
            async with session.get(server.make_url("/")) as response:
                await response.read()
            return await response.json(content_type=None)

    assert asyncio.run(run()) == {"reason": "quarantined"}
