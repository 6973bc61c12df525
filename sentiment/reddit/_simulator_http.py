"""The simulator's HTTP face: routing, Reddit's error shapes, and the runners.

One low-level aiohttp handler does its own routing (Reddit accepts ``.json``
suffixes and trailing slashes everywhere, which a router would multiply).
Listing pages are joined from pre-serialized item bytes, never re-encoded.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import threading
from dataclasses import dataclass
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import quote

import orjson
from aiohttp import BasicAuth, web

if TYPE_CHECKING:
    from collections.abc import Mapping
    from types import TracebackType

    from sentiment.reddit._simulator_store import ItemKind, Stored, Subreddit
    from sentiment.reddit.simulator import Simulator

__all__ = ["SimulatorServer", "SimulatorThread", "listing_bytes"]

_JSON: Final = "application/json; charset=UTF-8"
_UNAUTHORIZED: Final = b'{"message": "Unauthorized", "error": 401}'
_NOT_FOUND: Final = b'{"message": "Not Found", "error": 404}'
_TOO_MANY: Final = b'{"message": "Too Many Requests", "error": 429}'
# asyncprawcore picks InvalidToken from this header; without it a 401 is a KeyError there.
_INVALID_TOKEN: Final = {"www-authenticate": 'Bearer realm="reddit", error="invalid_token"'}
_UNREADABLE: Final = {
    "private": (403, b'{"reason": "private", "message": "Forbidden", "error": 403}'),
    "quarantined": (
        403,
        b'{"reason": "quarantined", "quarantine_message": "This community is quarantined.",'
        b' "message": "Forbidden", "error": 403}',
    ),
    "banned": (404, b'{"reason": "banned", "message": "Not Found", "error": 404}'),
}
_LISTING_ENDPOINTS: Final[dict[str, ItemKind]] = {"new": "submissions", "comments": "comments"}


@dataclass(frozen=True, slots=True)
class _Route:
    endpoint: str  # access_token, new, comments, about, info, thread, stats or unknown
    subreddit: str | None = None
    thing: str | None = None


def _route(method: str, path: str) -> _Route:
    """Map a request to an endpoint, ignoring ``.json``, trailing slashes and case."""
    parts = [part for part in path.rstrip("/").removesuffix(".json").split("/") if part]
    if method == "POST":
        return _Route("access_token" if parts == ["api", "v1", "access_token"] else "unknown")
    match parts:
        case ["api", "info"]:
            route = _Route("info")
        case ["comments", thing, *_]:
            route = _Route("thread", thing=thing)
        case ["r", sub, "comments", thing, *_]:
            route = _Route("thread", sub.lower(), thing)
        case ["r", sub, ("new" | "comments" | "about") as endpoint]:
            route = _Route(endpoint, sub.lower())
        case ["_sim", "stats"]:
            route = _Route("stats")
        case _:
            route = _Route("unknown")
    return route


def listing_bytes(children: list[bytes], after: str | None, before: str | None) -> bytes:
    """A Listing around already-encoded children, without decoding anything.

    One join over every part: joining the children first and then wrapping them
    costs a second large buffer, which measured 30x slower (fresh mmap'd pages).
    """
    parts = [
        b'{"kind":"Listing","data":{"after":', orjson.dumps(after), b',"dist":',
        str(len(children)).encode(), b',"modhash":null,"geo_filter":null,"children":[',
    ]  # fmt: skip
    for index, child in enumerate(children):
        if index:
            parts.append(b",")
        parts.append(child)
    parts += [b'],"before":', orjson.dumps(before), b"}}"]
    return b"".join(parts)


def _thread_bytes(link: Stored, comments: list[Stored]) -> bytes:
    """``[submission listing, comment tree listing]``; `json` because of lone surrogates."""
    things: dict[str, dict[str, Any]] = {}
    roots: list[dict[str, Any]] = []
    for comment in comments:  # oldest first, so parents come before replies
        thing = json.loads(comment.payload)
        things[comment.fullname] = thing
        parent = things.get(comment.parent or "")
        thing["data"]["depth"] = 0 if parent is None else parent["data"]["depth"] + 1
        if parent is None:
            roots.append(thing)
        else:
            if not parent["data"]["replies"]:
                parent["data"]["replies"] = _listing_dict()
            parent["data"]["replies"]["data"]["children"].append(thing)
    tree = json.dumps(_listing_dict(roots), separators=(",", ":")).encode("ascii")
    return b"[" + listing_bytes([link.payload], None, None) + b"," + tree + b"]"


def _listing_dict(children: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    data = {"after": None, "before": None, "dist": None, "modhash": None, "geo_filter": ""}
    return {"kind": "Listing", "data": data | {"children": children or []}}


def _json(status: int, body: bytes, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status, body=body, headers={"Content-Type": _JSON, **(headers or {})}
    )


def _limit(raw: str | None) -> int:
    """Reddit's `limit`: 25 by default, at most 100."""
    try:
        limit = int(raw or 25)
    except ValueError:
        return 25
    return min(limit, 100) if limit > 0 else 25


class _Handler:
    """Serves one `Simulator`; aiohttp calls it for every request."""

    def __init__(self, sim: Simulator) -> None:
        self._sim = sim

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        sim = self._sim
        route = _route(request.method, request.path)
        sim.stats.requests[route.endpoint] += 1
        if sim.latency:
            await asyncio.sleep(sim.latency)
        if route.endpoint == "access_token":
            response = await self._token(request)
        elif route.endpoint == "stats":
            response = _json(200, orjson.dumps(sim.stats.as_dict()))
        else:
            maybe = await self._api(request, route)
            if maybe is None:  # a "drop" fault: aiohttp finds the transport closed and gives up
                if request.transport is not None:
                    request.transport.close()
                return web.Response()
            response = maybe
        sim.stats.statuses[response.status] += 1
        return response

    async def _token(self, request: web.BaseRequest) -> web.Response:
        try:
            basic = BasicAuth.decode(request.headers.get("Authorization", ""))
        except ValueError:
            return _json(401, _UNAUTHORIZED)
        form = {key: str(value) for key, value in (await request.post()).items()}
        status, body = self._sim.issue_token(basic.login, basic.password, form)
        return _json(status, body)

    async def _api(self, request: web.BaseRequest, route: _Route) -> web.Response | None:
        sim = self._sim
        fault = sim.take_fault(route.subreddit)
        if fault is not None:
            if fault.kind == "drop":
                return None
            if fault.kind == "status":
                phrase = HTTPStatus(fault.status).phrase
                return _json(fault.status, orjson.dumps({"message": phrase, "error": fault.status}))
            await asyncio.sleep(fault.delay)
        client = sim.client_for(request.headers.get("Authorization"))
        if client is None:
            return _json(401, _UNAUTHORIZED, _INVALID_TOKEN)
        allowed, limits = sim.charge(client)
        if not allowed:
            sim.stats.rate_limited += 1
            return _json(429, _TOO_MANY, limits)
        status, body, extra = self._dispatch(request, route)
        return _json(status, body, limits | extra)

    def _dispatch(
        self, request: web.BaseRequest, route: _Route
    ) -> tuple[int, bytes, dict[str, str]]:
        """Status, body and extra headers of an authorized, in-budget request."""
        if route.endpoint == "info":
            names = [name for name in request.query.get("id", "").split(",") if name][:100]
            return 200, listing_bytes(self._sim.lookup(names), None, None), {}
        if route.endpoint == "thread":
            return self._thread(route.thing or "")
        if route.endpoint == "unknown" or route.subreddit is None:
            return 404, _NOT_FOUND, {}
        return self._subreddit(request, route.endpoint, route.subreddit)

    def _subreddit(
        self, request: web.BaseRequest, endpoint: str, name: str
    ) -> tuple[int, bytes, dict[str, str]]:
        """/r/<name>/new, /comments or /about, or why they cannot be read."""
        sub = self._sim.subreddit(name)
        if sub is None and endpoint == "about":
            return 404, _NOT_FOUND, {}
        if sub is None:
            search = f"{request.scheme}://{request.host}/subreddits/search.json?q={quote(name)}"
            return 302, b"", {"Location": search}
        if sub.kind in _UNREADABLE:
            return (*_UNREADABLE[sub.kind], {})
        if endpoint == "about":
            return 200, sub.about, {}
        return 200, self._listing(sub, endpoint, request.query), {}

    def _listing(self, sub: Subreddit, endpoint: str, query: Mapping[str, str]) -> bytes:
        after, before, limit = query.get("after"), query.get("before"), _limit(query.get("limit"))
        children, after, before = self._sim.page(
            sub, _LISTING_ENDPOINTS[endpoint], after, before, limit
        )
        return listing_bytes(children, after, before)

    def _thread(self, id36: str) -> tuple[int, bytes, dict[str, str]]:
        found = self._sim.thread(id36)
        if found is None:
            return 404, _NOT_FOUND, {}
        link, comments = found
        sub = self._sim.subreddit(link.subreddit)
        if sub is not None and sub.kind in _UNREADABLE:
            return (*_UNREADABLE[sub.kind], {})
        return 200, _thread_bytes(link, comments), {}


class SimulatorServer:
    """Serves a `Simulator` on the running event loop; ``async with`` yields the base URL."""

    def __init__(self, sim: Simulator, *, host: str = "127.0.0.1", port: int = 0) -> None:
        if not ipaddress.IPv4Address(host).is_loopback:
            raise ValueError(f"the simulator binds to loopback only, not {host}")
        self._sim, self._host, self._port = sim, host, port
        self._runner: web.ServerRunner | None = None
        self.url = ""

    async def start(self) -> str:
        """Listen (port 0: any free port) and return ``http://host:port``."""
        # handler_cancellation: a client that gave up on a slow response frees its handler.
        server = web.Server(_Handler(self._sim), handler_cancellation=True, access_log=None)
        self._runner = web.ServerRunner(server, shutdown_timeout=1.0)
        await self._runner.setup()
        await web.TCPSite(self._runner, self._host, self._port).start()
        port = self._runner.addresses[0][1]
        self.url = f"http://{self._host}:{port}"
        return self.url

    async def stop(self) -> None:
        """Close the listener and every connection."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> str:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()


class SimulatorThread:
    """Runs a `SimulatorServer` on its own loop in a background thread, for sync code.

    ``with SimulatorThread(sim) as url:`` serves until the block ends.
    """

    def __init__(self, sim: Simulator, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self._server = SimulatorServer(sim, host=host, port=port)
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The base URL, once started."""
        return self._server.url

    def start(self) -> str:
        """Start serving and return the base URL; raises what the server raised."""
        self._thread = threading.Thread(target=self._run, name="reddit-simulator", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            self._thread.join()
            raise self._error
        return self.url

    def stop(self) -> None:
        """Stop serving and wait for the thread to end."""
        if self._loop is not None and self._stopping is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # noqa: BLE001 - handed to start() in the caller's thread
            self._error = exc
        finally:
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        async with self._server:
            self._ready.set()
            await self._stopping.wait()

    def __enter__(self) -> str:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
