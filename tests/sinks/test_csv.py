"""The CSV sink against real files: format, safety, and exactly-once under crashes."""

from __future__ import annotations

import csv
import gc
import os
import re
import signal
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sentiment.dto import RawEventDTO, dump_events, load_events
from sentiment.errors import ConfigError, ServiceUnavailable
from sentiment.reddit.ids import to_base36 as base36
from sentiment.sinks import csv as sink
from sentiment.sinks.csv import COLUMNS, LEDGER, CsvLedgerCorrupt, check_csv_dir, export_events

ROOT = Path(__file__).resolve().parents[2]
DAY = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)
HOUR = timedelta(hours=1)
# Written independently of the module on purpose: OWASP's list plus full-width forms.
TRIGGERS = "=+-@\t\r\uff1d\uff0b\uff0d\uff20"
_serial = iter(range(36**4, 36**6))


def make(
    *, sub: str = "wallstreetbets", at: datetime = DAY, kind: str = "submission", **payload: Any
) -> RawEventDTO:
    event_id = base36(next(_serial))
    body_key = "selftext" if kind == "submission" else "body"
    defaults = {"id": event_id, "author": "alice", body_key: f"text of {event_id}", "score": 7}
    return RawEventDTO(
        id=event_id, occurred_at=at, source_id=sub, event_type=kind, payload=defaults | payload
    )


def read(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f, strict=True))
    assert rows[0] == list(COLUMNS)
    assert all(len(r) == len(COLUMNS) for r in rows), "a torn or malformed line"
    return [dict(zip(COLUMNS, r, strict=True)) for r in rows[1:]]


def day_file(csv_dir: Path, sub: str = "wallstreetbets", day: str = "2024-03-01") -> Path:
    return csv_dir / "reddit" / sub / f"{day}.csv"


def neutral(text: str) -> str:
    return "'" + text if text[:1] and text[0] in TRIGGERS else text


# -- format -------------------------------------------------------------------


def test_submission_row_has_every_column(tmp_path):
    event = make(
        sub="WallStreetBets", title="GME", selftext="to the moon\nand back, \"really\"",
        score=42, permalink="/r/wallstreetbets/comments/abc/gme/", url="https://example.com/x",
        at=datetime(2024, 3, 1, 9, 30, 5, 123, tzinfo=UTC),
    )  # fmt: skip

    result = export_events([event], csv_dir=tmp_path, batch_id="b1")

    path = day_file(tmp_path)
    assert (result.written, result.files) == (1, (path.resolve(),))
    assert path.read_bytes().startswith(b"id,occurred_at,source,source_id,event_type,author,")
    (row,) = read(path)
    assert row == {
        "id": event.id, "occurred_at": "2024-03-01T09:30:05.000123Z", "source": "reddit",
        "source_id": "wallstreetbets", "event_type": "submission", "author": "alice",
        "title": "GME", "body": "to the moon\nand back, \"really\"", "score": "42",
        "permalink": "https://www.reddit.com/r/wallstreetbets/comments/abc/gme/",
        "url": "https://example.com/x", "payload": row["payload"],
    }  # fmt: skip
    assert orjson.loads(row["payload"]) == event.payload


def test_comment_row_takes_body_and_leaves_missing_fields_empty(tmp_path):
    event = make(kind="comment", body="nice", permalink="/r/x/comments/a/b/c/", author=None)

    export_events([event], csv_dir=tmp_path, batch_id="b1")

    (row,) = read(day_file(tmp_path))
    assert (row["body"], row["title"], row["url"], row["author"]) == ("nice", "", "", "")
    assert row["permalink"] == "https://www.reddit.com/r/x/comments/a/b/c/"
    assert row["event_type"] == "comment"


