"""Adversarial tests, round 2: the Django wrapper and the pool's lifecycle, on PostgreSQL.

Round 1 (test_adversarial.py) attacked the pool core. These attack what sits
around it: a dead thread's wrapper still reachable through a cursor, fork()
while other threads borrow and wait, pools retired under borrowers, thread
sharing, Django's transaction edge cases, the housekeeper and the stats.
"""

from __future__ import annotations

import collections
import gc
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from django.db import connections, transaction
from django_postgrespool import pool_stats, registry

from tests.backend.test_fork import in_child
from tests.reliability.load import wait_until
from tests.support.db import DRIVER
from tests.support.requests import backend_pid, one_thread_per_backend, run_request

OTHER_DATABASE = "postgres"  # on the suite's server, beside the tests' database


def _run(target: Any, *args: Any) -> threading.Thread:
    t = threading.Thread(target=target, args=args)
    t.start()
    return t


def test_closing_a_dead_threads_cursor_does_not_give_back_its_reclaimers_connection(
    pooled_alias, monitor
) -> None:
    # lease='transaction': a thread ends holding a cursor (kept in a global);
    # its connection is reclaimed by a thread that enters an atomic block.
    # Closing the kept cursor later must not check in the reclaimer's lease.
    alias, app = pooled_alias(
        pool_options={"pool_size": 1, "max_overflow": 0, "timeout": 10, "lease": "transaction"}
    )
    kept: list[Any] = []

    def leaves_a_cursor_open() -> None:
        cursor = connections[alias].cursor()
        cursor.execute("SELECT 1")
        kept.append(cursor)  # the thread ends without closing anything

    _run(leaves_a_cursor_open).join(10)
    assert len(kept) == 1
    inside, closed, done = threading.Event(), threading.Event(), threading.Event()
    seen: dict[str, Any] = {}

    def reclaimer() -> None:
        conn = connections[alias]
        try:
            with transaction.atomic(using=alias):  # borrows: reclaims the dead thread's
                seen["source"] = conn.checkout_info()["source"]
                inside.set()
                closed.wait(10)
                seen["checked_out"] = pool_stats(alias)[0]["checked_out"]
                seen["autocommit"] = conn.connection.autocommit
                with conn.cursor() as cursor:
                    cursor.execute("SELECT pg_backend_pid()")
        except BaseException as error:  # noqa: BLE001
            seen["error"] = repr(error)
        finally:
            conn.close()
            done.set()

    t = _run(reclaimer)
    assert inside.wait(10)
    kept[0].close()  # from the main thread, as a module-level cache would
    closed.set()
    t.join(10)
    assert seen.get("source") == "reclaimed", seen
    assert seen.get("checked_out") == 1, seen  # still the reclaimer's
    assert seen.get("autocommit") is False, seen  # its transaction untouched
    assert "error" not in seen, seen


def test_closing_a_dead_threads_shared_wrapper_leaves_its_reclaimers_transaction_alone(
    pooled_alias,
) -> None:
    alias, _ = pooled_alias(pool_options={"pool_size": 1, "max_overflow": 0, "timeout": 10})
    kept: list[Any] = []

    def leaves_a_cursor_open() -> None:
        cursor = connections[alias].cursor()
        cursor.execute("SELECT 1")
        kept.append(cursor)

    _run(leaves_a_cursor_open).join(10)
    inside, closed = threading.Event(), threading.Event()
    seen: dict[str, Any] = {}

    def reclaimer() -> None:
        conn = connections[alias]
        try:
            with transaction.atomic(using=alias):
                with conn.cursor() as cursor:
                    seen["txid"] = _one(cursor, "SELECT txid_current()")
                seen["source"] = conn.checkout_info()["source"]
                inside.set()
                closed.wait(10)
                with conn.cursor() as cursor:
                    seen["txid_after"] = _one(cursor, "SELECT txid_current()")
        except BaseException as error:  # noqa: BLE001
            seen["error"] = repr(error)
        finally:
            conn.close()

    t = _run(reclaimer)
    assert inside.wait(10)
    dead_threads_wrapper = kept[0].db
    dead_threads_wrapper.inc_thread_sharing()  # as a test would, to use it here
    dead_threads_wrapper.close()
    closed.set()
    t.join(10)
    assert seen.get("source") == "reclaimed", seen
    assert "error" not in seen and seen["txid"] == seen["txid_after"], seen


