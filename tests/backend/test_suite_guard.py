"""The suite's own guard: a test that leaves a pool lending fails, and alone.

One CI run failed 60 tests of the default lane at once ("too many values to
unpack" from pool_stats()): pools an earlier test had left lending stayed in
the registry for the rest of the session. tests/conftest.py now checks after
each test that the pools it closed drained; these tests call that check on a
pool left lending on purpose.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest
from django.db import connections
from django_postgrespool import close_pools, pool_stats, registry

from tests.conftest import _no_pool_outlives_its_test


def test_a_pool_left_lending_fails_the_test_and_is_dropped(pooled_alias: Any) -> None:
    alias, _ = pooled_alias(pool_options={"pool_size": 1, "max_overflow": 0})
    holding, release, done = threading.Event(), threading.Event(), threading.Event()

    def holder() -> None:  # a borrower a test forgot to stop
        with connections[alias].cursor() as cursor:
            cursor.execute("SELECT 1")
            holding.set()
            release.wait(30)
        connections[alias].close()
        done.set()

    thread = threading.Thread(target=holder, name="forgotten-borrower")
    thread.start()
    try:
        assert holding.wait(10)
        close_pools()
        assert len(pool_stats(alias)) == 1  # closed, still lending: kept
        with pytest.raises(pytest.fail.Exception) as failed:
            _no_pool_outlives_its_test(grace=0.2)
        message = str(failed.value)
        assert "still lending" in message and "'checked_out': 1" in message, message
        assert "forgotten-borrower" in message, message  # the lease's owner is named
        assert pool_stats(alias) == [] and registry.all_pools() == []  # the next test starts clean
    finally:
        release.set()
        thread.join(10)
    assert done.is_set()


def test_a_pool_that_drains_within_the_grace_passes(pooled_alias: Any) -> None:
    alias, _ = pooled_alias(pool_options={"pool_size": 1, "max_overflow": 0})
    holding, release = threading.Event(), threading.Event()

    def holder() -> None:
        with connections[alias].cursor() as cursor:
            cursor.execute("SELECT 1")
            holding.set()
            release.wait(30)
        connections[alias].close()  # gives it back to the closed pool: closed

    thread = threading.Thread(target=holder)
    thread.start()
    assert holding.wait(10)
    close_pools()
    threading.Timer(0.1, release.set).start()
    _no_pool_outlives_its_test(grace=10)  # returns once the connection is back
    thread.join(10)
    assert registry.all_pools() == []
