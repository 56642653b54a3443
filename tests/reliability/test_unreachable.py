"""An unreachable server: a clear OperationalError within connect_timeout, and recovery."""

from __future__ import annotations

import contextlib
import socket
import time

import pytest
from django.db import OperationalError, connections
from django_postgrespool import pool_stats

from tests.reliability.figures import record
from tests.reliability.load import Load, assert_only_database_errors, failures, wait_until
from tests.support.pgcluster import PASSWORD, free_port
from tests.support.requests import backend_pid

pytestmark = pytest.mark.reliability

CONNECT_TIMEOUT = 2  # libpq's minimum: lower values count as 2
SLACK = 1.1  # "within the connect timeout + 10 %"


@contextlib.contextmanager
def blackhole(port: int):
    """Listen on ``port`` and never answer: TCP connects, the startup packet gets no reply."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen(256)
        yield s


def _connect_error(alias: str) -> tuple[OperationalError, float]:
    started = time.monotonic()
    with pytest.raises(OperationalError) as raised:
        connections[alias].ensure_connection()
    return raised.value, time.monotonic() - started


def _assert_no_password(error: BaseException, caplog) -> None:
    for text in (str(error), repr(error), str(error.__cause__), caplog.text, repr(pool_stats())):
        assert PASSWORD not in text


def test_closed_port_at_start_fails_at_once_with_a_clear_error(pooled_alias, caplog):
    port = free_port()
    alias, _ = pooled_alias("closed", options={"connect_timeout": CONNECT_TIMEOUT}, PORT=str(port))
    error, took = _connect_error(alias)
    message = str(error)
    assert f'connection to server at "127.0.0.1", port {port} failed: Connection refused' in message
    assert "Is the server running on that host and accepting TCP/IP connections?" in message
    assert took < CONNECT_TIMEOUT * SLACK
    _assert_no_password(error, caplog)
    (stats,) = pool_stats(alias)
    assert (stats["checked_out"], stats["size"]) == (0, 0)
    record("unreachable at start", "closed port: error after", took, "s")


def test_silent_server_at_start_times_out_within_connect_timeout(pooled_alias, caplog):
    port = free_port()
    alias, _ = pooled_alias("silent", options={"connect_timeout": CONNECT_TIMEOUT}, PORT=str(port))
    with blackhole(port):
        error, took = _connect_error(alias)
    assert "timeout expired" in str(error)
    assert CONNECT_TIMEOUT * 0.9 <= took <= CONNECT_TIMEOUT * SLACK
    _assert_no_password(error, caplog)
    (stats,) = pool_stats(alias)
    assert (stats["checked_out"], stats["size"]) == (0, 0)
    record(
        "unreachable at start",
        f"silent port: error after (connect_timeout={CONNECT_TIMEOUT})",
        took,
        "s",
    )


def test_server_gone_in_the_middle_of_load_fails_fast_and_recovers(own_alias, own_cluster):
    threads = 12
    alias, _ = own_alias(
        "gone",
        pool_options={"pool_size": 6, "max_overflow": threads - 6, "timeout": 10},
        options={"connect_timeout": CONNECT_TIMEOUT},
    )
    with Load(alias, threads, sql="SELECT pg_sleep(0.002)") as load:
        assert wait_until(lambda: sum(o.ok for o in load.snapshot()) >= 100, 20)
        own_cluster.stop("fast")
        stopped = time.monotonic()  # pg_ctl -w: the server is gone
        refused_until = time.monotonic() + 1.5
        time.sleep(1.5)
        # The port now answers TCP but never speaks: connects hang until
        # connect_timeout, never longer.
        with blackhole(own_cluster.port):
            silent_from = time.monotonic()
            time.sleep(CONNECT_TIMEOUT * 2)
            silent_until = time.monotonic()
        own_cluster.start()
        accepting = time.monotonic()
        assert wait_until(
            lambda: any(o.ok and o.start >= accepting for o in load.snapshot()), 5, 0.005
        )
        time.sleep(0.5)
    outcomes = load.snapshot()
    assert_only_database_errors(outcomes)
    down = [o for o in outcomes if stopped <= o.start < accepting]
    refused = [o for o in down if o.start < refused_until]
    silent = [o for o in down if silent_from <= o.start < silent_until]
    assert refused and silent
    assert not [o for o in refused + silent if o.ok]
    slowest_refused = max(o.duration for o in refused)
    slowest_silent = max(o.duration for o in silent)
    timeouts = [o for o in silent if "timeout expired" in str(o.error)]
    assert timeouts
    assert slowest_refused <= CONNECT_TIMEOUT * SLACK
    assert slowest_silent <= CONNECT_TIMEOUT * SLACK
    first_ok = min(o.end for o in outcomes if o.ok and o.start >= accepting)
    recovery = max(0.0, first_ok - accepting)
    assert recovery < 1.0
    (stats,) = pool_stats(alias)
    assert stats["checked_out"] == 0
    assert backend_pid(alias) > 0
    case = "server gone mid-load"
    record(case, "failed while refused", len(failures(refused)))
    record(case, "slowest refused", slowest_refused, "s")
    record(case, "failed while silent", len(failures(silent)))
    record(case, "slowest silent", slowest_silent, "s")
    record(case, "recovery", recovery, "s")