def test_fork_while_threads_hold_and_wait_shares_no_session_either_way(
    pooled_alias, monitor
) -> None:
    # 6 threads on 2 connections (some hold, the others wait) while the main
    # thread forks 4 times; each child runs requests in its main thread and in
    # 2 threads of its own, and collects the inherited pools. Neither side may
    # see a session of the other; the parent must lose no connection.
    alias, app = pooled_alias(
        pool_options={
            "pool_size": 2,
            "max_overflow": 0,
            "timeout": 20,
            "max_idle": 0.05,  # the housekeeper runs in both processes
            "leak_timeout": 0.05,
        }
    )
    parent_pids: set[int] = set()
    lock = threading.Lock()
    errors: list[BaseException] = []
    stop = threading.Event()

    def body(cursor: Any) -> int:
        cursor.execute("SELECT pg_backend_pid(), pg_sleep(0.002)")
        return cursor.fetchone()[0]

    def worker() -> None:
        try:
            while not stop.is_set():
                pid = run_request(alias, body)
                with lock:
                    parent_pids.add(pid)
        except BaseException as error:  # noqa: BLE001
            errors.append(error)
        finally:
            connections[alias].close()

    def child_work() -> dict[str, Any]:
        mine: list[int] = []

        def in_thread() -> None:
            mine.extend(backend_pid(alias) for _ in range(3))
            connections[alias].close()

        threads = [threading.Thread(target=in_thread) for _ in range(2)]
        for t in threads:
            t.start()
        mine.extend(backend_pid(alias) for _ in range(3))
        for t in threads:
            t.join(20)
        # The worst a child can do with what it inherited.
        registry._abandoned.clear()
        gc.collect()
        mine.append(backend_pid(alias))
        (stats,) = pool_stats(alias)
        return {"pids": mine, "opened": stats["opened"], "pid": stats["pid"]}

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    children = []
    try:
        for _ in range(4):
            time.sleep(0.05)
            children.append(in_child(child_work))
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert not any(t.is_alive() for t in threads)
    assert errors == [], errors[:3]
    for child in children:
        assert "ok" in child, child
        assert len(child["ok"]["pids"]) == 10
        assert not set(child["ok"]["pids"]) & parent_pids, (child, parent_pids)
        assert child["ok"]["opened"] <= 3 and child["ok"]["pid"] != os.getpid()
    (stats,) = pool_stats(alias)
    assert stats["invalidated"] == 0 and stats["checked_out"] == 0
    assert stats["opened"] == 2 and len(parent_pids) == 2
    assert monitor.settled_count(app, 2, timeout=10) == 2  # the children's sessions ended
    assert set(monitor.pids(app)) == parent_pids  # and the parent's are alive
    assert backend_pid(alias) in parent_pids


@pytest.mark.parametrize("leases", [("request", "request"), ("transaction", "request")])
def test_pools_retired_mid_storm_close_every_connection_when_it_comes_back(
    pooled_alias, monitor, leases
) -> None:
    # The alias's POOL_OPTIONS and OPTIONS are switched in place (the dict every
    # thread's wrapper shares) 10 times while 6 threads borrow: each switch
    # retires the pool under borrowers that hold or wait for its connections.
    alias, app = pooled_alias(
        pool_options={"pool_size": 2, "max_overflow": 1, "timeout": 20, "lease": leases[0]}
    )
    settings_dict = connections.settings[alias]
    errors: list[BaseException] = []
    stop = threading.Event()
    body = one_thread_per_backend(0.001)

    def worker() -> None:
        try:
            while not stop.is_set():
                run_request(alias, body)
                with transaction.atomic(using=alias):
                    with connections[alias].cursor() as cursor:
                        body(cursor)
        except BaseException as error:  # noqa: BLE001
            errors.append(error)
        finally:
            connections[alias].close()

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    try:
        for n in range(10):
            time.sleep(0.03)
            settings_dict["POOL_OPTIONS"] = {
                "pool_size": 2 + n % 2,
                "max_overflow": 1,
                "timeout": 20,
                "lease": leases[n % 2],
            }
            settings_dict["OPTIONS"] = {**settings_dict["OPTIONS"], "connect_timeout": 10 + n}
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert not any(t.is_alive() for t in threads)
    assert errors == [], errors[:3]
    pools = [p for p in registry.all_pools() if p.alias == alias]
    live = [p for p in pools if not p.retired]
    assert len(live) == 1 and not live[0].closed
    for pool in pools:
        if pool.retired:
            assert pool.in_use() == 0 and len(pool._leases) == 0, pool.stats()
    (stats,) = pool_stats(alias)  # retired pools with nothing lent are not shown
    assert stats["checked_out"] == 0
    assert stats["size"] == stats["idle"] <= 3
    # max_idle=0.01: the housekeeper may close the overflow ones meanwhile.
    settled = monitor.settled_count(app, stats["size"], timeout=10)
    assert settled == pool_stats(alias)[0]["size"]


def test_a_connection_opened_under_settings_switched_back_is_not_lent_under_the_old_key(
    pooled_alias,
) -> None:
    # A waits at the cap of the pool of NAME=tests; the NAME is switched to
    # 'postgres' in place; the holder's connection is discarded, so A opens a
    # new one (reading the settings now); the NAME is switched back. A's
    # connection, to 'postgres', must not be lent as one of the pool of NAME=tests.
    alias, _ = pooled_alias(pool_options={"pool_size": 1, "max_overflow": 0, "timeout": 20})
    settings_dict = connections.settings[alias]
    tests_db = settings_dict["NAME"]
    holding, release, waited = threading.Event(), threading.Event(), threading.Event()
    seen: dict[str, Any] = {}

    def holder() -> None:
        conn = connections[alias]
        try:
            with transaction.atomic(using=alias):
                with conn.cursor() as cursor:
                    cursor.execute("SELECT 1")
                holding.set()
                release.wait(20)
                conn.close()  # inside the atomic block: discarded, room for a new one
        except BaseException as error:  # noqa: BLE001
            seen["holder"] = repr(error)
        finally:
            connections[alias].close()

    def waiter() -> None:
        try:
            seen["waiter"] = run_request(
                alias, lambda c: (c.execute("SELECT current_database()"), c.fetchone()[0])[1]
            )
        finally:
            connections[alias].close()
            waited.set()

    h = _run(holder)
    assert holding.wait(20)
    w = _run(waiter)
    deadline = time.monotonic() + 20
    while pool_stats(alias)[0]["waiting"] == 0 and time.monotonic() < deadline:
        time.sleep(0.005)
    settings_dict["NAME"] = OTHER_DATABASE
    try:
        release.set()
        assert waited.wait(20)
    finally:
        settings_dict["NAME"] = tests_db
    h.join(20)
    w.join(20)
    assert seen.get("waiter") == OTHER_DATABASE, seen  # it connected as the settings said
    current = run_request(
        alias, lambda c: (c.execute("SELECT current_database()"), c.fetchone()[0])[1]
    )
    assert current == tests_db


