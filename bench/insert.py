"""How fast does the batch sink store events, and the CSV sink export them?

Every figure is rows per second, measured in this run against a baseline from
the same run, same data, same server, so the ratios mean something on any
machine (absolute numbers depend on the disk and on the neighbours).

N synthetic Reddit events (~1.5 KB of JSON each, ~300 subreddits, four weeks
of history; see `_common.make_events`) are generated once and reused. Each
load goes into an EMPTY `raw_events` (TRUNCATE, then CHECKPOINT so no run
pays for the previous one's dirty pages; and before every timed method,
loads and exports alike, os.sync() so that none pays for the page cache
writeback of the one before), with durability on (fsync and
synchronous_commit as configured; the embedded server keeps the defaults):

  sink                insert_batch(events): per chunk, a binary COPY straight
                      into raw_events (every row is new here, so no chunk falls
                      back to the stage table and INSERT ... ON CONFLICT DO
                      NOTHING RETURNING), default chunk size
                      (INSERT_BATCH_SIZE), a commit per chunk.
  copy_text           the ceiling: plain COPY straight into raw_events, text
                      format, psycopg2 copy_expert, the COPY text encoded (with
                      escaping) while it streams, in chunks of 1,000 rows.
  copy_binary         the ceiling: plain COPY, binary format, psycopg 3
                      write_row, jsonb from the events' JSON (as the sink does).
  copy                max(copy_text, copy_binary).
  orm                 SQLAlchemy ORM session.add(RawEvent(...)) per row, a
                      commit every 1,000 rows, on --orm-fraction of the rows.
  executemany         psycopg2 execute_values(... ON CONFLICT DO NOTHING),
                      page_size=1000, payload as JSON text, ONE commit at the end.
  sink_all_conflicts  the sink again on the same batch, right after `sink`
                      (every row a conflict, nothing stored): the first chunk's
                      COPY fails on a stored key, and every chunk goes through
                      the stage table.
  csv                 export_events(rows the sink returned as new) into an
                      empty directory: per-subreddit, per-day files with their
                      ledgers, fdatasync'd (the sink's exactly-once contract).
  copy_to_csv         the baseline for csv: PostgreSQL's COPY (SELECT ...) TO
                      STDOUT (FORMAT csv, HEADER) of the same rows into one
                      file, fsync'd once at the end.
  sink_batch_id       (informational) insert_batch(events, batch_id=...), as
                      sentiment/tasks.py calls it: each chunk's outcome is
                      also recorded in ingested_batches.

The events come as the pipeline hands them to the sinks: out of a batch blob
(`load_events`), each with its payload's JSON (RawEventDTO.payload_json, made
once while scraping) and its payload decoded only when a sink reads it; done
here before any clock starts. Every method that writes JSON uses those bytes;
the ORM takes decoded dicts (copies of its rows, decoded before the clock),
as ORM code does. All other encoding (COPY text and binary rows, CSV cells, ORM
objects) is inside every timed region. Each method
runs --repeat times, interleaved (a round runs every method once, in an order that rotates
from round to round) so a noisy
neighbour hits all of them alike; the table shows the median and every run.
Targets: sink/copy >= 0.7, sink/orm >= 2.5, sink/executemany >= 1.2,
csv/copy_to_csv >= 0.5 (on the ratio of medians; `paired`, the median of the
per-round ratios, is shown beside it).

Investigation options, not needed for the targets: --chunk-sizes 1000,20000
also loads with insert_batch(chunk_size=...); --variants also measures
sink_work_mem (insert_batch on a session with work_mem and temp_buffers at
64MB).

    python bench/insert.py --rows 200000 --repeat 3 --json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import _common
from _common import Measurement, ratio, timed

_common.configure_environment()  # before anything reads Settings

import orjson  # noqa: E402
import psycopg  # noqa: E402
import psycopg2  # noqa: E402
import psycopg2.errors  # noqa: E402
import psycopg2.extras  # noqa: E402
from psycopg.adapt import Dumper  # noqa: E402
from psycopg.pq import Format  # noqa: E402
from sqlalchemy.orm import Session  # noqa: E402

from sentiment.config import get_settings  # noqa: E402
from sentiment.db import get_engine  # noqa: E402
from sentiment.dto import RawEventDTO, dump_events, load_events  # noqa: E402
from sentiment.models import RawEvent  # noqa: E402
from sentiment.sinks.postgres import InsertResult, insert_batch  # noqa: E402

COLUMNS = "id, occurred_at, source, source_id, event_type, payload"
TARGETS = {  # name: (numerator, denominator, minimum)
    "sink/copy": ("sink", "copy", 0.7),
    "sink/orm": ("sink", "orm", 2.5),
    "sink/executemany": ("sink", "executemany", 1.2),
    "csv/copy_to_csv": ("csv", "copy_to_csv", 0.5),
}
METHODS = [
    "sink", "copy", "copy_text", "copy_binary", "orm", "executemany",
    "sink_all_conflicts", "csv", "copy_to_csv",
]  # fmt: skip

try:
    from sentiment.sinks.csv import export_events
except ImportError as exc:  # the CSV sink is written separately; measure the rest without it
    export_events = None
    CSV_MISSING = f"sentiment.sinks.csv.export_events is not importable ({exc}); csv skipped"
else:
    CSV_MISSING = ""


# -- the methods (each one a timed body; set-up and checks stay outside) -------------------


def load_sink(events: Sequence[RawEventDTO], chunk_size: int | None = None) -> InsertResult:
    return insert_batch(events, chunk_size=chunk_size)


def load_sink_batch_id(events: Sequence[RawEventDTO], run: int) -> InsertResult:
    """insert_batch as sentiment/tasks.py calls it: with a batch_id, so each chunk's
    outcome is recorded in ingested_batches (a fresh id: nothing to replay)."""
    return insert_batch(events, batch_id=f"bench-insert-{run}-{uuid.uuid4().hex}")


def _escape_text(value: str) -> str:
    """A text-format COPY field: backslash, newline, CR and tab are escaped."""
    if "\\" in value:
        value = value.replace("\\", "\\\\")
    if "\n" in value or "\r" in value or "\t" in value:
        value = value.replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")
    return value


def _copy_text_chunks(events: Sequence[RawEventDTO], rows_per_chunk: int = 1000) -> Iterator[bytes]:
    for start in range(0, len(events), rows_per_chunk):
        lines = []
        for e in events[start : start + rows_per_chunk]:
            # orjson escapes every control character inside JSON strings and emits
            # no whitespace between tokens, so only its backslashes need doubling.
            payload = e.payload_json.replace(b"\\", b"\\\\")
            head = "\t".join((
                _escape_text(e.id), e.occurred_at.isoformat(), _escape_text(e.source),
                _escape_text(e.source_id), _escape_text(e.event_type), "",
            ))  # fmt: skip
            lines.append(head.encode() + payload + b"\n")
        yield b"".join(lines)


class _Stream:
    """A file-like object for copy_expert: each read() is the next encoded chunk."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks

    def read(self, size: int = -1) -> bytes:
        return next(self._chunks, b"")


