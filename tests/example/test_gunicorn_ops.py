"""Operations under gunicorn: prewarmed workers, and no churn between pool_size and the cap."""

from __future__ import annotations

import json
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.example.helpers import ExampleDatabase, example_env, free_addrport, start_server, stop

# Served by real servers: in CI, in one lane per Django release and driver (Makefile).
pytestmark = pytest.mark.servers

WORKERS, THREADS = 2, 4


def serve(example_db: ExampleDatabase, tmp_path, query: str):
    port, addrport = free_addrport()
    return start_server(
        [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "--workers", str(WORKERS),
         "--threads", str(THREADS), "--bind", addrport, "--graceful-timeout", "5"],
        example_env(f"{example_db.url}?{query}", WEB_CONCURRENCY=str(WORKERS)),
        tmp_path / "gunicorn.log", port,
    )


def backend_pids(base: str, requests: int) -> set[int]:
    def one(n: int) -> int:
        with urllib.request.urlopen(f"{base}/api/slow-query/?ms=5", timeout=60) as response:
            return int(json.load(response)["backend_pid"])

    with ThreadPoolExecutor(WORKERS * THREADS) as clients:
        return set(clients.map(one, range(requests)))


def test_prewarmed_workers_have_pool_size_sessions_before_the_first_request(
    example_db: ExampleDatabase, tmp_path
) -> None:
    served = serve(example_db, tmp_path, "pool_size=3&max_overflow=1")
    try:
        # default: pool_size 3; reports: pool_size 2 (its own POOL_OPTIONS), per worker
        expected = WORKERS * (3 + 2)
        deadline = time.monotonic() + 30
        while example_db.sessions() < expected and time.monotonic() < deadline:
            time.sleep(0.05)
        assert example_db.sessions() == expected, served.output()[-3000:]
        assert served.output().count("prewarmed {'default': 3, 'reports': 2}") == WORKERS
    finally:
        stop(served.process)


@pytest.mark.parametrize("max_idle", [None, 30])
def test_steady_load_above_pool_size_reuses_connections_with_max_idle(
    example_db: ExampleDatabase, tmp_path, max_idle
) -> None:
    query = "pool_size=2&max_overflow=2" + (f"&max_idle={max_idle}" if max_idle else "")
    served = serve(example_db, tmp_path, query)
    try:
        pids = backend_pids(served.base, 400)
    finally:
        stop(served.process)
    print(f"\nmax_idle={max_idle}: {len(pids)} distinct backends served 400 requests "
          f"({WORKERS} workers x {THREADS} threads, pool_size=2, max_overflow=2)")
    if max_idle:
        assert len(pids) <= WORKERS * (2 + 2)