def test_settings_that_change_at_every_connect_fail_within_the_timeout_by_name(
    pooled_alias,
) -> None:
    # The retry above (the pool of the settings as they are now) is bounded:
    # settings that differ at every look fail after the pool's timeout,
    # naming the alias, not the settings' values.
    import itertools

    from django_postgrespool import PoolError

    alias, _ = pooled_alias(pool_options={"pool_size": 1, "timeout": 0.3})
    conn = connections[alias]
    real = conn._settings_key
    counter = itertools.count()
    conn._settings_key = lambda: (*real()[:-1], next(counter))  # never the same twice
    started = time.monotonic()
    with pytest.raises(PoolError, match=r"alias 'pooled' changed each time .* for 0.3s") as info:
        conn.ensure_connection()
    assert 0.3 <= time.monotonic() - started < 10
    assert connections.settings[alias]["PASSWORD"] not in str(info.value)
    del conn._settings_key
    conn.close()
    assert run_request(alias) is not None  # the settings as they are: served


def test_stats_and_pgpool_during_a_storm_with_sweeps_leak_warnings_and_recycling(
    pooled_alias, monitor
) -> None:
    # max_idle and leak_timeout tiny (the housekeeper sweeps and warns all the
    # time), recycle tiny (connections replaced at checkout), overflow, gc at
    # every allocation, a thread switch every microsecond; a reader checks
    # the snapshot's invariants and runs pgpool meanwhile.
    import io
    import sys

    from django.core.management import call_command

    alias, app = pooled_alias(
        pool_options={
            "pool_size": 2,
            "max_overflow": 2,
            "timeout": 20,
            "max_idle": 0.01,
            "leak_timeout": 0.005,
            "recycle": 0.05,
            "fair_after": 0,
        }
    )
    errors: list[BaseException] = []
    broken: list[dict[str, Any]] = []
    stop = threading.Event()
    barrier = threading.Barrier(7)
    body = one_thread_per_backend(0.002)

    def worker() -> None:
        try:
            barrier.wait(10)
            for _ in range(25):
                run_request(alias, body)
        except BaseException as error:  # noqa: BLE001
            errors.append(error)
        finally:
            connections[alias].close()

    def reader() -> None:
        try:
            barrier.wait(10)
            n = 0
            while not stop.is_set():
                for st in pool_stats(alias):
                    if not (
                        0 <= st["idle"] <= st["size"] <= 4
                        and st["checked_out"] <= 4
                        and st["peak_checked_out"] <= 4
                        and st["waiting"] >= 0
                    ):
                        broken.append(st)
                n += 1
                if n % 20 == 0:
                    out = io.StringIO()
                    call_command("pgpool", database=[alias], json=True, stdout=out)
        except BaseException as error:  # noqa: BLE001
            errors.append(error)
        finally:
            connections[alias].close()

    old_gc, old_switch = gc.get_threshold(), sys.getswitchinterval()
    gc.set_threshold(1)
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=worker) for _ in range(6)]
        r = threading.Thread(target=reader)
        for t in [*threads, r]:
            t.start()
        for t in threads:
            t.join(60)
        stop.set()
        r.join(30)
    finally:
        gc.set_threshold(*old_gc)
        sys.setswitchinterval(old_switch)
    assert not any(t.is_alive() for t in [*threads, r])
    assert errors == [], errors[:3]
    assert broken == [], broken[:2]
    (stats,) = pool_stats(alias)
    assert stats["checked_out"] == 0 and stats["waiting"] == 0 and stats["size"] <= 4

    def at_rest() -> bool:
        # The housekeeper sweeps what is beyond pool_size; its last close may
        # be under way: out of the size, not yet counted as closed (a snapshot
        # never stops the pool). A lost connection never settles.
        (st,) = pool_stats(alias)
        return st["size"] <= 2 and st["opened"] - st["closed"] == st["size"]

    wait_until(at_rest, 15)
    (stats,) = pool_stats(alias)
    assert stats["opened"] - stats["closed"] == stats["size"] <= 2, stats
    assert stats["checked_out"] == 0
    settled = monitor.settled_count(app, stats["size"], timeout=10)
    assert settled == pool_stats(alias)[0]["size"]


# -- Django's transaction edge cases through the pool ---------------------------------------

LEASES = ["request", "transaction"]


def _one(cursor: Any, sql: str) -> Any:
    cursor.execute(sql)
    return cursor.fetchone()[0]


