"""Django's test runner works unchanged with the pooled ENGINE."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.db import connect, url_params

PROJECT = Path(__file__).parent / "runner_project"


def run_manage(server_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    p = url_params(server_url)
    env = {
        **os.environ,
        "RUNNER_DB_NAME": "postgrespool_runner",
        "RUNNER_DB_USER": p["user"],
        "RUNNER_DB_PASSWORD": p["password"],
        "RUNNER_DB_HOST": p["host"],
        "RUNNER_DB_PORT": str(p["port"]),
        "PYTHONPATH": str(PROJECT),
    }
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=PROJECT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def existing_test_databases(server_url: str) -> list[str]:
    conn = connect(server_url)
    with conn.cursor() as cur:
        cur.execute(
            "SELECT datname FROM pg_database WHERE datname LIKE 'test_postgrespool_runner%%'"
        )
        names = sorted(r[0] for r in cur.fetchall())
    conn.close()
    return names


@pytest.mark.parametrize(
    "args",
    [
        ["test", "--noinput", "-v", "2"],
        ["test", "--noinput", "-v", "2", "--parallel", "2"],
        ["test", "--noinput", "-v", "2", "--keepdb"],
    ],
    ids=["serial", "parallel-2", "keepdb"],
)
def test_django_test_runner_passes_with_pooled_engine(server_url, args):
    result = run_manage(server_url, *args)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "Ran 7 tests" in output
    assert "OK" in output
    assert "is being accessed by other users" not in output
    if "--keepdb" in args:
        assert "Using existing test database" in output or "Creating test database" in output
        assert existing_test_databases(server_url) == [
            "test_postgrespool_runner",
            "test_postgrespool_runner_other",
        ]
        again = run_manage(server_url, *args)
        assert again.returncode == 0, again.stdout + again.stderr
        assert "Using existing test database for alias 'default'" in again.stdout + again.stderr
        run_manage(server_url, "test", "--noinput")  # without keepdb: drops them
    assert existing_test_databases(server_url) == []
