"""Claiming and marking rows for the sentiment workers."""

from __future__ import annotations

import threading
from datetime import UTC, date, datetime, timedelta

import pytest
from sqlalchemy import text

from sentiment.processing import claim_unprocessed, mark_processed, requeue_set_aside, set_aside
from sentiment.sinks.postgres import insert_batch
from tests.conftest import wait_for_a_lock_wait
from tests.factories import make_event


def _events(count: int):
    start = datetime.now(UTC) - timedelta(hours=5)
    return [make_event(occurred_at=start + timedelta(seconds=i)) for i in range(count)]


def test_claim_returns_oldest_unprocessed_first(db):
    events = _events(20)
    insert_batch(list(reversed(events)))
    mark_processed([events[0].key])

    with claim_unprocessed(5) as claim:
        assert [row.key for row in claim] == [e.key for e in events[1:6]]


def test_concurrent_claimers_get_disjoint_rows(db):
    insert_batch(_events(100))
    claimed: list[list[str]] = []
    both_holding = threading.Barrier(2)

    def claimer() -> None:
        with claim_unprocessed(30) as claim:
            claimed.append([row.id for row in claim])
            both_holding.wait(timeout=10)  # hold the locks until the other has claimed too

    threads = [threading.Thread(target=claimer) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert len(claimed[0]) == len(claimed[1]) == 30
    assert not set(claimed[0]) & set(claimed[1])


def test_a_failed_claim_frees_its_rows(db):
    insert_batch(_events(3))
    with pytest.raises(RuntimeError), claim_unprocessed(3):
        raise RuntimeError("worker crashed")
    with claim_unprocessed(10) as claim:
        assert len(claim) == 3


def test_marking_inside_the_claim(db):
    insert_batch(_events(10))
    with claim_unprocessed(4) as claim:
        result = mark_processed([row.key for row in claim], connection=claim.connection)
    assert result.updated == 4
    with claim_unprocessed(10) as rest:
        assert len(rest) == 6


def test_mark_processed_counts_and_keeps_the_first_time(db):
    events = _events(5)
    insert_batch(events)
    first = mark_processed([e.key for e in events[:3]])
    with db.connect() as conn:
        before = dict(
            conn.execute(text("SELECT id, processed_at FROM raw_events WHERE processed")).all()
        )

    second = mark_processed(
        [events[0].key, events[1].id, events[3].id, ("nope1", datetime.now(UTC)), "nope2"]
    )

    assert first.summary() == {"updated": 3, "already_processed": 0, "unknown": 0, "invalid": 0}
    assert second.summary() == {"updated": 1, "already_processed": 2, "unknown": 2, "invalid": 0}
    with db.connect() as conn:
        after = dict(
            conn.execute(text("SELECT id, processed_at FROM raw_events WHERE processed")).all()
        )
    assert {k: after[k] for k in before} == before
    assert set(after) == {e.id for e in events[:4]}
    assert all(v is not None for v in after.values())


def test_mark_processed_with_no_keys(db):
    assert mark_processed([]).summary() == {
        "updated": 0,
        "already_processed": 0,
        "unknown": 0,
        "invalid": 0,
    }


def test_keys_are_read_as_the_dto_reads_them(db):
    events = _events(4)
    insert_batch(events)
    naive = events[2].occurred_at.astimezone(UTC).replace(tzinfo=None)

    result = mark_processed(
        [
            (events[0].id, events[0].occurred_at.isoformat()),  # ISO text, as JSON carries it
            (events[1].id.upper(), events[1].occurred_at.timestamp()),  # epoch seconds
            (f"t1_{events[2].id}", naive),  # a fullname, and a naive time taken as UTC
            f"t3_{events[3].id}",
        ]
    )

    assert result.summary() == {"updated": 4, "already_processed": 0, "unknown": 0, "invalid": 0}


def test_a_bad_key_is_counted_and_logged_and_the_rest_are_marked(db, caplog):
    events = _events(2)
    insert_batch(events)
    bad = [
        (events[1].id, "yesterday"),  # not a time
        ("not an id!", events[1].occurred_at),
        (events[1].id,),  # not a pair
        (events[1].id, events[1].occurred_at, "extra"),
        42,
        None,
        (7, events[1].occurred_at),  # an id must be text
        (events[1].id, float("nan")),
    ]

    with caplog.at_level("WARNING", logger="sentiment.processing"):
        result = mark_processed([events[0].key, *bad])

    assert result.summary() == {"updated": 1, "already_processed": 0, "unknown": 0, "invalid": 8}
    assert "8 invalid keys" in caplog.text and "'yesterday'" in caplog.text
    with db.connect() as conn:
        done = conn.execute(text("SELECT id FROM raw_events WHERE processed")).scalars().all()
    assert done == [events[0].id]


@pytest.mark.parametrize("limit", [0, -5, 2.5, "10", True])
def test_claim_refuses_a_limit_that_is_not_a_row_count(db, limit):
    with (
        pytest.raises(ValueError, match="limit must be a whole number of rows >= 1"),
        claim_unprocessed(limit),
    ):
        pass


def test_mark_processed_counts_rows_once_however_many_keys_name_them(db):
    """An id and its (id, time) key name one row; a bare id can name two (one id at
    two times): `updated` and `already_processed` count rows, `unknown` keys."""
    at = datetime.now(UTC) - timedelta(hours=1)
    twice = [make_event(event_id="twin1", occurred_at=at - timedelta(minutes=m)) for m in (1, 2)]
    one = make_event(occurred_at=at)
    insert_batch([*twice, one])

    first = mark_processed([one.id, one.key])
    second = mark_processed(["twin1", one.key, "nope3"])

    assert first.summary() == {"updated": 1, "already_processed": 0, "unknown": 0, "invalid": 0}
    assert second.summary() == {"updated": 2, "already_processed": 1, "unknown": 1, "invalid": 0}


def test_claim_takes_claim_batch_size_rows_unless_told(db, monkeypatch):
    from sentiment import processing

    insert_batch(_events(9))
    configured = processing.get_settings().model_copy(update={"claim_batch_size": 4})
    monkeypatch.setattr(processing, "get_settings", lambda: configured)

    with claim_unprocessed() as claim:
        assert len(claim) == 4


def test_connections_let_the_server_notice_a_client_that_vanished_mid_claim(db):
    """A sentiment worker's machine that drops off the network keeps its claim's locks
    until the server notices; TCP keepalives make that minutes, not hours."""
    from sentiment.db import get_engine
    from sentiment.sinks.postgres import get_sink_engine

    for engine in (get_engine(), get_sink_engine()):
        with engine.connect() as conn:
            shown = [conn.execute(text(f"SHOW tcp_keepalives_{name}")).scalar()
                     for name in ("idle", "interval", "count")]  # fmt: skip
        assert shown == ["60", "10", "6"]


def test_two_marks_of_the_same_rows_at_once_count_each_row_once(db):
    """A mark that waits on another's row locks re-checks those rows once the other
    commits: the other updated them, so this one counts them as already processed,
    not as neither (its snapshot, taken before that commit, saw them unprocessed)."""
    events = _events(6)
    insert_batch(events)
    keys = [e.key for e in events]
    results = []

    with db.connect() as first:
        with first.begin():
            results.append(mark_processed(keys, connection=first))  # holds the row locks
            second = threading.Thread(target=lambda: results.append(mark_processed(keys)))
            second.start()
            wait_for_a_lock_wait(db, "the second mark")
        second.join(timeout=30)

    assert not second.is_alive()
    assert [r.summary() for r in results] == [
        {"updated": 6, "already_processed": 0, "unknown": 0, "invalid": 0},
        {"updated": 0, "already_processed": 6, "unknown": 0, "invalid": 0},
    ]


def _score(row) -> float:
    """A model that cannot score one kind of row."""
    if row.payload.get("body") == "poison":
        raise ValueError("the model cannot read this row")
    return 0.5


def _consume_once(limit: int = 5) -> tuple[int, int]:
    """One pass of a consumer that scores row by row, and sets aside what it cannot
    score: (scored, set aside)."""
    with claim_unprocessed(limit) as claim:
        scored, failed = [], []
        for row in claim:
            try:
                _score(row)
                scored.append(row.key)
            except ValueError as exc:
                failed.append((row.key, str(exc)))
        mark_processed(scored, connection=claim.connection)
        for key, reason in failed:
            set_aside([key], reason, connection=claim.connection)
    return len(scored), len(failed)


def test_a_row_no_model_can_score_is_set_aside_and_the_queue_moves_on(db):
    events = _events(12)
    poison = make_event(occurred_at=events[0].occurred_at - timedelta(seconds=1), body="poison")
    insert_batch([poison, *events])

    passes = [_consume_once(limit=5) for _ in range(3)]

    assert passes == [(4, 1), (5, 0), (3, 0)]  # the oldest row, set aside once
    with claim_unprocessed(100) as claim:
        assert len(claim) == 0
    with db.connect() as conn:
        row = conn.execute(
            text("SELECT processed, processed_at, process_error FROM raw_events WHERE id = :id"),
            {"id": poison.id},
        ).one()
        scored = conn.execute(
            text("SELECT count(*) FROM raw_events WHERE processed AND process_error IS NULL")
        ).scalar()
    assert row.processed and row.processed_at is not None
    assert row.process_error == "the model cannot read this row"
    assert scored == 12


def test_set_aside_counts_like_mark_processed_and_needs_a_reason(db):
    events = _events(3)
    insert_batch(events)
    mark_processed([events[0].key])

    result = set_aside(
        [events[0].key, events[1].key, ("zz999", events[2].occurred_at)], "bad\x00 row"
    )

    assert (result.updated, result.already_processed, result.unknown) == (1, 1, 1)
    with db.connect() as conn:
        errors = dict(conn.execute(text("SELECT id, process_error FROM raw_events")).all())
    assert errors == {events[0].id: None, events[1].id: "bad row", events[2].id: None}
    with pytest.raises(ValueError, match="reason"):
        set_aside([events[2].key], "  ")


def test_a_reason_with_a_lone_surrogate_is_stored_cleaned(db):
    # str(exc) of a model's error can carry one (text decoded with surrogateescape,
    # say); psycopg2 cannot encode it, and the claim's marks would roll back with it.
    events = _events(2)
    insert_batch(events)

    with claim_unprocessed(5) as claim:
        mark_processed([events[1].key], connection=claim.connection)
        set_aside([events[0].key], "cannot read \udc80 here", connection=claim.connection)

    with db.connect() as conn:
        rows = dict(conn.execute(text("SELECT id, process_error FROM raw_events")).all())
    assert rows == {events[0].id: "cannot read \ufffd here", events[1].id: None}


@pytest.mark.parametrize(
    "keys",
    ["abc12", ("abc12", "2026-01-01T00:00:00Z"), ("abc12", "20260101T000000Z"),
     ("abc12", 1767225600), ["abc12", datetime(2026, 1, 1, tzinfo=UTC)],
     ("abc12", "2026-01-01 00:00:00 UTC"), ("abc12", date(2026, 1, 1))],
    ids=["str", "pair", "basic-format pair", "epoch pair", "datetime pair",
         "unparsable time", "date pair"],
)  # fmt: skip
def test_one_key_instead_of_a_list_of_keys_is_refused(db, keys):
    # Iterated, "abc12" would be five one-letter ids, and one (id, time) pair a bare
    # id that marks every row with that id.
    with pytest.raises(TypeError, match="a list of keys"):
        mark_processed(keys)
    with pytest.raises(TypeError, match="a list of keys"):
        set_aside(keys, "reason")


def test_rows_set_aside_go_back_to_the_queue_when_asked(db):
    events = _events(4)
    insert_batch(events)
    set_aside([e.key for e in events[:3]], "model v1 failed")
    mark_processed([events[3].key])

    assert requeue_set_aside() == 3

    with claim_unprocessed(10) as claim:
        assert [row.key for row in claim] == [e.key for e in events[:3]]
    with db.connect() as conn:
        assert (
            conn.execute(
                text("SELECT count(*) FROM raw_events WHERE process_error IS NOT NULL")
            ).scalar()
            == 0
        )


@pytest.mark.parametrize("second", [None, "", "not an id", {"id": "x"}, "20260101"])
def test_two_keys_of_which_one_is_bad_still_mark_the_good_one(db, second):
    # Not a pair: a bad key is counted, the other marked ("20260101" is an id).
    events = _events(1)
    insert_batch(events)

    result = mark_processed([events[0].id, second])

    assert result.updated == 1
    assert result.invalid == (0 if second == "20260101" else 1)