@pytest.mark.parametrize("lease", LEASES)
def test_close_inside_atomic_discards_the_connection_and_the_next_request_works(
    pooled_alias, monitor, lease
) -> None:
    from django.db import Error

    alias, app = pooled_alias(pool_options={"pool_size": 1, "max_overflow": 0, "lease": lease})
    conn = connections[alias]
    with transaction.atomic(using=alias):
        with conn.cursor() as cursor:
            first = _one(cursor, "SELECT pg_backend_pid()")
        conn.close()
        assert conn.closed_in_transaction
        # psycopg 3: OperationalError; psycopg2: InterfaceError (not a DatabaseError).
        with pytest.raises(Error, match="closed"):
            with conn.cursor() as cursor:
                cursor.execute("SELECT 1")
    assert conn.connection is None
    second = run_request(alias)
    assert second != first
    (stats,) = pool_stats(alias)
    assert stats["invalidated"] == 1 and stats["checked_out"] == 0 and stats["size"] == 1
    assert monitor.settled_count(app, 1) == 1


@pytest.mark.parametrize("lease", LEASES)
def test_a_connection_created_receiver_that_raises_on_a_reused_connection_leaks_nothing(
    pooled_alias, monitor, lease
) -> None:
    from django.db.backends.signals import connection_created

    alias, app = pooled_alias(pool_options={"pool_size": 1, "max_overflow": 0, "lease": lease})
    pid = run_request(alias)

    def raises(sender: Any, connection: Any, **kwargs: Any) -> None:
        if connection.alias == alias:
            raise RuntimeError("receiver failed")

    connection_created.connect(raises)
    try:
        for _ in range(3):
            with pytest.raises(RuntimeError):
                run_request(alias)
            assert pool_stats(alias)[0]["checked_out"] == 0
    finally:
        connection_created.disconnect(raises)
    assert run_request(alias) == pid
    t = _run(lambda: (run_request(alias), connections[alias].close()))
    t.join(10)  # another thread is not stuck behind a connection left lent
    assert not t.is_alive()
    assert monitor.settled_count(app, 1) == 1


def test_on_commit_callbacks_that_query_with_lease_transaction_storm(pooled_alias) -> None:
    # 4 threads on one connection; each transaction's on_commit callbacks
    # query (borrowing again) and open an atomic block of their own.
    alias, _ = pooled_alias(
        pool_options={"pool_size": 1, "max_overflow": 0, "timeout": 20, "lease": "transaction"}
    )
    errors: list[BaseException] = []
    ran = collections.Counter[str]()
    lock = threading.Lock()

    def worker() -> None:
        conn = connections[alias]

        def callback() -> None:
            with conn.cursor() as cursor:
                _one(cursor, "SELECT pg_backend_pid()")
            with transaction.atomic(using=alias):
                with conn.cursor() as cursor:
                    _one(cursor, "SELECT txid_current()")
            with lock:
                ran["callback"] += 1

        try:
            for _ in range(10):
                with transaction.atomic(using=alias):
                    with conn.cursor() as cursor:
                        _one(cursor, "SELECT txid_current()")
                    transaction.on_commit(callback, using=alias)
                    transaction.on_commit(callback, using=alias)
                assert conn.connection is None  # given back after the callbacks
        except BaseException as error:  # noqa: BLE001
            errors.append(error)
        finally:
            conn.close()

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == [], errors[:3]
    assert ran["callback"] == 80
    (stats,) = pool_stats(alias)
    assert stats["checked_out"] == 0 and stats["opened"] == 1


@pytest.mark.parametrize("lease", LEASES)
def test_a_transaction_begun_by_hand_and_left_open_is_rolled_back_at_request_end(
    pooled_alias, lease
) -> None:
    alias, _ = pooled_alias(pool_options={"pool_size": 1, "max_overflow": 0, "lease": lease})
    conn = connections[alias]

    def dirty(cursor: Any) -> int:
        conn.set_autocommit(False)
        cursor.execute("SELECT set_config('pp.dirty', 'yes', false)")
        return _one(cursor, "SELECT pg_backend_pid()")

    pid = run_request(alias, dirty)
    seen: dict[str, Any] = {}

    def next_borrower(cursor: Any) -> None:
        seen["pid"] = _one(cursor, "SELECT pg_backend_pid()")
        seen["dirty"] = _one(cursor, "SELECT current_setting('pp.dirty', true)")
        seen["autocommit"] = connections[alias].connection.autocommit
        seen["in_tx"] = connections[alias].connection.info.transaction_status

    t = _run(lambda: (run_request(alias, next_borrower), connections[alias].close()))
    t.join(10)
    assert seen["pid"] == pid
    assert seen["dirty"] in ("", None) and seen["autocommit"] is True
    assert conn.get_autocommit() is True  # the wrapper that began it is back to normal
    conn.close()


def _kept_server_side_cursor(alias: str) -> Any:
    """Open a server-side cursor in a request, read from it, end the request; return it."""
    from django.core.signals import request_finished, request_started

    request_started.send(sender=None)
    cursor = connections[alias].chunked_cursor()
    cursor.execute("SELECT generate_series(1, 1000)")
    assert cursor.fetchmany(2) == [(1,), (2,)]
    request_finished.send(sender=None)  # the cursor is kept, the lease is not
    assert connections[alias].connection is None
    assert pool_stats(alias)[0]["checked_out"] == 0
    return cursor


