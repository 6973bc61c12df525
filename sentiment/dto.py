"""RawEventDTO: the one shape every scraper produces and every sink consumes.

Normalisation happens here, once, so that anything Reddit can send is storable:

* NUL characters are removed from every string (PostgreSQL rejects them in
  text and jsonb);
* lone UTF-16 surrogates (valid in JSON escapes, invalid in UTF-8) become
  U+FFFD;
* integers beyond 64 bits become strings and NaN/Infinity become null (JSON
  and jsonb have no room for them);
* `occurred_at` is a tz-aware UTC datetime whatever it arrived as.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import orjson
from pydantic import (
    BaseModel,
    ConfigDict,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
)

from sentiment.config import valid_subreddit

__all__ = [
    "EventType", "RawEventDTO", "canonical_id", "clean_json", "clean_text", "dump_events",
    "load_events", "loads_lenient", "to_utc",
]  # fmt: skip

EventType = Literal["submission", "comment"]

_ID_RE = re.compile(r"^[0-9a-z]{1,16}$")
_LONE_SURROGATE = re.compile(r"[\ud800-\udfff]")
# The integers orjson encodes; beyond them a payload keeps the number as text.
_INT_MIN, _INT_END = -(2**63), 2**64
_NUL_ESCAPE = b"\\u0000"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
_FIELDS_GIVEN = ("id", "occurred_at", "source_id", "event_type", "payload")  # "source": default


def clean_text(value: str) -> str:
    """`value` storable in PostgreSQL text: NULs dropped, lone surrogates replaced."""
    if "\x00" in value:
        value = value.replace("\x00", "")
    if _LONE_SURROGATE.search(value):
        value = _LONE_SURROGATE.sub("\ufffd", value)
    return value


def _clean_value(value: Any) -> Any:  # noqa: PLR0911 - one return per JSON type reads best
    if isinstance(value, str):
        return clean_text(value)
    if isinstance(value, dict):
        return {clean_text(str(k)): _clean_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean_value(v) for v in value]
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return value if _INT_MIN <= value < _INT_END else str(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return clean_text(str(value))


def loads_lenient(data: bytes | str) -> Any:
    """`json.loads`, with NaN, Infinity and numbers beyond a double read as None:
    what a payload holds for them once the DTO has made it storable."""
    return json.loads(data, parse_constant=_none, parse_float=_finite)


def _none(_: str) -> None:
    return None


def _finite(text: str) -> float | None:
    value = float(text)
    return value if math.isfinite(value) else None


def clean_json(payload: dict[str, Any]) -> tuple[dict[str, Any], bytes]:
    """Return the payload made storable, and its JSON encoding.

    Fast path: orjson encodes a clean payload in C and we only look for an
    escaped NUL. It refuses lone surrogates and huge integers, and any NUL
    shows up as ``\\u0000``; only then do we walk the structure in Python.
    """
    try:
        encoded = orjson.dumps(payload)
    except (TypeError, orjson.JSONEncodeError):
        encoded = b""
    # orjson writes NaN and infinities as null: then the payload must say so too.
    # (Most payloads hold a null; decoding and comparing is the cheap check.)
    if (
        encoded
        and _NUL_ESCAPE not in encoded
        and (b"null" not in encoded or orjson.loads(encoded) == payload)
    ):
        return payload, _trimmed(encoded)
    cleaned = _clean_value(payload)
    return cleaned, _trimmed(orjson.dumps(cleaned))


def _trimmed(encoded: bytes) -> bytes:
    """orjson's output copied without its spare capacity, for bytes that are kept.

    orjson (3.12 and later) leaves the returned bytes holding the buffer it grew
    to: 16 KB for a 2 KB payload (tracemalloc; ijl/orjson does not shrink it, see
    home-assistant/core#181245). An event keeps its payload JSON for a batch's
    life, so without the copy a batch would hold several times its size. The
    copy of a 2 KB payload costs ~0.3 µs (timeit).
    """
    return bytes(memoryview(encoded))


def canonical_id(value: Any) -> str:
    """Reddit's base36 id, lower case, without a `t1_`/`t3_` fullname prefix."""
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ValueError(f"{value!r} is not a Reddit base36 id")
    text = str(value).strip().lower()
    if text[:3] in {"t1_", "t3_"}:
        text = text[3:]
    if not _ID_RE.fullmatch(text):
        raise ValueError(f"{value!r} is not a Reddit base36 id")
    return text


def to_utc(value: Any) -> datetime:
    """An aware UTC datetime from a datetime (naive means UTC), ISO 8601 text or epoch seconds."""
    if isinstance(value, bool):
        raise ValueError("occurred_at must be a datetime, an ISO string or epoch seconds")
    try:
        if isinstance(value, int | float):
            if not math.isfinite(value):
                raise ValueError("occurred_at must be a finite epoch timestamp")
            return datetime.fromtimestamp(value, tz=UTC)
        if isinstance(value, str):
            value = datetime.fromisoformat(value.replace("Z", "+00:00"))
        if isinstance(value, datetime):
            return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    except (OverflowError, OSError):  # beyond what a datetime (or time_t) holds in UTC
        raise ValueError(f"occurred_at {value!r} is out of range") from None
    raise ValueError("occurred_at must be a datetime, an ISO string or epoch seconds")


class RawEventDTO(BaseModel):
    """One Reddit submission or comment, normalised and ready to store."""

    # `payload` encoded as JSON, kept once made (see `payload_json`). A slot, not
    # a field: it is derived from `payload`, so equality, dumps and reprs ignore it.
    __slots__ = ("_payload_json",)
    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str
    occurred_at: datetime
    source: Literal["reddit"] = "reddit"
    source_id: str
    event_type: EventType
    payload: dict[str, Any]

    @field_validator("id", mode="before")
    @classmethod
    def _check_id(cls, value: Any) -> str:
        return canonical_id(value)

    @field_validator("occurred_at", mode="before")
    @classmethod
    def _check_occurred_at(cls, value: Any) -> datetime:
        return to_utc(value)

    @field_validator("source_id", mode="before")
    @classmethod
    def _check_source_id(cls, value: Any) -> str:
        if not isinstance(value, str):
            raise ValueError(f"{value!r} is not a subreddit name")
        return valid_subreddit(value)

    # "plain": the validator's result is the value. In "before" mode pydantic would
    # validate it again, a key-by-key copy of the dict clean_json just returned
    # (~4 µs an event). (occurred_at stays "before": in "plain" mode pydantic's
    # JSON serializer no longer knows the field is a datetime.)
    @field_validator("payload", mode="plain")
    @classmethod
    def _check_payload(cls, value: Any) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise ValueError("payload must be a JSON object")
        try:
            return clean_json(value)[0]
        except (TypeError, RecursionError) as exc:  # nested too deep, or not JSON at all
            raise ValueError(f"payload cannot be stored as JSON: {exc}") from None

    @property
    def key(self) -> tuple[str, datetime]:
        """The primary key in raw_events."""
        return (self.id, self.occurred_at)

    @property
    def payload_json(self) -> bytes:
        """`payload` as JSON, encoded once.

        The scraper, the batch blob, the database COPY and the CSV all need these
        bytes; encoding a cold 1.5 KB payload costs ~7 µs, so it happens once per
        process: `from_reddit` and `load_events` keep the bytes they already have.
        A payload that skipped validation is encoded as it is (a NUL stays, and
        the database refuses the row); only what JSON cannot hold at all (a lone
        surrogate, a huge integer) is cleaned first.
        """
        try:
            return self._payload_json  # type: ignore[no-any-return]
        except AttributeError:
            pass
        try:
            encoded = _trimmed(orjson.dumps(self.payload))
        except (TypeError, orjson.JSONEncodeError):
            encoded = clean_json(self.payload)[1]
        return self._keep_json(encoded)

    def _keep_json(self, encoded: bytes) -> bytes:
        object.__setattr__(self, "_payload_json", encoded)  # a frozen model; not a field
        return encoded

    @classmethod
    def from_trusted_json(
        cls,
        *,
        id: str,
        occurred_at: datetime,
        source_id: str,
        event_type: EventType,
        payload_json: bytes,
    ) -> RawEventDTO:
        """An event from values that are valid already, its payload still JSON.

        For the hot paths that hold an event's payload as bytes and mostly pass
        them on (a listing page, a batch blob): `payload` is decoded the first
        time something reads it, and `payload_json` stays the bytes given. The
        caller vouches for every value, as with `model_construct`: `id`,
        `source_id` and `event_type` canonical, `occurred_at` aware UTC, and
        `payload_json` a JSON object the database can store (no NUL, no lone
        surrogate). Built without pydantic's machinery: ~1 µs, where
        `model_construct` costs several.
        """
        event = cls.__new__(cls)
        setattr_ = object.__setattr__
        setattr_(event, "__dict__", {
            "id": id, "occurred_at": occurred_at, "source": "reddit", "source_id": source_id,
            "event_type": event_type,
        })  # fmt: skip
        setattr_(event, "__pydantic_fields_set__", set(_FIELDS_GIVEN))
        setattr_(event, "__pydantic_extra__", None)
        setattr_(event, "__pydantic_private__", None)
        setattr_(event, "_payload_json", payload_json)
        return event

    # An event from `from_trusted_json` has no "payload" in its __dict__ until it
    # is read: attribute access finds it through __getattr__, and whatever reads
    # the fields' __dict__ directly (equality, repr, dumps, pickling, copies)
    # decodes it first, so the event looks like any other from the outside.

    def __getattr__(self, name: str) -> Any:
        if name == "payload":
            return self._decoded_payload()
        return super().__getattr__(name)  # type: ignore[misc]

    def _decoded_payload(self) -> dict[str, Any]:
        try:
            return self.__dict__["payload"]  # type: ignore[no-any-return]
        except KeyError:
            pass
        try:
            payload = orjson.loads(self._payload_json)
        except orjson.JSONDecodeError:
            # A number beyond a double (1e400), which no page check sees without
            # decoding: None, as `from_reddit` would store it. (Not JSON at all:
            # json raises too, a ValueError.)
            payload = loads_lenient(self._payload_json)
        self.__dict__["payload"] = payload
        return payload  # type: ignore[no-any-return]

    def peek_payload(self) -> Any:
        """`payload` if it is decoded already, else None (then `payload_json` holds it).

        For a reader that wants only a few fields and can take them from the JSON
        more cheaply than decoding all of it (the CSV export)."""
        return self.__dict__.get("payload")

    def __iter__(self) -> Any:  # dict(event), and pydantic dumping it inside another model
        self._decoded_payload()
        return super().__iter__()

    def __eq__(self, other: object) -> bool:
        if isinstance(other, RawEventDTO):
            self._decoded_payload()
            other._decoded_payload()
        return super().__eq__(other)

    # Unhashable, like any model holding a dict (pydantic's hash of a frozen model
    # would fail on the payload anyway).
    __hash__ = None  # type: ignore[assignment]

    def __repr_args__(self) -> Any:
        self._decoded_payload()
        return super().__repr_args__()

    @model_serializer(mode="wrap")
    def _serialized(self, handler: SerializerFunctionWrapHandler) -> Any:
        # Every pydantic dump (model_dump, model_dump_json), also of an event
        # inside another model or a list.
        self._decoded_payload()
        return handler(self)

    def __getstate__(self) -> dict[Any, Any]:
        self._decoded_payload()
        return super().__getstate__()

    def __copy__(self) -> RawEventDTO:
        self._decoded_payload()
        return super().__copy__()

    def __deepcopy__(self, memo: dict[int, Any] | None = None) -> RawEventDTO:
        self._decoded_payload()
        return super().__deepcopy__(memo)

    @classmethod
    def from_reddit(cls, item: dict[str, Any], subreddit: str, kind: EventType) -> RawEventDTO:
        """A listing item as an event, for a subreddit the caller has already validated.

        The same checks and normalisation as the validators, done by hand: on the
        scraper's hot path pydantic's per-field machinery cost ~20 µs an item.
        Raises ValueError (or KeyError, TypeError) for an item that is malformed.
        """
        payload, encoded = clean_json(item)
        event = cls.model_construct(
            id=canonical_id(item["id"]),
            occurred_at=to_utc(item["created_utc"]),
            source="reddit",
            source_id=subreddit,
            event_type=kind,
            payload=payload,
        )
        event._keep_json(encoded)
        return event


def dump_events(events: Iterable[RawEventDTO]) -> bytes:
    """Encode validated events compactly (for a blob in Redis).

    One line per event: ``[id, epoch µs, source_id, event_type]`` as JSON, a
    tab, then the payload's JSON. JSON never holds a raw tab or newline, and
    keeping the payload's bytes apart lets `load_events` hand them on unencoded.
    """
    return b"\n".join(
        orjson.dumps([e.id, (e.occurred_at - _EPOCH) // _MICROSECOND, e.source_id, e.event_type])
        + b"\t"
        + e.payload_json
        for e in events
    )


def load_events(blob: bytes) -> list[RawEventDTO]:
    """Decode what `dump_events` wrote. The events were validated before, so skip it.

    Payloads stay JSON until something reads them (`from_trusted_json`): the
    insert only needs their bytes. Lines without a tab are the earlier format
    (one JSON array per event), which a blob written before an upgrade may
    still hold.
    """
    events = []
    for line in blob.splitlines():
        if not line:
            continue
        head, tab, payload_json = line.partition(b"\t")
        if tab:
            event_id, micros, source_id, event_type = orjson.loads(head)
            event = RawEventDTO.from_trusted_json(
                id=event_id,
                occurred_at=_EPOCH + micros * _MICROSECOND,
                source_id=source_id,
                event_type=event_type,
                payload_json=payload_json,
            )
        else:
            event_id, micros, source_id, event_type, payload = orjson.loads(line)
            event = RawEventDTO.model_construct(
                id=event_id,
                occurred_at=_EPOCH + micros * _MICROSECOND,
                source="reddit",
                source_id=source_id,
                event_type=event_type,
                payload=payload,
            )
        events.append(event)
    return events
