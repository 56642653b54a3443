"""Under uvicorn (ASGI), each request's connection goes back to the pool, within the cap."""

from __future__ import annotations

import pytest
import json
import sys
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from tests.example.helpers import ExampleDatabase, example_env, free_addrport, start_server, stop

# Served by real servers: in CI, in one lane per Django release and driver (Makefile).
pytestmark = pytest.mark.servers


def test_asgi_requests_borrow_and_return_connections_within_the_cap(
    example_db: ExampleDatabase, tmp_path
) -> None:
    port, _ = free_addrport()
    served = start_server(
        [sys.executable, "-m", "uvicorn", "exampleproject.asgi:application", "--host",
         "127.0.0.1", "--port", str(port), "--no-access-log"],
        example_env(example_db.url + "?pool_size=2&max_overflow=1&timeout=30"),
        tmp_path / "uvicorn.log", port,
    )

    def get(path: str) -> int:
        with urllib.request.urlopen(served.base + path, timeout=60) as response:
            response.read()
            return response.status

    try:
        paths = ["/api/slow-query/?ms=10", "/api/products/", "/"] * 70
        with ThreadPoolExecutor(16) as clients:
            statuses = list(clients.map(get, paths))
        peak_sessions = example_db.sessions()
        with urllib.request.urlopen(served.base + "/pool.json", timeout=30) as response:
            stats = json.load(response)
    finally:
        stop(served.process)
    assert statuses == [200] * len(paths), served.output()[-3000:]
    (default,) = [a for a in stats["aliases"] if a["alias"] == "default"]
    (pool,) = default["pools"]
    assert pool["checked_out"] == 0
    assert pool["peak_checked_out"] <= 3 and pool["timeouts"] == 0
    assert pool["checkouts"] >= len(paths)
    assert peak_sessions <= 3 + 3  # default 2 + 1, reports 2 + 1