def _use_while_another_borrows(alias: str, use: Any) -> dict[str, Any]:
    """Run ``use()`` while another thread, in a transaction, has the connection."""
    seen: dict[str, Any] = {}
    ready, done = threading.Event(), threading.Event()

    def next_borrower() -> None:
        try:
            with transaction.atomic(using=alias):
                with connections[alias].cursor() as c:
                    seen["cursors"] = _one(c, "SELECT count(*) FROM pg_cursors")
                    seen["txid"] = _one(c, "SELECT txid_current()")
                    ready.set()
                    done.wait(10)
                    seen["txid_after"] = _one(c, "SELECT txid_current()")
        except BaseException as error:  # noqa: BLE001
            seen["error"] = f"{type(error).__name__}: {error}"
        finally:
            connections[alias].close()

    t = _run(next_borrower)
    assert ready.wait(10)
    try:
        seen["use"] = use()
    except Exception as error:  # noqa: BLE001
        seen["use"] = f"{type(error).__name__}: {error}"
    done.set()
    t.join(10)
    return seen


@pytest.mark.parametrize("lease", LEASES)
def test_a_server_side_cursor_kept_past_request_end_fails_to_fetch(pooled_alias, lease) -> None:
    alias, _ = pooled_alias(pool_options={"pool_size": 1, "max_overflow": 0, "lease": lease})
    cursor = _kept_server_side_cursor(alias)
    seen = _use_while_another_borrows(alias, lambda: cursor.fetchmany(2))
    # psycopg 3: "the cursor is closed"; psycopg2: "cursor already closed".
    assert "InterfaceError" in seen["use"] and "closed" in seen["use"], seen
    assert seen["cursors"] == 0 and seen["txid"] == seen["txid_after"], seen
    assert "error" not in seen, seen


@pytest.mark.parametrize("lease", LEASES)
def test_a_server_side_cursor_executed_again_never_runs_on_the_next_borrowers_session(
    pooled_alias, lease
) -> None:
    alias, _ = pooled_alias(pool_options={"pool_size": 1, "max_overflow": 0, "lease": lease})
    cursor = _kept_server_side_cursor(alias)
    seen = _use_while_another_borrows(alias, lambda: cursor.execute("SELECT 1"))
    # It fails clearly. psycopg 3: "the cursor is closed" (its own check sends
    # CLOSE first); psycopg2 refuses any second execute() of a named cursor.
    assert "closed" in seen["use"] or "more than once" in seen["use"], seen
    assert "error" not in seen, seen  # and the other borrower's transaction goes on
    assert seen["txid"] == seen["txid_after"], seen


# -- finalizers run by the garbage collector ----------------------------------------------
#
# The collector runs where a thread allocates: inside psycopg 3's execute(), with the
# connection's lock held (a threading.Lock), or between Django's ensure_connection() and
# create_cursor(). A finalizer that closes a cursor then runs there. A hang in CI
# (dj61-psycopg, an async test whose failed stream left an iterator to the collector)
# is what sent us looking. Each test runs its thread under a watchdog: a finalizer that
# waits for the lock its own thread holds would hang the suite, not fail it.


def _rows_left_to_the_collector(alias: str, *, keep: bool = False) -> Any:
    """Open a server-side cursor in a generator, read from it, leave it in a cycle
    (or return it, if ``keep``: the caller makes the cycle).

    What an abandoned ``QuerySet.iterator()`` is: Django's cursor_iter() closes
    its cursor in a ``finally``, which runs when the collector frees it.
    """

    def rows() -> Any:
        cursor = connections[alias].chunked_cursor()
        try:
            cursor.execute("SELECT generate_series(1, 1000)")
            while True:
                yield cursor.fetchmany(2)
        finally:
            cursor.close()

    gen = rows()
    assert next(gen) == [(1,), (2,)]
    if keep:
        return gen
    cycle: list[Any] = [gen]
    cycle.append(cycle)
    return None


def _watched(alias: str, body: Any) -> dict[str, Any]:
    """Run ``body(wrapper, seen)`` in a thread of its own, connected, with the collector
    off (the body runs it where it means to); if it is still running after 10 s, free
    psycopg 3's connection lock it waits for and tell so. Return ``seen``."""
    seen: dict[str, Any] = {}
    lock_of: list[Any] = []

    def run() -> None:
        try:
            conn = connections[alias]
            conn.ensure_connection()
            lock_of.append(getattr(conn.connection, "lock", None))  # psycopg 3's
            body(conn, seen)
        except BaseException as error:  # noqa: BLE001
            seen.setdefault("error", f"{type(error).__name__}: {error}")
        finally:
            connections[alias].close()

    gc.collect()
    enabled = gc.isenabled()
    gc.disable()  # the test says where the collector runs
    try:
        t = _run(run)
        t.join(10)
        if t.is_alive():
            seen["hung"] = True
            if lock_of and lock_of[0] is not None:
                lock_of[0].release()  # the waiter ends; the test fails, the suite goes on
            t.join(10)
    finally:
        if enabled:
            gc.enable()
    return seen


psycopg3_only = pytest.mark.skipif(
    DRIVER != "psycopg",
    reason="psycopg2 holds its connection's lock only in C, with the GIL released: "
    "no finalizer runs while it is held",
)


