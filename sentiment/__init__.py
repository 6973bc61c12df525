"""Sentiment pipeline: Reddit → TimescaleDB/PostgreSQL → CSV, driven by Celery.

`from sentiment import scrape; scrape.delay("wallstreetbets").get()` runs one
scrape → insert → export chain and returns its summary. The Celery app and the
tasks load on first use, so `sentiment.config` and friends stay light.
"""

from __future__ import annotations

from typing import Any

__all__ = ["app", "mark_processed", "scrape"]


def __getattr__(name: str) -> Any:
    if name in {"app", "celery"}:
        from sentiment.celery_app import app

        return app
    if name in {"scrape", "mark_processed"}:
        from sentiment import tasks

        return getattr(tasks, name)
    raise AttributeError(f"module 'sentiment' has no attribute {name!r}")