def test_rows_are_split_by_subreddit_and_utc_day(tmp_path):
    midnight = datetime(2024, 3, 2, tzinfo=UTC)
    events = [
        make(at=midnight - timedelta(microseconds=1)),
        make(at=midnight),
        make(at=datetime(2024, 3, 1, 23, 30, tzinfo=timezone(-HOUR * 2))),  # 01:30Z
        make(sub="stocks", at=midnight),
        RawEventDTO.model_construct(  # skipped validation: still -02:00, not UTC
            **(vars(make()) | {"occurred_at": datetime(2024, 3, 1, 22, tzinfo=timezone(-HOUR * 2))})
        ),
    ]

    result = export_events(events, csv_dir=tmp_path, batch_id="b1")

    first, second = day_file(tmp_path), day_file(tmp_path, day="2024-03-02")
    stocks = day_file(tmp_path, "stocks", "2024-03-02")
    assert set(result.files) == {p.resolve() for p in (first, second, stocks)}
    assert [r["id"] for r in read(first)] == [events[0].id]
    assert [r["id"] for r in read(second)] == [events[1].id, events[2].id, events[4].id]
    assert [r["occurred_at"] for r in read(second)] == [
        "2024-03-02T00:00:00.000000Z", "2024-03-02T01:30:00.000000Z", "2024-03-02T00:00:00.000000Z"
    ]  # fmt: skip
    assert [r["id"] for r in read(stocks)] == [events[3].id]
    assert (result.written, result.skipped, result.rejected) == (5, 0, 0)


@pytest.mark.parametrize("trigger", list(TRIGGERS))
def test_formula_cells_are_neutralised(tmp_path, trigger):
    value = f'{trigger}HYPERLINK("http://evil","x")'
    event = make(author=value, title=value, selftext=value, url=value, permalink=value, score=-5)

    export_events([event], csv_dir=tmp_path, batch_id="b1")

    (row,) = read(day_file(tmp_path))
    for column in ("author", "title", "body", "url", "permalink"):
        assert row[column] == "'" + value
    assert row["score"] == "-5"  # a number, not a formula
    assert orjson.loads(row["payload"])["title"] == value  # the raw JSON keeps the original


@pytest.mark.parametrize(("score", "cell"), [
    (float("-inf"), "'-inf"),  # not a number a spreadsheet reads: text, neutralised
    ("-\u0663\u0664", "'-\u0663\u0664"),  # Arabic-Indic digits: not a number either
])  # fmt: skip
def test_a_score_that_is_not_a_plain_number_is_text_and_neutralised(tmp_path, score, cell):
    valid = make()
    event = RawEventDTO.model_construct(**(vars(valid) | {"payload": {"score": score}}))

    export_events([event], csv_dir=tmp_path, batch_id="b1")

    (row,) = read(day_file(tmp_path))
    assert row["score"] == cell


def test_harmless_text_is_left_alone(tmp_path):
    event = make(title="a=b+c-d@e", selftext=" =not a formula", score="-12345678901234567890")

    export_events([event], csv_dir=tmp_path, batch_id="b1")

    (row,) = read(day_file(tmp_path))
    assert (row["title"], row["body"]) == ("a=b+c-d@e", " =not a formula")
    assert row["score"] == "-12345678901234567890"  # a huge int the DTO turned into a string


# -- path safety and bad rows -------------------------------------------------


def test_rows_that_skipped_validation_are_refused_and_others_written(tmp_path):
    good = [make(), make(sub="stocks")]
    bad = [
        RawEventDTO.model_construct(**(vars(good[0]) | {"source_id": "../../etc"})),
        RawEventDTO.model_construct(**(vars(good[0]) | {"source_id": "a/b"})),
        RawEventDTO.model_construct(**(vars(good[0]) | {"id": "=cmd|calc"})),
        RawEventDTO.model_construct(**(vars(good[0]) | {"payload": "not a dict"})),
        RawEventDTO.model_construct(**(vars(good[0]) | {"occurred_at": "yesterday"})),
        RawEventDTO.model_construct(**{k: v for k, v in vars(good[0]).items() if k != "payload"}),
    ]
    csv_dir = tmp_path / "csv"

    result = export_events([bad[0], good[0], *bad[1:], good[1]], csv_dir=csv_dir, batch_id="b1")

    assert (result.written, result.rejected) == (2, 6)
    written = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.csv"))
    assert written == [Path("csv/reddit/stocks/2024-03-01.csv"),
                       Path("csv/reddit/wallstreetbets/2024-03-01.csv")]  # fmt: skip