@psycopg3_only
@pytest.mark.parametrize("lease", LEASES)
def test_a_kept_server_side_cursor_freed_while_the_next_borrower_is_inside_psycopg_does_not_wait(
    pooled_alias, lease
) -> None:
    alias, _ = pooled_alias(pool_options={"pool_size": 1, "max_overflow": 0, "lease": lease})
    cursor = _kept_server_side_cursor(alias)  # closed at checkin; kept (a generator's)

    def next_borrower(conn: Any, seen: dict[str, Any]) -> None:
        with transaction.atomic(using=alias):
            with conn.cursor() as c:
                seen["txid"] = _one(c, "SELECT txid_current()")
            with conn.connection.lock:  # inside psycopg: where the collector may run
                cursor.close()  # the generator's finally, run by the collector
            with conn.cursor() as c:
                seen["txid_after"] = _one(c, "SELECT txid_current()")

    seen = _watched(alias, next_borrower)
    assert "hung" not in seen and "error" not in seen, seen
    assert seen["txid"] == seen["txid_after"], seen


@psycopg3_only
@pytest.mark.parametrize("lease", LEASES)
def test_an_abandoned_iterator_of_the_current_lease_collected_inside_psycopg_does_not_wait(
    pooled_alias, lease
) -> None:
    # Its cursor is still open: closing it would wait for the lock this thread
    # holds. The close is left to the checkin, which closes every cursor.
    alias, _ = pooled_alias(pool_options={"pool_size": 1, "max_overflow": 0, "lease": lease})

    def borrower(conn: Any, seen: dict[str, Any]) -> None:
        with transaction.atomic(using=alias):
            _rows_left_to_the_collector(alias)
            with conn.connection.lock:  # inside psycopg, when the collector runs
                seen["collected"] = gc.collect()
            with conn.cursor() as c:
                seen["cursors"] = _one(c, "SELECT count(*) FROM pg_cursors")

    seen = _watched(alias, borrower)
    assert "hung" not in seen and "error" not in seen, seen
    assert seen["collected"] > 0 and seen["cursors"] == 1, seen  # left for the checkin
    after: dict[str, Any] = {}

    def next_borrower(conn: Any, seen: dict[str, Any]) -> None:
        with conn.cursor() as c:
            seen["cursors"] = _one(c, "SELECT count(*) FROM pg_cursors")

    after = _watched(alias, next_borrower)
    assert after == {"cursors": 0}, after  # closed at checkin
    assert pool_stats(alias)[0]["invalidated"] == 0


@pytest.mark.parametrize("lease", LEASES)
def test_kept_iterators_freed_by_the_collector_while_the_next_borrower_queries_never_hang(
    pooled_alias, lease
) -> None:
    # The CI hang, made likely: a request leaves an iterator (its cursor) in a
    # cycle; the next borrower of the same connection runs queries while the
    # main thread drops the last reference and waits without allocating, so
    # the next borrower's next allocation runs a full collection and the
    # iterator's finalizer, often inside psycopg with the connection's lock held.
    import weakref

    alias, _ = pooled_alias(
        pool_options={"pool_size": 1, "max_overflow": 0, "timeout": 10, "lease": lease}
    )
    kept: list[Any] = []
    seen: dict[str, Any] = {"queries": 0, "rounds": 0}
    locks: list[Any] = []

    def leaves_an_iterator() -> None:
        from django.core.signals import request_finished, request_started

        request_started.send(sender=None)
        try:
            gen = _rows_left_to_the_collector(alias, keep=True)
            cycle: list[Any] = [gen]
            cycle.append(cycle)
            kept.extend((weakref.ref(gen), cycle))
        finally:
            request_finished.send(sender=None)

    def next_borrower(querying: threading.Event, stop: threading.Event) -> None:
        conn = connections[alias]
        try:
            while not stop.is_set():
                with conn.cursor() as c:
                    c.execute("SELECT 1")
                    c.fetchall()
                seen["queries"] += 1
                locks.append(getattr(conn.connection, "lock", None))  # psycopg 3's
                querying.set()
        except BaseException as error:  # noqa: BLE001
            seen.setdefault("error", f"{type(error).__name__}: {error}")
        finally:
            conn.close()

    thresholds = gc.get_threshold()
    for _ in range(20):
        _run(leaves_an_iterator).join(10)
        ref, cycle = kept
        kept.clear()
        assert ref() is not None
        querying, stop = threading.Event(), threading.Event()
        t = _run(next_borrower, querying, stop)
        assert querying.wait(10)
        gc.set_threshold(1, 1, 1)  # the next allocation collects everything
        try:
            del cycle
            deadline = time.monotonic() + 5
            while ref() is not None and time.monotonic() < deadline:
                time.sleep(0.001)
        finally:
            gc.set_threshold(*thresholds)
        stop.set()
        t.join(10)
        if t.is_alive():
            seen["hung"] = True
            if locks[-1] is not None:
                locks[-1].release()  # the waiter ends; the test fails, the suite goes on
            t.join(10)
            break
        seen["rounds"] += 1
    assert "hung" not in seen and "error" not in seen, seen
    assert seen["rounds"] == 20, seen
    assert pool_stats(alias)[0]["checked_out"] == 0


