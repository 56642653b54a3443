"""``make demo``: the README's quickstart serves the shop, and Ctrl-C stops the site and the server."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.example.helpers import (
    EXAMPLES,
    free_addrport,
    port_is_closed,
    stop,
    wait_for_http,
    with_database,
)
from tests.support.db import connect
from tests.support.pgcluster import PASSWORD

# Served by real servers; with MATRIX=1 (CI), in the lane `make demo` uses by
# default only (Makefile): the other lanes serve the example in their own tests.
pytestmark = [pytest.mark.servers, pytest.mark.default_lane]

ROOT = EXAMPLES.parent


def quickstart_commands() -> list[str]:
    """Return the shell commands of the README's first console block on the demo, in order."""
    text = (EXAMPLES.parent / "README.rst").read_text()
    title = "Trying it and running the tests"
    section = text.split(f"{title}\n{'=' * len(title)}\n", 1)[1]
    block = section.split(".. code-block:: console\n\n", 1)[1].split("\n\n", 1)[0]
    return [line.strip()[2:] for line in block.splitlines() if line.strip().startswith("$ ")]


def lane_env() -> dict[str, str]:
    """Return DJANGO= and DRIVER= for make, so that `make demo` uses this lane's virtualenv."""
    match = re.search(r"/\.venv/dj(\d)(\d+)-(psycopg2?)/", sys.executable)
    return {"DJANGO": f"{match.group(1)}.{match.group(2)}", "DRIVER": match.group(3)} if match else {}


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("DATABASE_URL", "DJANGO_SETTINGS_MODULE", "WEB_CONCURRENCY")}
    return {**env, **lane_env(), **extra}


def ctrl_c(process: subprocess.Popen[str], timeout: float = 60) -> None:
    """Send SIGINT to the whole foreground group, as a terminal's Ctrl-C does; wait for the end."""
    os.killpg(process.pid, signal.SIGINT)
    process.wait(timeout=timeout)


def launch(command: str, env: dict[str, str], log: Path) -> subprocess.Popen[str]:
    with log.open("w") as out:
        return subprocess.Popen(
            ["bash", "-c", command], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
            text=True, start_new_session=True,
        )


def fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.read().decode()


@pytest.fixture
def fresh_database(server_url: str) -> Iterator[str]:
    name = f"demo_{uuid.uuid4().hex[:8]}"
    admin = connect(server_url)
    with admin.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    yield with_database(server_url, name)
    with admin.cursor() as cur:
        cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.close()


def test_readme_quickstart_serves_the_shop_and_ctrl_c_stops_it(
    fresh_database: str, tmp_path: Path
) -> None:
    commands = quickstart_commands()
    assert commands == ["make demo"]
    port, addrport = free_addrport()
    env = clean_env(DATABASE_URL=fresh_database, DEMO_ADDRPORT=addrport)
    log = tmp_path / "demo.log"
    process = launch(" && ".join(commands), env, log)
    try:
        wait_for_http(f"http://{addrport}/", process, log, timeout=180)
        assert "Espresso cup" in fetch(f"http://{addrport}/")
        stats = json.loads(fetch(f"http://{addrport}/pool.json"))
        [default] = next(a for a in stats["aliases"] if a["alias"] == "default")["pools"]
        assert default["database"] == fresh_database.rsplit("/", 1)[1]
        ctrl_c(process)
    finally:
        stop(process, signal.SIGKILL)
    output = log.read_text()
    assert "[demo] Using the server of DATABASE_URL." in output
    assert "[demo] DATABASE_URL=postgres://postgres:********@127.0.0.1:" in output
    assert '[demo] psql: psql "$DATABASE_URL"' in output
    assert "[demo] Stopping the site ..." in output
    assert "System check identified no issues (0 silenced)." in output
    assert port_is_closed(port)
    assert PASSWORD not in output


@pytest.fixture
def demo_data() -> Iterator[Path]:
    # Not under pytest's tmp_path: the postgres user must be able to reach it.
    folder = Path(tempfile.mkdtemp(prefix="postgrespool-demo-"))
    os.chmod(folder, 0o755)
    yield folder / "demo"
    pid = folder / "demo" / "data" / "postmaster.pid"
    if pid.exists():  # a failed test left the server running
        from tests.support.pgcluster import Cluster

        Cluster(folder / "demo" / "data").stop("immediate")
    shutil.rmtree(folder, ignore_errors=True)


def run_demo_once(data: Path, log: Path) -> tuple[float, str]:
    """Run the demo with an embedded server in ``data``; Ctrl-C it once it serves."""
    port, addrport = free_addrport()
    env = clean_env(DEMO_ADDRPORT=addrport, DEMO_DATA=str(data))
    started = time.monotonic()
    process = launch(f"{sys.executable} examples/demo.py", env, log)
    try:
        wait_for_http(f"http://{addrport}/pool.json", process, log, timeout=180)
        ready = time.monotonic() - started
        assert "Hand grinder" in fetch(f"http://{addrport}/products/hand-grinder/")
        ctrl_c(process)
    finally:
        stop(process, signal.SIGKILL)
    assert process.returncode == 0, log.read_text()
    assert port_is_closed(port)
    return ready, log.read_text()


def test_demo_starts_embedded_postgres_once_and_reuses_its_data(demo_data: Path, tmp_path: Path) -> None:
    first_time, first = run_demo_once(demo_data, tmp_path / "first.log")
    assert "[demo] Creating the embedded PostgreSQL" in first
    psql = re.search(r"^\[demo\] psql: PGPASSFILE=(\S+) psql '(postgres://postgres@[^']+)'$", first, re.M)
    assert psql and (Path(psql.group(1)).stat().st_mode & 0o777) == 0o600
    assert "Sample data: loaded 5 products." in first
    assert first.rstrip().endswith("[demo] Stopping the embedded PostgreSQL ...\n[demo] Stopped.")
    assert not (demo_data / "data" / "postmaster.pid").exists()
    assert "database system is shut down" in (demo_data / "server.log").read_text()

    second_time, second = run_demo_once(demo_data, tmp_path / "second.log")
    assert "[demo] Starting the embedded PostgreSQL" in second
    assert "No migrations to apply." in second
    assert "Sample data: kept the 5 existing products." in second
    assert not (demo_data / "data" / "postmaster.pid").exists()
    print(f"\ndemo ready in {first_time:.1f}s on the first run, {second_time:.1f}s on the second")
    for text in (first, second):
        assert PASSWORD not in text