def test_a_symlink_out_of_csv_dir_is_refused(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "csv" / "reddit").mkdir(parents=True)
    (tmp_path / "csv" / "reddit" / "evil").symlink_to(outside)

    result = export_events([make(sub="evil"), make()], csv_dir=tmp_path / "csv", batch_id="b1")

    assert (result.written, result.rejected) == (1, 1)
    assert list(outside.iterdir()) == []


def test_no_directory_is_made_through_a_symlink_out_of_csv_dir(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "csv").mkdir()
    (tmp_path / "csv" / "reddit").symlink_to(outside)  # the subreddit directory does not exist

    result = export_events([make()], csv_dir=tmp_path / "csv", batch_id="b1")

    assert (result.written, result.rejected) == (0, 1)
    assert list(outside.iterdir()) == []


# -- errors ---------------------------------------------------------------------


def test_disk_errors_are_retryable_service_unavailable(tmp_path):
    (tmp_path / "reddit").write_text("a file where a directory must be")

    with pytest.raises(ServiceUnavailable, match="reddit") as info:
        export_events([make()], csv_dir=tmp_path, batch_id="b1")

    assert info.value.retryable
    assert isinstance(info.value.__cause__, OSError)


@pytest.mark.parametrize("enabled", [True, False])
def test_the_garbage_collector_is_left_as_it_was_found(tmp_path, enabled):
    (tmp_path / "reddit").write_text("a file where a directory must be")
    was = gc.isenabled()
    (gc.enable if enabled else gc.disable)()
    try:
        export_events([make()], csv_dir=tmp_path / "ok", batch_id="b1")
        assert gc.isenabled() is enabled
        with pytest.raises(ServiceUnavailable):  # and after a failed export
            export_events([make()], csv_dir=tmp_path, batch_id="b2")
        assert gc.isenabled() is enabled
    finally:
        (gc.enable if was else gc.disable)()


def _truncate_csv(path: Path) -> None:
    os.truncate(path, path.stat().st_size - 3)


def _delete_ledger(path: Path) -> None:
    (path.parent / LEDGER).unlink()


def _garble_ledger(path: Path) -> None:
    ledger = path.parent / LEDGER
    ledger.write_bytes(b"not json\n" + ledger.read_bytes())


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (_truncate_csv, "but its ledger commits"),
        (_delete_ledger, "has CSV files but no ledger"),
        (_garble_ledger, "bad record at byte 0"),
    ],
)
def test_a_damaged_file_is_reported_after_the_other_files_are_written(tmp_path, damage, message):
    export_events([make(), make()], csv_dir=tmp_path, batch_id="b1")
    path = day_file(tmp_path)
    damage(path)
    before = path.read_bytes()
    other = make(sub="stocks")

    with pytest.raises(CsvLedgerCorrupt, match=message):
        export_events([make(), other], csv_dir=tmp_path, batch_id="b2")

    assert path.read_bytes() == before  # left for a person to look at, never cut
    assert [r["id"] for r in read(day_file(tmp_path, "stocks"))] == [other.id]


def test_a_failure_before_a_first_ledger_exists_never_cuts_committed_rows(tmp_path, monkeypatch):
    export_events([make()], csv_dir=tmp_path, batch_id="b1")
    path = day_file(tmp_path)
    before = path.read_bytes()
    (path.parent / LEDGER).unlink()  # lost: deleted by hand, or a backup without it
    fds = len(os.listdir("/proc/self/fd"))

    def no_more_files(*args: Any) -> Any:
        raise OSError(24, "Too many open files")

    with monkeypatch.context() as patched:  # the scan for orphaned rows fails
        patched.setattr(sink.os, "scandir", no_more_files)
        with pytest.raises(ServiceUnavailable, match="Too many open files"):
            export_events([make()], csv_dir=tmp_path, batch_id="b2")
    assert len(os.listdir("/proc/self/fd")) == fds  # nothing left open
    assert not (path.parent / LEDGER).exists()  # no empty ledger beside the rows

    with pytest.raises(CsvLedgerCorrupt, match=r"no ledger\.jsonl"):
        export_events([make()], csv_dir=tmp_path, batch_id="b3")  # still refused, not cut
    assert path.read_bytes() == before


