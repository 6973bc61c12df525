"""The embedded servers know their own: by the folder they serve, not by their port."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sentiment.embedded import EmbeddedRedis
from sentiment.errors import ConfigError
from tests.processes import pid_running


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def first(tmp_path):  # type: ignore[no-untyped-def]
    server = EmbeddedRedis(tmp_path / "first", _free_port())
    server.start()
    yield server
    server.stop()


def test_another_runs_redis_on_the_port_is_refused_not_shared(first, tmp_path):
    second = EmbeddedRedis(tmp_path / "second", first.port)

    with pytest.raises(ConfigError, match=f"EMBEDDED_REDIS_PORT: 127.0.0.1:{first.port} is taken"):
        second.start()

    assert first.is_running()
    first.start()  # its own server: fine, nothing to do


def test_a_stale_pidfile_never_kills_the_process_that_has_its_pid_now(first):
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        first.stop()
        assert not first.is_running()
        first.pidfile.write_text(f"{bystander.pid}\n")  # the server is gone; its pid reused

        first.stop()

        assert bystander.poll() is None  # still alive
        assert not first.pidfile.exists()
    finally:
        bystander.kill()
        bystander.wait()


def test_a_stop_under_another_port_setting_still_stops_our_server(first, tmp_path):
    # `sentiment services stop` run with the folder but not the port it was started
    # with: the pidfile is ours, so is the server; forgetting the pidfile instead
    # would leave it running with nothing left to stop it by.
    pid = int(first.pidfile.read_text())
    elsewhere = EmbeddedRedis(first.data_dir, _free_port())

    elsewhere.stop()

    assert not first.is_running()
    assert not first.pidfile.exists()
    assert not pid_running(pid)


def test_a_start_under_another_port_setting_does_not_start_a_second_server_on_our_folder(first):
    # Two servers appending to one append-only file would corrupt it.
    elsewhere = EmbeddedRedis(first.data_dir, _free_port())

    with pytest.raises(ConfigError, match=f"already runs \\(pid \\d+, 127.0.0.1:{first.port}\\)"):
        elsewhere.start()

    assert not elsewhere.is_running()
    assert first.is_running()


def test_the_embedded_postgres_running_on_another_port_is_named_not_waited_for(settings):
    from sentiment.embedded import embedded_postgres

    if not settings.uses_embedded_postgres:
        pytest.skip("PG_HOST is configured: no embedded PostgreSQL to check")
    elsewhere = embedded_postgres(settings)
    elsewhere.port = _free_port()

    with pytest.raises(ConfigError, match=f"runs on port {settings.embedded_pg_port}"):
        elsewhere.start()


def test_a_run_refused_for_another_port_leaves_the_running_redis_alone(first, tmp_path):
    # ensure_services counts what it started so that a failed start-up stops it
    # again; a refused start must not count (and so stop) the server already running.
    from sentiment.config import Settings
    from sentiment.embedded import ensure_services, stop_services

    elsewhere = Settings(data_dir=first.data_dir, embedded_redis_port=_free_port(),
                         pg_host="db.example", redis_url=None)  # fmt: skip
    started: list[str] = []
    with pytest.raises(ConfigError, match="already runs"):
        ensure_services(elsewhere, started=started)
    stop_services(elsewhere, started)

    assert started == []
    assert first.is_running()


def test_our_folders_redis_whose_port_cannot_be_read_is_not_started_again(tmp_path):
    # A redis-server of our folder whose title shows no port yet (it writes its
    # pidfile before it sets its title): refuse, and do not count it as started.
    from sentiment.config import Settings
    from sentiment.embedded import ensure_services

    folder = tmp_path / "redis"
    folder.mkdir()
    sleeper = subprocess.Popen(["/x/redis-server", "60"], executable="/bin/sleep", cwd=folder)
    try:
        # Popen returns once the child execs (vfork), a moment before the kernel
        # shows its new command line: until then /proc says it is nobody's Redis.
        title = Path(f"/proc/{sleeper.pid}/cmdline")
        deadline = time.monotonic() + 10
        while b"redis-server" not in title.read_bytes():
            assert time.monotonic() < deadline
            time.sleep(0.001)
        (folder / "redis.pid").write_text(f"{sleeper.pid}\n")
        settings = Settings(data_dir=tmp_path, embedded_redis_port=_free_port(),
                            pg_host="db.example", redis_url=None)  # fmt: skip
        started: list[str] = []

        with pytest.raises(ConfigError, match="already runs"):
            ensure_services(settings, started=started)

        assert started == []
        assert not EmbeddedRedis(tmp_path, settings.embedded_redis_port).is_running()
    finally:
        sleeper.kill()
        sleeper.wait()
