"""The pool really pools: one physical connection serves request after request."""

from __future__ import annotations

import asyncio
import threading
from unittest import mock

import pytest
from django.core.exceptions import SynchronousOnlyOperation
from django.db import connections, transaction
from django_postgrespool import pool_stats

from tests.support.requests import backend_pid, hammer, hold_at_once, run_request


def test_next_request_gets_the_same_backend(pooled_alias, monitor):
    alias, app = pooled_alias()
    pids = {backend_pid(alias) for _ in range(5)}
    assert len(pids) == 1
    assert monitor.settled_count(app, 1) == 1  # returned to the pool, still open


def test_connection_stays_open_idle_in_the_pool_after_the_request(pooled_alias, monitor):
    alias, app = pooled_alias()
    pid = backend_pid(alias)
    assert connections[alias].connection is None
    state = monitor.query("SELECT state FROM pg_stat_activity WHERE pid = %s", (pid,))
    assert state == [("idle",)]


def test_the_end_of_a_request_calls_a_close_that_is_not_djangos(pooled_alias):
    # The end of a request gives the connection back without Django's close()
    # only while close() and what Django calls around it are Django's own: a
    # subclass's close(), or one patched on the connection, is called.
    alias, app = pooled_alias()
    connection = connections[alias]
    calls: list[str] = []

    class Subclass(type(connection)):  # type: ignore[misc]
        def close(self):
            calls.append("subclass")
            super().close()

    first = backend_pid(alias)
    original = type(connection)
    connection.__class__ = Subclass
    try:
        assert backend_pid(alias) == first
    finally:
        connection.__class__ = original
    assert calls == ["subclass"] and connection.connection is None
    with mock.patch.object(connection, "close", wraps=connection.close) as patched:
        assert backend_pid(alias) == first
    assert patched.call_count == 1 and connection.connection is None
    assert backend_pid(alias) == first  # and Django's own again, the connection given back


def test_the_end_of_a_request_inside_an_event_loop_raises_as_django_does(pooled_alias):
    # Django's close_if_unusable_or_obsolete() refuses to run in an event loop
    # (SynchronousOnlyOperation); the pool's quicker way must refuse too.
    alias, app = pooled_alias()
    connection = connections[alias]
    connection.ensure_connection()

    async def end_of_request() -> None:
        connection.close_if_unusable_or_obsolete()

    with pytest.raises(SynchronousOnlyOperation):
        asyncio.run(end_of_request())
    assert connection.connection is not None  # still this thread's
    connection.close_if_unusable_or_obsolete()
    assert connection.connection is None


def test_two_threads_at_once_use_two_backends_then_share_them(pooled_alias, monitor):
    alias, app = pooled_alias()
    barrier = threading.Barrier(2)
    pids: list[int] = []

    def hold(cursor):
        cursor.execute("SELECT pg_backend_pid()")
        barrier.wait(timeout=10)
        return cursor.fetchone()[0]

    threads = [
        threading.Thread(target=lambda: pids.append(run_request(alias, hold))) for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(pids)) == 2
    assert backend_pid(alias) in pids
    assert monitor.settled_count(app, 2) == 2


def test_64_threads_never_exceed_the_cap_and_never_fail(pooled_alias, monitor):
    alias, app = pooled_alias(pool_options={"pool_size": 4, "max_overflow": 6, "timeout": 60})
    cap = 10
    peak, errors = hammer(
        alias, 64, 10, lambda c: c.execute("SELECT pg_sleep(0.002)"), lambda: monitor.count(app)
    )
    (stats,) = pool_stats(alias)
    print(
        f"64 threads x 10 requests: peak server connections {peak}, cap {cap}, "
        f"peak checked out {stats['peak_checked_out']}, waits {stats['waits']}"
    )
    assert errors == []
    assert 0 < peak <= cap
    assert stats["peak_checked_out"] <= cap
    assert stats["checked_out"] == 0
    assert stats["checkouts"] == 640
    assert monitor.count(app) <= 4 + 6
    assert stats["idle"] == stats["size"] >= 4


def test_overflow_connections_close_when_returned_to_a_full_pool(pooled_alias, monitor):
    alias, app = pooled_alias(pool_options={"pool_size": 1, "max_overflow": 2})
    hold_at_once(alias, 3)
    (stats,) = pool_stats(alias)
    assert stats["opened"] == 3
    assert stats["size"] == 1
    assert monitor.settled_count(app, 1) == 1


def test_session_setup_runs_once_per_physical_connection(pooled_alias, monitor):
    # assume_role makes Django run SET ROLE at every new connection; a reused
    # pooled connection must not send it again, nor anything at checkin.
    alias, app = pooled_alias(options={"assume_role": "postgres"})
    pid = run_request(
        alias, lambda c: (c.execute("SELECT pg_backend_pid() /* first */"), c.fetchone()[0])[1]
    )

    def last_query():
        return monitor.query("SELECT query FROM pg_stat_activity WHERE pid = %s", (pid,))[0][0]

    assert last_query() == "SELECT pg_backend_pid() /* first */"
    request_started_pid = None

    def second(cursor):
        nonlocal request_started_pid
        # Checked out, nothing run yet: the server saw nothing since the first request.
        assert last_query() == "SELECT pg_backend_pid() /* first */"
        cursor.execute("SELECT current_user, pg_backend_pid()")
        request_started_pid = cursor.fetchone()[1]

    run_request(alias, second)
    assert request_started_pid == pid
    assert last_query() == "SELECT current_user, pg_backend_pid()"


def test_time_zone_and_role_are_set_on_new_connections(pooled_alias):
    alias, _ = pooled_alias(options={"assume_role": "pg_monitor"}, TIME_ZONE="Asia/Tokyo")
    zone, role = run_request(
        alias,
        lambda c: (
            c.execute("SHOW TIME ZONE"),
            c.fetchone()[0],
            c.execute("SELECT current_role"),
            c.fetchone()[0],
        )[1::2],
    )
    assert (zone, role) == ("Asia/Tokyo", "pg_monitor")
    again = run_request(
        alias,
        lambda c: (c.execute("SELECT current_setting('TimeZone'), current_role"), c.fetchone())[1],
    )
    assert again == ("Asia/Tokyo", "pg_monitor")


def test_atomic_blocks_work_on_pooled_connections(pooled_alias):
    alias, _ = pooled_alias()

    def body(cursor):
        cursor.execute("CREATE TEMP TABLE t (x int)")
        with transaction.atomic(using=alias):
            cursor.execute("INSERT INTO t VALUES (1)")
            with transaction.atomic(using=alias):
                cursor.execute("INSERT INTO t VALUES (2)")
        cursor.execute("SELECT count(*) FROM t")
        return cursor.fetchone()[0]

    assert run_request(alias, body) == 2
