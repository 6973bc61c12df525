"""Append new events to per-subreddit, per-day CSV files, exactly once.

Layout: ``<csv_dir>/reddit/<subreddit>/<YYYY-MM-DD>.csv`` (UTC day of
``occurred_at``) and, in each subreddit's directory, ``ledger.jsonl``: the
commit log of every CSV file in it. Never delete the ledger while its CSVs
stay (an export refuses a directory whose CSVs have bytes and no ledger rather
than treat them all as uncommitted).

Format
  * RFC 4180: records end in CRLF, a cell holding ``"`` ``,`` CR or LF is
    quoted (so cells may span lines: read with ``open(path, newline="",
    encoding="utf-8")`` and ``csv.reader``). UTF-8 without a BOM: a BOM is
    only valid at offset 0 and most tools but Excel take it as part of the
    first column name (in Excel use Data > From Text/CSV, UTF-8).
  * Columns: see `COLUMNS`; ``occurred_at`` is fixed-width
    ``YYYY-MM-DDTHH:MM:SS.ffffffZ`` (lossless, sorts as text); ``payload`` is
    the JSON object. Missing payload fields are empty cells; rows keep the
    order they were given in.
  * Formula injection (OWASP): a text cell starting with = + - @ TAB CR (or
    the full-width = + - @ some spreadsheets also accept) gets a leading ``'``.
    ``score`` is a number, not text: ``-5`` stays ``-5``.

Exactly once. The contract is per batch and subreddit directory: ``batch_id``
names the content (the rows the database reported new for that batch); the
database hands each row out once, so the same event id under two batch ids is
not checked for. Under an exclusive ``flock`` of the directory (it serialises
processes and threads, and the kernel drops it when its holder dies):

  1. Read the ledger: JSON lines, an optional ``{"checkpoint": {file: end}}``
     first, then commit records ``{"batch", "at", "files": {file: [start,
     end, rows]}}``, each file's ``start`` where its previous ``end`` was. The
     last ``end`` of a file is its committed length. An unterminated last line
     is a torn commit and is cut off; any other bad line is corruption.
  2. Batch in the ledger: skip the directory. Otherwise cut each of the
     batch's files back to its committed length: bytes past it are an append
     whose commit never happened.
  3. Write each file's rows (with the header if it is empty) at that offset in
     one call, fdatasync each, and fsync the directory if a file is new.
  4. Append the commit record for all the files, then fdatasync. That write
     is the commit point.

A crash (even SIGKILL) before 4 completes leaves no commit: the next export to
the directory cuts the partial or complete-but-uncommitted rows off, and the
re-run of the batch writes them again - never torn, never twice. After 4 the
batch is in the ledger and a re-run skips it. Data is durable before its
commit record is written, so a power loss cannot leave a commit without rows.

One ledger per directory, not per file: a batch spread over many days creates
one ledger, not one per day file, and commits with one record and one sync
(file creation and syncs were most of the cost). Directories are independent,
so a batch's directories are exported side by side by a few I/O threads while
this thread formats the next one, and one directory's failure leaves the
others committed. Readers wanting no uncommitted tail take LOCK_SH on the
directory, or read each file only up to its last ``end``.

The ledger is compacted when its first `_COMPACT_AT` commit records (or more)
are older than `KEEP_BATCHES_S`: it is rewritten as one checkpoint (every file's
committed length before the records kept) plus the records from the first recent
one on, and renamed over the old one. A
batch is remembered for `KEEP_BATCHES_S`, longer than the pipeline keeps a
batch to re-run (its blob expires after three days).
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import logging
import math
import os
import re
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import msgspec
import orjson

from sentiment.config import valid_subreddit
from sentiment.dto import RawEventDTO
from sentiment.errors import (
    ConfigError,
    CsvLedgerCorrupt,
    InvalidSubreddit,
    SentimentError,
    ServiceUnavailable,
)

__all__ = [
    "COLUMNS", "KEEP_BATCHES_S", "LEDGER", "CsvLedgerCorrupt", "ExportResult", "check_csv_dir",
    "committed_batches", "export_events",
]  # fmt: skip

log = logging.getLogger(__name__)

COLUMNS = (
    "id", "occurred_at", "source", "source_id", "event_type", "author",
    "title", "body", "score", "permalink", "url", "payload",
)  # fmt: skip
LEDGER = "ledger.jsonl"
KEEP_BATCHES_S = 4 * 24 * 3600
_COMPACT_AT = 1024
_HEADER = (",".join(COLUMNS) + "\r\n").encode()
_FORMULA_START = frozenset("=+-@\t\r\uff1d\uff0b\uff0d\uff20")
_ID_RE = re.compile(r"[0-9a-z]{1,16}")
_NUMBER_RE = re.compile(r"-?[0-9]+(?:\.[0-9]+)?")  # ASCII digits: \d takes any script's
_EVENT_TYPES = frozenset({"submission", "comment"})
_REDDIT = "https://www.reddit.com"
_THREADS = 8
_OPEN_AT_ONCE = 32  # CSV files a thread holds open; 8 threads stay well inside 1,024
_OPEN = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC  # never follow a planted symlink

Rows = list[tuple[datetime, RawEventDTO]]


@dataclass(frozen=True, slots=True)
class ExportResult:
    """Rows appended now, rows already in their file (re-run), rows refused, and
    every CSV file that holds this batch's rows (written now or before)."""

    written: int
    skipped: int
    rejected: int
    files: tuple[Path, ...]


