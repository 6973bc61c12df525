"""RawEventDTO: normalisation makes anything Reddit can send storable."""

from __future__ import annotations

import copy
import pickle
import tracemalloc
from datetime import UTC, datetime, timedelta, timezone

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import TypeAdapter, ValidationError
from sqlalchemy import text

from sentiment.dto import RawEventDTO, clean_json, dump_events, load_events
from sentiment.reddit.jsondecode import decode_json
from sentiment.sinks.postgres import insert_batch


def _nested(depth: int) -> list:
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


def _event(**overrides):
    fields = {
        "id": "abc123",
        "occurred_at": 1_700_000_000.5,
        "source_id": "WallStreetBets",
        "event_type": "submission",
        "payload": {"title": "x"},
    }
    fields.update(overrides)
    return RawEventDTO(**fields)


def test_epoch_and_naive_times_become_utc():
    assert _event().occurred_at == datetime(2023, 11, 14, 22, 13, 20, 500000, tzinfo=UTC)
    naive = _event(occurred_at=datetime(2024, 1, 1, 12, 0))
    assert naive.occurred_at == datetime(2024, 1, 1, 12, 0, tzinfo=UTC)
    aware = _event(occurred_at=datetime(2024, 1, 1, 12, 0, tzinfo=timezone(timedelta(hours=2))))
    assert aware.occurred_at == datetime(2024, 1, 1, 10, 0, tzinfo=UTC)
    assert aware.occurred_at.tzinfo is UTC


def test_subreddit_is_canonical_and_fullname_prefix_dropped():
    event = _event(id="t3_ABC123", source_id="r/WallStreetBets")
    assert event.id == "abc123"
    assert event.source_id == "wallstreetbets"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("source_id", "../etc"),
        ("source_id", "a"),
        ("source_id", "x" * 22),
        ("event_type", "vote"),
        ("id", "not an id!"),
        ("payload", ["a", "list"]),
        ("occurred_at", float("nan")),
        ("occurred_at", True),
        # Beyond what a datetime holds: a clear error, not a bare OverflowError.
        ("occurred_at", 1e20),
        ("occurred_at", "0001-01-01T00:30:00+01:00"),
        ("occurred_at", "9999-12-31T23:59:59-01:00"),
        # Not an id or a name: not the text "none" or "true".
        ("id", None),
        ("id", True),
        ("source_id", None),
        ("payload", {"deep": _nested(300)}),  # deeper than JSON encoders go
    ],
)
def test_bad_fields_are_refused_with_the_field_named(field, value):
    with pytest.raises(ValidationError) as caught:
        _event(**{field: value})
    assert caught.value.errors()[0]["loc"] == (field,)


def test_nul_lone_surrogates_huge_ints_and_nan_are_cleaned():
    dirty = {
        "title": "a\x00b",
        "body\x00": "half \ud83d of an emoji",
        "nested": [{"x": "\udfff"}, 2**70, float("nan"), float("inf"), True, None, 1.5],
    }
    payload = _event(payload=dirty).payload
    assert payload == {
        "title": "ab",
        "body": "half \ufffd of an emoji",
        "nested": [{"x": "\ufffd"}, str(2**70), None, None, True, None, 1.5],
    }


@pytest.mark.parametrize("dirty", [
    {"score": float("-inf"), "ratio": float("nan")},  # alone: the JSON still says null
    {"score": float("inf"), "title": "a\x00b"},
])  # fmt: skip
def test_a_payload_and_its_json_agree_on_what_json_cannot_hold(dirty):
    event = _event(payload=dirty)
    assert orjson.loads(event.payload_json) == event.payload
    assert event.payload["score"] is None


def test_a_big_integer_is_kept_alike_with_or_without_a_nul_elsewhere():
    plain = _event(payload={"n": 2**63}).payload
    with_nul = _event(payload={"n": 2**63, "title": "a\x00b"}).payload
    assert plain["n"] == with_nul["n"] == 2**63


def test_clean_payload_is_left_as_is():
    payload = {"title": "🚀 emoji and ünïcødé", "score": -3}
    cleaned, encoded = clean_json(payload)
    assert cleaned is payload
    assert encoded == '{"title":"🚀 emoji and ünïcødé","score":-3}'.encode()


