"""The `sentiment` command line, run as a user runs it."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import text

from tests.conftest import _free_port
from tests.processes import ROOT, pid_running


def _sentiment(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sentiment.cli", *args],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_run_refuses_a_csv_dir_it_cannot_write_before_starting_anything(tmp_path):
    blocked = tmp_path / "csv"
    blocked.write_text("a file where the CSV folder should be")

    result = _sentiment("run", "--duration", "5", env={"CSV_DIR": str(blocked)}, timeout=60)

    assert result.returncode == 1
    assert f"CSV_DIR={blocked}: cannot write CSV files there" in " ".join(result.stdout.split())


@pytest.mark.parametrize(
    "args",
    [("--flower-port", "70000"), ("--simulator-port", "0"), ("--duration", "0"),
     ("--duration", "-5"), ("--concurrency", "0")],
    ids=" ".join,
)  # fmt: skip
def test_run_refuses_an_option_out_of_range_before_starting_anything(args):
    result = _sentiment("run", *args, timeout=60)

    assert result.returncode == 2, result.stdout + result.stderr
    assert "Invalid value for '" + args[0] in result.stderr
    assert "Traceback" not in result.stdout + result.stderr


def test_simulator_refuses_a_port_out_of_range():
    result = _sentiment("simulator", "--port", "70000", timeout=60)

    assert result.returncode == 2
    assert "Invalid value for '--port'" in result.stderr


def test_a_first_scrape_that_cannot_be_enqueued_is_one_clear_error(settings, tmp_path):
    from sentiment.runner import Runner

    runner = Runner(settings, concurrency=1)
    env = {**os.environ, "SUBREDDITS": "stocks", "PG_PORT": "not-a-port"}

    with pytest.raises(RuntimeError, match="could not enqueue the first scrapes") as caught:
        runner._kick_off(env)

    assert "PG_PORT" in str(caught.value)


def test_a_second_run_on_the_same_data_dir_is_refused_at_once(settings):
    from sentiment.runner import only_run

    with only_run(settings.data_dir):  # this test is "the first run"
        result = _sentiment("run", "--duration", "5", timeout=60)

    assert result.returncode == 1
    shown = " ".join(result.stdout.split())
    assert f"another `sentiment run` (pid {os.getpid()}) is using {settings.data_dir}" in shown


def test_run_refuses_a_port_that_is_taken_before_starting_anything(settings):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = _sentiment("run", "--duration", "5", "--flower-port", str(port), timeout=60)

    assert result.returncode == 1
    shown = " ".join(result.stdout.split())
    assert f"port {port} (Flower) is in use; choose another with --flower-port" in shown
    assert "migrating" not in shown


@pytest.mark.slow
def test_run_brings_up_the_whole_pipeline_and_stops_cleanly(settings, db, redis_client, csv_dir):
    env = {
        # No Reddit credentials: the runner starts the simulator itself.
        "REDDIT_CLIENT_ID": "",
        "REDDIT_CLIENT_SECRET": "",
        "REDDIT_OAUTH_URL": "https://oauth.reddit.com",
        "REDDIT_URL": "https://www.reddit.com",
        "SUBREDDITS": "alpha_demo:10,beta_demo:10",
    }
    sim_port, flower_port = _free_port(), _free_port()

    result = _sentiment(
        "run",
        "--duration",
        "25",
        "--simulator-port",
        str(sim_port),
        "--flower-port",
        str(flower_port),
        env=env,
        timeout=180,
    )

    assert result.returncode == 0, result.stdout + result.stderr
    assert f"Flower http://127.0.0.1:{flower_port}" in result.stdout
    assert "stopped; logs are in" in result.stdout
    with db.connect() as conn:
        counts = dict(
            conn.execute(text("SELECT source_id, count(*) FROM raw_events GROUP BY 1")).all()
        )
    assert set(counts) == {"alpha_demo", "beta_demo"}
    assert all(n > 0 for n in counts.values())
    assert {p.parent.name for p in csv_dir.rglob("*.csv")} == {"alpha_demo", "beta_demo"}
    # "--": pgrep would take "--port=..." for an option of its own and match nothing.
    leftovers = subprocess.run(
        ["pgrep", "-f", "--", f"--port={flower_port}"], capture_output=True, check=False
    )
    assert leftovers.returncode == 1, "a child process outlived `sentiment run`"  # 1: no match


def test_status_reports_health_queues_and_backlog(settings, db, redis_client):
    from sentiment.pipeline import park_export
    from sentiment.processing import set_aside
    from sentiment.sinks.postgres import insert_batch
    from tests.factories import make_events

    events = sorted(make_events(9, subreddit="stocks"), key=lambda e: e.occurred_at)
    insert_batch(events)
    set_aside([e.key for e in events[:2]], "no text to score")
    park_export({"batch_id": "b1", "batch": None, "subreddit": "stocks", "new": [0]})

    result = _sentiment("status", "--json", env={"SUBREDDITS": "stocks"})

    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["health"] == {"postgres": "ok", "redis": "ok"}
    assert report["unprocessed"] == 7
    assert report["set_aside"] == 2
    assert report["parked_exports"] == 1
    oldest = min(e.occurred_at for e in events[2:])
    assert datetime.fromisoformat(report["oldest_unprocessed"]) == oldest
    # A session in another time zone still gets UTC in the table.
    env = {"SUBREDDITS": "stocks", "COLUMNS": "200", "PGTZ": "America/New_York"}
    table = _sentiment("status", env=env)
    assert f"7 (oldest {oldest:%Y-%m-%d %H:%M} UTC)" in table.stdout
    assert "set aside" in table.stdout
    assert report["subreddits"]["stocks"]["submissions"] == 9
    assert set(report["queues"]) == {"scrape", "ingest", "export"}


def test_the_live_view_reuses_a_slow_database_count_for_a_while(settings, db, redis_client,
                                                                 monkeypatch):  # fmt: skip
    # Counting a large raw_events takes seconds; the live view asks every 2 s. It
    # reuses the last count for ten times as long as the count took (here: longer).
    from sentiment import status
    from sentiment.sinks.postgres import insert_batch
    from tests.factories import make_events

    monkeypatch.setattr(status, "_last_database", {})
    monkeypatch.setattr(status, "_REUSE_FOR", 10_000)  # times the query's duration
    monkeypatch.setattr(status, "_REUSE_AT_MOST_S", 3600.0)
    insert_batch(make_events(3, subreddit="stocks"))
    first = status.collect_status(settings, ["stocks"], reuse_database=True)
    insert_batch(make_events(2, subreddit="stocks"))

    reused = status.collect_status(settings, ["stocks"], reuse_database=True)
    fresh = status.collect_status(settings, ["stocks"])

    assert first["subreddits"]["stocks"]["submissions"] == 3
    assert reused["subreddits"]["stocks"]["submissions"] == 3
    assert reused["unprocessed"] == 3 and reused["health"]["postgres"] == "ok"
    assert "last_run_s_ago" not in reused["subreddits"]["stocks"]  # Redis's part is not reused
    assert fresh["subreddits"]["stocks"]["submissions"] == 5
    assert fresh["unprocessed"] == 5


def test_the_live_view_asks_again_after_a_failure_and_within_half_a_minute(settings, monkeypatch):
    # A database that timed out must not be shown down for 10x the timeout; a
    # count that waited behind a lock must not be shown for 10x that wait.
    from sentiment import status

    calls: list[int] = []

    def down(settings: object, report: dict) -> None:
        calls.append(1)
        report["health"]["postgres"] = "error: timeout"

    monkeypatch.setattr(status, "_last_database", {})
    monkeypatch.setattr(status, "_REUSE_FOR", 10_000)
    monkeypatch.setattr(status, "_collect_database", down)
    status.collect_status(settings, ["stocks"], reuse_database=True)
    status.collect_status(settings, ["stocks"], reuse_database=True)
    assert len(calls) == 2  # a failure is not reused

    def slow_but_fine(settings: object, report: dict) -> None:
        calls.append(1)
        report["health"]["postgres"] = "ok"

    monkeypatch.setattr(status, "_collect_database", slow_but_fine)
    monkeypatch.setattr(status, "_REUSE_AT_MOST_S", 0.0)
    status.collect_status(settings, ["stocks"], reuse_database=True)
    status.collect_status(settings, ["stocks"], reuse_database=True)
    assert len(calls) == 4  # reused for at most _REUSE_AT_MOST_S


def test_requeue_puts_rows_set_aside_back_in_the_queue(settings, db):
    from sentiment.processing import set_aside
    from sentiment.sinks.postgres import insert_batch
    from tests.factories import make_events

    stocks, news = make_events(3, subreddit="stocks"), make_events(2, subreddit="news")
    insert_batch(stocks + news)
    set_aside([e.key for e in stocks + news], "model v1 failed")

    one = _sentiment("requeue", "Stocks")
    rest = _sentiment("requeue")
    bad = _sentiment("requeue", "../etc")

    assert one.returncode == 0, one.stderr
    assert json.loads(one.stdout) == {"requeued": 3, "subreddit": "Stocks"}
    assert json.loads(rest.stdout)["requeued"] == 2
    assert bad.returncode != 0 and "not a valid subreddit name" in bad.stdout
    with db.connect() as conn:
        assert (
            conn.execute(text("SELECT count(*) FROM raw_events WHERE NOT processed")).scalar() == 5
        )


@pytest.mark.parametrize(("host", "pghost"), [("db.example", "db.example"), ("::1", "::1")])
def test_psql_gets_the_host_as_libpq_wants_it(monkeypatch, host, pghost):
    # libpq takes brackets off an IPv6 address only in a URI, not in PGHOST.
    from sentiment.cli import psql_environment
    from sentiment.config import load_settings

    monkeypatch.setenv("PG_HOST", host)
    monkeypatch.setenv("PG_PORT", "6432")
    env = psql_environment(load_settings())

    assert (env["PGHOST"], env["PGPORT"]) == (pghost, "6432")


def test_psql_opens_the_pipelines_database(settings, db):
    """No psql on the machine and no password to type: `sentiment psql` brings both."""
    from sentiment.sinks.postgres import insert_batch
    from tests.factories import make_events

    insert_batch(make_events(3, subreddit="stocks"))

    result = _sentiment(
        "psql", "-At", "-c", "SELECT count(*) FROM raw_events WHERE source_id = 'stocks'"
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "3"


def test_psql_says_where_when_the_database_is_not_there(settings):
    port = str(_free_port())
    down = {"PG_HOST": "127.0.0.1", "PG_PORT": port, "PG_PASSWORD": "x"}

    result = _sentiment("psql", "-c", "SELECT 1", env=down)

    assert result.returncode != 0
    assert "127.0.0.1" in result.stderr and port in result.stderr  # psql's own message


def test_status_shows_a_scrape_in_progress(settings, redis_client):
    """A first scrape that waits for the rate limit is "scraping", not "never"."""
    from sentiment.pipeline import acquire_scrape_lock, record_run, release_scrape_lock

    record_run("stocks", {"subreddit": "stocks"})
    token = acquire_scrape_lock("wallstreetbets", ttl_s=60)  # as a running scrape holds it
    try:
        env = {"SUBREDDITS": "stocks,wallstreetbets", "COLUMNS": "200"}
        report = json.loads(_sentiment("status", "--json", env=env).stdout)
        table = _sentiment("status", env=env).stdout
    finally:
        release_scrape_lock("wallstreetbets", token)

    assert report["subreddits"]["wallstreetbets"]["scraping"] is True
    assert report["subreddits"]["stocks"]["scraping"] is False
    rows = {line.split()[1]: line for line in table.splitlines() if line.startswith("│ ")}
    assert "never, scraping now" in rows["wallstreetbets"]
    assert "scraping" not in rows["stocks"] and "s ago" in rows["stocks"]


def test_status_says_which_server_is_down_and_exits_non_zero(settings):
    down = {  # nothing listens on either port
        "PG_HOST": "127.0.0.1",
        "PG_PORT": str(_free_port()),
        "REDIS_URL": f"redis://127.0.0.1:{_free_port()}/0",
    }

    report = _sentiment("status", "--json", env=down, timeout=60)
    table = _sentiment("status", env={**down, "COLUMNS": "200"}, timeout=60)

    assert report.returncode == table.returncode == 1
    health = json.loads(report.stdout)["health"]
    assert health["postgres"].startswith("error: ") and "refused" in health["postgres"]
    assert health["redis"].startswith("error: ") and "refused" in health["redis"]
    shown = " ".join(table.stdout.split())
    assert f"PostgreSQL ({down['PG_HOST']}:{down['PG_PORT']}) is not reachable" in shown
    assert "Redis (127.0.0.1:" in shown and "Traceback" not in table.stdout + table.stderr


def test_status_on_a_database_never_migrated_says_to_migrate(settings, scratch_engine):
    env = {"PG_DB": scratch_engine.url.database, "COLUMNS": "200"}

    result = _sentiment("status", env=env, timeout=60)

    assert result.returncode == 1
    shown = " ".join(result.stdout.split())
    assert "is not migrated" in shown and "raw_events" in shown
    assert "run `sentiment migrate`" in shown


@pytest.mark.parametrize(
    "command", [("migrate",), ("run", "--duration", "5"), ("retention", "--days", "3")]
)
def test_an_unreachable_database_is_one_clear_line_not_a_traceback(settings, command):
    port = _free_port()  # nothing listens there

    result = _sentiment(*command, env={"PG_HOST": "127.0.0.1", "PG_PORT": str(port)}, timeout=90)

    assert result.returncode == 1
    shown = " ".join(result.stdout.split())
    assert f"error: PostgreSQL (127.0.0.1:{port}): connection to server" in shown
    assert "Connection refused" in shown and "PG_HOST" in shown
    assert "Traceback" not in result.stdout + result.stderr


def test_an_embedded_database_that_is_not_running_is_named_as_such(settings, tmp_path):
    port = _free_port()  # no embedded server started there
    env = {"PG_HOST": "", "EMBEDDED_PG_PORT": str(port), "DATA_DIR": str(tmp_path / "data"),
           "REDIS_URL": settings.redis_connection_url()}  # fmt: skip

    result = _sentiment("requeue", env=env, timeout=90)

    assert result.returncode == 1
    shown = " ".join(result.stdout.split())
    assert f"error: PostgreSQL (127.0.0.1:{port}): connection to server" in shown
    assert "the embedded server: start it with `sentiment services start`" in shown
    assert "EMBEDDED_PG_PORT" in shown and "Check PG_HOST" not in shown


# `exports --retry` runs a task's body here: its outage comes as ServiceUnavailable.
@pytest.mark.parametrize("command", [("exports",), ("exports", "--retry")])
def test_an_unreachable_redis_is_one_clear_line_not_a_traceback(settings, command):
    port = _free_port()

    result = _sentiment(*command, env={"REDIS_URL": f"redis://127.0.0.1:{port}/0"})

    assert result.returncode == 1
    shown = " ".join(result.stdout.split())
    assert f"error: Redis (127.0.0.1:{port}): Error 111 connecting" in shown
    assert "REDIS_URL" in shown and "Traceback" not in result.stdout + result.stderr


def test_exports_lists_parked_exports_and_retries_them(settings, db, redis_client, csv_dir):
    import time

    from sentiment import pipeline
    from sentiment.sinks.postgres import insert_batch
    from tests.factories import make_events

    events = make_events(5, subreddit="stocks")
    insert_batch(events)
    key = pipeline.stash_batch(events)
    summary = dict.fromkeys(("duplicates", "rejected", "gaps", "malformed", "requests"), 0)
    pipeline.park_export({**summary, "batch_id": "b-cli", "batch": key, "subreddit": "stocks",
                          "new": [0, 1, 2, 3, 4], "fetched": 5, "inserted": 5,
                          "started_at": time.time()})  # fmt: skip

    listed = _sentiment("exports", "--json")

    assert listed.returncode == 0, listed.stderr
    (entry,) = json.loads(listed.stdout)
    assert entry["subreddit"] == "stocks"
    assert entry["rows"] == 5
    assert entry["batch_id"] == "b-cli"
    assert entry["retry_until"] == pytest.approx(time.time() + pipeline.BATCH_TTL_S, abs=60)

    retried = _sentiment("exports", "--retry")

    assert retried.returncode == 0, retried.stdout + retried.stderr
    assert json.loads(retried.stdout.split("\n", 1)[1]) == {"exported": 1, "failing": 0, "lost": 0}
    written = []
    for path in csv_dir.rglob("*.csv"):
        with path.open(newline="", encoding="utf-8") as handle:
            written += [row[0] for row in list(csv.reader(handle))[1:]]
    assert sorted(written) == sorted(e.id for e in events)
    assert pipeline.parked_exports() == []
    assert json.loads(_sentiment("exports", "--json").stdout) == []


def test_a_bad_setting_is_reported_without_a_traceback():
    result = _sentiment("status", env={"PG_PORT": "not-a-port"})

    assert result.returncode == 1
    assert "PG_PORT: Input should be a valid integer" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr


def test_retention_previews_then_drops_old_processed_rows(settings, db):
    from sqlalchemy import text

    old = datetime.now(UTC) - timedelta(days=400)  # no partition that old: the default one
    with db.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO raw_events (id, occurred_at, source, source_id, event_type,"
                " payload, processed) VALUES ('old1', :at, 'reddit', 'stocks', 'comment',"
                " '{}', true), ('new1', now(), 'reddit', 'stocks', 'comment', '{}', false)"
            ),
            {"at": old},
        )

    def stored() -> set[str]:
        with db.connect() as conn:
            return set(conn.execute(text("SELECT id FROM raw_events")).scalars())

    off = _sentiment("retention")
    assert off.returncode == 1
    assert "retention is off: set RETENTION_DAYS" in off.stdout

    preview = _sentiment("retention", "--days", "365", "--dry-run")
    assert preview.returncode == 0, preview.stdout + preview.stderr
    would = json.loads(preview.stdout)
    assert (would["dry_run"], would["held_back_by"]) == (True, None)
    # old1's chunk (TimescaleDB), or old1 in the default partition (plain PostgreSQL)
    assert (would["dropped"], would["rows_deleted"]) in {(1, 0), (0, 1)}
    assert stored() == {"old1", "new1"}

    done = _sentiment("retention", env={"RETENTION_DAYS": "365"})
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert (report["dropped"], report["rows_deleted"]) == (would["dropped"], would["rows_deleted"])
    assert stored() == {"new1"}


def test_scrape_refuses_an_invalid_name_before_enqueuing(settings):
    result = _sentiment("scrape", "../../etc")

    assert result.returncode == 1
    assert "not a valid subreddit name" in result.stdout


@pytest.mark.slow
def test_scrape_enqueues_waits_and_prints_the_summary(worker, simulator):
    simulator.add_subreddit("clisummary", submissions=4, comments=6)

    result = _sentiment("scrape", "r/CliSummary", timeout=120)

    assert result.returncode == 0, result.stdout + result.stderr
    assert "no running worker" not in result.stdout
    summary = json.loads(result.stdout[result.stdout.index("{") :])
    assert summary["subreddit"] == "clisummary"
    assert summary["fetched"] == summary["inserted"] == summary["exported"] == 10


def test_scrape_says_redis_is_unreachable_without_a_traceback(settings):
    nothing = f"redis://127.0.0.1:{_free_port()}/0"  # nothing listens there

    result = _sentiment("scrape", "stocks", env={"REDIS_URL": nothing}, timeout=60)

    assert result.returncode == 1
    shown = " ".join(result.stdout.split())
    assert "Redis" in shown and "is not reachable" in shown and "REDIS_URL" in shown
    assert "Traceback" not in result.stdout + result.stderr


def test_scrape_with_no_worker_says_so_and_what_to_start(settings, redis_client):
    from sentiment.celery_app import app

    try:
        result = _sentiment("scrape", "noworker_here", "--timeout", "2", timeout=60)
    finally:
        app.control.purge()  # the scrape stays queued: no later worker should run it

    assert result.returncode == 1
    shown = " ".join(result.stdout.split())
    assert "no running worker takes the scrape queue" in shown
    assert "no result after 2s" in shown and "celery -A sentiment worker" in shown
    assert "Traceback" not in result.stdout + result.stderr


def test_reddit_check_without_credentials_says_what_to_set(settings):
    env = {"SUBREDDITS": "stocks", "REDDIT_CLIENT_ID": "", "REDDIT_CLIENT_SECRET": ""}

    result = _sentiment("reddit", "check", env=env)

    assert result.returncode == 1
    shown = " ".join(result.stdout.split())
    assert "error: REDDIT_CLIENT_ID and REDDIT_CLIENT_SECRET are not set" in shown
    assert "Traceback" not in result.stdout + result.stderr


@pytest.mark.parametrize("server", ["postgres", "redis"])
def test_an_embedded_port_taken_by_another_program_is_refused_at_once(settings, tmp_path, server):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        env = {"DATA_DIR": str(tmp_path / "data")}
        if server == "postgres":  # only PostgreSQL is embedded
            env |= {"EMBEDDED_PG_PORT": port, "PG_HOST": "",
                    "REDIS_URL": settings.redis_connection_url()}  # fmt: skip
        else:  # only Redis is embedded
            env |= {"EMBEDDED_REDIS_PORT": port, "REDIS_URL": "", "PG_HOST": "127.0.0.1",
                    "PG_PORT": str(settings.embedded_pg_port)}  # fmt: skip
        result = _sentiment("services", "start", env=env, timeout=60)

    variable = "EMBEDDED_PG_PORT" if server == "postgres" else "EMBEDDED_REDIS_PORT"
    assert result.returncode == 1
    shown = " ".join(result.stdout.split())
    assert f"error: {variable}: 127.0.0.1:{port} is taken by another program" in shown
    assert "Traceback" not in result.stdout + result.stderr


def test_simulator_refuses_a_port_that_is_taken(settings):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = _sentiment("simulator", "--port", str(port), timeout=60)

    assert result.returncode == 1
    shown = " ".join(result.stdout.split())
    assert f"error: port {port} is in use; choose another with --port" in shown
    assert "Traceback" not in result.stdout + result.stderr


def test_the_simulator_alone_serves_the_demo_subreddits_and_says_how_to_use_it(settings):
    """With no SUBREDDITS and no --subreddits it used to serve nothing at all."""
    import base64
    import json
    import urllib.parse
    import urllib.request

    from sentiment.runner import DEMO_SUBREDDITS

    port = _free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "sentiment.cli", "simulator", "--port", str(port)],
        cwd=ROOT, env={**os.environ, "SUBREDDITS": ""}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(process.stdout or []), daemon=True).start()
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while not any("REDDIT_URL=" in line for line in lines):  # printed once it listens
            assert time.monotonic() < deadline, f"no usage line: {lines}"
            time.sleep(0.1)
        said = " ".join(lines)
        assert f"REDDIT_OAUTH_URL={base}" in said and f"REDDIT_URL={base}" in said
        auth = base64.b64encode(b"simulator:simulator").decode()
        token_request = urllib.request.Request(
            f"{base}/api/v1/access_token", method="POST",
            data=urllib.parse.urlencode({"grant_type": "client_credentials"}).encode(),
            headers={"Authorization": f"Basic {auth}"},
        )  # fmt: skip
        with urllib.request.urlopen(token_request, timeout=10) as response:
            token = json.load(response)["access_token"]
        for entry in DEMO_SUBREDDITS.split(","):
            name = entry.partition(":")[0]
            about = urllib.request.Request(
                f"{base}/r/{name}/about", headers={"Authorization": f"Bearer {token}"}
            )
            with urllib.request.urlopen(about, timeout=10) as response:
                assert json.load(response)["data"]["display_name"].lower() == name
    finally:
        process.terminate()
        process.wait(timeout=20)


def test_reddit_check_reports_each_subreddit(settings, simulator):
    simulator.add_subreddit("checkme_ok", submissions=1, subscribers=1234)
    simulator.add_subreddit("checkme_priv", kind="private")
    simulator.add_subreddit("checkme_ban", kind="banned")

    good = _sentiment("reddit", "check", env={"SUBREDDITS": "checkme_ok"})
    bad = _sentiment("reddit", "check", env={"SUBREDDITS": "checkme_ok,checkme_priv,checkme_ban"})

    assert good.returncode == 0, good.stdout + good.stderr
    assert "1,234 subscribers" in good.stdout
    assert bad.returncode == 1
    assert "Forbidden" in bad.stdout
    assert "NotFound" in bad.stdout


def test_reddit_check_with_bad_credentials(settings, simulator):
    simulator.add_subreddit("checkme_auth")
    result = _sentiment(
        "reddit", "check", env={"REDDIT_CLIENT_SECRET": "wrong", "SUBREDDITS": "checkme_auth"}
    )

    assert result.returncode == 1
    assert "Reddit refused the credentials" in result.stdout


def test_reddit_check_says_once_that_reddit_is_unreachable(settings):
    nowhere = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    env = {"SUBREDDITS": "stocks,investing", "REDDIT_OAUTH_URL": nowhere, "REDDIT_URL": nowhere}

    result = _sentiment("reddit", "check", env=env)

    assert result.returncode == 1
    shown = " ".join(result.stdout.split())
    assert f"error: Reddit ({nowhere}) is not reachable" in shown
    assert "REDDIT_URL" in shown and "stocks" not in shown  # one line, not one per subreddit


def test_migrate_check_compares_models_and_migrations(settings):
    result = _sentiment("migrate", "--check")

    assert result.returncode == 0, result.stdout + result.stderr
    assert "models and migrations agree" in result.stdout


def _installed_copy(tmp_path):  # type: ignore[no-untyped-def]
    """The package as `pip install .` lays it out (no alembic.ini beside it), and a
    command that runs `sentiment` from there."""
    import shutil

    site = tmp_path / "site-packages"
    shutil.copytree(ROOT / "sentiment", site / "sentiment")
    code = f"import sys; sys.path.insert(0, {str(site)!r}); from sentiment.cli import main; main()"
    return [sys.executable, "-c", code]


def test_migrate_from_an_installed_package_uses_the_alembic_ini_where_it_runs(settings, tmp_path):
    """The image installs the package into site-packages and runs `sentiment migrate`
    in /app, where alembic.ini and alembic/ are."""
    command = _installed_copy(tmp_path)
    env = {**os.environ, "PYTHONPATH": ""}

    done = subprocess.run([*command, "migrate"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120, check=False)  # fmt: skip
    elsewhere = subprocess.run([*command, "migrate"], cwd=tmp_path, env=env, capture_output=True,
                               text=True, timeout=120, check=False)  # fmt: skip

    assert done.returncode == 0, done.stdout + done.stderr
    assert "database is at the newest migration" in done.stdout
    assert elsewhere.returncode == 1
    shown = " ".join(elsewhere.stdout.split())
    assert "no alembic.ini" in shown and "Traceback" not in elsewhere.stdout + elsewhere.stderr


def test_run_with_an_unreachable_redis_is_one_clear_line(settings):
    port = _free_port()

    result = _sentiment("run", "--duration", "5", env={"REDIS_URL": f"redis://127.0.0.1:{port}/0"})

    assert result.returncode == 1
    shown = " ".join(result.stdout.split())
    assert f"error: Redis (127.0.0.1:{port}): Error 111 connecting" in shown
    assert "Traceback" not in result.stdout + result.stderr


@pytest.mark.slow
def test_run_stopped_by_sigterm_stops_everything_it_started(settings, db, redis_client, csv_dir):
    """A supervisor, `timeout` or a closed terminal stops `sentiment run` with SIGTERM
    or SIGHUP, not Ctrl-C: the children (in sessions of their own) must go too."""
    import signal

    run, sim_port, flower_port = _demo_run("gamma_demo", stdout=subprocess.PIPE)
    try:
        _wait_for_port(flower_port)
        for port in (flower_port, sim_port):  # so that none found afterwards means something
            found = subprocess.run(["pgrep", "-f", f"{port}"], capture_output=True, check=False)
            assert found.stdout, f"no child serves port {port}"
        run.send_signal(signal.SIGTERM)
        output, _ = run.communicate(timeout=90)
    finally:
        if run.poll() is None:
            run.kill()
    assert "stopped; logs are in" in output, output
    for port in (flower_port, sim_port):
        leftovers = subprocess.run(["pgrep", "-f", f"{port}"], capture_output=True, check=False)
        assert leftovers.stdout == b"", f"a child on port {port} outlived `sentiment run`"


@pytest.mark.slow
def test_run_killed_outright_leaves_no_child_behind(settings, db, redis_client, csv_dir):
    """SIGKILL (the OOM killer, `kill -9`) gives `sentiment run` no chance to stop its
    children: they must notice and stop themselves. A beat left running would hold
    the beat lock and make the next run's beat exit at once."""
    import signal
    import time

    run, _, flower_port = _demo_run("delta_demo", stdout=subprocess.DEVNULL)
    children: list[str] = []
    try:
        deadline = _wait_for_port(flower_port)
        found = subprocess.run(
            ["pgrep", "-P", str(run.pid)], capture_output=True, text=True, check=False
        )
        children = found.stdout.split()
        assert len(children) == 4  # simulator, worker, beat, flower
        while time.monotonic() < deadline and redis_client.get("sentiment:beat:lock") is None:
            time.sleep(0.2)
        assert redis_client.get("sentiment:beat:lock") is not None  # beat is up and holds it

        run.send_signal(signal.SIGKILL)
        run.wait(timeout=10)

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and any(pid_running(pid) for pid in children):
            time.sleep(0.5)
        assert not [pid for pid in children if pid_running(pid)], "children outlived sentiment run"
        assert redis_client.get("sentiment:beat:lock") is None  # beat let go of it
    finally:
        if run.poll() is None:
            run.kill()
        for pid in children:
            if pid_running(pid):
                os.kill(int(pid), signal.SIGKILL)
        redis_client.delete("sentiment:beat:lock")