def load_copy_text(conn: Any, events: Sequence[RawEventDTO]) -> int:
    with conn.cursor() as cur:
        cur.copy_expert(
            f"COPY raw_events ({COLUMNS}) FROM STDIN (FORMAT text)",
            _Stream(_copy_text_chunks(events)),
        )
        rows = cur.rowcount
    conn.commit()
    return rows


class OrjsonJsonbDumper(Dumper):
    """jsonb in binary COPY: a version byte and the JSON text (given, or encoded by orjson)."""

    format = Format.BINARY
    oid = 3802  # jsonb

    def dump(self, obj: Any) -> bytes:
        return b"\x01" + (obj if isinstance(obj, bytes) else orjson.dumps(obj))


def load_copy_binary(conn: psycopg.Connection[Any], events: Sequence[RawEventDTO]) -> int:
    with conn.cursor() as cur:
        with cur.copy(f"COPY raw_events ({COLUMNS}) FROM STDIN (FORMAT BINARY)") as copy:
            copy.set_types(["text", "timestamptz", "text", "text", "text", "jsonb"])
            write_row = copy.write_row
            for e in events:
                row = (e.id, e.occurred_at, e.source, e.source_id, e.event_type, e.payload_json)
                write_row(row)
        rows = cur.rowcount
    conn.commit()
    return rows


