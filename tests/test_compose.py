"""docker-compose.yml is valid, complete, and refuses to start without its secrets."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _compose_command() -> list[str] | None:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, check=False)
        if probe.returncode == 0:
            return ["docker", "compose"]
    return None


COMPOSE = _compose_command()
pytestmark = pytest.mark.skipif(COMPOSE is None, reason="no docker compose client on this machine")


def _config(tmp_path: Path, env: str) -> subprocess.CompletedProcess[str]:
    shutil.copy(ROOT / "docker-compose.yml", tmp_path / "docker-compose.yml")
    (tmp_path / ".env").write_text(env)
    assert COMPOSE is not None
    return subprocess.run(
        [*COMPOSE, "config"], cwd=tmp_path, capture_output=True, text=True, check=False, timeout=60
    )


def test_compose_config_is_valid_with_every_service(tmp_path):
    result = _config(
        tmp_path, "PG_PASSWORD=pw\nREDIS_PASSWORD=rpw\nFLOWER_BASIC_AUTH=admin:secret\n"
    )

    assert result.returncode == 0, result.stderr
    for service in ("timescaledb", "redis", "migrate", "worker", "beat", "flower"):
        assert f"  {service}:" in result.stdout
    assert "service_completed_successfully" in result.stdout
    assert "pg_isready" in result.stdout
    assert "FLOWER_BASIC_AUTH: admin:secret" in result.stdout
    assert "--requirepass" in result.stdout


def test_compose_refuses_to_start_without_passwords(tmp_path):
    result = _config(tmp_path, "FLOWER_BASIC_AUTH=admin:secret\n")

    assert result.returncode != 0
    assert (
        "set PG_PASSWORD in .env" in result.stderr or "set REDIS_PASSWORD in .env" in result.stderr
    )
