"""The tests never point at what `make run` or production is configured to use."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.processes import ROOT

_PROBE = """
import json, os
import tests.conftest
print(json.dumps({k: os.environ.get(k) for k in
                  ("PG_HOST", "PG_DB", "REDIS_URL", "DATA_DIR", "CSV_DIR", "EMBEDDED_PG_PORT")}))
"""
_OURS = ("PG_HOST", "PG_DB", "REDIS_URL", "DATA_DIR", "CSV_DIR", "EMBEDDED_PG_PORT",
         "EMBEDDED_REDIS_PORT")  # fmt: skip


def test_servers_and_folders_configured_in_dotenv_or_the_environment_are_not_the_tests(
    tmp_path,
):
    (tmp_path / ".env").write_text(
        "PG_HOST=prod-db.internal\npg_db=sentiment\nREDIS_URL=redis://:pw@prod-redis:6379/0\n"
        f"CSV_DIR={tmp_path / 'real-csv'}\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in _OURS}
    env |= {"PYTHONPATH": str(ROOT), "DATA_DIR": str(tmp_path / "real-data")}

    probe = subprocess.run([sys.executable, "-c", _PROBE], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=60, check=False)  # fmt: skip

    assert probe.returncode == 0, probe.stderr
    seen = json.loads(probe.stdout.splitlines()[-1])
    assert seen["PG_HOST"] == "prod-db.internal"  # the configured server, but
    assert seen["PG_DB"] == "sentiment_test"  # never its database,
    assert seen["REDIS_URL"] == "redis://:pw@prod-redis:6379/15"  # nor its Redis database,
    assert seen["DATA_DIR"] == str(ROOT / ".sentiment-test")  # nor its folders
    assert seen["CSV_DIR"] == str(ROOT / ".sentiment-test" / "csv")
    assert seen["EMBEDDED_PG_PORT"] == "54339"