def load_orm(events: Sequence[RawEventDTO], commit_every: int = 1000) -> int:
    with Session(get_engine()) as session:
        for number, e in enumerate(events, 1):
            session.add(
                RawEvent(
                    id=e.id, occurred_at=e.occurred_at, source=e.source, source_id=e.source_id,
                    event_type=e.event_type, payload=e.payload,
                )
            )  # fmt: skip
            if number % commit_every == 0:
                session.commit()
        session.commit()
    return len(events)


def load_executemany(conn: Any, events: Sequence[RawEventDTO]) -> int:
    rows = (
        (e.id, e.occurred_at, e.source, e.source_id, e.event_type, e.payload_json.decode())
        for e in events
    )
    with conn.cursor() as cur:
        psycopg2.extras.execute_values(
            cur,
            f"INSERT INTO raw_events ({COLUMNS}) VALUES %s ON CONFLICT DO NOTHING",
            rows,
            page_size=1000,
        )
    conn.commit()  # one commit at the end
    return len(events)


def export_csv(new: Sequence[RawEventDTO], csv_dir: Path, batch_id: str) -> Any:
    assert export_events is not None
    return export_events(new, csv_dir=csv_dir, batch_id=batch_id)


def dump_copy_to_csv(conn: Any, path: Path) -> int:
    with open(path, "wb") as out, conn.cursor() as cur:
        cur.copy_expert(
            f"COPY (SELECT {COLUMNS} FROM raw_events) TO STDOUT (FORMAT csv, HEADER)", out
        )
        rows = cur.rowcount
        out.flush()
        os.fsync(out.fileno())  # the CSV sink's files are durable too
    conn.rollback()
    return rows


# -- the database around the runs ---------------------------------------------------------


class Database:
    """The benchmark's own connections: psycopg2 for text COPY and execute_values,
    psycopg 3 for binary COPY, and an autocommit one for TRUNCATE / CHECKPOINT."""

    def __init__(self, settings: Any) -> None:
        dsn = settings.database_url().replace("postgresql+psycopg2://", "postgresql://")
        self.pg2 = psycopg2.connect(dsn, application_name="bench-insert")
        self.admin = psycopg2.connect(dsn, application_name="bench-insert-admin")
        self.admin.autocommit = True
        self.pg3 = psycopg.connect(dsn, application_name="bench-insert")
        self.pg3.adapters.register_dumper(dict, OrjsonJsonbDumper)
        self.can_checkpoint = True

    def scalar(self, sql: str, *args: Any) -> Any:
        with self.admin.cursor() as cur:
            cur.execute(sql, args or None)
            return cur.fetchone()[0]

    def execute(self, sql: str, *args: Any) -> None:
        with self.admin.cursor() as cur:
            cur.execute(sql, args or None)

    def describe(self) -> dict[str, Any]:
        with self.admin.cursor() as cur:
            return _common.describe_database(cur)

    def checkpoint(self) -> None:
        if not self.can_checkpoint:
            return
        try:
            self.execute("CHECKPOINT")
        except psycopg2.errors.InsufficientPrivilege:
            print("  (no privilege for CHECKPOINT: runs start without one)")
            self.can_checkpoint = False

    def empty(self) -> None:
        tables = ["raw_events", "rejected_events"]
        if self.scalar("SELECT to_regclass('ingested_batches') IS NOT NULL"):
            tables.append("ingested_batches")
        self.execute(f"TRUNCATE {', '.join(tables)}")
        self.checkpoint()

    def count(self) -> int:
        return int(self.scalar("SELECT count(*) FROM raw_events"))

    def default_partition_rows(self, layout: str) -> int:
        if layout != "partitioned":
            return 0
        return int(self.scalar("SELECT count(*) FROM raw_events_default"))

    def ensure_partitions(self, data: _common.SyntheticData, layout: str) -> None:
        """A daily partition for every day of the data, so nothing lands in the default one."""
        if layout != "partitioned":
            return
        self.execute("TRUNCATE raw_events")
        self.execute(
            f"INSERT INTO raw_events ({COLUMNS})"
            " SELECT 'bench' || to_char(d, 'YYYYMMDD'), d, 'reddit', 'bench', 'submission', '{}'"
            " FROM generate_series(%s::timestamptz, %s::timestamptz, interval '1 day') AS d",
            data.first_day, data.last_day,
        )  # fmt: skip
        created = self.scalar(
            "SELECT count(*) FROM raw_events_ensure_partitions(%s)",
            get_settings().partition_days_ahead,
        )
        print(
            f"partitions: {created} created for {data.first_day:%Y-%m-%d}..{data.last_day:%Y-%m-%d}"
        )
        self.execute("TRUNCATE raw_events")

    def close(self) -> None:
        for conn in (self.pg2, self.admin, self.pg3):
            conn.close()


