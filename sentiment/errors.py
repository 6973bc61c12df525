"""The exceptions the pipeline raises, under one base.

    SentimentError
     ├── ConfigError                a setting is missing or wrong: fix it and restart
     ├── ServiceUnavailable         PostgreSQL, Redis or the disk is down: retried
     ├── RedditError
     │    ├── RedditUnavailable     5xx, timeout, dropped connection: retried with backoff
     │    ├── RedditRateLimited     429: every process waits until the window resets
     │    ├── RedditAuthError       401: bad credentials, not retried
     │    └── SubredditUnavailable  403/404: private, quarantined, banned or missing
     ├── InvalidSubreddit           the name breaks Reddit's rules; nothing was requested
     └── CsvLedgerCorrupt           a CSV file no longer matches its ledger: a person must look

Whether an error is worth retrying comes from its class (`retryable`), never
from parsing messages.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "CsvLedgerCorrupt",
    "InvalidSubreddit",
    "RedditAuthError",
    "RedditError",
    "RedditRateLimited",
    "RedditUnavailable",
    "SentimentError",
    "ServiceUnavailable",
    "SubredditUnavailable",
]


class SentimentError(Exception):
    """Base of every error the pipeline raises on purpose."""

    retryable = False


class ConfigError(SentimentError):
    """A setting is missing or invalid; the message names it and shows a valid value."""


class ServiceUnavailable(SentimentError):
    """PostgreSQL, Redis or the CSV disk cannot be reached right now."""

    retryable = True


class InvalidSubreddit(SentimentError, ValueError):
    """The subreddit name breaks Reddit's naming rules."""


class CsvLedgerCorrupt(SentimentError):
    """A CSV file no longer matches its ledger (edited, truncated or damaged by hand)."""


class RedditError(SentimentError):
    """Reddit answered with an error."""


class RedditUnavailable(RedditError):
    """Reddit (or the network to it) failed in a way that may pass: 5xx, timeout, reset."""

    retryable = True


class RedditRateLimited(RedditError):
    """Reddit answered 429; `retry_after` says how long every process must wait."""

    retryable = True

    def __init__(self, message: str, retry_after: float) -> None:
        # Both in args: Celery's result backend and pickle rebuild an error from them.
        super().__init__(message, retry_after)
        self.retry_after = retry_after

    def __str__(self) -> str:
        return str(self.args[0])


class RedditAuthError(RedditError):
    """Reddit refused the credentials (401)."""


class SubredditUnavailable(RedditError):
    """The subreddit is private, quarantined, banned or does not exist (403/404)."""