@pytest.mark.parametrize("payload_json", [b"[1, 2]", b"null", b'"text"', b"{not json", b""])
def test_a_payload_that_is_not_a_json_object_is_refused_and_the_rest_written(
    tmp_path, payload_json
):
    good = make(sub="stocks")
    bad = RawEventDTO.from_trusted_json(  # as out of a batch blob that was not ours
        id="zz1", occurred_at=DAY, source_id="wallstreetbets", event_type="comment",
        payload_json=payload_json,
    )  # fmt: skip

    result = export_events([bad, good], csv_dir=tmp_path, batch_id="b1")

    assert (result.written, result.rejected) == (1, 1)
    assert [r["id"] for r in read(day_file(tmp_path, "stocks"))] == [good.id]
    assert not day_file(tmp_path).exists()


def test_a_batch_over_more_days_than_files_a_process_may_open(tmp_path):
    days = [DAY - timedelta(days=n) for n in range(300)]  # a quiet subreddit's first backfill
    blob = tmp_path / "batch.blob"
    blob.write_bytes(dump_events([make(at=day) for day in days]))
    code = (
        "import resource, sys\n"
        "from pathlib import Path\n"
        "from sentiment.dto import load_events\n"
        "from sentiment.sinks.csv import export_events\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (128, 128))\n"
        "events = load_events(Path(sys.argv[1]).read_bytes())\n"
        "print(export_events(events, csv_dir=Path(sys.argv[2]), batch_id='b1').written)\n"
    )

    done = subprocess.run([sys.executable, "-c", code, str(blob), str(tmp_path / "csv")],
                          capture_output=True, text=True, timeout=120, check=False)  # fmt: skip

    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["300"]
    files = sorted((tmp_path / "csv" / "reddit" / "wallstreetbets").glob("*.csv"))
    assert len(files) == 300 and all(len(read(f)) == 1 for f in files)


# -- exactly once ---------------------------------------------------------------


def test_rerunning_a_batch_writes_nothing_twice(tmp_path):
    events = [make(), make(), make(sub="stocks")]
    first = export_events(events, csv_dir=tmp_path, batch_id="b1")
    before = day_file(tmp_path).read_bytes()

    again = export_events(events, csv_dir=tmp_path, batch_id="b1")
    later = export_events([make()], csv_dir=tmp_path, batch_id="b2")

    assert (first.written, first.skipped) == (3, 0)
    assert (again.written, again.skipped, again.files) == (0, 3, first.files)
    assert later.written == 1
    assert day_file(tmp_path).read_bytes().startswith(before)
    assert len(read(day_file(tmp_path))) == 3  # one header, no repeated rows


def test_a_batch_over_many_days_commits_once_in_one_ledger_per_directory(tmp_path):
    events = [make(at=DAY + d * timedelta(days=1)) for d in range(5)] + [make(sub="stocks")]

    export_events(events, csv_dir=tmp_path, batch_id="b1")

    wsb = tmp_path / "reddit" / "wallstreetbets"
    assert sorted(p.name for p in wsb.iterdir()) == sorted(
        [LEDGER] + [f"2024-03-0{d}.csv" for d in range(1, 6)]
    )
    (record,) = [orjson.loads(line) for line in (wsb / LEDGER).read_bytes().splitlines()]
    assert record["batch"] == "b1"
    assert {name: span[2] for name, span in record["files"].items()} == {
        f"2024-03-0{d}.csv": 1 for d in range(1, 6)
    }
    assert all(span[1] == (wsb / name).stat().st_size for name, span in record["files"].items())


