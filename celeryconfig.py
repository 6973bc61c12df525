"""Celery settings for the sentiment pipeline (read by `sentiment.celery_app`).

Broker and result backend come from Settings: REDIS_URL, or the embedded Redis.
Every reliability choice is here, with its reason.
"""

from __future__ import annotations

from kombu.entity import Exchange, Queue

from sentiment.config import get_settings
from sentiment.errors import ConfigError
from sentiment.schedule import build_beat_schedule

try:
    _settings = get_settings()
except ConfigError as exc:
    # `celery -A sentiment worker|beat|flower` would print this under a traceback.
    raise SystemExit(f"error: {exc}") from None

broker_url = _settings.redis_connection_url()
result_backend = broker_url
# Keep retrying the broker at start-up instead of crashing when Redis is late.
broker_connection_retry_on_startup = True
broker_connection_max_retries = None  # and keep trying while it is gone later

# A task whose worker dies (OOM, SIGKILL, a lost machine) is not lost: it is
# acknowledged only after it finished, and requeued if the worker vanished.
# Every task is idempotent (primary key, chunk records, CSV ledger), so
# running one twice is harmless.
task_acks_late = True
task_reject_on_worker_lost = True
# One message at a time per process: a long scrape does not hold others back.
worker_prefetch_multiplier = 1

# Redis redelivers an unacknowledged message after the visibility timeout.
# It must exceed the longest task and the longest retry countdown, or a slow
# task would run twice at once.
broker_transport_options = {
    "visibility_timeout": _settings.celery_visibility_timeout,
    "socket_keepalive": True,
    "health_check_interval": 10,
}
result_backend_transport_options = {"retry_policy": {"timeout": 5.0}}
redis_socket_keepalive = True
redis_retry_on_timeout = True

# Small JSON messages: batches travel by reference (a compressed blob in Redis).
task_serializer = "json"
result_serializer = "json"
accept_content = ["json"]
result_expires = 24 * 3600
result_extended = True
task_track_started = True

# Time limits: the soft one raises inside the task so it can clean up.
task_soft_time_limit = _settings.task_soft_time_limit
task_time_limit = _settings.task_hard_time_limit

# Queues, so each stage scales on its own: `celery -A sentiment worker -Q scrape`.
# Each queue has its own direct exchange and key: a bare Queue(name) would
# inherit the default queue's routing key and silently receive nothing.
task_queues = tuple(
    Queue(name, Exchange(name, type="direct"), routing_key=name)
    for name in ("scrape", "ingest", "export")
)
task_default_queue = "ingest"
task_routes = {
    "sentiment.tasks.scrape": {"queue": "scrape"},
    "sentiment.tasks.insert_batch": {"queue": "ingest"},
    "sentiment.tasks.mark_processed": {"queue": "ingest"},
    "sentiment.tasks.set_aside": {"queue": "ingest"},
    "sentiment.tasks.keep_partitions": {"queue": "ingest"},
    "sentiment.tasks.apply_retention": {"queue": "ingest"},
    "sentiment.tasks.export_csv": {"queue": "export"},
    "sentiment.tasks.retry_exports": {"queue": "export"},
    "sentiment.tasks.export_missing": {"queue": "export"},
}

# Flower and `sentiment status` see tasks as they move.
worker_send_task_events = True
task_send_sent_event = True

timezone = "UTC"
enable_utc = True
beat_schedule = build_beat_schedule(_settings)
beat_scheduler = "sentiment.schedule:SingleBeatScheduler"
beat_schedule_filename = str(_settings.data_dir / "celerybeat-schedule")
worker_hijack_root_logger = False
