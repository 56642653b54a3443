"""The dburl tests pass against the oldest dj-database-url that packages/dburl declares."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import lanes

HERE = Path(__file__).resolve().parent
VENV = lanes.VENVS / "dburl-oldest"
# The lane whose Django, driver and SQLAlchemy the oldest dj-database-url is paired with.
BASE_LANE = "dj52-psycopg"


def declared_floor() -> str:
    """Return the version in packages/dburl's ``dj-database-url>=X`` requirement."""
    text = (lanes.ROOT / "packages" / "dburl" / "pyproject.toml").read_text()
    match = re.search(r'"dj-database-url>=([0-9.]+)', text)
    assert match, "packages/dburl/pyproject.toml declares no dj-database-url floor"
    return match.group(1)


def oldest_python() -> Path:
    """Create (once per requirement set) a venv pinned to the declared floor; return its python."""
    reqs = lanes.requirements(BASE_LANE, [f"dj-database-url=={declared_floor()}"])
    django, _ = lanes.parse(BASE_LANE)
    return lanes.ensure_venv(VENV.name, lanes.PYTHON[django], reqs)


# Its virtualenv is BASE_LANE's whichever lane runs it: with MATRIX=1, run once.
@pytest.mark.default_lane
def test_dburl_suite_passes_with_the_oldest_declared_dj_database_url(server_url):
    python = oldest_python()
    installed = subprocess.run(
        [str(python), "-c", "import importlib.metadata as m; print(m.version('dj-database-url'))"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()
    floor = declared_floor()
    assert installed.split(".")[: len(floor.split("."))] == floor.split(".")
    env = {**os.environ, "DATABASE_URL": server_url, "PYTHONDONTWRITEBYTECODE": "1"}
    run = subprocess.run(
        [
            str(python), "-m", "pytest", str(HERE), "-q", "-p", "no:cacheprovider",
            f"--ignore={Path(__file__)}", "-m", "not reliability",
        ],
        cwd=lanes.ROOT, env=env, capture_output=True, text=True, timeout=540,
    )
    summary = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else run.stderr[-2000:]
    output = f"dj-database-url {installed}:\n{run.stdout[-4000:]}{run.stderr[-2000:]}"
    assert run.returncode == 0, output
    assert " passed" in summary and "failed" not in summary and "skipped" not in summary, summary
    print(sys.version, f"dj-database-url {installed}: {summary}")
