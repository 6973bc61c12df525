"""The Celery application; `celery -A sentiment …` finds it as `sentiment.app`."""

from __future__ import annotations

import gc
from typing import Any

from celery import Celery
from celery.signals import worker_process_init

__all__ = ["app"]

app = Celery("sentiment", include=["sentiment.tasks"])
app.config_from_object("celeryconfig")


@worker_process_init.connect  # type: ignore[untyped-decorator]
def _freeze_start_up_objects(**_: Any) -> None:
    """Move what a pool process holds after start-up out of the collector's sight.

    Some 140,000 objects (modules, Celery, SQLAlchemy, asyncpraw) live as long as
    the process; without this every full collection, which a batch of events
    triggers, traverses them all again (CPython's documented use of gc.freeze).
    """
    gc.freeze()
