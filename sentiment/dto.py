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

import math
import re
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, field_validator

from sentiment.config import valid_subreddit

__all__ = ["EventType", "RawEventDTO", "clean_json", "dump_events", "load_events"]

EventType = Literal["submission", "comment"]

_ID_RE = re.compile(r"^[0-9a-z]{1,16}$")
_LONE_SURROGATE = re.compile(r"[\ud800-\udfff]")
_INT64 = 2**63
_NUL_ESCAPE = b"\\u0000"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def _clean_str(value: str) -> str:
    if "\x00" in value:
        value = value.replace("\x00", "")
    if _LONE_SURROGATE.search(value):
        value = _LONE_SURROGATE.sub("\ufffd", value)
    return value


def _clean_value(value: Any) -> Any:  # noqa: PLR0911 - one return per JSON type reads best
    if isinstance(value, str):
        return _clean_str(value)
    if isinstance(value, dict):
        return {_clean_str(str(k)): _clean_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean_value(v) for v in value]
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return value if -_INT64 <= value < _INT64 else str(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return _clean_str(str(value))


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
    if encoded and _NUL_ESCAPE not in encoded:
        return payload, encoded
    cleaned = _clean_value(payload)
    return cleaned, orjson.dumps(cleaned)


def _canonical_id(value: Any) -> str:
    """Reddit's base36 id, lower case, without a `t1_`/`t3_` fullname prefix."""
    text = str(value).strip().lower()
    if text[:3] in {"t1_", "t3_"}:
        text = text[3:]
    if not _ID_RE.fullmatch(text):
        raise ValueError(f"{value!r} is not a Reddit base36 id")
    return text


def _to_utc(value: Any) -> datetime:
    if isinstance(value, bool):
        raise ValueError("occurred_at must be a datetime, an ISO string or epoch seconds")
    if isinstance(value, int | float):
        if not math.isfinite(value):
            raise ValueError("occurred_at must be a finite epoch timestamp")
        return datetime.fromtimestamp(value, tz=UTC)
    if isinstance(value, str):
        value = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if isinstance(value, datetime):
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    raise ValueError("occurred_at must be a datetime, an ISO string or epoch seconds")


class RawEventDTO(BaseModel):
    """One Reddit submission or comment, normalised and ready to store."""

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
        return _canonical_id(value)

    @field_validator("occurred_at", mode="before")
    @classmethod
    def _check_occurred_at(cls, value: Any) -> datetime:
        return _to_utc(value)

    @field_validator("source_id", mode="before")
    @classmethod
    def _check_source_id(cls, value: Any) -> str:
        return valid_subreddit(str(value))

    @field_validator("payload", mode="before")
    @classmethod
    def _check_payload(cls, value: Any) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise ValueError("payload must be a JSON object")
        return clean_json(value)[0]

    @property
    def key(self) -> tuple[str, datetime]:
        """The primary key in raw_events."""
        return (self.id, self.occurred_at)

    @classmethod
    def from_reddit(cls, item: dict[str, Any], subreddit: str, kind: EventType) -> RawEventDTO:
        """A listing item as an event, for a subreddit the caller has already validated.

        The same checks and normalisation as the validators, done by hand: on the
        scraper's hot path pydantic's per-field machinery cost ~20 µs an item.
        Raises ValueError (or KeyError, TypeError) for an item that is malformed.
        """
        return cls.model_construct(
            id=_canonical_id(item["id"]),
            occurred_at=_to_utc(item["created_utc"]),
            source="reddit",
            source_id=subreddit,
            event_type=kind,
            payload=clean_json(item)[0],
        )


def dump_events(events: Iterable[RawEventDTO]) -> bytes:
    """Encode validated events compactly (for a blob in Redis), as JSON lines."""
    return b"\n".join(
        orjson.dumps(
            [e.id, (e.occurred_at - _EPOCH) // _MICROSECOND, e.source_id, e.event_type, e.payload],
        )
        for e in events
    )


def load_events(blob: bytes) -> list[RawEventDTO]:
    """Decode what `dump_events` wrote. The events were validated before, so skip it."""
    events = []
    for line in blob.splitlines():
        if not line:
            continue
        event_id, micros, source_id, event_type, payload = orjson.loads(line)
        events.append(
            RawEventDTO.model_construct(
                id=event_id,
                occurred_at=_EPOCH + micros * _MICROSECOND,
                source="reddit",
                source_id=source_id,
                event_type=event_type,
                payload=payload,
            )
        )
    return events
