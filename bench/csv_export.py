"""Where does the CSV export's time go? A diagnostic beside bench/insert.py.

bench/insert.py times `export_events` against PostgreSQL's COPY TO CSV. This
script takes the export apart on the same synthetic events (no database
needed) so that a change to `sentiment/sinks/csv.py` can be aimed and checked:

  export        export_events(events) into an empty directory, as bench/insert.py
                times it: this thread groups and formats each subreddit's rows
                while a few threads write, fdatasync and commit the directories
                already formatted.
  formatting    the same grouping and formatting alone, nothing written.
  io            the writing alone: directories formatted beforehand (not timed),
                then written, synced and committed by the same threads.
  export_nosync export_events with every fsync and fdatasync a no-op, then one
                os.sync(): the most that batching the syncs could save.
  threads_N     (with --threads) export_events with N I/O threads.

If `export` is close to `formatting` + `io`, the two do not overlap; if it is
close to `export_nosync`, the syncs are not what costs.

It also times creating 1,000 empty files in a fresh directory (`create_us`,
microseconds a file). On ext4 without a journal the inode allocator skips, one
by one, every inode freed in the last few minutes, so file creation slows
several-fold right after a mass deletion (such as the previous benchmark's
clean-up); a high `create_us` says the run is paying for that, and waiting a
few minutes before measuring again is fair.

Each round runs every method once, in an order that rotates; figures are
medians of --repeat rounds, in rows per second. Every export goes into its own
new directory under DATA_DIR, kept until the end of the run (deleting files
between rounds would slow the next round's file creation, see above).

    python bench/csv_export.py --rows 200000 --repeat 3 [--threads 1,2,4] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import _common

_common.configure_environment()

from sentiment.config import get_settings  # noqa: E402 - after configure_environment
from sentiment.dto import dump_events, load_events  # noqa: E402
from sentiment.sinks import csv as csv_sink  # noqa: E402

BASE_METHODS = ("export", "formatting", "io", "export_nosync")


def formatted(events: list[Any], root: Path) -> list[csv_sink._Dir]:
    """Group and format every row as export_events does; the directories to write."""
    return list(csv_sink._formatted(csv_sink._group(events)[0], root))


@contextlib.contextmanager
def syncs_skipped() -> Iterator[None]:
    real = os.fsync, os.fdatasync
    os.fsync = os.fdatasync = lambda fd: None
    try:
        yield
    finally:
        os.fsync, os.fdatasync = real


@contextlib.contextmanager
def io_threads(count: int) -> Iterator[None]:
    real = csv_sink._THREADS
    csv_sink._THREADS = count
    try:
        yield
    finally:
        csv_sink._THREADS = real


def create_us(scratch: Path, files: int = 1000) -> float:
    """Microseconds to create one empty file in a fresh directory (the filesystem's state)."""
    directory = Path(tempfile.mkdtemp(prefix="create-", dir=scratch))
    os.sync()
    started = time.perf_counter()
    for i in range(files):
        os.close(os.open(directory / f"{i}.csv", os.O_WRONLY | os.O_CREAT, 0o644))
    return 1e6 * (time.perf_counter() - started) / files


def prepared(name: str, events: list[Any], root: Path) -> Callable[[], Any]:
    """The timed part of `name`, with whatever it needs done beforehand already done."""

    def export() -> None:
        csv_sink.export_events(events, csv_dir=root, batch_id="b")

    def export_nosync() -> None:
        with syncs_skipped():
            export()
        os.sync()

    def formatting() -> None:
        with csv_sink._collector_paused():  # as export_events formats
            formatted(events, root)

    if name == "io":
        with csv_sink._collector_paused():
            dirs = formatted(events, root)

        def io() -> None:
            with ThreadPoolExecutor(csv_sink._THREADS) as pool:
                list(pool.map(lambda work: csv_sink._export_dir(root, work, "b"), dirs))

        return io
    if name.startswith("threads_"):

        def threads() -> None:
            with io_threads(int(name.removeprefix("threads_"))):
                export()

        return threads
    return {"export": export, "export_nosync": export_nosync, "formatting": formatting}[name]


def run_method(name: str, events: list[Any], scratch: Path) -> tuple[float, float]:
    """One timed run of `name` into a new directory: (wall seconds, CPU seconds)."""
    run = prepared(name, events, Path(tempfile.mkdtemp(prefix=f"{name}-", dir=scratch)))
    os.sync()  # no run pays for the writeback of the one before
    _, wall, cpu = _common.timed(run)
    return wall, cpu


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", default="", help="also export with these I/O thread counts")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    args = parser.parse_args(argv)
    if args.rows < 1 or args.repeat < 1:
        parser.error("--rows and --repeat must be >= 1")
    args.threads = [int(n) for n in args.threads.split(",") if n.strip()]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _common.exit_on_sigterm()
    data = _common.make_events(args.rows, seed=args.seed)
    # As the pipeline hands them over: out of a batch blob, each payload JSON
    # encoded once upstream and decoded only where the export reads it.
    events = load_events(dump_events(data.events))
    methods = [*BASE_METHODS, *(f"threads_{n}" for n in args.threads)]
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in methods}
    creates: list[float] = []
    settings = get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="bench-csv-export-", dir=settings.data_dir.resolve()))
    print(f"{len(events):,} events, {len(data.subreddits)} subreddits, "
          f"exporting into {scratch}", flush=True)  # fmt: skip
    try:
        for round_no in range(args.repeat):
            creates.append(create_us(scratch))
            shift = round_no % len(methods)
            for name in methods[shift:] + methods[:shift]:
                wall, cpu = run_method(name, events, scratch)
                runs[name].append((wall, cpu))
                print(f"  round {round_no + 1}/{args.repeat} {name:14s} "
                      f"{len(events) / wall:9,.0f} rows/s  ({wall:.2f} s, CPU {cpu:.2f} s)",
                      flush=True)  # fmt: skip
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    def median_s(name: str) -> float:
        return statistics.median(wall for wall, _ in runs[name])

    summary: dict[str, Any] = {
        name: {
            "rows_per_s": round(len(events) / median_s(name)),
            "median_s": round(median_s(name), 3),
            "runs_s": [round(wall, 3) for wall, _ in runs[name]],
            "cpu_s": [round(cpu, 3) for _, cpu in runs[name]],
        }
        for name in methods
    }
    summary["create_us"] = [round(us, 1) for us in creates]
    overlap = median_s("formatting") + median_s("io")
    print(f"\nbench/csv_export.py: {len(events):,} rows, median of {args.repeat}")
    for name in methods:
        print(f"  {name:14s} {summary[name]['rows_per_s']:9,} rows/s  {median_s(name):6.2f} s")
    print(f"  formatting + io    {overlap:6.2f} s  (export {median_s('export'):.2f} s)")
    print(f"  file creation      {statistics.median(creates):6.1f} us a file "
          f"(rounds: {', '.join(f'{us:.0f}' for us in creates)})")  # fmt: skip
    if args.json:
        print(json.dumps({"rows": len(events), "repeat": args.repeat, **summary}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
