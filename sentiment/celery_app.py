"""The Celery application; `celery -A sentiment …` finds it as `sentiment.app`."""

from __future__ import annotations

import gc
from typing import Any

from celery import Celery, Task
from celery.signals import worker_init, worker_process_init, worker_process_shutdown

from sentiment.errors import ConfigError, ServiceUnavailable
from sentiment.outages import POSTGRES_DOWN, REDIS_DOWN

__all__ = ["PipelineTask", "app"]


class PipelineTask(Task):  # type: ignore[misc]  # celery is untyped
    """Every task of the pipeline: an outage (or a lock or statement timeout) that
    outlasts its retries ends it as `ServiceUnavailable`, naming the server and
    what it said.

    SQLAlchemy's and redis-py's own errors cannot be rebuilt from the result
    backend (their constructors take more than a message): `.get()` raised a
    bare Exception holding their repr. Autoretry runs inside this call, so a
    retry still sees the original error.
    """

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().__call__(*args, **kwargs)
        except POSTGRES_DOWN as exc:
            said = exc.orig if exc.orig is not None else exc
            raise ServiceUnavailable(f"PostgreSQL: {said}") from exc
        except REDIS_DOWN as exc:
            raise ServiceUnavailable(f"Redis: {exc}") from exc


app = Celery("sentiment", include=["sentiment.tasks"], task_cls=PipelineTask)
app.config_from_object("celeryconfig")


@worker_process_init.connect  # type: ignore[untyped-decorator]
def _freeze_start_up_objects(**_: Any) -> None:
    """Move what a pool process holds after start-up out of the collector's sight.

    Some 140,000 objects (modules, Celery, SQLAlchemy, asyncpraw) live as long as
    the process; without this every full collection, which a batch of events
    triggers, traverses them all again (CPython's documented use of gc.freeze).
    """
    gc.freeze()


@worker_process_shutdown.connect  # type: ignore[untyped-decorator]
def _close_reddit(**_: Any) -> None:
    """Close the pool process's Reddit client and its connections on the way out."""
    from sentiment import pipeline

    pipeline.close_runtime()


@worker_init.connect  # type: ignore[untyped-decorator]
def _check_csv_dir(sender: Any, **_: Any) -> None:
    """A worker that takes exports stops at start-up if it cannot write to CSV_DIR.

    Celery logs and ignores what a signal handler raises, except SystemExit.
    """
    if "export" not in sender.app.amqp.queues.consume_from:
        return
    from sentiment.config import get_settings
    from sentiment.sinks.csv import check_csv_dir

    try:
        check_csv_dir(get_settings().csv_dir)
    except ConfigError as exc:
        raise SystemExit(f"error: {exc}") from None
