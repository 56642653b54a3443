"""Under gunicorn's gevent worker (greenlets, not threads), connections are lent and returned."""

from __future__ import annotations

import sys

import pytest

import gevent  # noqa: F401 - installed in every lane (tests/support/lanes.py)

from tests.example.helpers import (
    ExampleDatabase,
    example_env,
    free_addrport,
    load_then_default_pool,
    start_server,
    stop,
)

from tests.support.db import DRIVER

# Served by real servers: in CI, in one lane per Django release and driver (Makefile).
pytestmark = pytest.mark.servers


def test_gevent_worker_shares_the_pool_between_greenlets_within_the_cap(
    example_db: ExampleDatabase, tmp_path
) -> None:
    port, addrport = free_addrport()
    served = start_server(
        [sys.executable, "-m", "gunicorn", "--worker-class", "gevent", "--workers", "1",
         "--worker-connections", "64", "--bind", addrport, "exampleproject.wsgi"],
        # max_idle: greenlets hold connections while gunicorn writes their
        # responses; without it the third would close at every return.
        example_env(example_db.url + "?pool_size=2&max_overflow=1&timeout=30&max_idle=30"),
        tmp_path / "gunicorn.log", port,
    )

    try:
        paths = ["/api/slow-query/?ms=20", "/api/products/"] * 60
        statuses, pool = load_then_default_pool(served, paths)
    finally:
        stop(served.process)
    assert statuses == [200] * len(paths), served.output()[-3000:]
    print(f"\ngevent: {pool['checkouts']} checkouts, {pool['waits']} waits, "
          f"{pool['handoffs']} hand-offs, peak {pool['peak_checked_out']}, opened {pool['opened']}")
    assert pool["checked_out"] == 0 and pool["timeouts"] == 0
    assert pool["peak_checked_out"] <= 3 and pool["opened"] <= 3 + pool["invalidated"]
    if DRIVER == "psycopg":
        # psycopg 3 yields to other greenlets while it waits for the server:
        # 16 clients on 3 connections really waited (psycopg2 blocks the worker).
        assert pool["waits"] > 0
