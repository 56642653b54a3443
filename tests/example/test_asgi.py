"""Under uvicorn (ASGI), each request's connection goes back to the pool, within the cap."""

from __future__ import annotations

import sys

import pytest

from tests.example.helpers import (
    ExampleDatabase,
    example_env,
    free_addrport,
    load_then_default_pool,
    start_server,
    stop,
)

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

    try:
        paths = ["/api/slow-query/?ms=10", "/api/products/", "/"] * 70
        statuses, pool = load_then_default_pool(served, paths)
        peak_sessions = example_db.sessions()
    finally:
        stop(served.process)
    assert statuses == [200] * len(paths), served.output()[-3000:]
    assert pool["checked_out"] == 0
    assert pool["peak_checked_out"] <= 3 and pool["timeouts"] == 0
    assert pool["checkouts"] >= len(paths)
    assert peak_sessions <= 3 + 3  # default 2 + 1, reports 2 + 1
