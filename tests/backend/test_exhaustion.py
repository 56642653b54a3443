"""At the cap, a checkout waits up to ``timeout`` and then says why it failed."""

from __future__ import annotations

import threading
import time

import pytest
from django.db import OperationalError, connections
from django_postgrespool import PoolTimeout, pool_stats

from tests.support.requests import run_request


def test_exhausted_pool_raises_after_timeout_with_a_message_that_explains(pooled_alias, caplog):
    alias, _ = pooled_alias(pool_options={"pool_size": 1, "max_overflow": 1, "timeout": 0.5})
    holding = threading.Barrier(3)
    release = threading.Event()

    def hold():
        def body(cursor):
            cursor.execute("SELECT 1")
            holding.wait(timeout=10)
            release.wait(timeout=10)

        run_request(alias, body)

    holders = [threading.Thread(target=hold) for _ in range(2)]
    for h in holders:
        h.start()
    holding.wait(timeout=10)
    started = time.monotonic()
    try:
        with pytest.raises(PoolTimeout) as raised:
            connections[alias].ensure_connection()
        waited = time.monotonic() - started
    finally:
        release.set()
        for h in holders:
            h.join()
    assert isinstance(raised.value, OperationalError)
    assert str(raised.value) == (
        "Connection pool of database alias 'pooled' is exhausted: 2 of 2 connections "
        "(pool_size=1 + max_overflow=1) are checked out and none was returned within "
        "timeout=0.5s. Hint: look for requests or threads that hold a connection (long "
        "transactions, CONN_MAX_AGE > 0 with more threads than connections), or raise "
        "pool_size/max_overflow if the server's max_connections allows it. See "
        "https://django-postgrespool.readthedocs.io/en/latest/guide/sizing.html"
    )
    assert 0.45 <= waited < 5
    (stats,) = pool_stats(alias)
    assert (stats["timeouts"], stats["waits"], stats["checked_out"]) == (1, 1, 0)
    assert "waiting up to 0.5s" in caplog.text
    assert run_request(alias, lambda c: (c.execute("SELECT 1"), c.fetchone()[0])[1]) == 1


def test_pool_timeout_survives_pickling():
    import pickle

    error = PoolTimeout(alias="a", pool_size=1, max_overflow=2, checked_out=3, timeout=4.0)
    again = pickle.loads(pickle.dumps(error))
    assert str(again) == str(error)


def test_waiter_gets_the_connection_returned_within_timeout(pooled_alias):
    alias, _ = pooled_alias(pool_options={"pool_size": 1, "max_overflow": 0, "timeout": 10})
    holding = threading.Event()

    def hold():
        def body(cursor):
            cursor.execute("SELECT 1")
            holding.set()
            time.sleep(0.3)

        run_request(alias, body)

    holder = threading.Thread(target=hold)
    holder.start()
    holding.wait(timeout=10)
    started = time.monotonic()
    run_request(alias)
    holder.join()
    assert 0.1 < time.monotonic() - started < 5
    (stats,) = pool_stats(alias)
    assert stats["waits"] == 1 and stats["timeouts"] == 0