def test_the_ledger_is_compacted_and_remembers_recent_batches(tmp_path, monkeypatch):
    from sentiment.sinks import csv as sink

    clock = [1_000_000.0]
    monkeypatch.setattr(sink, "time", type("Clock", (), {"time": staticmethod(lambda: clock[0])}))
    monkeypatch.setattr(sink, "_COMPACT_AT", 3)
    batches = {f"b{n}": [make(at=DAY + n % 2 * 24 * HOUR)] for n in range(8)}
    for n, (batch_id, events) in enumerate(batches.items()):
        if n == 4:  # b0..b3 are now older than the pipeline could ever re-run them
            clock[0] += sink.KEEP_BATCHES_S + 1
        export_events(events, csv_dir=tmp_path, batch_id=batch_id)

    ledger = (tmp_path / "reddit" / "wallstreetbets" / LEDGER).read_bytes().splitlines()
    assert "checkpoint" in orjson.loads(ledger[0])
    assert [orjson.loads(line)["batch"] for line in ledger[1:]] == ["b4", "b5", "b6", "b7"]
    assert export_events(batches["b5"], csv_dir=tmp_path, batch_id="b5").skipped == 1
    later = make()
    assert export_events([later], csv_dir=tmp_path, batch_id="b8").written == 1  # chains on
    paths = [day_file(tmp_path), day_file(tmp_path, day="2024-03-02")]
    assert_exactly_once(paths, [e for b in batches.values() for e in b] + [later])


def test_a_clock_stepping_back_never_makes_compaction_forget_committed_rows(tmp_path, monkeypatch):
    """Commit records are in file order, but their times follow the wall clock,
    which may step back (NTP, a VM restored): compaction drops old records only
    from the front, never a stale record after a recent one."""
    from sentiment.sinks import csv as sink

    now = 1_000_000_000.0
    clock = [now]
    monkeypatch.setattr(sink, "time", type("Clock", (), {"time": staticmethod(lambda: clock[0])}))
    monkeypatch.setattr(sink, "_COMPACT_AT", 3)
    first, stepped_back = [make(at=DAY)], [[make(at=DAY)] for _ in range(3)]
    export_events(first, csv_dir=tmp_path, batch_id="b0")
    clock[0] = now - sink.KEEP_BATCHES_S - 3600  # the clock steps back five days
    for n, events in enumerate(stepped_back, start=1):
        export_events(events, csv_dir=tmp_path, batch_id=f"b{n}")
    clock[0] = now  # and forward again: the three look older than any re-run
    other_day = [make(at=DAY + 24 * HOUR)]
    export_events(other_day, csv_dir=tmp_path, batch_id="b4")
    later = [make(at=DAY)]

    assert export_events(later, csv_dir=tmp_path, batch_id="b5").written == 1

    everything = first + [e for events in stepped_back for e in events] + other_day + later
    assert_exactly_once([day_file(tmp_path), day_file(tmp_path, day="2024-03-02")], everything)


def test_a_failed_compaction_keeps_the_commit(tmp_path, monkeypatch, caplog):
    from sentiment.sinks import csv as sink

    export_events([make()], csv_dir=tmp_path, batch_id="b1")
    monkeypatch.setattr(sink, "_COMPACT_AT", 1)
    monkeypatch.setattr(sink, "KEEP_BATCHES_S", -1)  # every record is old
    (tmp_path / "reddit" / "wallstreetbets" / f"{LEDGER}.tmp").mkdir()  # cannot be written

    assert export_events([make()], csv_dir=tmp_path, batch_id="b2").written == 1
    assert "ledger compaction failed" in caplog.text
    monkeypatch.setattr(sink, "_COMPACT_AT", 10**6)
    assert export_events([make()], csv_dir=tmp_path, batch_id="b2").skipped == 1
    assert len(read(day_file(tmp_path))) == 2