@dataclass(slots=True)
class _Dir:
    """One subreddit directory's share of a batch: its rows formatted per day file."""

    name: str
    path: Path
    chunks: dict[str, tuple[bytes, int]] = field(default_factory=dict)  # file -> (rows, count)
    refused: int = 0  # rows whose payload turned out not to be a JSON object

    @property
    def rows(self) -> int:
        return sum(count for _, count in self.chunks.values())

    def release(self) -> None:
        """Drop the formatted bytes once written; the counts stay for the result."""
        self.chunks = {file: (b"", count) for file, (_, count) in self.chunks.items()}


def check_csv_dir(csv_dir: Path) -> Path:
    """Make `csv_dir` if needed and prove a file can be created in it; its resolved path.

    Run at start-up by every process that exports, so that a wrong CSV_DIR stops
    it at once with a ConfigError saying what to fix, instead of every export
    failing later. (A disk that fails after start-up is an export's retry.)
    """
    try:
        csv_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=csv_dir):
            pass
    except FileExistsError:
        reason = "it is a file, not a folder"
    except OSError as exc:
        reason = exc.strerror or str(exc)
    else:
        return csv_dir.resolve()
    raise ConfigError(f"CSV_DIR={csv_dir}: cannot write CSV files there ({reason}); "
                      "set CSV_DIR to a folder this user can create and write")  # fmt: skip


def committed_batches(csv_dir: Path, subreddit: str) -> set[str]:
    """The batch ids a subreddit's ledger has committed (for the last `KEEP_BATCHES_S`).

    A read without the directory's lock, for checks: an export running meanwhile
    may add its batch right after. It parses as an export does (a torn last line
    is no commit, a bad record makes the ledger corrupt) but changes nothing.
    """
    path = csv_dir / "reddit" / valid_subreddit(subreddit) / LEDGER
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return set()
    except OSError as exc:
        raise ServiceUnavailable(f"{path}: cannot read the CSV ledger ({exc.strerror})") from exc
    return _parse_ledger(path, raw, fd=-1).batches