# -- the benchmark ---------------------------------------------------------------------------


def _check(what: str, got: int, expected: int) -> None:
    if got != expected:
        raise RuntimeError(f"{what}: expected {expected:,} rows, got {got:,}")


@dataclass
class Bench:
    """Everything a round needs: the connections, the data and where results go."""

    db: Database
    events: list[RawEventDTO]
    orm_events: list[RawEventDTO]
    results: dict[str, Measurement]
    layout: str
    repeat: int
    scratch: Path
    chunk_sizes: list[int]
    tuned_engine: Any | None

    def record(self, name: str, run: int, fn: Callable[[], Any], rows: int) -> Any:
        """Time fn, keep and print the figure.

        The page cache is flushed first (os.sync), so that no method pays for
        the writeback of the one before it: the files the last CSV export
        wrote, the WAL and table files the last load wrote.
        """
        os.sync()
        out, seconds, cpu = timed(fn)
        m = self.results[name]
        m.rows.append(rows)
        m.seconds.append(seconds)
        m.cpu_seconds.append(cpu)
        print(
            f"  {name:<20} run {run}/{self.repeat}: {rows / seconds:>10,.0f} rows/s"
            f"  ({rows:,} rows in {seconds:.2f} s, client CPU {cpu:.2f} s)",
            flush=True,
        )
        return out

    def load(self, name: str, run: int, fn: Callable[[], Any], rows: int) -> Any:
        """Time fn loading `rows` rows into an empty raw_events, then check they all arrived."""
        self.db.empty()
        out = self.record(name, run, fn, rows)
        _check(name, self.db.count(), rows)
        _check(
            f"{name}: rows in raw_events_default", self.db.default_partition_rows(self.layout), 0
        )
        return out


def run_round(b: Bench, run: int) -> None:
    """Every method once, each into an empty raw_events (the conflict runs excepted).

    The order rotates from round to round, so no method always runs first
    (right after data generation) or always follows the same neighbour.
    """
    db, events, n = b.db, b.events, len(b.events)

    def sink_then_csv() -> None:
        result = b.load("sink", run, lambda: load_sink(events), n)
        _check("sink: new events returned", len(result.new), n)
        db.checkpoint()
        again = b.record("sink_all_conflicts", run, lambda: load_sink(events), n)
        _check("sink_all_conflicts: new events returned", len(again.new), 0)
        if export_events is not None:
            csv_dir = Path(tempfile.mkdtemp(prefix="csv-", dir=b.scratch))
            exported = b.record("csv", run, lambda: export_csv(result.new, csv_dir, f"b{run}"), n)
            _check("csv: rows written", exported.written, n)
            b.results["csv"].note = f"{len(exported.files):,} files"
            # The directory stays until the run ends (the scratch folder goes then).
            # Deleting its 8,000-odd files here made the next round's export up to
            # twice as slow: for a few minutes ext4 steps over recently freed
            # inodes when it allocates new ones (perf: ext4_create spent its time
            # in recently_deleted), so every file created paid for this clean-up.
        out_file = b.scratch / "copy_to.csv"
        dumped = b.record("copy_to_csv", run, lambda: dump_copy_to_csv(db.pg2, out_file), n)
        _check("copy_to_csv", dumped, n)
        out_file.unlink()

    def chunked(size: int) -> Callable[[], Any]:
        return lambda: b.load(f"sink@{size}", run, lambda: load_sink(events, chunk_size=size), n)

    units: list[Callable[[], Any]] = [
        sink_then_csv,
        lambda: b.load("copy_text", run, lambda: load_copy_text(db.pg2, events), n),
        lambda: b.load("copy_binary", run, lambda: load_copy_binary(db.pg3, events), n),
        lambda: b.load("executemany", run, lambda: load_executemany(db.pg2, events), n),
        lambda: b.load("orm", run, lambda: load_orm(b.orm_events), len(b.orm_events)),
        lambda: b.load("sink_batch_id", run, lambda: load_sink_batch_id(events, run), n),
        *(chunked(size) for size in b.chunk_sizes),
    ]
    if b.tuned_engine is not None:
        tuned = b.tuned_engine
        units.append(
            lambda: b.load("sink_work_mem", run, lambda: insert_batch(events, engine=tuned), n)
        )
    shift = (run - 1) % len(units)
    for unit in units[shift:] + units[:shift]:
        unit()