def test_blob_round_trip_keeps_microseconds():
    events = [
        _event(occurred_at=datetime(2024, 5, 1, 1, 2, 3, 456789, tzinfo=UTC)),
        _event(id="zz9"),
    ]
    assert load_events(dump_events(events)) == events


def test_payload_json_is_encoded_once_and_travels_with_the_blob():
    event = _event(payload={"title": "tab\there", "body": "line\nbreak"})
    assert orjson.loads(event.payload_json) == event.payload
    assert event.payload_json is event.payload_json  # kept, not encoded again

    (loaded,) = load_events(dump_events([event]))

    assert loaded == event
    assert loaded.payload_json == event.payload_json
    assert b"\t" not in event.payload_json  # JSON escapes it, so the blob's tab is unambiguous


@pytest.mark.parametrize("build", ["validated", "from_reddit", "skipped_validation"])
def test_kept_payload_json_holds_no_spare_buffer(build):
    payload = {"id": "abc123", "created_utc": 1.7e9, "title": "t" * 40}
    payload |= {f"field_{n}": "reddit text " * 15 for n in range(12)}  # ~2.5 KB of JSON
    tracemalloc.start()
    try:
        if build == "validated":
            event = _event(payload=payload)
        elif build == "from_reddit":
            event = RawEventDTO.from_reddit(payload, "stocks", "submission")
        else:
            event = RawEventDTO.model_construct(**{**_event().__dict__, "payload": payload})
        encoded = event.payload_json
        held = sum(
            stat.size
            for stat in tracemalloc.take_snapshot().statistics("traceback")
            if stat.size >= len(encoded)  # the one allocation that holds the JSON
        )
    finally:
        tracemalloc.stop()
    assert len(encoded) > 2000
    assert len(encoded) <= held < 1.2 * len(encoded)  # orjson's own buffer: 2-8 times that


def test_blobs_in_the_earlier_format_still_load():
    # One JSON array per line: what a blob left in Redis by the previous release holds.
    event = _event(occurred_at=datetime(2024, 5, 1, 1, 2, 3, 456789, tzinfo=UTC))
    micros = (event.occurred_at - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)
    old = orjson.dumps([event.id, micros, event.source_id, event.event_type, event.payload])

    assert load_events(old + b"\n") == [event]


def test_a_payload_that_skipped_validation_is_cleaned_when_encoded():
    event = RawEventDTO.model_construct(
        id="abc", occurred_at=datetime(2024, 1, 1, tzinfo=UTC), source="reddit",
        source_id="stocks", event_type="comment", payload={"body": "nul\x00 and \ud800"},
    )  # fmt: skip
    assert orjson.loads(event.payload_json) == {"body": "nul and \ufffd"}  # JSON cannot hold it


def test_a_nul_that_skipped_validation_reaches_the_database_to_be_refused():
    event = RawEventDTO.model_construct(
        id="abc", occurred_at=datetime(2024, 1, 1, tzinfo=UTC), source="reddit",
        source_id="stocks", event_type="comment", payload={"body": "nul\x00"},
    )  # fmt: skip
    assert event.payload_json == b'{"body":"nul\\u0000"}'  # the sink quarantines such a row


reddit_text = st.text(st.characters(codec=None, exclude_categories=()), max_size=200)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(title=reddit_text, body=reddit_text, author=reddit_text)
def test_any_unicode_round_trips_through_the_database(db, title, body, author):
    event = _event(payload={"title": title, "selftext": body, "author": author})
    with db.begin() as conn:
        conn.execute(text("TRUNCATE raw_events"))

    result = insert_batch([event])

    assert result.rejected == 0
    with db.connect() as conn:
        stored = conn.execute(text("SELECT payload FROM raw_events")).scalar_one()
    assert stored == event.payload
    assert "\x00" not in stored["title"]


def test_from_reddit_builds_what_validation_builds():
    for payload in (
        {"id": "abc123", "created_utc": 1_700_000_000.5, "title": "ok"},
        {"id": "t3_ABC125", "created_utc": 1_700_000_000, "title": "fullname, upper case"},
        {
            "id": "abc124",
            "created_utc": 1_700_000_001,
            "title": "a\x00b",
            "x": "\ud800",
            "n": 2**70,
        },
    ):
        fast = RawEventDTO.from_reddit(payload, "stocks", "submission")
        slow = RawEventDTO(
            id=payload["id"], occurred_at=payload["created_utc"], source_id="stocks",
            event_type="submission", payload=payload,
        )  # fmt: skip
        assert fast == slow
        assert fast.occurred_at.tzinfo is UTC


