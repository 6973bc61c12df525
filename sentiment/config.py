"""One Settings object, read from the environment and `.env`.

`get_settings()` is the only place that reads the environment. A bad value
fails at start-up with :class:`ConfigError`, whose message names the variable
and shows a valid example.
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import quote, urlsplit

from pydantic import (
    BaseModel,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from sentiment.errors import ConfigError

__all__ = [
    "MAX_INTERVAL_S", "SIMULATOR_CLIENT_ID", "Settings", "SubredditSchedule", "get_settings",
    "load_settings", "parse_subreddits", "valid_subreddit",
]  # fmt: skip

# The client id `sentiment run` gives its workers when no Reddit credentials are
# set (they scrape the built-in simulator); `sentiment status` reads its budget.
SIMULATOR_CLIENT_ID = "simulator"

# Reddit's own rule for subreddit names: letters, digits and underscore, 2-21
# characters (a few legacy names are 2 long, e.g. r/de). Nothing else can reach
# a file path or a URL.
_SUBREDDIT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_]{1,20}$")
_ENCODE = "percent-encode : / ? # @ in the password (%3A %2F %3F %23 %40)"
# A DNS name or a compose service name (which may hold underscores), maybe with
# its root dot; not digits and dots alone ("10.0.0.7." is no address and no name).
_HOST_RE = re.compile(r"(?![\d.]+$)[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,252}[A-Za-z0-9_])?\.?")
_INTERVAL_RE = re.compile(r"^[1-9]\d*\s*(second|minute|hour|day|week)s?$")


def valid_subreddit(name: str) -> str:
    """Return the canonical (lower-case) subreddit name, or raise ValueError."""
    cleaned = name.strip().removeprefix("r/").removeprefix("/r/") if isinstance(name, str) else ""
    if not _SUBREDDIT_RE.fullmatch(cleaned):
        raise ValueError(
            f"{name!r} is not a valid subreddit name: use 2-21 letters, digits or underscores, "
            "e.g. wallstreetbets"
        )
    return cleaned.lower()


class SubredditSchedule(BaseModel, frozen=True):
    """A subreddit and how often beat scrapes it."""

    name: str
    interval_seconds: int


MAX_INTERVAL_S = 7 * 24 * 3600  # beyond this Celery's schedule overflows; scrape at least weekly


def parse_subreddits(raw: str | list[Any], default_interval: int) -> list[SubredditSchedule]:
    """Parse `wallstreetbets:60,stocks,TinySub:300` into schedules (canonical names)."""
    items = raw if isinstance(raw, list) else [p for p in raw.split(",") if p.strip()]
    schedules: dict[str, SubredditSchedule] = {}
    for item in items:
        if isinstance(item, SubredditSchedule):
            schedules[item.name] = item
            continue
        name, _, interval = str(item).strip().partition(":")
        seconds = default_interval
        if interval:
            digits = re.fullmatch(r"[0-9]+", interval.strip())  # ASCII: isdigit() takes '²'
            if not digits or not 10 <= int(interval) <= MAX_INTERVAL_S:
                raise ValueError(
                    f"interval {interval!r} for {name!r} must be a whole number of seconds from "
                    f"10 to {MAX_INTERVAL_S} (a week), e.g. wallstreetbets:60"
                )
            seconds = int(interval)
        canonical = valid_subreddit(name)
        if canonical in schedules:
            raise ValueError(f"subreddit {canonical!r} is listed twice")
        schedules[canonical] = SubredditSchedule(name=canonical, interval_seconds=seconds)
    return list(schedules.values())


class Settings(BaseSettings):
    """Every setting of the pipeline; see `.env.example` for each one explained."""

    model_config = SettingsConfigDict(
        env_file=".env", env_file_encoding="utf-8", extra="ignore", case_sensitive=False
    )

    # PostgreSQL. No PG_HOST means: use the embedded server under DATA_DIR.
    pg_host: str | None = None
    pg_port: int = Field(5432, ge=1, le=65535)
    pg_user: str = "sentiment"
    pg_password: SecretStr = SecretStr("")
    pg_db: str = "sentiment"
    pg_pool_size: int = Field(5, ge=1, le=100)
    pg_pool_max_overflow: int = Field(5, ge=0, le=100)

    # Redis, broker and result backend. No REDIS_URL means: the embedded Redis.
    redis_url: SecretStr | None = None

    # Embedded services, used when PG_HOST / REDIS_URL are not set.
    data_dir: Path = Path(".sentiment")
    embedded_pg_port: int = Field(54329, ge=1024, le=65535)
    embedded_redis_port: int = Field(63799, ge=1024, le=65535)

    # Reddit.
    reddit_client_id: str | None = None
    reddit_client_secret: SecretStr | None = None
    reddit_user_agent: str = "python:sentiment-pipeline:0.1 (by /u/sentiment-pipeline)"
    reddit_username: str | None = None
    reddit_password: SecretStr | None = None
    reddit_oauth_url: str = "https://oauth.reddit.com"
    reddit_url: str = "https://www.reddit.com"
    # Reddit's budget per OAuth client: requests per fixed window.
    reddit_ratelimit_requests: int = Field(100, ge=1, le=10_000)
    reddit_ratelimit_window_seconds: int = Field(60, ge=1, le=3600)
    reddit_max_attempts: int = Field(5, ge=1, le=20)
    reddit_timeout_seconds: float = Field(16.0, gt=0, le=300)
    scrape_backfill_depth: int = Field(1000, ge=100, le=1000)
    # Reddit lists some items late: those created this long before the watermark
    # are looked at again on the page that reaches it (0: never).
    scrape_lookback_seconds: int = Field(300, ge=0, le=86_400)

    # What to scrape, and how often. The default interval comes first: fields are
    # validated in order, and SUBREDDITS' entries without one take it.
    scrape_interval_seconds: int = Field(60, ge=10, le=MAX_INTERVAL_S)
    subreddits: Annotated[list[SubredditSchedule], NoDecode] = Field(default_factory=list)

    # Sinks.
    csv_dir: Path = Path("data/csv")
    insert_batch_size: int = Field(5000, ge=1, le=1_000_000)
    claim_batch_size: int = Field(500, ge=1, le=100_000)

    # Celery: task limits and redelivery.
    task_soft_time_limit: int = Field(600, ge=10, le=86_400)
    task_max_retries: int = Field(20, ge=0, le=1000)
    retry_backoff_max: int = Field(120, ge=1, le=3600)
    celery_visibility_timeout: int = Field(3600, ge=30)

    # Storage layout: "auto" makes raw_events a hypertable when the server has
    # TimescaleDB, and a natively partitioned table otherwise.
    storage_layout: Literal["auto", "timescaledb", "partitioned"] = "auto"
    timescale_chunk_interval: str = "1 day"
    partition_days_ahead: int = Field(7, ge=1, le=366)
    # Unset: keep every row. Set: an hourly task drops days older than this,
    # never a row still unprocessed (see sentiment/retention.py).
    retention_days: int | None = Field(None, ge=1, le=36_500)

    @field_validator("subreddits", mode="before")
    @classmethod
    def _parse_subreddits(cls, value: Any, info: Any) -> list[SubredditSchedule]:
        default = info.data.get("scrape_interval_seconds", 60)
        if value is None:
            return []
        return parse_subreddits(value, default)

    @field_validator("timescale_chunk_interval")
    @classmethod
    def _check_interval(cls, value: str) -> str:
        if not _INTERVAL_RE.fullmatch(value.strip().lower()):
            raise ValueError("must be a positive PostgreSQL interval such as '1 day' or '12 hours'")
        return value.strip().lower()

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value():
            return None
        parts = urlsplit(value.get_secret_value())
        if parts.scheme not in {"redis", "rediss", "unix"}:
            raise ValueError(
                "must be a redis:// or rediss:// URL, e.g. redis://:password@localhost:6379/0"
            )
        if parts.scheme == "unix":
            if not parts.path:
                raise ValueError("names no socket path, e.g. unix:///run/redis.sock")
            return value
        if "://" not in value.get_secret_value():  # redis-py takes an empty host as localhost
            raise ValueError("names no host, e.g. redis://:password@localhost:6379/0")
        # No piece of the URL goes into these messages: with a password left
        # unencoded, the "port" or "path" is part of the password.
        rest = value.get_secret_value().split("://", 1)[1][len(parts.netloc) :]
        path, _, query = rest.partition("?")
        query, _, fragment = query.partition("#")
        if "@" in path or "@" in fragment or "@" in query.partition("=")[0]:
            raise ValueError(f"has an @ after its host part: the password holds / ? or # as it "
                             f"is; {_ENCODE}")  # fmt: skip
        try:
            port = parts.port
        except ValueError:
            digits = parts.netloc.rpartition(":")[2].isdigit()
            problem = "is out of range (1-65535)" if digits else "is not a number"
            raise ValueError(f"the port {problem}; {_ENCODE}") from None
        if port == 0:
            raise ValueError("the port is out of range (1-65535)")
        return value

    @field_validator("pg_host")
    @classmethod
    def _check_pg_host(cls, value: str | None) -> str | None:
        """A host name, an IPv4 address or an IPv6 one (brackets optional)."""
        if value is None:
            return None
        host = value.strip().removeprefix("[").removesuffix("]")
        with contextlib.suppress(ValueError):
            return str(ipaddress.ip_address(host))
        if _HOST_RE.fullmatch(host):
            return host
        if re.fullmatch(r"[^:/@\s]+:\d+", host):
            raise ValueError("must be a host name or address without a port; "
                             "set the port in PG_PORT")  # fmt: skip
        raise ValueError("must be a host name or address, e.g. db.example or 10.0.0.7 "
                         "(no user, port, path or URL)")  # fmt: skip

    @field_validator("reddit_oauth_url", "reddit_url")
    @classmethod
    def _check_base_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in {"http", "https"} or not parts.netloc:
            raise ValueError("must be an http(s) base URL, e.g. https://oauth.reddit.com")
        return value.rstrip("/")

    @field_validator(
        "pg_host",
        "reddit_client_id",
        "reddit_username",
        "reddit_client_secret",
        "reddit_password",
        "retention_days",
        mode="before",
    )
    @classmethod
    def _blank_is_unset(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("reddit_user_agent")
    @classmethod
    def _one_line(cls, value: str) -> str:
        if not value.isprintable():  # a CR or LF would end the header and start another
            raise ValueError("must be one line of printable text (no control characters)")
        return value

    @field_validator("reddit_user_agent", "csv_dir", "data_dir", "pg_user", "pg_db", mode="before")
    @classmethod
    def _not_blank(cls, value: Any) -> Any:
        if isinstance(value, str) and not value.strip():
            raise ValueError("must not be empty (unset it for the default)")
        return value

    @model_validator(mode="after")
    def _reddit_credentials_complete(self) -> Settings:
        """Half a set of credentials would silently mean the simulator; say what is missing."""
        has = {
            "REDDIT_CLIENT_ID": bool(self.reddit_client_id),
            "REDDIT_CLIENT_SECRET": bool(self.reddit_client_secret),
            "REDDIT_USERNAME": bool(self.reddit_username),
            "REDDIT_PASSWORD": bool(self.reddit_password),
        }
        needs = [  # (given, then this is needed too)
            ("REDDIT_CLIENT_ID", "REDDIT_CLIENT_SECRET"),
            ("REDDIT_CLIENT_SECRET", "REDDIT_CLIENT_ID"),
            ("REDDIT_USERNAME", "REDDIT_PASSWORD"),
            ("REDDIT_PASSWORD", "REDDIT_USERNAME"),
            ("REDDIT_USERNAME", "REDDIT_CLIENT_ID"),  # the password grant is the app's too
            ("REDDIT_USERNAME", "REDDIT_CLIENT_SECRET"),
        ]
        problems = [f"{missing}: needed with {given}"
                    for given, missing in needs if has[given] and not has[missing]]  # fmt: skip
        if problems:
            raise ValueError(
                "\n  ".join(problems) + " (set REDDIT_CLIENT_ID and REDDIT_CLIENT_SECRET, plus "
                "REDDIT_USERNAME and REDDIT_PASSWORD for the password grant; none of them: "
                "the local simulator)"
            )
        return self

    @model_validator(mode="after")
    def _embedded_ports_differ(self) -> Settings:
        if self.embedded_pg_port == self.embedded_redis_port:
            raise ValueError(f"EMBEDDED_PG_PORT and EMBEDDED_REDIS_PORT are both "
                             f"{self.embedded_pg_port}: give them different ports")  # fmt: skip
        return self

    @model_validator(mode="after")
    def _visibility_outlasts_tasks(self) -> Settings:
        needed = self.task_hard_time_limit + self.retry_backoff_max
        if self.celery_visibility_timeout <= needed:
            raise ValueError(
                f"CELERY_VISIBILITY_TIMEOUT ({self.celery_visibility_timeout}s) must exceed "
                f"the hard task time limit plus RETRY_BACKOFF_MAX ({needed}s), or Redis would "
                "hand a running task to a second worker"
            )
        return self

    @property
    def task_hard_time_limit(self) -> int:
        """When a task is killed: the soft limit (which it may catch) plus a tenth."""
        return self.task_soft_time_limit + max(5, self.task_soft_time_limit // 10)

    # -- derived values -------------------------------------------------------

    @property
    def uses_embedded_postgres(self) -> bool:
        return self.pg_host is None

    @property
    def uses_embedded_redis(self) -> bool:
        return self.redis_url is None

    @property
    def has_reddit_credentials(self) -> bool:
        return bool(self.reddit_client_id and self.reddit_client_secret)

    @property
    def postgres_address(self) -> str:
        """host:port of PostgreSQL (the embedded server's when PG_HOST is unset)."""
        if self.pg_host is None:
            return f"127.0.0.1:{self.embedded_pg_port}"
        host = f"[{self.pg_host}]" if ":" in self.pg_host else self.pg_host  # IPv6
        return f"{host}:{self.pg_port}"

    def database_url(self, driver: str = "psycopg2") -> str:
        """SQLAlchemy URL. Contains the password: never log it."""
        password = quote(self.pg_password.get_secret_value(), safe="")
        auth = (
            f"{quote(self.pg_user, safe='')}:{password}"
            if password
            else quote(self.pg_user, safe="")
        )
        database = quote(self.pg_db, safe="")  # a name, never more of the URL (?host=…)
        return f"postgresql+{driver}://{auth}@{self.postgres_address}/{database}"

    def redis_connection_url(self) -> str:
        """Broker URL. Contains the password: never log it."""
        if self.redis_url is not None:
            return self.redis_url.get_secret_value()
        return f"redis://127.0.0.1:{self.embedded_redis_port}/0"

    @property
    def redis_address(self) -> str:
        """host:port of Redis, or its socket path; never the password."""
        parts = urlsplit(self.redis_connection_url())
        if parts.scheme == "unix":
            return parts.path
        return f"{parts.hostname or 'localhost'}:{parts.port or 6379}"  # redis-py's defaults

    def safe_summary(self) -> dict[str, str]:
        """Where things are, with every secret left out, for logs and `sentiment status`."""
        pg = "embedded" if self.pg_host is None else self.postgres_address
        return {
            "postgres": f"{pg}/{self.pg_db} as {self.pg_user}",
            "redis": "embedded" if self.redis_url is None else self.redis_address,
            "reddit": _without_credentials(self.reddit_oauth_url),
            "subreddits": ",".join(s.name for s in self.subreddits) or "(none)",
            "csv_dir": str(self.csv_dir),
        }


def _without_credentials(url: str) -> str:
    """`url` without a user or password (a proxy's, say) before its host."""
    parts = urlsplit(url)
    return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()


def _describe(error: ValidationError) -> str:
    lines = []
    for problem in error.errors():
        message = problem["msg"].removeprefix("Value error, ")
        if problem["loc"]:
            lines.append(f"  {str(problem['loc'][0]).upper()}: {message}")
        else:  # a rule across settings: its message starts with the variable
            lines.append(f"  {message}")
    return "invalid configuration (fix these in the environment or .env):\n" + "\n".join(lines)


def load_settings(**overrides: Any) -> Settings:
    """Read Settings now, turning validation errors into a ConfigError a person can act on."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None
    except UnicodeDecodeError as exc:  # only a file is read as bytes: .env
        env_file = Settings.model_config.get("env_file")
        raise ConfigError(f"{env_file} is not UTF-8 text ({exc.reason} at byte {exc.start}); "
                          "save it as UTF-8") from None  # fmt: skip


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide Settings (cached; `get_settings.cache_clear()` re-reads)."""
    return load_settings()