def tuned_sink_engine(settings: Any) -> Any:
    """The sink's engine with more sort and temp-table memory for its session (a variant)."""
    from sqlalchemy import create_engine

    return create_engine(
        settings.database_url(driver="psycopg"),
        pool_size=1,
        connect_args={
            "application_name": "bench-insert-tuned",
            "options": "-c work_mem=64MB -c temp_buffers=64MB",
        },
    )


def summarize(results: dict[str, Measurement]) -> dict[str, Any]:
    """Medians, runs, and each target's ratio of medians.

    `paired` is the median of the per-round ratios (both methods measured in the
    same round, minutes apart): on a noisy machine it is the steadier figure.
    """
    medians = {name: m.median for name, m in results.items()}
    runs = {name: m.rates for name, m in results.items()}
    runs["copy"] = [max(a, b) for a, b in zip(runs["copy_text"], runs["copy_binary"], strict=True)]
    medians["copy"] = max(v for v in (medians["copy_text"], medians["copy_binary"]) if v)
    ratios = {}
    for label, (num, den, minimum) in TARGETS.items():
        value = ratio(medians.get(num), medians.get(den))
        pairs = [a / b for a, b in zip(runs.get(num, []), runs.get(den, []), strict=False) if b]
        ratios[label] = {
            "ratio": None if value is None else round(value, 3),
            "paired": round(statistics.median(pairs), 3) if pairs else None,
            "target": minimum,
            "status": "SKIP" if value is None else ("PASS" if value >= minimum else "MISS"),
        }
    extra = {}
    for name in results:
        if name not in METHODS and medians.get(name):
            extra[name] = {
                "rows_per_s": round(medians[name]),
                "over_sink": round(medians[name] / medians["sink"], 3),
                "over_copy": round(medians[name] / medians["copy"], 3),
            }
    return {"medians": medians, "runs": runs, "ratios": ratios, "variants": extra}


def print_tables(summary: dict[str, Any], results: dict[str, Measurement], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(120, shutil.get_terminal_size().columns), highlight=False)
    table = Table(title=title, title_justify="left")
    table.add_column("method")
    table.add_column("median rows/s", justify="right")
    table.add_column("runs (rows/s)", justify="right")
    table.add_column("note")
    order = METHODS + [name for name in results if name not in METHODS]
    for name in order:
        median = summary["medians"].get(name)
        runs = summary["runs"].get(name, [])
        note = results[name].note if name in results else "max(copy_text, copy_binary)"
        if median is None:
            table.add_row(name, "-", "-", note or "skipped")
            continue
        table.add_row(name, f"{median:,.0f}", "  ".join(f"{r:,.0f}" for r in runs), note)
    console.print(table)
    ratios = Table(title="targets (ratio of medians; paired = median of per-round ratios)",
                   title_justify="left")  # fmt: skip
    for column in ("ratio", "value", "paired", "target", "result"):
        ratios.add_column(column, justify="left" if column == "ratio" else "right")
    for label, r in summary["ratios"].items():
        style = {"PASS": "green", "MISS": "bold red"}.get(r["status"], "yellow")
        value = "-" if r["ratio"] is None else f"{r['ratio']:.2f}"
        paired = "-" if r["paired"] is None else f"{r['paired']:.2f}"
        ratios.add_row(
            label, value, paired, f">= {r['target']}", f"[{style}]{r['status']}[/{style}]"
        )
    console.print(ratios)
    if summary["variants"]:
        extra = Table(title="extra measurements, relative to sink and copy", title_justify="left")
        for column in ("method", "rows/s", "/ sink", "/ copy"):
            extra.add_column(column, justify="left" if column == "method" else "right")
        for name, v in summary["variants"].items():
            extra.add_row(
                name, f"{v['rows_per_s']:,}", f"{v['over_sink']:.2f}", f"{v['over_copy']:.2f}"
            )
        console.print(extra)


