"""Settings: typed, validated at start-up, secrets kept out of sight."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from sentiment.config import load_settings, parse_subreddits
from sentiment.errors import ConfigError


def test_subreddits_with_and_without_intervals():
    schedules = parse_subreddits("wallstreetbets:60, stocks,TinySub:300", default_interval=120)
    assert [(s.name, s.interval_seconds) for s in schedules] == [
        ("wallstreetbets", 60),
        ("stocks", 120),
        ("tinysub", 300),
    ]


def test_subreddits_without_an_interval_take_scrape_interval_seconds(monkeypatch):
    monkeypatch.setenv("SUBREDDITS", "stocks,wallstreetbets:30")
    monkeypatch.setenv("SCRAPE_INTERVAL_SECONDS", "300")
    schedules = load_settings().subreddits
    assert [(s.name, s.interval_seconds) for s in schedules] == [
        ("stocks", 300),
        ("wallstreetbets", 30),
    ]


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("SUBREDDITS", "wallstreetbets:soon", "SUBREDDITS: interval 'soon' for 'wallstreetbets'"),
        ("SUBREDDITS", "../../etc", "SUBREDDITS: '../../etc' is not a valid subreddit name"),
        ("SUBREDDITS", "stocks,Stocks", "SUBREDDITS: subreddit 'stocks' is listed twice"),
        ("PG_PORT", "postgres", "PG_PORT: Input should be a valid integer"),
        ("REDIS_URL", "localhost:6379", "REDIS_URL: must be a redis:// or rediss:// URL"),
        ("REDDIT_OAUTH_URL", "oauth.reddit.com", "REDDIT_OAUTH_URL: must be an http(s) base URL"),
        (
            "TIMESCALE_CHUNK_INTERVAL",
            "daily",
            "TIMESCALE_CHUNK_INTERVAL: must be a positive PostgreSQL interval",
        ),
        (
            "TIMESCALE_CHUNK_INTERVAL",
            "0 days",
            "TIMESCALE_CHUNK_INTERVAL: must be a positive PostgreSQL interval",
        ),
        # Beyond ~8,000 years Celery's schedule overflows and beat dies; a week is plenty.
        ("SUBREDDITS", "stocks:300000000000", "SUBREDDITS: interval '300000000000' for 'stocks'"),
        ("SCRAPE_INTERVAL_SECONDS", "300000000000", "SCRAPE_INTERVAL_SECONDS: Input should be"),
        ("STORAGE_LAYOUT", "mongo", "STORAGE_LAYOUT: Input should be 'auto', 'timescaledb' or"),
        ("RETENTION_DAYS", "0", "RETENTION_DAYS: Input should be greater than or equal to 1"),
        ("RETENTION_DAYS", "a month", "RETENTION_DAYS: Input should be a valid integer"),
        ("REDIS_URL", "redis://localhost:99999/0", "REDIS_URL: the port is out of range"),
        ("REDIS_URL", "redis://localhost:abc/0", "REDIS_URL: the port is not a number"),
        ("REDIS_URL", "redis:localhost", "REDIS_URL: names no host"),
        ("REDIS_URL", "redis://localhost:0/0", "REDIS_URL: the port is out of range"),
        ("PG_DB", "", "PG_DB: must not be empty"),
        ("PG_USER", " ", "PG_USER: must not be empty"),
        ("PG_HOST", "db:5432", "PG_HOST: must be a host name or address without a port"),
        ("PG_HOST", "user@db", "PG_HOST: must be a host name or address"),
        ("PG_HOST", "/var/run/postgresql", "PG_HOST: must be a host name or address"),
        ("PG_HOST", "10.0.0.7.", "PG_HOST: must be a host name or address"),
    ],
)
def test_a_bad_value_names_the_variable_and_what_to_fix(monkeypatch, variable, value, message):
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert message in str(caught.value)
    assert str(caught.value).startswith(
        "invalid configuration (fix these in the environment or .env)"
    )


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"REDDIT_CLIENT_ID": "abc", "REDDIT_CLIENT_SECRET": ""},
         "  REDDIT_CLIENT_SECRET: needed with REDDIT_CLIENT_ID (set REDDIT_CLIENT_ID and"),
        ({"REDDIT_CLIENT_ID": "", "REDDIT_CLIENT_SECRET": "s3cret"},
         "  REDDIT_CLIENT_ID: needed with REDDIT_CLIENT_SECRET"),
        ({"REDDIT_USERNAME": "bob", "REDDIT_PASSWORD": ""},
         "  REDDIT_PASSWORD: needed with REDDIT_USERNAME"),
        ({"REDDIT_USERNAME": "", "REDDIT_PASSWORD": "pw"},
         "  REDDIT_USERNAME: needed with REDDIT_PASSWORD"),
        ({"REDDIT_USERNAME": "bob", "REDDIT_PASSWORD": "pw", "REDDIT_CLIENT_ID": "",
          "REDDIT_CLIENT_SECRET": ""},
         "  REDDIT_CLIENT_ID: needed with REDDIT_USERNAME\n  REDDIT_CLIENT_SECRET: needed with"),
        ({"REDDIT_USER_AGENT": " "}, "  REDDIT_USER_AGENT: must not be empty"),
        ({"CSV_DIR": ""}, "  CSV_DIR: must not be empty"),
        ({"DATA_DIR": ""}, "  DATA_DIR: must not be empty"),
        ({"SUBREDDITS": "wsb:10\u00b2"}, "  SUBREDDITS: interval '10\u00b2' for 'wsb' must be"),
        ({"EMBEDDED_PG_PORT": "63799", "EMBEDDED_REDIS_PORT": "63799"},
         "EMBEDDED_PG_PORT and EMBEDDED_REDIS_PORT are both 63799"),
        ({"REDDIT_USER_AGENT": "bot 1.0\r\nX-Injected: 1"},
         "  REDDIT_USER_AGENT: must be one line of printable text"),
        ({"CELERY_VISIBILITY_TIMEOUT": "300", "TASK_SOFT_TIME_LIMIT": "600",
          "RETRY_BACKOFF_MAX": "120"}, "\n  CELERY_VISIBILITY_TIMEOUT (300s) must exceed"),
    ],
)  # fmt: skip
def test_settings_that_only_make_sense_together(monkeypatch, given, message):
    for variable, value in given.items():
        monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert message in str(caught.value)
    assert "(settings)" not in str(caught.value)


def test_an_env_file_that_is_not_utf8_names_itself(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_bytes(b"SUBREDDITS=b\xf6rse\n")  # Latin-1, not UTF-8
    with pytest.raises(ConfigError, match=r"\.env is not UTF-8 text .*byte 12"):
        load_settings()


def test_secrets_never_show_in_repr_or_summary(monkeypatch):
    monkeypatch.setenv("PG_HOST", "db.example")
    monkeypatch.setenv("PG_PASSWORD", "pg-secret-1")
    monkeypatch.setenv("REDIS_URL", "redis://:redis-secret-2@cache:6379/0")
    monkeypatch.setenv("REDDIT_CLIENT_SECRET", "reddit-secret-3")
    monkeypatch.setenv("REDDIT_PASSWORD", "reddit-secret-4")
    monkeypatch.setenv("REDDIT_USERNAME", "someone")
    monkeypatch.setenv("REDDIT_CLIENT_ID", "some-app")
    settings = load_settings()
    shown = repr(settings) + str(settings) + str(settings.safe_summary())
    for secret in ("pg-secret-1", "redis-secret-2", "reddit-secret-3", "reddit-secret-4"):
        assert secret not in shown
    assert "pg-secret-1" in settings.database_url()  # only where it is needed


def test_a_bad_setting_stops_a_process_at_start_up_with_the_message(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "SUBREDDITS": "ok,not a name"}
    result = subprocess.run(
        [sys.executable, "-c", "from sentiment.config import get_settings; get_settings()"],
        env=env,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode != 0
    assert "SUBREDDITS: 'not a name' is not a valid subreddit name" in result.stderr


@pytest.mark.parametrize("command", ["worker", "beat", "flower"])
def test_a_bad_setting_stops_celery_with_the_message_alone(tmp_path, command):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "SUBREDDITS": "ok,not a name"}
    result = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "sentiment", command],
        env=env,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert result.stderr.startswith("error: invalid configuration")
    assert "SUBREDDITS: 'not a name' is not a valid subreddit name" in result.stderr
    assert "Traceback" not in result.stderr


def test_env_example_documents_every_setting_and_loads(tmp_path, monkeypatch):
    from sentiment.config import Settings

    example = (Path(__file__).resolve().parent.parent / ".env.example").read_text()
    missing = [
        name.upper() for name in Settings.model_fields if f"\n{name.upper()}=" not in example
    ]
    assert missing == []

    for name in Settings.model_fields:
        monkeypatch.delenv(name.upper(), raising=False)
    (tmp_path / ".env").write_text(example)
    monkeypatch.chdir(tmp_path)
    loaded = load_settings()
    assert [s.name for s in loaded.subreddits] == ["wallstreetbets", "stocks", "investing"]
    assert loaded.uses_embedded_postgres and loaded.uses_embedded_redis


@pytest.mark.parametrize(("host", "address"), [
    ("db.example", "db.example:6432"), ("pg_primary", "pg_primary:6432"),
    ("db.example.com.", "db.example.com.:6432"),
    ("10.0.0.7", "10.0.0.7:6432"), ("::1", "[::1]:6432"), ("[::1]", "[::1]:6432"),
])  # fmt: skip
def test_pg_host_names_and_addresses_make_a_url_that_reaches_them(monkeypatch, host, address):
    from sqlalchemy.engine import make_url

    monkeypatch.setenv("PG_HOST", host)
    monkeypatch.setenv("PG_PORT", "6432")
    settings = load_settings()

    assert settings.postgres_address == address
    url = make_url(settings.database_url())
    assert (url.host, url.port) == (address.rpartition(":")[0].strip("[]"), 6432)


@pytest.mark.parametrize("url", [
    "redis://:hunter2/Zq9w@redis.internal:6379/0",  # a / in the password: the rest is a path
    "redis://default:S3cr3tPw#x7Q@redis.internal:6379/0",  # a #: the rest is a fragment
    "redis://:98765/secret@redis.internal:6379/0",
    "redis://:1234/Secr3t@redis.internal:6379/0",  # looked like localhost:1234, no password
    "redis://:12345#tail@redis.internal/0",
    "redis://:ab?cd@redis.internal:6379/0",  # a ?: the rest is a query whose first key has @
])  # fmt: skip
def test_a_redis_password_left_unencoded_is_refused_without_showing_it(monkeypatch, url):
    monkeypatch.setenv("REDIS_URL", url)
    with pytest.raises(ConfigError) as refused:
        load_settings()

    message = str(refused.value)
    assert "REDIS_URL:" in message and "percent-encode" in message
    secret = url.split("://", 1)[1].split("redis.internal")[0].removeprefix("default")
    assert all(part not in message for part in re.split(r"[:/#@]", secret) if part)


@pytest.mark.parametrize("url", [
    "redis://cache:6379/0?client_name=me@example",  # an @ in a query value is no password's
    "rediss://cache:6380/0?ssl_ca_certs=/etc/ssl/ca@corp.pem",
    "redis://user:p%40ss%2Fw%3Frd@cache:6379/0",  # percent-encoded, as it should be
    "redis://[::1]:6379/0",
])  # fmt: skip
def test_valid_redis_urls_are_accepted(monkeypatch, url):
    monkeypatch.setenv("REDIS_URL", url)
    assert load_settings().redis_connection_url() == url


def test_where_settings_point_is_shown_without_credentials(monkeypatch):
    monkeypatch.setenv("REDIS_URL", "redis://:pw@/0")  # redis-py's localhost
    monkeypatch.setenv("REDDIT_OAUTH_URL", "https://proxyuser:proxypw@proxy.example:8443/")
    monkeypatch.setenv("PG_HOST", "db.example")
    monkeypatch.setenv("PG_DB", "sentiment?host=evil.example")
    settings = load_settings()

    shown = str(settings.safe_summary()) + settings.redis_address
    assert "proxypw" not in shown and "proxyuser" not in shown
    assert settings.redis_address == "localhost:6379"
    assert settings.safe_summary()["reddit"] == "https://proxy.example:8443"
    from sqlalchemy.engine import make_url

    url = make_url(settings.database_url())  # a name is a name, not more URL
    assert (url.host, url.database, dict(url.query)) == (
        "db.example",
        "sentiment?host=evil.example",
        {},
    )


def test_a_redis_url_without_a_host_means_localhost_as_in_redis_py(monkeypatch):
    import redis

    monkeypatch.setenv("REDIS_URL", "redis://:pw@/0")
    url = load_settings().redis_connection_url()
    kwargs = redis.Redis.from_url(url).connection_pool.connection_kwargs
    assert kwargs.get("host", "localhost") == "localhost"
    assert kwargs["password"] == "pw"
