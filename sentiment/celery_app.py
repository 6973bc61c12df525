"""The Celery application; `celery -A sentiment …` finds it as `sentiment.app`."""

from __future__ import annotations

from celery import Celery

__all__ = ["app"]

app = Celery("sentiment", include=["sentiment.tasks"])
app.config_from_object("celeryconfig")