def code_fingerprints() -> dict[str, str | None]:
    """Which code produced the figures: HEAD and the measured modules' content hashes."""
    root = _common.ROOT
    out: dict[str, str | None] = {}
    head = root / ".git" / "HEAD"
    try:
        ref = head.read_text().strip()
        if ref.startswith("ref: "):
            ref = (root / ".git" / ref[5:]).read_text().strip()
        out["git_head"] = ref[:12]
    except OSError:
        out["git_head"] = None
    for rel in ("sentiment/sinks/postgres.py", "sentiment/sinks/csv.py"):
        try:
            out[rel] = hashlib.sha256((root / rel).read_bytes()).hexdigest()[:12]
        except OSError:
            out[rel] = None
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--rows", type=int, default=200_000, help="events per load (default 200000)"
    )
    parser.add_argument(
        "--repeat", type=int, default=3, help="runs per method; the median is reported"
    )
    parser.add_argument(
        "--orm-fraction", type=float, default=0.1, help="share of the rows the ORM loads (0.1)"
    )
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object as the last line"
    )
    parser.add_argument("--seed", type=int, default=42, help="seed of the synthetic data")
    parser.add_argument(
        "--chunk-sizes", default="", help="also measure the sink at these chunk sizes: 1000,20000"
    )
    parser.add_argument(
        "--variants",
        action="store_true",
        help="also measure sink_work_mem (see README)",
    )
    args = parser.parse_args(argv)
    if args.rows < 1 or args.repeat < 1 or not 0 < args.orm_fraction <= 1:
        parser.error("--rows and --repeat must be >= 1, --orm-fraction in (0, 1]")
    args.chunk_sizes = [int(s) for s in args.chunk_sizes.split(",") if s.strip()]
    return args