def export_events(events: Sequence[RawEventDTO], *, csv_dir: Path, batch_id: str) -> ExportResult:
    """Append `events` to their day files, once per `batch_id` and directory (see module doc).

    A bad row (e.g. built with `model_construct`) is refused, logged and counted
    in `rejected`; it never stops the other rows. Disk errors raise
    `ServiceUnavailable`; retrying the same batch is safe.
    """
    if not batch_id:
        raise ValueError("batch_id must be a non-empty string")
    root = csv_dir.resolve()
    with _collector_paused():
        return _export(events, root, batch_id)


def _export(events: Sequence[RawEventDTO], root: Path, batch_id: str) -> ExportResult:
    groups, rejected = _group(events)
    dirs: list[_Dir] = []
    futures: list[Future[str]] = []
    # This thread formats (CPU, under the GIL) while a few threads write, sync and
    # commit the directories already formatted (I/O, outside it); the semaphore
    # bounds how far formatting runs ahead, and so the memory held.
    in_flight = threading.BoundedSemaphore(2 * _THREADS)
    with ThreadPoolExecutor(max_workers=max(1, min(_THREADS, len(groups)))) as pool:
        for work in _formatted(groups, root):
            in_flight.acquire()
            future = pool.submit(_export_dir, root, work, batch_id)
            future.add_done_callback(lambda _: in_flight.release())
            dirs.append(work)
            futures.append(future)
    counts = dict.fromkeys(("written", "skipped", "refused"), 0)
    files: list[Path] = []
    errors: list[SentimentError] = []
    for work, future in zip(dirs, futures, strict=True):
        try:
            outcome = future.result()
        except (ServiceUnavailable, CsvLedgerCorrupt) as exc:
            errors.append(exc)  # every other directory still finished: a retry skips those
            continue
        counts[outcome] += work.rows
        rejected += work.refused
        if outcome != "refused":
            files.extend(work.path / file for file in work.chunks)
    if errors:
        raise next((e for e in errors if e.retryable), errors[0])
    return ExportResult(counts["written"], counts["skipped"], rejected + counts["refused"],
                        tuple(files))  # fmt: skip