def test_a_collected_iterator_never_gives_back_the_connection_of_a_thread_about_to_use_it(
    pooled_alias,
) -> None:
    # lease='transaction' gives the connection back when a cursor's close leaves
    # nothing open. Run by the collector, that close may come between Django's
    # ensure_connection() and create_cursor(), or inside psycopg: the thread goes
    # on with a connection it no longer holds (Django: None.cursor()).
    alias, _ = pooled_alias(
        pool_options={"pool_size": 1, "max_overflow": 0, "lease": "transaction"}
    )

    def borrower(conn: Any, seen: dict[str, Any]) -> None:
        _rows_left_to_the_collector(alias)
        seen["collected"] = gc.collect() > 0  # as if run inside the next statement
        seen["held"] = conn.connection is not None
        seen["checked_out"] = pool_stats(alias)[0]["checked_out"]
        with conn.cursor() as c:
            seen["cursors"] = _one(c, "SELECT count(*) FROM pg_cursors")

    seen = _watched(alias, borrower)
    assert seen == {"collected": True, "held": True, "checked_out": 1, "cursors": 0}, seen
    assert pool_stats(alias)[0]["checked_out"] == 0  # given back at the statement's end


def test_pgpool_called_inside_a_transaction_leaves_the_callers_connection_alone(
    pooled_alias,
) -> None:
    # call_command("pgpool") from code that is inside an atomic block (a
    # TestCase, a view): the command borrows this thread's wrapper.
    import io

    from django.core.management import call_command

    alias, _ = pooled_alias(pool_options={"pool_size": 2, "max_overflow": 0})
    conn = connections[alias]
    with transaction.atomic(using=alias):
        with conn.cursor() as cursor:
            txid = _one(cursor, "SELECT txid_current()")
        call_command("pgpool", database=[alias], json=True, stdout=io.StringIO())
        assert not conn.closed_in_transaction
        with conn.cursor() as cursor:
            assert _one(cursor, "SELECT txid_current()") == txid


# -- thread sharing ----------------------------------------------------------------------


def test_a_shared_wrapper_closed_by_two_threads_at_once_is_given_back_once(pooled_alias) -> None:
    # allow_thread_sharing: two threads close the wrapper at once while two
    # others wait for the pool's only connection. One check-in, one hand-off.
    import sys

    alias, _ = pooled_alias(pool_options={"pool_size": 1, "max_overflow": 0, "timeout": 10})
    conn = connections[alias]
    conn.inc_thread_sharing()
    lock = threading.Lock()
    claims: dict[int, int] = {}
    twice: list[int] = []
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)

    def waiter() -> None:
        try:
            with connections[alias].cursor() as c:
                pid = _one(c, "SELECT pg_backend_pid()")
                with lock:
                    if pid in claims:
                        twice.append(pid)
                    claims[pid] = claims.get(pid, 0) + 1
                time.sleep(0.005)
                with lock:
                    claims[pid] -= 1
                    if not claims[pid]:
                        del claims[pid]
        finally:
            connections[alias].close()

    try:
        for _ in range(30):
            conn.ensure_connection()
            waiters = [_run(waiter) for _ in range(2)]
            deadline = time.monotonic() + 5
            while pool_stats(alias)[0]["waiting"] < 2 and time.monotonic() < deadline:
                time.sleep(0.0005)
            barrier = threading.Barrier(2)
            closers = [_run(lambda b: (b.wait(5), conn.close()), barrier) for _ in range(2)]
            for t in closers + waiters:
                t.join(10)
        stats = pool_stats(alias)[0]
    finally:
        sys.setswitchinterval(old)
        conn.dec_thread_sharing()
    assert twice == [], (len(twice), stats)
    assert stats["checked_out"] == 0 and stats["size"] == 1


def test_a_wrapper_shared_by_a_thread_that_ended_is_not_reclaimed_from_its_users(
    pooled_alias,
) -> None:
    # LiveServerTestCase's way round: a thread borrows, shares its wrapper
    # (inc_thread_sharing) with the main thread and ends. A waiter at the cap
    # must time out, not take the connection the main thread is using.
    from django_postgrespool import PoolTimeout

    alias, _ = pooled_alias(pool_options={"pool_size": 1, "max_overflow": 0, "timeout": 0.6})
    shared: list[Any] = []

    def lends_its_wrapper() -> None:
        conn = connections[alias]
        with conn.cursor() as c:
            _one(c, "SELECT 1")
        conn.inc_thread_sharing()
        shared.append(conn)

    _run(lends_its_wrapper).join(10)
    conn = shared[0]
    with conn.cursor() as c:
        c.execute("BEGIN")
        pid = _one(c, "SELECT pg_backend_pid()")
    outcome: list[str] = []

    def waiter() -> None:
        try:
            run_request(alias)
            outcome.append("got it")
        except PoolTimeout:
            outcome.append("timeout")
        finally:
            connections[alias].close()

    t = _run(waiter)
    t.join(10)
    assert outcome == ["timeout"]
    with conn.cursor() as c:
        assert _one(c, "SELECT pg_backend_pid()") == pid
        c.execute("ROLLBACK")
    conn.close()
    conn.dec_thread_sharing()
    assert pool_stats(alias)[0]["checked_out"] == 0
    assert run_request(alias) == pid


# -- async, health checks, shutdown --------------------------------------------------------


def test_sync_to_async_thread_sensitive_and_not_share_no_session(pooled_alias) -> None:
    import asyncio

    from asgiref.sync import async_to_sync, sync_to_async

    alias, _ = pooled_alias(pool_options={"pool_size": 2, "max_overflow": 0, "timeout": 20})
    body = one_thread_per_backend(0.001)

    def view() -> int:
        return run_request(alias, body)

    async def main() -> list[int]:
        calls = [sync_to_async(view, thread_sensitive=n % 2 == 0)() for n in range(40)]
        return await asyncio.gather(*calls)

    pids = async_to_sync(main)()
    assert len(pids) == 40 and len(set(pids)) <= 2
    stats = pool_stats(alias)[0]
    assert stats["opened"] <= 2


