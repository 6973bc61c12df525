"""Append new events to per-subreddit, per-day CSV files, exactly once.

Layout: ``<csv_dir>/reddit/<subreddit>/<YYYY-MM-DD>.csv`` (UTC day of
``occurred_at``) and, beside each, ``<YYYY-MM-DD>.csv.ledger``: the file's
commit log and its lock. Never delete one without the other (an export
refuses a CSV whose ledger is gone rather than treat it all as uncommitted).

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

Exactly once. The contract is per batch: ``batch_id`` names the content (the
rows the database reported new for that batch); the database hands each row
out once, so the same event id under two batch ids is not checked for. A file
holding part of a batch is never appended that batch again, even with other
rows. Under an exclusive ``flock`` of the ledger (it serialises processes and
threads, and the kernel drops it when its holder dies):

  1. Read the ledger: JSON lines ``{"batch", "start", "end", "rows"}``, each
     record starting where the previous ended. ``end`` of the last record is
     the committed length of the CSV. An unterminated last line is a torn
     commit and is cut off; any other bad line is corruption (raise).
  2. Batch in the ledger: skip it. Otherwise cut the CSV back to the committed
     length: bytes past it are an append whose commit never happened.
  3. Write the rows (with the header if the file is empty) at that offset, in
     one buffer, then fdatasync (and fsync the directory of a new file).
  4. Append the commit record, then fdatasync. That write is the commit point.

A crash (even SIGKILL) before 4 completes leaves no commit: the next export to
the file cuts the partial or complete-but-uncommitted rows off, and the re-run
of the batch writes them again - never torn, never twice. After 4 the batch is
in the ledger and a re-run skips it. The data is durable before its commit
record is written, so a power loss cannot leave a commit without its rows.
Files are independent (each has its own ledger and lock), so a batch's files
are exported side by side and one file's failure leaves the others committed.
Readers wanting no uncommitted tail take LOCK_SH on the ledger, or read only
up to the last ``end``. The ledger grows by one line per batch per day file
(a day file stops growing after its day, so it is small and never compacted).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import orjson

from sentiment.config import valid_subreddit
from sentiment.dto import RawEventDTO, clean_json
from sentiment.errors import CsvLedgerCorrupt, InvalidSubreddit, SentimentError, ServiceUnavailable

__all__ = ["COLUMNS", "CsvLedgerCorrupt", "ExportResult", "export_events"]

log = logging.getLogger(__name__)

COLUMNS = (
    "id", "occurred_at", "source", "source_id", "event_type", "author",
    "title", "body", "score", "permalink", "url", "payload",
)  # fmt: skip
_HEADER = ",".join(COLUMNS)
_FORMULA_START = frozenset("=+-@\t\r\uff1d\uff0b\uff0d\uff20")
_ID_RE = re.compile(r"[0-9a-z]{1,16}")
_NUMBER_RE = re.compile(r"-?\d+(?:\.\d+)?")
_EVENT_TYPES = frozenset({"submission", "comment"})
_REDDIT = "https://www.reddit.com"
_THREADS = 8
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


def export_events(events: Sequence[RawEventDTO], *, csv_dir: Path, batch_id: str) -> ExportResult:
    """Append `events` to their day files, once per `batch_id` and file (see module doc).

    A bad row (e.g. built with `model_construct`) is refused, logged and counted
    in `rejected`; it never stops the other rows. Disk errors raise
    `ServiceUnavailable`; retrying the same batch is safe.
    """
    if not batch_id:
        raise ValueError("batch_id must be a non-empty string")
    root = csv_dir.resolve()
    groups, rejected = _group(events)
    jobs = [(root / "reddit" / name / f"{day.isoformat()}.csv", name, rows)
            for (name, day), rows in sorted(groups.items())]  # fmt: skip
    # Files are independent, so a few threads export them side by side: creating
    # files and fdatasync release the GIL, so one file's I/O overlaps another's
    # encoding, and concurrent fdatasyncs share the filesystem's journal commits.
    with ThreadPoolExecutor(max_workers=max(1, min(_THREADS, len(jobs)))) as pool:
        futures = [pool.submit(_export_file, root, *job, batch_id) for job in jobs]
    counts = dict.fromkeys(("written", "skipped", "refused"), 0)
    files: list[Path] = []
    errors: list[SentimentError] = []
    for (path, _, rows), future in zip(jobs, futures, strict=True):
        try:
            outcome = future.result()
        except (ServiceUnavailable, CsvLedgerCorrupt) as exc:
            errors.append(exc)  # every other file still finished: a retry skips those
            continue
        counts[outcome] += len(rows)
        if outcome != "refused":
            files.append(path)
    if errors:
        raise next((e for e in errors if e.retryable), errors[0])
    return ExportResult(counts["written"], counts["skipped"], rejected + counts["refused"],
                        tuple(files))  # fmt: skip


# -- validation and grouping --------------------------------------------------


def _group(events: Sequence[RawEventDTO]) -> tuple[dict[tuple[str, date], Rows], int]:
    """Rows by (canonical subreddit, UTC day); bad rows are counted, not raised."""
    groups: dict[tuple[str, date], Rows] = {}
    names: dict[str, str] = {}  # source_id -> canonical name, validated once per name
    rejected = 0
    for event in events:
        try:
            name, ts = _check(event, names)
        except (AttributeError, TypeError, ValueError, OverflowError) as exc:
            log.warning("csv export: refused event %r: %s", getattr(event, "id", None), exc)
            rejected += 1
            continue
        groups.setdefault((name, ts.date()), []).append((ts, event))
    return groups, rejected


def _check(event: RawEventDTO, names: dict[str, str]) -> tuple[str, datetime]:
    """The row's canonical subreddit and UTC time, or ValueError saying why it cannot
    be written. Only rows that skipped validation (`model_construct`) can fail."""
    if not (isinstance(event.id, str) and _ID_RE.fullmatch(event.id)):
        raise ValueError("id is not a base36 Reddit id")
    if event.source != "reddit" or event.event_type not in _EVENT_TYPES:
        raise ValueError("unknown source or event_type")
    if not isinstance(event.payload, dict) or not isinstance(event.occurred_at, datetime):
        raise TypeError("payload or occurred_at has the wrong type")
    name = names.get(event.source_id)
    if name is None:
        try:
            name = names[event.source_id] = valid_subreddit(event.source_id)
        except ValueError as exc:
            raise InvalidSubreddit(str(exc)) from None
    ts = event.occurred_at
    return name, ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)


# -- formatting ---------------------------------------------------------------


def _encode(rows: Rows, name: str, *, header: bool) -> bytes:
    """The rows as CSV bytes, in one buffer so that the file gets one write.

    Built by hand: Python 3.11's csv.writer does ~60 MB/s, 4x slower than this on
    1.5 KB rows. id, occurred_at, source_id and event_type are validated and need
    no quoting; every other cell goes through `_quote` (csv.QUOTE_MINIMAL's rule).
    """
    lines = [_HEADER] if header else []
    for ts, event in rows:
        p = event.payload
        body = p.get("selftext") if event.event_type == "submission" else p.get("body")
        lines.append(",".join((
            event.id, ts.isoformat(timespec="microseconds")[:-6] + "Z", "reddit", name,
            event.event_type, _text(p.get("author")), _text(p.get("title")), _text(body),
            _score(p.get("score")), _text(_absolute(p.get("permalink"))), _text(p.get("url")),
            _json(p),
        )))  # fmt: skip
    lines.append("")  # the last record's terminator
    # "replace" only matters for a lone surrogate in a row that skipped the DTO.
    return "\r\n".join(lines).encode("utf-8", "replace")


def _quote(cell: str) -> str:
    if '"' in cell:
        return '"' + cell.replace('"', '""') + '"'
    if "," in cell or "\n" in cell or "\r" in cell:
        return '"' + cell + '"'
    return cell


def _text(value: Any) -> str:
    if value is None:
        return ""
    text = value if isinstance(value, str) else str(value)
    return _quote("'" + text if text[:1] in _FORMULA_START else text)


def _score(value: Any) -> str:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)  # a number, even a negative one, is not a formula
    if isinstance(value, str) and _NUMBER_RE.fullmatch(value):  # a huge int the DTO made a string
        return value
    return _text(value)


def _json(payload: dict[str, Any]) -> str:
    try:
        encoded = orjson.dumps(payload)
    except (TypeError, orjson.JSONEncodeError):  # a payload that skipped the DTO's cleaning
        encoded = clean_json(payload)[1]
    return '"' + encoded.decode().replace('"', '""') + '"'


def _absolute(permalink: Any) -> Any:
    if isinstance(permalink, str) and permalink.startswith("/"):
        return _REDDIT + permalink
    return permalink


# -- the exactly-once append --------------------------------------------------


def _export_file(root: Path, path: Path, name: str, rows: Rows, batch_id: str) -> str:
    """One file's share of the batch: "written", "skipped" (there already) or "refused"."""
    if not path.resolve().is_relative_to(root):  # a symlinked directory or file on the way
        log.warning("csv export: refused %d rows: r/%s: %s leads outside %s", len(rows), name,
                    path, root)  # fmt: skip
        return "refused"
    try:
        _make_dirs(path.parent)
        with _open_locked(path) as (ledger_fd, data_fd):
            done = _append_locked(path, data_fd, ledger_fd, batch_id=batch_id, rows=rows, name=name)
    except OSError as exc:
        raise ServiceUnavailable(f"CSV disk unavailable at {path}: {exc}") from exc
    except CsvLedgerCorrupt as exc:
        log.error("csv export: %s", exc)  # noqa: TRY400 - the message says it all
        raise
    return "written" if done else "skipped"


@contextlib.contextmanager
def _open_locked(path: Path) -> Iterator[tuple[int, int]]:
    """The ledger, exclusively locked, and the CSV; neither may be a symlink."""
    with contextlib.ExitStack() as stack:
        try:
            ledger_fd = os.open(f"{path}.ledger", _OPEN | os.O_EXCL, 0o644)
            new_ledger = True
        except FileExistsError:
            ledger_fd, new_ledger = os.open(f"{path}.ledger", _OPEN, 0o644), False
        stack.callback(os.close, ledger_fd)
        fcntl.flock(ledger_fd, fcntl.LOCK_EX)  # released on close, or by the kernel if we die
        data_fd = os.open(path, _OPEN, 0o644)
        stack.callback(os.close, data_fd)
        # The ledger is always created before its CSV, so a CSV with bytes and no
        # ledger lost it to a person: recovery would cut the whole file away.
        if new_ledger and os.fstat(data_fd).st_size:
            raise CsvLedgerCorrupt(f"{path} has no ledger; restore {path}.ledger or move the CSV")
        yield ledger_fd, data_fd


def _append_locked(
    path: Path, data_fd: int, ledger_fd: int, *, batch_id: str, rows: Rows, name: str
) -> bool:
    committed, end, ledger_len = _read_ledger(path, ledger_fd)
    if batch_id in committed:
        if committed[batch_id] != len(rows):
            log.warning("csv export: %s already has batch %r with %d rows, not %d; "
                        "a batch id must name its content", path, batch_id,
                        committed[batch_id], len(rows))  # fmt: skip
        return False
    size = os.fstat(data_fd).st_size
    if size < end:
        raise CsvLedgerCorrupt(f"{path} is {size} bytes but its ledger commits {end}; "
                               "move both files aside to start the day file again")  # fmt: skip
    if size > end:
        log.warning("csv export: %s: cutting %d bytes of an unfinished append", path, size - end)
        os.ftruncate(data_fd, end)
    chunk = _encode(rows, name, header=end == 0)
    record = {"batch": batch_id, "start": end, "end": end + len(chunk), "rows": len(rows)}
    try:
        _write_chunk(data_fd, chunk, end)
        os.fdatasync(data_fd)
        if end == 0:
            _fsync_dir(path.parent)  # the new file's name must be durable before its commit
        _write_chunk(ledger_fd, orjson.dumps(record) + b"\n", ledger_len)  # the commit point
        os.fdatasync(ledger_fd)
    except OSError:
        with contextlib.suppress(OSError):  # an unsure commit becomes no commit; if this
            os.ftruncate(ledger_fd, ledger_len)  # fails too, the next recovery cuts both
            os.ftruncate(data_fd, end)
        raise
    return True


def _read_ledger(path: Path, fd: int) -> tuple[dict[str, int], int, int]:
    """Committed batches (-> rows), committed CSV length, and valid ledger length."""
    raw = os.pread(fd, os.fstat(fd).st_size, 0)
    committed: dict[str, int] = {}
    end = pos = 0
    while (newline := raw.find(b"\n", pos)) >= 0:
        record = _parse(raw[pos:newline])
        if record is None or record[1] != end or record[0] in committed:
            raise CsvLedgerCorrupt(f"{path}.ledger: bad record at byte {pos}; "
                                   "move the CSV and its ledger aside")  # fmt: skip
        committed[record[0]] = record[3]
        end, pos = record[2], newline + 1
    if pos < len(raw):  # a commit torn by a crash: it never happened
        log.warning("csv export: %s.ledger: dropping a torn commit record", path)
        os.ftruncate(fd, pos)
    return committed, end, pos


def _parse(line: bytes) -> tuple[str, int, int, int] | None:
    try:
        record = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    match record:
        case {"batch": str(batch), "start": int(start), "end": int(end), "rows": int(rows)}:
            return (batch, start, end, rows) if 0 <= start <= end else None
    return None


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