def _formatted(groups: dict[str, dict[date, Rows]], root: Path) -> Iterator[_Dir]:
    """Each subreddit directory's share, formatted, one directory at a time."""
    for name in sorted(groups):
        work = _Dir(name, root / "reddit" / name)
        for day, rows in sorted(groups[name].items()):
            data, count = _encode(rows, name)
            work.refused += len(rows) - count
            if count:
                work.chunks[f"{day.isoformat()}.csv"] = (data, count)
        yield work


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """Keep the cyclic garbage collector out of the export.

    The export allocates a few tracked objects per row (row tuples, lists, cell
    strings), none of them in a cycle, and each allocation burst triggers
    collections that traverse every object the process holds: with the
    batch's events and payloads in memory, that was a sixth to a quarter of
    the export's user CPU on 200,000 rows (perf: gc_collect_main, visit_decref,
    visit_reachable). Reference counting still frees everything; the collector
    resumes afterwards.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


# -- validation and grouping --------------------------------------------------


def _group(events: Sequence[RawEventDTO]) -> tuple[dict[str, dict[date, Rows]], int]:
    """Rows by canonical subreddit and UTC day; bad rows are counted, not raised."""
    groups: dict[str, dict[date, Rows]] = {}
    names: dict[str, str] = {}  # source_id -> canonical name, validated once per name
    rejected = 0
    for event in events:
        try:
            name, ts = _check(event, names)
        except (AttributeError, TypeError, ValueError, OverflowError) as exc:
            log.warning("csv export: refused event %r: %s", getattr(event, "id", None), exc)
            rejected += 1
            continue
        groups.setdefault(name, {}).setdefault(ts.date(), []).append((ts, event))
    return groups, rejected


def _check(event: RawEventDTO, names: dict[str, str]) -> tuple[str, datetime]:
    """The row's canonical subreddit and UTC time, or ValueError saying why it cannot
    be written. Only rows that skipped validation (`model_construct`, or a batch blob
    that was not ours) can fail. (A payload still JSON is checked as it is formatted.)"""
    if not (isinstance(event.id, str) and _ID_RE.fullmatch(event.id)):
        raise ValueError("id is not a base36 Reddit id")
    if event.source != "reddit" or event.event_type not in _EVENT_TYPES:
        raise ValueError("unknown source or event_type")
    payload = event.peek_payload()
    if payload is None:
        _ = event.payload_json  # still JSON (from_trusted_json), or AttributeError: none at all
    elif not isinstance(payload, dict):
        raise TypeError("payload is not a JSON object")
    if not isinstance(event.occurred_at, datetime):
        raise TypeError("occurred_at is not a datetime")
    name = names.get(event.source_id)
    if name is None:
        try:
            name = names[event.source_id] = valid_subreddit(event.source_id)
        except ValueError as exc:
            raise InvalidSubreddit(str(exc)) from None
    ts = event.occurred_at
    return name, ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)


# -- formatting ---------------------------------------------------------------


def _encode(rows: Rows, name: str) -> tuple[bytes, int]:
    """The rows as CSV bytes (no header), in one buffer so that the file gets one
    write, and how many rows it holds: a row whose payload JSON turns out not to be
    an object is refused here (logged, not counted), and the others go on.

    Built by hand: Python 3.11's csv.writer does ~60 MB/s, 4x slower than this on
    1.5 KB rows. id, occurred_at, source_id and event_type are validated and need
    no quoting; every other cell goes through `_text` (csv.QUOTE_MINIMAL's rule).
    The payload, most of the bytes, stays bytes from orjson to the file.
    """
    out: list[bytes] = []
    add = out.append
    count = 0
    for ts, event in rows:
        try:
            get = _cells(event).get
        except (AttributeError, TypeError, ValueError) as exc:  # not an object / not JSON
            log.warning("csv export: refused event %r: payload is not a JSON object (%s)",
                        event.id, exc)  # fmt: skip
            continue
        kind = event.event_type
        body = get("selftext") if kind == "submission" else get("body")
        line = (f"{event.id},{ts.isoformat(timespec='microseconds')[:-6]}Z,reddit,{name},{kind},"
                f"{_text(get('author'))},{_text(get('title'))},{_text(body)},"
                f"{_score(get('score'))},{_text(_absolute(get('permalink')))},"
                f"{_text(get('url'))},\"")  # fmt: skip
        # "replace" only matters for a lone surrogate in a row that skipped the DTO.
        add(line.encode("utf-8", "replace"))
        add(event.payload_json.replace(b'"', b'""'))  # the payload cell, quoted
        add(b'"\r\n')
        count += 1
    return b"".join(out), count


class _Cells(msgspec.Struct):
    """The payload fields a row shows in cells of their own; msgspec skips the rest."""

    author: Any = None
    title: Any = None
    selftext: Any = None
    body: Any = None
    score: Any = None
    permalink: Any = None
    url: Any = None

    def get(self, name: str) -> Any:
        return getattr(self, name)


_CELLS = msgspec.json.Decoder(_Cells)


def _cells(event: RawEventDTO) -> dict[str, Any] | _Cells:
    """The fields of the payload the row shows, read from its JSON if it is not
    decoded yet (~3x cheaper than decoding all of it). ValueError if the JSON is
    not JSON, TypeError if it is not an object."""
    payload = event.peek_payload()
    if payload is not None:
        return payload  # type: ignore[no-any-return]
    try:
        return _CELLS.decode(event.payload_json)
    except msgspec.DecodeError:  # not an object, a number beyond a double, or not JSON
        # (ValidationError is a DecodeError.) The payload's own decoder says which,
        # and reads an out-of-range number as the database stores it.
        payload = event.payload  # orjson.JSONDecodeError (a ValueError) if not JSON
        if not isinstance(payload, dict):
            raise TypeError("not an object") from None
        return payload


def _text(value: Any) -> str:
    if value is None:
        return ""
    text = value if value.__class__ is str else str(value)
    if text[:1] in _FORMULA_START:
        text = "'" + text
    # Four C scans beat one regex search (~20% of the formatting time).
    if '"' in text:
        return '"' + text.replace('"', '""') + '"'
    if "," in text or "\n" in text or "\r" in text:
        return '"' + text + '"'
    return text


def _score(value: Any) -> str:
    if (isinstance(value, int) and not isinstance(value, bool)) or (
        isinstance(value, float) and math.isfinite(value)
    ):
        return str(value)  # a number, even a negative one, is not a formula
    if isinstance(value, str) and _NUMBER_RE.fullmatch(value):  # a huge int the DTO made a string
        return value
    return _text(value)


def _absolute(permalink: Any) -> Any:
    if isinstance(permalink, str) and permalink.startswith("/"):
        return _REDDIT + permalink
    return permalink


# -- the exactly-once append --------------------------------------------------


@dataclass(slots=True)
class _Ledger:
    """A directory's ledger as read: committed file lengths and remembered batches."""

    fd: int
    length: int = 0  # bytes of valid records
    ends: dict[str, int] = field(default_factory=dict)
    batches: set[str] = field(default_factory=set)
    records: list[bytes] = field(default_factory=list)  # commit records, for compaction
    stale: int = 0  # records older than KEEP_BATCHES_S


def _export_dir(root: Path, work: _Dir, batch_id: str) -> str:
    """One directory's share of the batch: "written", "skipped" (there already) or "refused"."""
    try:
        return _export_dir_once(root, work, batch_id)
    finally:
        work.release()


def _export_dir_once(root: Path, work: _Dir, batch_id: str) -> str:
    try:
        # Before any mkdir: a symlinked directory on the way must not get one made
        # outside csv_dir (resolve() follows the parts that exist).
        if not work.path.resolve().is_relative_to(root):
            log.warning("csv export: refused %d rows: r/%s: %s leads outside %s", work.rows,
                        work.name, work.path, root)  # fmt: skip
            return "refused"
        _make_dirs(work.path)
        with _locked(work.path) as dir_fd:
            done = _append_locked(work, dir_fd, batch_id)
    except OSError as exc:
        raise ServiceUnavailable(f"CSV disk unavailable at {work.path}: {exc}") from exc
    except CsvLedgerCorrupt as exc:
        log.error("csv export: %s", exc)  # noqa: TRY400 - the message says it all
        raise
    return "written" if done else "skipped"


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[int]:
    """The directory, exclusively flock'ed (released on close, or by the kernel if we die).

    The lock is on the directory, not the ledger, because compaction replaces the
    ledger file: a lock on the old file would no longer exclude anyone."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield fd
    finally:
        os.close(fd)


def _append_locked(work: _Dir, dir_fd: int, batch_id: str) -> bool:
    ledger = _open_ledger(work.path, dir_fd)
    try:
        if batch_id in ledger.batches:
            return False
        _write_files(work, dir_fd, ledger, batch_id)
        try:
            _compact(work.path, dir_fd, ledger)
        except OSError as exc:  # committed already; the next export compacts instead
            log.warning("csv export: %s: ledger compaction failed: %s", work.path / LEDGER, exc)
    finally:
        os.close(ledger.fd)
    return True


def _open_ledger(directory: Path, dir_fd: int) -> _Ledger:
    try:
        fd = os.open(LEDGER, _OPEN & ~os.O_CREAT, dir_fd=dir_fd)
    except FileNotFoundError:
        return _new_ledger(directory, dir_fd)
    try:
        return _read_ledger(directory / LEDGER, fd)
    except BaseException:
        os.close(fd)
        raise


def _new_ledger(directory: Path, dir_fd: int) -> _Ledger:
    """A directory's first ledger; refused if CSVs with rows are there already.

    The check comes before the ledger exists: an empty ledger beside rows would
    make the next export take them all for an unfinished append and cut them.
    The directory's flock keeps every other exporter out meanwhile."""
    with os.scandir(dir_fd) as entries:
        orphans = [e.name for e in entries if e.name.endswith(".csv") and e.stat().st_size]
    if orphans:
        raise CsvLedgerCorrupt(f"{directory} has CSV files but no {LEDGER} "
                               f"({', '.join(sorted(orphans)[:3])}); restore the ledger "
                               "or move the CSV files aside")  # fmt: skip
    fd = os.open(LEDGER, _OPEN | os.O_EXCL, 0o644, dir_fd=dir_fd)
    try:
        os.fsync(dir_fd)  # the ledger's name is durable before any CSV it commits
    except BaseException:
        os.close(fd)
        raise
    return _Ledger(fd)


def _read_ledger(path: Path, fd: int) -> _Ledger:
    raw = os.pread(fd, os.fstat(fd).st_size, 0)
    ledger = _parse_ledger(path, raw, fd)
    if ledger.length < len(raw):  # a commit torn by a crash: it never happened
        log.warning("csv export: %s: dropping a torn commit record", path)
        os.ftruncate(fd, ledger.length)
    return ledger


def _parse_ledger(path: Path, raw: bytes, fd: int) -> _Ledger:
    """The ledger in `raw`, up to its last complete line (`length`); CsvLedgerCorrupt
    if a complete line is not a valid record."""
    ledger = _Ledger(fd)
    old = time.time() - KEEP_BATCHES_S
    pos = 0
    while (newline := raw.find(b"\n", pos)) >= 0:
        try:
            _apply(ledger, raw[pos:newline], first=pos == 0, old=old)
        except ValueError:
            raise CsvLedgerCorrupt(
                f"{path}: bad record at byte {pos}; move the directory's CSV files and ledger aside"
            ) from None
        pos = newline + 1
    ledger.length = pos
    return ledger


def _apply(ledger: _Ledger, line: bytes, *, first: bool, old: float) -> None:
    """Fold one ledger line into `ledger`; ValueError if it is not a valid record."""
    match orjson.loads(line):  # orjson.JSONDecodeError is a ValueError
        case {"checkpoint": dict(ends)} if first and all(
            isinstance(end, int) and end >= 0 for end in ends.values()
        ):
            ledger.ends.update(ends)
        case {"batch": str(batch), "at": int() | float() as at, "files": dict(files)} if (
            batch not in ledger.batches
        ):
            for file, span in files.items():
                match span:
                    case [int(start), int(end), int()] if start == ledger.ends.get(file, 0) <= end:
                        ledger.ends[file] = end
                    case _:
                        raise ValueError(span)
            ledger.batches.add(batch)
            ledger.records.append(line)
            ledger.stale += at < old
        case _:
            raise ValueError(line)


def _write_files(work: _Dir, dir_fd: int, ledger: _Ledger, batch_id: str) -> None:
    """Steps 2 to 4 of the module doc for every file of `work`."""
    spans: dict[str, list[int]] = {}
    files = list(work.chunks.items())
    try:
        for first in range(0, len(files), _OPEN_AT_ONCE):
            _write_group(work, dir_fd, ledger, files[first : first + _OPEN_AT_ONCE], spans)
        if any(start == 0 for start, _, _ in spans.values()):
            os.fsync(dir_fd)  # a new file's name must be durable before its commit
        record = orjson.dumps({"batch": batch_id, "at": int(time.time()),
                               "files": spans})  # fmt: skip
        _write_chunk(ledger.fd, record + b"\n", ledger.length)  # the commit point
        os.fdatasync(ledger.fd)
    except OSError:
        # An unsure commit becomes no commit; whatever this cannot undo, the next
        # export's recovery cuts (bytes past each file's committed length).
        with contextlib.suppress(OSError):
            os.ftruncate(ledger.fd, ledger.length)
        for file in spans:
            with contextlib.suppress(OSError):
                _truncate(file, dir_fd, ledger.ends.get(file, 0))
        raise
    ledger.records.append(record)
    ledger.length += len(record) + 1
    ledger.ends.update((file, end) for file, (_, end, _) in spans.items())


def _write_group(
    work: _Dir,
    dir_fd: int,
    ledger: _Ledger,
    files: list[tuple[str, tuple[bytes, int]]],
    spans: dict[str, list[int]],
) -> None:
    """Write up to `_OPEN_AT_ONCE` files, then sync and close them; record each in `spans`
    before its write, so that a failure cuts what was written.

    A batch may span hundreds of days (a first backfill of a quiet subreddit),
    more files than a process may hold open; syncing each file right after its
    write was slower (the kernel writes back a group of files together)."""
    fds: list[int] = []
    try:
        for file, (chunk, count) in files:
            fd = os.open(file, _OPEN, 0o644, dir_fd=dir_fd)
            fds.append(fd)
            end = ledger.ends.get(file, 0)
            size = os.fstat(fd).st_size
            if size < end:
                raise CsvLedgerCorrupt(f"{work.path / file} is {size} bytes but its ledger "
                                       f"commits {end}; move the directory's CSV files and "
                                       "ledger aside to start again")  # fmt: skip
            if size > end:
                log.warning("csv export: %s: cutting %d bytes of an unfinished append",
                            work.path / file, size - end)  # fmt: skip
                os.ftruncate(fd, end)
            data = _HEADER + chunk if end == 0 else chunk
            spans[file] = [end, end + len(data), count]
            _write_chunk(fd, data, end)
        for fd in fds:
            os.fdatasync(fd)
    finally:
        for fd in fds:
            os.close(fd)


def _truncate(file: str, dir_fd: int, length: int) -> None:
    fd = os.open(file, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        os.ftruncate(fd, length)
    finally:
        os.close(fd)


def _compact(directory: Path, dir_fd: int, ledger: _Ledger) -> None:
    """Rewrite the ledger as a checkpoint plus its recent records, once enough are old."""
    if ledger.stale < _COMPACT_AT:
        return
    # Only from the front: records are in file order, but their times follow the
    # wall clock, which can step back. A stale record after a recent one stays,
    # else the checkpoint below would end its files before its rows.
    old = time.time() - KEEP_BATCHES_S
    stale = 0
    for line in ledger.records:
        if orjson.loads(line)["at"] >= old:
            break
        stale += 1
    if stale < _COMPACT_AT:
        return
    recent = ledger.records[stale:]
    # The checkpoint holds the lengths as they were before the kept records, so
    # that each kept record still starts where its file's previous end was.
    ends = dict(ledger.ends)
    for line in reversed(recent):
        for file, (start, _, _) in orjson.loads(line)["files"].items():
            ends[file] = start
    body = b"\n".join([orjson.dumps({"checkpoint": ends}), *recent]) + b"\n"
    tmp = f"{LEDGER}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o644, dir_fd=dir_fd)  # fmt: skip
    try:
        _write_chunk(fd, body, 0)
        os.fdatasync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, LEDGER, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    os.fsync(dir_fd)
    log.info("csv export: %s: ledger compacted to %d records", directory / LEDGER, len(recent))


def _write_chunk(fd: int, data: bytes, offset: int) -> None:
    """Write all of `data` at `offset`. Crash tests replace this to die half-way."""
    view = memoryview(data)
    while view:
        done = os.pwrite(fd, view, offset)
        view, offset = view[done:], offset + done


def _make_dirs(directory: Path) -> None:
    """mkdir -p, fsyncing each new directory's parent so the new name survives a power loss."""
    missing = []
    while not directory.is_dir():
        missing.append(directory)
        directory = directory.parent
    for new in reversed(missing):
        new.mkdir(exist_ok=True)  # another process may create it at the same moment
        _fsync_dir(new.parent)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
