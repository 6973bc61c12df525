"""Celery configuration: routing and reliability settings as intended."""

from __future__ import annotations

from sentiment.celery_app import app
from sentiment.tasks import (
    apply_retention,
    export_csv,
    export_missing,
    insert_batch,
    keep_partitions,
    mark_processed,
    retry_exports,
    scrape,
    set_aside,
)


def test_each_task_lands_in_its_own_queue():
    router = app.amqp.router
    routes = {
        task.name: router.route({}, task.name, args=(), kwargs={})["queue"]
        for task in (
            scrape,
            insert_batch,
            export_csv,
            mark_processed,
            set_aside,
            keep_partitions,
            apply_retention,
            retry_exports,
            export_missing,
        )
    }
    assert {name: (q.name, q.routing_key, q.exchange.name) for name, q in routes.items()} == {
        "sentiment.tasks.scrape": ("scrape", "scrape", "scrape"),
        "sentiment.tasks.insert_batch": ("ingest", "ingest", "ingest"),
        "sentiment.tasks.export_csv": ("export", "export", "export"),
        "sentiment.tasks.mark_processed": ("ingest", "ingest", "ingest"),
        "sentiment.tasks.set_aside": ("ingest", "ingest", "ingest"),
        "sentiment.tasks.keep_partitions": ("ingest", "ingest", "ingest"),
        "sentiment.tasks.apply_retention": ("ingest", "ingest", "ingest"),
        "sentiment.tasks.retry_exports": ("export", "export", "export"),
        "sentiment.tasks.export_missing": ("export", "export", "export"),
    }


def test_a_crashed_worker_loses_no_task():
    conf = app.conf
    assert conf.task_acks_late is True
    assert conf.task_reject_on_worker_lost is True
    assert conf.worker_prefetch_multiplier == 1
    assert conf.broker_connection_retry_on_startup is True
    visibility = conf.broker_transport_options["visibility_timeout"]
    assert visibility > conf.task_time_limit > conf.task_soft_time_limit


def test_every_pipeline_error_comes_back_from_the_result_backend_as_itself():
    """What `.get()` raises is rebuilt from the stored type and args: an error whose
    constructor takes more than its message came back as a bare Exception."""
    import pickle

    from sentiment import errors

    classes = [getattr(errors, name) for name in errors.__all__]
    samples = [
        errors.RedditRateLimited("Reddit rate limit hit while scraping r/x", 12.5)
        if cls is errors.RedditRateLimited
        else cls(f"{cls.__name__} happened")
        for cls in classes
    ]
    for error in samples:
        stored = app.backend.prepare_exception(error)
        for back in (app.backend.exception_to_python(stored), pickle.loads(pickle.dumps(error))):
            assert type(back) is type(error)
            assert str(back) == str(error)
            assert vars(back) == vars(error)
