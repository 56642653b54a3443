"""Dead connections are found and replaced, never handed out again."""

from __future__ import annotations

import collections
import threading
import time

import pytest
from django.db import OperationalError
from django_postgrespool import pool as pool_module
from django_postgrespool import pool_stats

from tests.reliability.load import wait_until
from tests.support.db import DRIVER, url_params
from tests.support.proxy import HoldingProxy
from tests.support.requests import backend_pid, hold_at_once, run_request


@pytest.mark.parametrize(
    ("pre_ping", "poll"),
    [("socket", "libc"), ("socket", "select"), (True, "libc")],
    ids=["socket", "socket-select.poll", "ping"],
)
def test_terminated_backend_is_replaced_without_a_failed_request(
    pooled_alias, monitor, monkeypatch, pre_ping, poll
):
    # The socket check calls libc's poll() with the GIL held; where there is
    # no C library to call, select.poll() (which releases it).
    assert pool_module._libc_poll is not None  # Linux: CI runs the fast path
    if poll == "select":
        monkeypatch.setattr(pool_module, "_libc_poll", None)
    alias, app = pooled_alias(pool_options={"pre_ping": pre_ping})
    first = backend_pid(alias)
    assert monitor.terminate(app) == 1
    monitor.settled_count(app, 0)  # the backend has exited: its socket is closed
    time.sleep(0.02)
    second = backend_pid(alias)
    assert second != first
    (stats,) = pool_stats(alias)
    assert stats["invalidated"] == 1
    assert monitor.settled_count(app, 1) == 1
    assert monitor.pids(app) == [second]


def test_terminated_backend_without_health_check_fails_one_request_then_is_replaced(
    pooled_alias, monitor
):
    alias, app = pooled_alias(pool_options={"pre_ping": False})
    first = backend_pid(alias)
    monitor.terminate(app)
    monitor.settled_count(app, 0)
    time.sleep(0.02)
    with pytest.raises(OperationalError):
        backend_pid(alias)
    second = backend_pid(alias)
    assert second != first
    (stats,) = pool_stats(alias)
    assert stats["checked_out"] == 0
    assert stats["invalidated"] == 1


def test_after_a_lost_connection_older_ones_are_pinged_not_handed_out_to_fail(
    pooled_alias, monitor
):
    # No health check at all: the first dead one fails its request; the
    # others, older than it, are verified before anyone gets them.
    alias, app = pooled_alias(pool_options={"pre_ping": False, "pool_size": 3})

    hold_at_once(alias, 3)
    assert monitor.settled_count(app, 3) == 3
    monitor.terminate(app)
    monitor.settled_count(app, 0)
    time.sleep(0.02)
    failures = 0
    for _ in range(4):
        try:
            backend_pid(alias)
        except OperationalError:
            failures += 1
    assert failures == 1
    (stats,) = pool_stats(alias)
    assert stats["invalidated"] == 3
    assert stats["checked_out"] == 0


def test_broken_connection_is_discarded_at_checkin(pooled_alias, monitor):
    alias, app = pooled_alias(pool_options={"pre_ping": False})

    def die(cursor):
        cursor.execute("SELECT pg_terminate_backend(pg_backend_pid())")

    with pytest.raises(OperationalError):
        run_request(alias, die)
    (stats,) = pool_stats(alias)
    assert stats["invalidated"] == 1
    assert stats["size"] == 0
    assert backend_pid(alias) > 0


def test_recycle_replaces_old_connections(pooled_alias):
    alias, _ = pooled_alias(pool_options={"recycle": 1})
    first = backend_pid(alias)
    assert backend_pid(alias) == first
    time.sleep(2.1)
    assert backend_pid(alias) != first
    (stats,) = pool_stats(alias)
    assert stats["recycled"] == 1
    assert stats["invalidated"] == 0


def test_read_write_target_never_lends_a_session_that_can_no_longer_write(pooled_alias):
    # libpq checks target_session_attrs=read-write only when it connects; a
    # pooled session can outlive it (here: made read-only from inside).
    alias, _ = pooled_alias(options={"target_session_attrs": "read-write"})
    first = run_request(
        alias,
        lambda c: (
            c.execute("SET default_transaction_read_only = on"),
            c.execute("SELECT pg_backend_pid()"),
            c.fetchone()[0],
        )[2],
    )
    read_only, pid = run_request(
        alias,
        lambda c: (c.execute("SHOW transaction_read_only"), c.fetchone()[0],
                   c.execute("SELECT pg_backend_pid()"), c.fetchone()[0])[1::2],
    )
    assert read_only == "off" and pid != first
    assert pool_stats(alias)[0]["invalidated"] == 1


# psycopg2 keeps a connection's notices in conn.notices, which an application
# may replace (with a deque, say): checkin reads the last one either way.
NOTICES_KEPT_IN = ["the driver's own way"] + (["a deque"] if DRIVER == "psycopg2" else [])


@pytest.mark.parametrize("notices_kept_in", NOTICES_KEPT_IN)
def test_session_ended_right_after_a_result_is_not_lent_again(
    pooled_alias, monitor, server_url, notices_kept_in
):
    # The server ends an idle session (pg_terminate_backend, idle_session_timeout,
    # a shutdown) right after a result: the client reads its farewell with
    # that result, and until the backend's exit closes the socket, the
    # socket has nothing left to read. The socket check alone would lend it.
    from django.db.backends.signals import connection_created

    def keep_notices_in_a_deque(connection, **kwargs):
        if not isinstance(connection.connection.notices, collections.deque):
            connection.connection.notices = collections.deque(maxlen=10)

    if notices_kept_in == "a deque":
        connection_created.connect(keep_notices_in_a_deque)
    p = url_params(server_url)
    proxy = HoldingProxy((p["host"], int(p["port"])))
    try:
        alias, app = pooled_alias(
            HOST="127.0.0.1",
            PORT=str(proxy.port),
            pool_options={"pre_ping": "socket", "pool_size": 1, "max_overflow": 0},
        )
        first = backend_pid(alias)
        sql = "SELECT 42 AS held_result"
        proxy.hold(sql.encode())
        answer: list[object] = []
        request = threading.Thread(
            target=lambda: answer.append(run_request(alias, lambda c: (c.execute(sql), c.fetchone()[0])[1]))
        )
        request.start()
        # The server answered (the proxy holds the answer) and is idle: end it.
        assert wait_until(
            lambda: monitor.query(
                "SELECT 1 FROM pg_stat_activity WHERE pid = %s AND state = 'idle' AND query = %s",
                (first, sql),
            ),
            5,
        )
        monitor.query("SELECT pg_terminate_backend(%s)", (first,))
        request.join(10)
        assert answer == [42]
        second = backend_pid(alias)
        assert second != first
        (stats,) = pool_stats(alias)
        assert stats["invalidated"] == 1
        assert monitor.pids(app) == [second]
    finally:
        connection_created.disconnect(keep_notices_in_a_deque)
        proxy.close()