CHILD = """
import os, signal, sys
from pathlib import Path
from sentiment.dto import load_events
from sentiment.sinks import csv as sink

csv_dir, batch_dir, target, how, threads, compact_at = sys.argv[1:]
real = sink._write_chunk
sink._THREADS = int(threads)
if int(compact_at):  # compact all the time, forgetting every batch at once
    sink._COMPACT_AT, sink.KEEP_BATCHES_S = int(compact_at), -1

def crashing(fd, data, offset):  # die while writing to `target` (a CSV or a ledger)
    if os.readlink(f"/proc/self/fd/{fd}").endswith(target):
        real(fd, data[: len(data) // 2] if how == "half" else b"", offset)
        os.kill(os.getpid(), signal.SIGKILL)
    real(fd, data, offset)

if target:
    sink._write_chunk = crashing
for batch in sorted(Path(batch_dir).iterdir()):
    sink.export_events(load_events(batch.read_bytes()), csv_dir=Path(csv_dir), batch_id=batch.stem)
"""


def start_child(
    csv_dir: Path,
    batches: dict[str, list[RawEventDTO]],
    *,
    crash: str = "",
    how: str = "",
    threads: int = 8,
    compact_at: int = 0,
) -> subprocess.Popen[bytes]:
    """Export `batches` in another process, as the pipeline does: from dump_events blobs."""
    batch_dir = Path(tempfile.mkdtemp(dir=csv_dir.parent))
    for name, events in batches.items():
        (batch_dir / f"{name}.jsonl").write_bytes(dump_events(events))
    argv = [sys.executable, "-c", CHILD, str(csv_dir), str(batch_dir), crash, how, str(threads),
            str(compact_at)]  # fmt: skip
    return subprocess.Popen(argv, cwd=ROOT)


def assert_exactly_once(paths: list[Path], events: list[RawEventDTO]) -> None:
    ids = Counter(r["id"] for p in paths for r in read(p))
    assert ids == Counter(e.id for e in events)
    for path in paths:
        for row in read(path):
            assert orjson.loads(row["payload"])["id"] == row["id"]


@pytest.mark.parametrize("compact_at", [0, 5], ids=["ledger-grows", "ledger-compacted-often"])
def test_processes_appending_to_one_file_at_once_never_tear_or_lose_lines(tmp_path, compact_at):
    csv_dir = tmp_path / "csv"
    rounds = {
        who: {f"{who}{n:03}": [make(at=DAY + timedelta(hours=n % 2 * 12), title=f"{who},\n\"{n}")
                               for _ in range(25)] for n in range(60)}
        for who in ("a", "b", "c")
    }  # fmt: skip
    children = [start_child(csv_dir, batches, compact_at=compact_at) for batches in rounds.values()]

    assert [child.wait(timeout=60) for child in children] == [0, 0, 0]

    events = [e for batches in rounds.values() for b in batches.values() for e in b]
    paths = [day_file(csv_dir), day_file(csv_dir, day="2024-03-02")]
    assert_exactly_once(paths, events)
    if compact_at:  # a compaction replaced the ledger while others waited for the lock
        first = orjson.loads(
            (csv_dir / "reddit" / "wallstreetbets" / LEDGER).read_bytes().split(b"\n")[0]
        )
        assert "checkpoint" in first
        assert export_events([make()], csv_dir=csv_dir, batch_id="after").written == 1
    else:
        assert export_events(events[:25], csv_dir=csv_dir, batch_id="a000").skipped == 25


STOCKS, WSB = "/stocks/2024-03-01.csv", "/wallstreetbets/2024-03-01.csv"