def _demo_run(subreddit: str, *, stdout: int) -> tuple[subprocess.Popen[str], int, int]:
    """`sentiment run` of the simulator's demo on free ports: the process and the
    simulator's and Flower's ports."""
    env = {
        "REDDIT_CLIENT_ID": "", "REDDIT_CLIENT_SECRET": "", "SUBREDDITS": f"{subreddit}:10",
        "REDDIT_OAUTH_URL": "https://oauth.reddit.com", "REDDIT_URL": "https://www.reddit.com",
    }  # fmt: skip
    sim_port, flower_port = _free_port(), _free_port()
    run = subprocess.Popen(
        [sys.executable, "-m", "sentiment.cli", "run", "--simulator-port", str(sim_port),
         "--flower-port", str(flower_port)],
        cwd=ROOT, env={**os.environ, **env}, stdout=stdout, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    return run, sim_port, flower_port


def _wait_for_port(port: int) -> float:
    """Wait (up to 2 minutes) until something listens on `port`; the deadline, to reuse."""
    import time

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not _reachable_port(port):
        time.sleep(0.5)
    assert _reachable_port(port), "sentiment run did not come up"
    return deadline


def _reachable_port(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_status_beside_the_demo_sees_its_subreddits_and_its_rate_limit(settings, db, redis_client):
    """`sentiment status` in a second terminal next to `make run` (SUBREDDITS unset, no
    credentials): the demo's runs and the simulator client's budget, not blanks."""
    import time

    from sentiment.pipeline import record_run, scrape_lock_key
    from sentiment.reddit.ratelimit import limiter_key
    from sentiment.sinks.postgres import insert_batch
    from tests.factories import make_events

    insert_batch(make_events(3, subreddit="stocks"))
    record_run("stocks", summary={"inserted": 3})
    redis_client.set(scrape_lock_key("investing"), "token", ex=60)  # its first scrape, running
    redis_client.hset(limiter_key("simulator"), mapping={
        "window_end": time.time() + 30, "remaining": 91, "granted": 9, "limited": 0,
    })  # fmt: skip

    blank = {"SUBREDDITS": "", "REDDIT_CLIENT_ID": "", "REDDIT_CLIENT_SECRET": ""}
    report = json.loads(_sentiment("status", "--json", env=blank).stdout)

    assert report["subreddits"]["stocks"]["last_run_s_ago"] >= 0
    assert report["subreddits"]["investing"]["scraping"] is True
    assert report["rate_limit"]["remaining"] == 91


def test_run_keeps_a_signal_it_inherited_as_ignored():
    """`nohup sentiment run`: SIGHUP ignored, so closing the terminal stops nothing."""
    import signal

    from sentiment.runner import _terminate_as_interrupt

    before = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with _terminate_as_interrupt():
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL  # ours
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, before)
