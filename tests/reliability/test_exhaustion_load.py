"""Three times more threads than the cap, with slow queries: every waiter is answered in time."""

from __future__ import annotations

import threading
import time

import pytest
from django.core.signals import request_finished, request_started
from django.db import connections
from django_postgrespool import PoolTimeout, pool_stats

from tests.reliability.figures import record

pytestmark = pytest.mark.reliability

SLACK = 1.1  # "within timeout + 10 %"


@pytest.mark.parametrize(
    ("pool_size", "max_overflow", "timeout", "query"),
    [(2, 2, 1.0, 0.6), (5, 0, 0.5, 0.3)],
    ids=["cap4-timeout1s", "cap5-timeout0.5s"],
)
def test_every_waiter_gets_a_connection_or_the_timeout_error_in_time(
    pooled_alias, monitor, pool_size, max_overflow, timeout, query
):
    cap = pool_size + max_overflow
    threads = 3 * cap
    alias, app = pooled_alias(
        "exhaust",
        pool_options={"pool_size": pool_size, "max_overflow": max_overflow, "timeout": timeout},
    )
    start = threading.Barrier(threads)
    waits: list[tuple[float, BaseException | None]] = []
    peak_sessions = 0
    lock = threading.Lock()
    done = threading.Event()

    def borrower():
        start.wait(timeout=30)
        request_started.send(sender=None)
        try:
            began = time.monotonic()
            try:
                connections[alias].ensure_connection()
            except PoolTimeout as error:
                with lock:
                    waits.append((time.monotonic() - began, error))
                return
            with lock:
                waits.append((time.monotonic() - began, None))
            with connections[alias].cursor() as cursor:
                cursor.execute("SELECT pg_sleep(%s)", [query])
        finally:
            request_finished.send(sender=None)

    def watch():
        nonlocal peak_sessions
        while not done.is_set():
            peak_sessions = max(peak_sessions, monitor.count(app))
            time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    workers = [threading.Thread(target=borrower, daemon=True) for _ in range(threads)]
    began = time.monotonic()
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=30)
    elapsed = time.monotonic() - began
    done.set()
    watcher.join()
    assert not [w for w in workers if w.is_alive()], "a borrower is stuck: deadlock"
    assert len(waits) == threads
    got = [w for w, e in waits if e is None]
    timed_out = [(w, e) for w, e in waits if e is not None]
    assert len(got) >= cap
    for waited, error in timed_out:
        assert timeout * 0.95 <= waited <= timeout * SLACK
        assert str(error).startswith(
            f"Connection pool of database alias 'exhaust' is exhausted: {cap} of {cap} "
            f"connections (pool_size={pool_size} + max_overflow={max_overflow}) are checked "
            f"out and none was returned within timeout={timeout:g}s."
        )
    assert max(got) <= timeout * SLACK
    (stats,) = pool_stats(alias)
    assert stats["checked_out"] == 0
    assert stats["peak_checked_out"] == cap
    assert stats["timeouts"] == len(timed_out)
    assert peak_sessions <= cap
    assert monitor.count(app) <= pool_size
    case = f"exhaustion {threads} threads, cap {cap}, timeout {timeout:g}s, query {query:g}s"
    record(case, "got a connection", len(got))
    record(case, "pool timeouts", len(timed_out))
    record(case, "longest wait (served)", max(got), "s")
    record(case, "longest wait (timed out)", max((w for w, _ in timed_out), default=0.0), "s")
    record(case, "worst wait / timeout", max(w for w, _ in waits) / timeout)
    record(case, "peak server sessions", peak_sessions)
    record(case, "wall time", elapsed, "s")