@pytest.mark.parametrize(
    "scenario",
    [  # (file written when killed, how far the write got, threads, rows already committed)
        pytest.param((STOCKS, "half", 1, 0), id="half-the-rows"),
        pytest.param(("/stocks/" + LEDGER, "none", 1, 0), id="rows-synced-no-commit"),
        pytest.param(("/stocks/" + LEDGER, "half", 1, 0), id="half-the-commit-record"),
        pytest.param((WSB, "half", 1, 300), id="first-file-committed-second-half"),
        pytest.param((WSB, "half", 8, None), id="files-side-by-side-other-in-any-state"),
    ],
)
@pytest.mark.parametrize("other_batch_first", [False, True], ids=["rerun", "other-batch-first"])
def test_a_killed_export_is_completed_by_its_rerun(tmp_path, scenario, other_batch_first):
    crash, how, threads, skipped = scenario
    csv_dir = tmp_path / "csv"
    earlier = [make(sub="stocks"), make()]
    export_events(earlier, csv_dir=csv_dir, batch_id="b0")
    crashed = [make(sub="stocks", title=f"row {i}\nline two") for i in range(300)]
    crashed += [make(title="x" * 5000) for _ in range(300)]
    later = [make(), make(sub="stocks")]
    paths = [day_file(csv_dir, "stocks"), day_file(csv_dir)]
    torn = paths[0] if crash.startswith("/stocks/") else paths[1]
    size = torn.stat().st_size

    child = start_child(csv_dir, {"b1": crashed}, crash=crash, how=how, threads=threads)

    assert child.wait(timeout=60) == -signal.SIGKILL
    assert torn.stat().st_size > size  # it died with rows on disk
    if other_batch_first:  # another batch reaches the files before the re-run
        assert export_events(later, csv_dir=csv_dir, batch_id="b2").written == 2
        if skipped is not None:  # the torn tail is gone, committed rows stay
            committed = [e for e in crashed if e.source_id == "stocks"] if skipped else []
            assert_exactly_once(paths, earlier + committed + later)
    result = export_events(crashed, csv_dir=csv_dir, batch_id="b1")
    assert result.written + result.skipped == 600
    assert result.written >= 300
    if skipped is not None:
        assert result.skipped == skipped
    if not other_batch_first:
        export_events(later, csv_dir=csv_dir, batch_id="b2")
    assert_exactly_once(paths, earlier + crashed + later)


# -- round trip -------------------------------------------------------------------

ANY_TEXT = st.text(st.characters(codec=None, exclude_categories=()), max_size=40)
TRICKY = st.sampled_from(
    [
        "=1+1",
        "+1",
        "-1",
        "@SUM(A1)",
        "\t=x",
        "\r\n=x",
        '"',
        ",",
        "\r",
        "",
        "\x00=",
        "=\udfff",
        "\ud800",
    ]
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    title=st.one_of(ANY_TEXT, TRICKY, st.builds(str.__add__, TRICKY, ANY_TEXT)),
    body=st.one_of(ANY_TEXT, TRICKY),
    author=st.one_of(ANY_TEXT, TRICKY),
)
def test_any_text_round_trips(title, body, author):
    event = make(title=title, selftext=body, author=author)
    with tempfile.TemporaryDirectory() as tmp:
        export_events([event], csv_dir=Path(tmp), batch_id="b1")
        (row,) = read(day_file(Path(tmp)))
        # Out of a batch blob, the payload is still JSON: its cells are read from that.
        export_events(load_events(dump_events([event])), csv_dir=Path(tmp) / "b", batch_id="b1")
        assert day_file(Path(tmp) / "b").read_bytes() == day_file(Path(tmp)).read_bytes()
    cleaned = event.payload  # the DTO has already dropped NULs and replaced lone surrogates
    assert row["title"] == neutral(cleaned["title"])
    assert row["body"] == neutral(cleaned["selftext"])
    assert row["author"] == neutral(cleaned["author"])
    assert orjson.loads(row["payload"]) == cleaned


def test_cells_read_from_payload_json_match_cells_from_the_decoded_payload(tmp_path):
    events = [
        make(title="=1+1", score=-3, url="https://x.test/a,b", permalink="/r/x/1/"),
        make(kind="comment", body='say "hi"\nthere', score=2.5, author=None),
        make(score="123456789012345678901234567890", title=["not", "text"], url={"a": 1}),
        make(title="", selftext=None, score=True, extra={"nested": [1, {"deep": "x"}]}),
    ]
    export_events(events, csv_dir=tmp_path / "decoded", batch_id="b1")
    lazy = load_events(dump_events(events))
    assert all(e.peek_payload() is None for e in lazy)  # not decoded: cells come from JSON

    export_events(lazy, csv_dir=tmp_path / "json", batch_id="b1")

    decoded, from_json = day_file(tmp_path / "decoded"), day_file(tmp_path / "json")
    assert from_json.read_bytes() == decoded.read_bytes()
    assert len(read(from_json)) == 4
    assert all(e.peek_payload() is None for e in lazy)  # and nothing decoded them since