@pytest.mark.parametrize(
    "item",
    [
        {"id": "NOT an id", "created_utc": 1.0},
        {"id": "abc", "created_utc": "yesterday"},
        {"id": "abc", "created_utc": float("inf")},
        {"id": "abc", "created_utc": True},
        {"id": "abc"},
        {"created_utc": 1.0},
    ],
)
def test_from_reddit_refuses_malformed_items(item):
    with pytest.raises((ValueError, KeyError, TypeError)):
        RawEventDTO.from_reddit(item, "stocks", "comment")


def test_events_serialise_with_pydantic_without_warnings():
    event = _event(occurred_at=datetime(2024, 5, 1, 1, 2, 3, tzinfo=UTC))
    dumped = orjson.loads(event.model_dump_json())  # a serializer warning fails the test
    assert dumped["occurred_at"] == "2024-05-01T01:02:03Z"
    assert dumped["payload"] == event.payload
    assert RawEventDTO.model_validate_json(event.model_dump_json()) == event


def _lazy_twin(event: RawEventDTO) -> RawEventDTO:
    return RawEventDTO.from_trusted_json(
        id=event.id,
        occurred_at=event.occurred_at,
        source_id=event.source_id,
        event_type=event.event_type,
        payload_json=event.payload_json,
    )


def test_an_event_whose_payload_is_decoded_on_use_behaves_like_any_other():
    eager = _event(payload={"title": "é \U0001f600", "nested": {"list": [1, 2.5, None, True]}})

    assert _lazy_twin(eager) == eager
    assert eager == _lazy_twin(eager)
    assert _lazy_twin(eager) != _event(payload={"title": "other"})
    assert repr(_lazy_twin(eager)) == repr(eager)
    assert _lazy_twin(eager).model_dump() == eager.model_dump()
    assert _lazy_twin(eager).model_dump_json() == eager.model_dump_json()
    assert pickle.loads(pickle.dumps(_lazy_twin(eager))) == eager
    assert copy.copy(_lazy_twin(eager)) == eager
    assert copy.deepcopy(_lazy_twin(eager)) == eager
    assert _lazy_twin(eager).model_copy(update={"id": "zz1"}).payload == eager.payload
    lazy = _lazy_twin(eager)
    assert lazy.payload == eager.payload
    assert lazy.payload is lazy.payload  # decoded once, then kept
    assert lazy.payload_json is eager.payload_json  # never encoded again
    assert lazy.model_fields_set == eager.model_fields_set
    assert dict(_lazy_twin(eager)) == dict(eager)  # iterating decodes too
    listed = TypeAdapter(list[RawEventDTO])  # and pydantic dumping it inside something else
    assert listed.dump_python([_lazy_twin(eager)]) == listed.dump_python([eager])


def test_a_number_beyond_a_double_in_an_undecoded_payload_reads_as_none():
    """msgspec splits a page without reading the numbers it skips, so 1e400 can
    reach an event still JSON; decoding it gives None, as from_reddit stores it."""
    lazy = RawEventDTO.from_trusted_json(
        id="abc", occurred_at=datetime(2024, 1, 1, tzinfo=UTC), source_id="stocks",
        event_type="comment", payload_json=b'{"score": 1e400, "body": "x", "n": -1E+999}',
    )  # fmt: skip

    assert lazy.payload == {"score": None, "body": "x", "n": None}
    assert pickle.loads(pickle.dumps(lazy)).payload == lazy.payload
    eager = RawEventDTO.from_reddit(  # as the scraper decodes a page it cannot vouch for
        decode_json(b'{"id": "abc", "created_utc": 1704067200, "score": 1e400, "x": NaN}',
                    lenient=True),
        "stocks", "comment",
    )  # fmt: skip
    assert (eager.payload["score"], eager.payload["x"]) == (None, None)
    assert load_events(dump_events([eager])) == [eager]  # NaN no longer differs from null


def test_an_event_decoded_on_use_still_refuses_unknown_attributes():
    with pytest.raises(AttributeError, match="nonsense"):
        _lazy_twin(_event()).nonsense  # noqa: B018 - the access is the test