def measure(args: argparse.Namespace, settings: Any, data: _common.SyntheticData) -> dict[str, Any]:
    """Start the servers, run every round, and return the measurements and the server's facts."""
    events = data.events
    # Copies with their payloads decoded: ORM code starts from dicts.
    orm_events = load_events(dump_events(events[: max(1, round(len(events) * args.orm_fraction))]))
    for event in orm_events:
        _ = event.payload
    with _common.bench_servers():
        db = Database(settings)
        tuned = tuned_sink_engine(settings) if args.variants else None
        try:
            info = db.describe()
            where = (
                "embedded"
                if settings.uses_embedded_postgres
                else f"{settings.pg_host}:{settings.pg_port}"
            )
            print(
                f"PostgreSQL {info['postgres_version']} ({where}/{settings.pg_db}), "
                f"layout {info['layout']}, timescaledb {info['timescaledb_version'] or '-'}, "
                f"{info['server_settings']}",
                flush=True,
            )
            if info["server_settings"]["fsync"] != "on":
                print("WARNING: fsync is off on this server: figures are not durable-write figures")
            if CSV_MISSING:
                print(f"NOTE: {CSV_MISSING}")
            db.ensure_partitions(data, info["layout"])
            # Open (and prepare) every pooled connection outside the timed regions.
            insert_batch([])
            get_engine().connect().close()
            names = ["sink", "sink_all_conflicts", "csv", "copy_to_csv", "copy_text", "copy_binary",
                     "executemany", "orm", "sink_batch_id",
                     *(f"sink@{s}" for s in args.chunk_sizes)]  # fmt: skip
            if tuned is not None:
                insert_batch([], engine=tuned)
                names.append("sink_work_mem")
            results = {name: Measurement(name) for name in names}
            results["sink"].note = f"chunk_size {settings.insert_batch_size} (INSERT_BATCH_SIZE)"
            results["orm"].note = f"{len(orm_events):,} rows ({args.orm_fraction:g} of them)"
            results["executemany"].note = "page_size 1000, one commit"
            results["sink_batch_id"].note = "insert_batch(batch_id=...), as tasks.py calls it"
            results["copy_to_csv"].note = "one file, fsync'd"
            if CSV_MISSING:
                results["csv"].note = "skipped: sentiment.sinks.csv missing"
            if tuned is not None:
                results[
                    "sink_work_mem"
                ].note = "insert_batch, session work_mem=64MB temp_buffers=64MB"
            scratch = Path(
                tempfile.mkdtemp(prefix="bench-insert-", dir=settings.data_dir.resolve())
            )
            bench = Bench(
                db, events, orm_events, results, info["layout"], args.repeat, scratch,
                args.chunk_sizes, tuned,
            )  # fmt: skip
            started = time.perf_counter()
            try:
                for run in range(1, args.repeat + 1):
                    print(f"round {run}/{args.repeat}", flush=True)
                    run_round(bench, run)
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
                db.empty()
            info["elapsed"] = time.perf_counter() - started
        finally:
            db.close()
            if tuned is not None:
                tuned.dispose()
    return {"results": results, "info": info, "orm_rows": len(orm_events)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = get_settings()
    print(f"generating {args.rows:,} events (seed {args.seed}) ...", flush=True)
    data = _common.make_events(args.rows, seed=args.seed)
    # As the pipeline hands them over: through a batch blob, so each payload is
    # JSON encoded once upstream and decoded only where a sink reads it.
    data.events = load_events(dump_events(data.events))
    print(
        f"  {len(data.events):,} events, {len(data.subreddits)} subreddits, "
        f"{data.first_day:%Y-%m-%d}..{data.last_day:%Y-%m-%d}, "
        f"mean payload {data.mean_payload_bytes:,.0f} B of JSON, in {data.seconds:.1f} s",
        flush=True,
    )
    measured = measure(args, settings, data)
    results, info = measured["results"], measured["info"]
    summary = summarize(results)
    print_tables(
        summary,
        results,
        f"bench/insert.py: {args.rows:,} rows, median of {args.repeat}, PostgreSQL "
        f"{info['postgres_version']}, {info['layout']}, {os.cpu_count()} cores",
    )
    print(f"measured in {info['elapsed']:.0f} s", flush=True)
    if args.json:
        medians = summary["medians"]
        out: dict[str, Any] = {"rows": args.rows}
        out.update(
            {name: None if medians.get(name) is None else round(medians[name]) for name in METHODS}
        )
        out.update(
            {label.replace("/", "_over_"): r["ratio"] for label, r in summary["ratios"].items()}
        )
        out["sink_batch_id"] = summary["variants"].get("sink_batch_id", {}).get("rows_per_s")
        out.update(
            targets=summary["ratios"],
            layout=info["layout"],
            postgres_version=info["postgres_version"],
            timescaledb_version=info["timescaledb_version"],
            server="embedded" if settings.uses_embedded_postgres else "configured",
            server_settings=info["server_settings"],
            repeat=args.repeat,
            orm_rows=measured["orm_rows"],
            chunk_size=settings.insert_batch_size,
            mean_payload_bytes=round(data.mean_payload_bytes),
            seed=args.seed,
            csv_skipped=CSV_MISSING or None,
            cpu_count=os.cpu_count(),
            python=platform.python_version(),
            date=datetime.now(UTC).isoformat(timespec="seconds"),
            code=code_fingerprints(),
            variants=summary["variants"],
            details={name: m.as_json() for name, m in results.items()},
        )
        print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