def test_a_payload_json_with_a_number_beyond_a_double_is_written_as_the_database_stores_it(
    tmp_path,
):
    """Reddit's JSON may hold a number no double can (the database keeps it, the
    payload reads it as null): the row is written, not refused as "not an object"."""
    event = RawEventDTO.from_trusted_json(  # as a listing page hands it over
        id="zz1", occurred_at=DAY, source_id="stocks", event_type="submission",
        payload_json=b'{"title": "t", "score": 1e400, "author": "a"}',
    )  # fmt: skip

    result = export_events([event], csv_dir=tmp_path, batch_id="b1")

    assert (result.written, result.rejected) == (1, 0)
    [row] = read(day_file(tmp_path, "stocks"))
    assert (row["id"], row["title"], row["score"], row["author"]) == ("zz1", "t", "", "a")


# -- CSV_DIR checked at start-up ------------------------------------------------


def test_check_csv_dir_makes_the_folder_and_leaves_nothing_in_it(tmp_path):
    target = tmp_path / "new" / "csv"

    assert check_csv_dir(target) == target.resolve()

    assert target.is_dir()
    assert list(target.iterdir()) == []


def test_check_csv_dir_names_the_setting_and_the_reason(tmp_path):
    taken = tmp_path / "taken"
    taken.write_text("a file where the CSV folder should be")

    for bad, reason in ((taken, "it is a file, not a folder"), (taken / "csv", "Not a directory")):
        with pytest.raises(ConfigError, match=f"CSV_DIR={bad}: cannot write CSV files there "
                           rf"\({reason}\); set CSV_DIR to a folder"):  # fmt: skip
            check_csv_dir(bad)


def test_check_csv_dir_refuses_a_folder_it_cannot_write():
    # Root writes into read-only folders: as root, the check runs as nobody, in a
    # forked child, on a folder nobody can reach but not write.
    with tempfile.TemporaryDirectory(dir="/tmp") as parent:
        os.chmod(parent, 0o755)
        locked = Path(parent) / "locked"
        locked.mkdir(mode=0o555)
        if os.geteuid() != 0:
            with pytest.raises(ConfigError, match=f"CSV_DIR={locked}: .*Permission denied"):
                check_csv_dir(locked)
            return
        refused = _as_nobody(lambda: check_csv_dir(locked))
        assert refused == (f"ConfigError: CSV_DIR={locked}: cannot write CSV files there "
                           "(Permission denied); set CSV_DIR to a folder this user can create "
                           "and write")  # fmt: skip


def _as_nobody(check: Callable[[], object]) -> str:
    """What `check` raised (or "ok") when run as the user nobody, in a forked child."""
    import pwd

    nobody = pwd.getpwnam("nobody")
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        os.close(read)
        try:
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            check()
            outcome = "ok"
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            outcome = f"{type(exc).__name__}: {exc}"
        os.write(write, outcome.encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        outcome = pipe.read().decode()
    os.waitpid(pid, 0)
    return outcome


def test_the_readme_reads_a_file_as_it_says(tmp_path, capsys):
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## The CSV files", 1)[1].split("\n## ", 1)[0]
    (snippet,) = re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)
    events = [
        make(author="alice", title='GME, "moon"', selftext="line one\nline two"),
        make(kind="comment", author="bob", body="=1+1 bearish", at=DAY + HOUR),
    ]
    export_events(events, csv_dir=tmp_path, batch_id="b1")
    opened = r'open\("[^"]+\.csv"'
    assert re.search(opened, snippet), "the snippet opens a file by its path"

    exec(re.sub(opened, f"open({str(day_file(tmp_path))!r}", snippet), {})

    assert capsys.readouterr().out.splitlines() == [
        '2024-03-01T12:00:00.000000Z alice GME, "moon"',
        "2024-03-01T13:00:00.000000Z bob '=1+1 bearish",
    ]