def test_errors_and_a_terminated_backend_with_conn_health_checks_and_persistent_connections(
    pooled_alias, monitor
) -> None:
    from django.db import DatabaseError

    alias, app = pooled_alias(
        pool_options={"pool_size": 1, "max_overflow": 0},
        CONN_MAX_AGE=60,
        CONN_HEALTH_CHECKS=True,
    )
    pid = run_request(alias)

    def fails(cursor: Any) -> None:
        cursor.execute("SELECT 1/0")

    with pytest.raises(DatabaseError):
        run_request(alias, fails)
    assert run_request(alias) == pid  # usable: kept (Django's rule), same session
    assert monitor.terminate(app) == 1
    assert monitor.settled_count(app, 0) == 0
    assert run_request(alias) != pid  # Django's health check saw it: a new one, no error
    stats = pool_stats(alias)[0]
    assert stats["invalidated"] == 1 and stats["size"] == 1


_EXITING = """
import sys, threading, time
sys.path.insert(0, {root!r})
from tests.support import settings as ts
ts.configure({url!r})
from django.conf import settings
from django.db import connections
entry = ts.database_settings(application_name={app!r})
entry["POOL_OPTIONS"] = {{
    "pool_size": 2, "max_overflow": 1, "timeout": 5, "max_idle": 0.001, "leak_timeout": 0.001,
}}
both = {{"default": connections.settings["default"], "x": entry}}
connections.settings["x"] = connections.configure_settings(both)["x"]
settings.POSTGRESPOOL_METRICS_INTERVAL = 0.001
from django_postgrespool.metrics import sampler
sampler.subscribe(lambda stats: None)
sampler.ensure_running()
from tests.support.requests import run_request

def loop():
    while True:
        run_request("x", lambda c: c.execute("SELECT pg_sleep(0.001)"))

for _ in range(5):
    threading.Thread(target=loop, daemon=True).start()
time.sleep(0.4)
print("exiting", flush=True)
sys.exit(0)
"""


def test_interpreter_exit_with_the_housekeeper_sampler_and_borrowers_running(
    server_url, monitor
) -> None:
    # Daemon threads (the housekeeper sweeping and warning every millisecond,
    # the sampler, borrowers at the cap) while the interpreter exits.
    import subprocess
    import sys

    from tests.support.settings import unique_name

    root = str(Path(__file__).resolve().parents[2])
    app = unique_name("exit")
    for _ in range(2):
        done = subprocess.run(
            [sys.executable, "-c", _EXITING.format(root=root, url=server_url, app=app)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout.strip() == "exiting"
        for bad in ("Traceback", "Exception ignored", "Fatal Python error", "failed"):
            assert bad not in done.stderr, done.stderr[-3000:]
    assert monitor.settled_count(app, 0, timeout=10) == 0


_POOLS_WHILE_THE_HOUSEKEEPER_RUNS = """
import sys, threading
sys.setswitchinterval(1e-6)
from django_postgrespool.options import PoolOptions
from django_postgrespool.pool import ConnectionPool, Target
died = []
threading.excepthook = lambda args: died.append(repr(args.exc_value))
target = Target(database="d", host="h", port="1", user="u")
pools = []
for n in range(5000):
    # Each new pool with max_idle joins the housekeeper's set, and wakes it.
    pools.append(ConnectionPool(f"tenant{n}", PoolOptions(max_idle=0.05), target))
    if died:
        break
alive = any(t.name == "django_postgrespool housekeeper" for t in threading.enumerate())
print(alive, died, len(pools))
"""


def test_the_housekeeper_survives_pools_being_built_while_it_runs() -> None:
    # In a subprocess: a housekeeper that died would stay dead in this one.
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", _POOLS_WHILE_THE_HOUSEKEEPER_RUNS],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("True [] 5000"), done.stdout


_STATS_WHILE_POOLS_ARE_RETIRED = """
import sys, threading
sys.setswitchinterval(1e-6)
from django_postgrespool import registry
from django_postgrespool.options import PoolOptions
from django_postgrespool.pool import ConnectionPool, Target
target = Target(database="d", host="h", port="1", user="u")
kept, errors, stop = [], [], threading.Event()

def build():
    kept.append(ConnectionPool("tenant", PoolOptions(pool_size=1), target))
    return kept[-1]

def reader():  # pgpool, a Prometheus scrape, the OpenTelemetry callbacks
    while not stop.is_set():
        try:
            registry.all_pools()
            registry.pool_stats()
        except Exception as error:
            errors.append(repr(error))

t = threading.Thread(target=reader)
t.start()
for n in range(3000):
    registry.get_pool(("tenant", n), build)  # retires the one before
stop.set()
t.join()
# Drained, the retired pools leave the registry; each is counted once in the departed totals.
print(len(errors), errors[:1], len(registry.all_pools()), registry.departed_stats()[0]["pools"])
"""


def test_pool_stats_while_pools_are_retired_in_another_thread() -> None:
    # The registry's retired pools were a WeakSet read without its lock: a
    # pool retired by another thread meanwhile raised "Set changed size
    # during iteration" out of pool_stats() (24 times in 3 000 retirements).
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", _STATS_WHILE_POOLS_ARE_RETIRED],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("0 [] 1 2999"), done.stdout
