"""Adversarial tests of the pool core: races made likely, exceptions at bad moments.

Unit tests build a ConnectionPool directly on a fake DB-API (as test_pool_unit.py
does) whose cursor, rollback and connect can be made to raise or to run code at
the moment they are called; integration tests run on the suite's PostgreSQL.
"""

from __future__ import annotations

import collections
import contextlib
import gc
import random
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from django.db import connections, transaction
from django_postgrespool import PoolTimeout, pool_stats
from django_postgrespool import pool as pool_module
from django_postgrespool.errors import PoolError
from django_postgrespool.options import PoolOptions
from django_postgrespool.pool import GONE, IDLE, IN_USE, ConnectionPool, Lease, Target

from tests.support.requests import one_thread_per_backend, run_request

TARGET = Target(database="db", host="h", port="1", user="u")
_INTRANS = 2


class Interrupted(BaseException):
    """Stands for KeyboardInterrupt, SystemExit or gevent.Timeout (pytest treats the
    real KeyboardInterrupt as a request to stop the session)."""


class SignalRaised(Exception):
    """What a signal handler raises (RQ's job timeout, a request deadline)."""


class FakeCursor:
    def __init__(self, conn: FakeConnection) -> None:
        self.conn = conn
        self.closed = False

    def close(self) -> None:
        self.closed = True

    def execute(self, sql: str, params: Any = None) -> None:
        if self.closed or self.conn.closed:
            raise RuntimeError("cursor or connection closed")
        hook = FakeConnection.on_execute
        if hook is not None:
            hook(self.conn)

    def fetchone(self) -> tuple[bool]:
        return (True,)

    def __enter__(self) -> FakeCursor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class FakePGconn:
    transaction_status = 0


class FakeConnection:
    """A physical connection: a socketpair (the socket pre-ping polls it) and a status.

    ``user`` is who has it now, written by the tests' borrowers: a second
    borrower of one connection at a time is seen there.
    """

    on_execute: Callable[[FakeConnection], None] | None = None
    on_rollback: Callable[[FakeConnection], None] | None = None
    every: list[FakeConnection] = []

    def __init__(self) -> None:
        self.pgconn = FakePGconn()
        self.autocommit = True
        self.closed = False
        self.user: object = None
        self._sock, self.server_side = socket.socketpair()
        FakeConnection.every.append(self)

    def fileno(self) -> int:
        return self._sock.fileno()

    def cursor(self) -> FakeCursor:
        return FakeCursor(self)

    def rollback(self) -> None:
        hook = FakeConnection.on_rollback
        if hook is not None:
            hook(self)
        self.pgconn.transaction_status = 0

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.pgconn.transaction_status = 4
            self._sock.close()
            self.server_side.close()


@pytest.fixture(autouse=True)
def _fake_db_reset() -> Iterator[None]:
    FakeConnection.on_execute = FakeConnection.on_rollback = None
    FakeConnection.every = []
    yield
    FakeConnection.on_execute = FakeConnection.on_rollback = None
    for conn in FakeConnection.every:
        conn.close()
    FakeConnection.every = []


@contextlib.contextmanager
def racy() -> Iterator[None]:
    """Switch threads as often as CPython allows."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(old)


def make_pool(**options: object) -> ConnectionPool:
    opts = {"pool_size": 2, "max_overflow": 0, "timeout": 5.0, **options}
    return ConnectionPool(
        "fake",
        PoolOptions(**opts),  # type: ignore[arg-type]
        TARGET,
        connect_errors=(ConnectionRefusedError,),
    )


def assert_quiescent(pool: ConnectionPool) -> None:
    """Nothing lent, nothing lost, nobody waiting; every count agrees with every other."""
    stats = pool.stats()
    assert not pool._waiters and stats["waiting"] == 0
    assert stats["checked_out"] == 0, stats
    assert all(lease.state is IDLE for lease in pool._leases)
    assert len(pool._idle) == len(pool._leases) == pool._queue.checkedout() == stats["size"]
    assert stats["opened"] - stats["closed"] == stats["size"] <= pool.options.max_connections
    # Every physical connection is either one of the pool's idle ones, or closed.
    open_raw = {id(c) for c in FakeConnection.every if not c.closed}
    assert open_raw == {id(lease.raw) for lease in pool._leases}


def me() -> threading.Thread:
    return threading.current_thread()


# -- storms: no connection lent twice, no slot lost, counters that add up ---------------


@pytest.mark.parametrize("lifo", [False, True])
@pytest.mark.parametrize("max_overflow", [0, 2])
@pytest.mark.parametrize("fair_after", [0.0, 0.03])
def test_storm_lends_no_connection_twice_and_counts_every_checkout(
    fair_after: float, max_overflow: int, lifo: bool
) -> None:
    # 10 threads on 2 (+2) connections, short timeouts, affinity and not, a
    # switch at nearly every bytecode: a connection given to two borrowers is
    # seen on its `user`, a lost slot in the final counts.
    pool = make_pool(
        pool_size=2, max_overflow=max_overflow, timeout=0.02, fair_after=fair_after, use_lifo=lifo
    )
    counts = collections.Counter[str]()
    errors: list[BaseException] = []
    lock = threading.Lock()
    barrier = threading.Barrier(10)

    def borrower(n: int) -> None:
        rng = random.Random(n)
        last: Lease | None = None
        try:
            barrier.wait(10)
            for _ in range(150):
                try:
                    lease = pool.checkout(FakeConnection, last if n % 2 else None, me())
                except PoolTimeout:
                    with lock:
                        counts["timeout"] += 1
                    continue
                token = object()
                assert lease.raw.user is None, "lent to two borrowers at once"
                assert lease.state is IN_USE and lease.owner is me()
                lease.raw.user = token
                if rng.random() < 0.3:
                    time.sleep(rng.choice((0.0, 0.0005, 0.002)))
                assert lease.raw.user is token, "another borrower used it meanwhile"
                if rng.random() < 0.2:
                    lease.raw.pgconn.transaction_status = _INTRANS
                lease.raw.user = None
                pool.checkin(lease)
                last = lease
                with lock:
                    counts["ok"] += 1
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    with racy():
        threads = [threading.Thread(target=borrower, args=(n,)) for n in range(10)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert not any(t.is_alive() for t in threads), "a borrower hung"
    assert errors == []
    stats = pool.stats()
    assert counts["ok"] + counts["timeout"] == 1500
    assert counts["ok"] > 150  # the storm ran: most checkouts were served
    assert stats["checkouts"] == counts["ok"]
    assert stats["timeouts"] == counts["timeout"]
    assert stats["handoffs"] <= stats["checkouts"]
    assert stats["affinity_hits"] <= stats["checkouts"]
    assert stats["wait_time_histogram"]["count"] == counts["ok"]
    assert stats["use_time_histogram"]["count"] == counts["ok"]
    assert stats["peak_checked_out"] <= pool.options.max_connections
    assert stats["size"] <= pool.options.pool_size  # overflow closed as it came back
    assert_quiescent(pool)


def test_storm_with_dying_borrowers_and_gc_at_every_allocation_reclaims_every_slot() -> None:
    # Threads that end holding a connection, others that time out, the
    # collector at every allocation: each dead borrower's connection comes
    # back (reclaimed by a waiter or a checkout at the cap), none twice.
    pool = make_pool(pool_size=2, max_overflow=1, timeout=0.5, fair_after=0.0)
    errors: list[BaseException] = []
    died = collections.Counter[str]()

    def dies_holding() -> None:
        try:
            lease = pool.checkout(FakeConnection, None, me())
            assert lease.raw.user in (None, "the dead")  # reclaimed from another dead one
            lease.raw.user = "the dead"  # it never says it gave the connection back
            lease.raw.pgconn.transaction_status = _INTRANS
            died["held"] += 1
        except PoolTimeout:
            died["timeout"] += 1
        except BaseException as error:  # noqa: BLE001
            errors.append(error)

    def churn() -> None:
        try:
            for _ in range(60):
                try:
                    lease = pool.checkout(FakeConnection, None, me())
                except PoolTimeout:
                    continue
                # A reclaimed connection was reset: the dead thread's mark is ours to clear.
                assert lease.raw.user in (None, "the dead")
                assert lease.raw.pgconn.transaction_status == 0
                lease.raw.user = me()
                [object() for _ in range(3)]
                assert lease.raw.user is me()
                lease.raw.user = None
                pool.checkin(lease)
        except BaseException as error:  # noqa: BLE001
            errors.append(error)

    old = gc.get_threshold()
    gc.set_threshold(1)
    try:
        with racy():
            threads = [threading.Thread(target=churn) for _ in range(4)]
            threads += [threading.Thread(target=dies_holding) for _ in range(12)]
            random.Random(7).shuffle(threads)
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
    finally:
        gc.set_threshold(*old)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    # Whatever the dead still hold is reclaimed by checkouts at the cap.
    leases = [pool.checkout(FakeConnection, None, me()) for _ in range(3)]
    for lease in leases:
        lease.raw.user = None
        pool.checkin(lease)
    stats = pool.stats()
    assert stats["reclaimed"] >= died["held"] - 3
    assert_quiescent(pool)


def test_storm_of_connect_failures_while_others_wait_leaves_no_slot_lost() -> None:
    # Connection attempts fail at random (the backoff then answers at once),
    # while borrowers wait at the cap and give up: every failure frees its
    # slot, and the waiters hear of it.
    pool = make_pool(pool_size=2, max_overflow=2, timeout=0.05, fair_after=0.0)
    rng = random.Random(3)
    outcome = collections.Counter[str]()
    lock = threading.Lock()
    errors: list[BaseException] = []

    refused = [0]

    def connect() -> FakeConnection:
        if rng.random() < 0.3:
            with lock:
                refused[0] += 1
            raise ConnectionRefusedError("refused")
        return FakeConnection()

    stop = time.monotonic() + 1.0

    def borrower() -> None:
        try:
            while time.monotonic() < stop:
                try:
                    lease = pool.checkout(connect, None, me())
                except (ConnectionRefusedError, PoolError) as error:
                    key = type(error).__name__
                    time.sleep(0.005)  # a failed request; the backoff lasts 0.1 s at least
                else:
                    assert lease.raw.user is None
                    lease.raw.user = me()
                    time.sleep(0.0005)
                    lease.raw.user = None
                    # Overflow closes at checkin: later checkouts must connect again.
                    pool.checkin(lease)
                    key = "ok"
                with lock:
                    outcome[key] += 1
        except BaseException as error:  # noqa: BLE001
            errors.append(error)

    with racy():
        threads = [threading.Thread(target=borrower) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    assert outcome["ok"] > 50 and refused[0] > 0, outcome
    stats = pool.stats()
    assert stats["checkouts"] == outcome["ok"]
    # A refused checkout fails with the driver's error when nothing of the
    # pool's is lent, else it waits for a connection given back (PoolTimeout,
    # the refusal as its cause, when none comes within the timeout).
    assert stats["connect_failures"] == refused[0]
    assert refused[0] >= outcome["ConnectionRefusedError"]
    assert_quiescent(pool)


@pytest.mark.parametrize("retired", [False, True])
def test_close_while_threads_wait_hangs_nobody_and_closes_every_connection(retired: bool) -> None:
    # close() (a settings change retires the pool) while borrowers hold and
    # wait: waiters are served or time out, and every connection of the
    # closed pool is closed when given back.
    pool = make_pool(pool_size=2, max_overflow=1, timeout=0.3, fair_after=0.0)
    errors: list[BaseException] = []
    closing = threading.Event()

    def borrower() -> None:
        try:
            while not closing.is_set() or pool._waiters:
                try:
                    lease = pool.checkout(FakeConnection, None, me())
                except PoolTimeout:
                    continue
                assert lease.raw.user is None
                lease.raw.user = me()
                time.sleep(0.002)
                lease.raw.user = None
                pool.checkin(lease)
                if closing.is_set():
                    return
        except BaseException as error:  # noqa: BLE001
            errors.append(error)

    with racy():
        threads = [threading.Thread(target=borrower) for _ in range(8)]
        for t in threads:
            t.start()
        time.sleep(0.2)
        closing.set()
        pool.close(retired=retired)
        for t in threads:
            t.join(30)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    # No second close(): a checkin that began before close() retires its
    # connection itself (test_a_checkin_that_overlaps_close_leaves_no_open_connection).
    stats = pool.stats()
    assert stats["size"] == 0 and stats["checked_out"] == 0 and not pool._waiters
    assert all(c.closed for c in FakeConnection.every)


# -- the hand-off: no waiter misses a connection given back ------------------------------


@pytest.mark.parametrize("wake_up", ["eventfd, fair_after=0", "lock, default fair_after"])
def test_a_checkin_while_a_checkout_joins_the_line_is_not_missed(
    wake_up: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The GIL switches between the waiter's look at _idle (empty) and its
    # append to _waiters; the holder gives its connection back right then.
    # Forced here; with sys.setswitchinterval(1e-6) it happens on its own.
    if wake_up.startswith("lock"):  # no eventfd (macOS, Windows): no guard wakes it
        monkeypatch.setattr(pool_module, "_HAS_EVENTFD", False)
        pool = make_pool(pool_size=1, timeout=3.0)
    else:
        pool = make_pool(pool_size=1, timeout=3.0, fair_after=0.0)
    held = pool.checkout(FakeConnection, None, me())
    take_idle = pool._take_idle
    fired = threading.Event()

    def take_idle_then_switch() -> Lease | None:
        lease = take_idle()
        if lease is None and pool._lock.locked() and not fired.is_set():
            fired.set()  # inside _wait_as: the holder's checkin runs now
            giver = threading.Thread(target=pool.checkin, args=(held,))
            giver.start()
            giver.join(0.2)  # bounded: a fixed _wait_as may hold the lock it needs
        return lease

    monkeypatch.setattr(pool, "_take_idle", take_idle_then_switch)
    got: list[Lease] = []
    waiter = threading.Thread(target=lambda: got.append(pool.checkout(FakeConnection, None, me())))
    waiter.start()
    waiter.join(5)
    assert fired.is_set() and got
    (lease,) = got
    assert lease is held
    # Served within the giver's bounded join (0.2 s), not at the deadline (3 s).
    assert lease.wait < 1.5, f"an idle connection was left while the waiter slept {lease.wait:.2f}s"
    pool.checkin(lease)


def test_a_late_second_checkin_of_one_checkout_lends_it_once() -> None:
    # Two checkins of one checkout (a wrapper closed twice): the first hands the
    # connection to a waiter, whose checkout may complete before the second
    # checkin runs. The second names the checkout it gives back and does nothing.
    pool = make_pool(pool_size=1, timeout=2.0, fair_after=0.0)
    twice = 0

    def borrow(got: list[Lease]) -> None:
        got.append(pool.checkout(FakeConnection, None, None))

    def give_back(barrier: threading.Barrier, lease: Lease, borrowed_at: float) -> None:
        barrier.wait(5)
        pool.checkin(lease, None, borrowed_at)

    for _ in range(50):
        lease = pool.checkout(FakeConnection, None, None)
        got: list[Lease] = []
        waiters = [threading.Thread(target=borrow, args=(got,)) for _ in range(2)]
        for w in waiters:
            w.start()
        while len(pool._waiters) < 2:
            time.sleep(0.0005)
        barrier = threading.Barrier(2)
        givers = [
            threading.Thread(target=give_back, args=(barrier, lease, lease.borrowed_at))
            for _ in range(2)
        ]
        for t in givers:
            t.start()
        for t in givers:
            t.join(5)
        for w in waiters:
            w.join(0.05)
        twice += len(got) == 2
        while got:  # each waiter gives back what it got, letting the other in
            pool.checkin(got.pop(0))
            for w in waiters:
                w.join(0.05)
        for w in waiters:
            w.join(5)
        while got:
            pool.checkin(got.pop(0))
    assert twice == 0, f"lent to both waiters in {twice} of 50 rounds"
    assert_quiescent(pool)


def test_a_checkin_from_another_thread_racing_a_reclaim_lends_once() -> None:
    # A thread ends holding a connection; its wrapper, still reachable (a kept
    # cursor), is closed from another thread while a checkout at the cap
    # reclaims that connection. One of the two gets it.
    pool = make_pool(pool_size=1, timeout=2.0)
    both = 0

    def borrow(got: list[Lease], barrier: threading.Barrier | None = None) -> None:
        if barrier is not None:
            barrier.wait(5)
        got.append(pool.checkout(FakeConnection, None, me()))

    def closer(barrier: threading.Barrier, lease: Lease, borrowed_at: float) -> None:
        barrier.wait(5)
        pool.checkin(lease, None, borrowed_at)

    with racy():
        for _ in range(1000):
            box: list[Lease] = []
            ended = threading.Thread(target=borrow, args=(box,))
            ended.start()
            ended.join(5)
            (lease,) = box
            got: list[Lease] = []
            barrier = threading.Barrier(2)
            pair = [
                threading.Thread(target=borrow, args=(got, barrier)),  # reclaims it
                threading.Thread(target=closer, args=(barrier, lease, lease.borrowed_at)),
            ]
            for t in pair:
                t.start()
            for t in pair:
                t.join(5)
            (mine,) = got
            if mine in pool._idle or mine.state is not IN_USE:  # idle and lent at once
                both += 1
                pool._idle.pop(mine, None)
                mine.state = IN_USE
            pool.checkin(mine)
    assert both == 0, f"lent and idle at once in {both} of 1000 rounds"
    assert_quiescent(pool)


# -- exceptions at bad moments -----------------------------------------------------------


@contextlib.contextmanager
def alarm_raises(after: float) -> Iterator[None]:
    """Have SIGALRM raise SignalRaised in the main thread ``after`` seconds from now."""

    def handler(signum: int, frame: Any) -> None:
        raise SignalRaised("deadline")

    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, after)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


needs_main_thread = pytest.mark.skipif(
    threading.current_thread() is not threading.main_thread(), reason="signals: main thread"
)


@needs_main_thread
@pytest.mark.parametrize("fair_after", [0.0, 0.03])
def test_an_exception_raised_during_a_wait_leaves_no_ghost_waiter(fair_after: float) -> None:
    pool = make_pool(pool_size=1, timeout=5.0, fair_after=fair_after)
    held = pool.checkout(FakeConnection, None, None)  # owner None: never reclaimed
    with pytest.raises(SignalRaised), alarm_raises(0.1):
        pool.checkout(FakeConnection, None, me())
    waiting = pool.stats()["waiting"]
    pool.checkin(held)
    again = pool.checkout(FakeConnection, None, me()) if waiting == 0 else None
    assert waiting == 0, "the interrupted checkout is still in the line"
    assert again is held
    pool.checkin(again)
    assert_quiescent(pool)


@needs_main_thread
def test_a_base_exception_during_the_checkout_ping_loses_no_slot() -> None:
    pool = make_pool(pool_size=1, timeout=0.3, pre_ping=True)
    lease = pool.checkout(FakeConnection, None, me())
    pool.checkin(lease)

    def interrupted(conn: FakeConnection) -> None:
        raise Interrupted

    FakeConnection.on_execute = interrupted  # a KeyboardInterrupt during the round trip
    with pytest.raises(Interrupted):
        pool.checkout(FakeConnection, lease, me())
    FakeConnection.on_execute = None
    stats = pool.stats()
    assert stats["checked_out"] == 0, f"nobody has it, yet it is counted as lent: {stats}"
    pool.checkin(pool.checkout(FakeConnection, None, me()))


def test_a_base_exception_during_the_checkin_rollback_loses_no_slot() -> None:
    pool = make_pool(pool_size=1, timeout=0.3)
    lease = pool.checkout(FakeConnection, None, me())  # this thread lives on (a worker)
    lease.raw.pgconn.transaction_status = _INTRANS

    def interrupted(conn: FakeConnection) -> None:
        raise Interrupted

    FakeConnection.on_rollback = interrupted
    with pytest.raises(Interrupted):
        pool.checkin(lease)
    FakeConnection.on_rollback = None
    outcome: list[object] = []

    def other() -> None:
        try:
            pool.checkin(pool.checkout(FakeConnection, None, me()))
            outcome.append("ok")
        except PoolTimeout as error:
            outcome.append(error)

    t = threading.Thread(target=other)
    t.start()
    t.join(5)
    assert outcome == ["ok"], f"{lease!r} (owner alive) is never given back: {outcome}"


def test_a_base_exception_while_reclaiming_a_dead_threads_connection_loses_no_slot() -> None:
    pool = make_pool(pool_size=1, timeout=0.3)

    def dies_in_a_transaction() -> None:
        lease = pool.checkout(FakeConnection, None, me())
        lease.raw.pgconn.transaction_status = _INTRANS

    t = threading.Thread(target=dies_in_a_transaction)
    t.start()
    t.join()

    def interrupted(conn: FakeConnection) -> None:
        raise Interrupted

    FakeConnection.on_rollback = interrupted  # the reclaim's rollback is interrupted
    with pytest.raises(Interrupted):
        pool.checkout(FakeConnection, None, me())
    FakeConnection.on_rollback = None
    states = [lease.state for lease in pool._leases]
    lease = pool.checkout(FakeConnection, None, me())  # PoolTimeout: the slot is gone
    pool.checkin(lease)
    assert states in ([], [GONE]), states


def test_a_checkin_that_overlaps_close_leaves_no_open_connection() -> None:
    pool = make_pool(pool_size=1)
    lease = pool.checkout(FakeConnection, None, me())
    lease.raw.pgconn.transaction_status = _INTRANS  # the reset takes a round trip

    def close_meanwhile(conn: FakeConnection) -> None:
        FakeConnection.on_rollback = None
        closer = threading.Thread(target=pool.close, kwargs={"retired": True})
        closer.start()  # registry.close_pools() / a settings change, in another thread
        closer.join(5)

    FakeConnection.on_rollback = close_meanwhile
    pool.checkin(lease)
    assert pool.closed
    assert lease.state is GONE and lease.raw.closed, (
        f"{lease!r}: an idle, open connection in a closed pool ({pool.stats()['idle']} idle)"
    )


def test_a_connect_failure_while_others_wait_wakes_them_without_losing_the_slot() -> None:
    # Several checkouts wait at the cap behind one that is connecting; it
    # fails with a BaseException (interrupted). Its slot is given back and
    # the waiters go on: one connects, the others are handed connections.
    pool = make_pool(pool_size=1, max_overflow=1, timeout=3.0, fair_after=0.0)
    held = pool.checkout(FakeConnection, None, me())
    release = threading.Event()
    calls = collections.Counter[str]()

    def slow_then_interrupted() -> FakeConnection:
        calls["attempt"] += 1
        if calls["attempt"] == 1:
            release.wait(5)
            raise Interrupted
        return FakeConnection()

    outcome: list[object] = []

    def first() -> None:
        try:
            pool.checkout(slow_then_interrupted, None, me())
        except Interrupted:
            outcome.append("interrupted")

    def waiter() -> None:
        lease = pool.checkout(slow_then_interrupted, None, me())
        assert lease.raw.user is None
        lease.raw.user = me()
        time.sleep(0.01)
        lease.raw.user = None
        pool.checkin(lease)
        outcome.append("ok")

    a = threading.Thread(target=first)
    a.start()
    while not calls:
        time.sleep(0.001)
    waiters = [threading.Thread(target=waiter) for _ in range(4)]
    for t in waiters:
        t.start()
    deadline = time.monotonic() + 5
    while len(pool._waiters) < 4 and time.monotonic() < deadline:
        time.sleep(0.001)
    started = time.monotonic()
    release.set()
    a.join(5)
    for t in waiters:
        t.join(10)
    took = time.monotonic() - started
    pool.checkin(held)
    assert sorted(map(str, outcome)) == ["interrupted"] + ["ok"] * 4
    assert took < 1.5  # woken by the failure, not by their timeouts
    assert_quiescent(pool)


# -- against PostgreSQL --------------------------------------------------------------------


@pytest.mark.parametrize("fair_after", [0, 0.03])
def test_lease_transaction_storm_never_shares_a_session(pooled_alias, monitor, fair_after) -> None:
    # lease='transaction', 8 threads on 2 connections: each statement outside
    # a transaction and each atomic block borrows. A backend claimed by two
    # threads at once, or a transaction that moves to another backend (a
    # cursor running on someone else's session), fails the test.
    alias, app = pooled_alias(
        pool_options={
            "pool_size": 2,
            "max_overflow": 0,
            "timeout": 10,
            "lease": "transaction",
            "fair_after": fair_after,
        }
    )
    claims: dict[int, int] = {}
    lock = threading.Lock()
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def claim(pid: int) -> None:
        with lock:
            holder = claims.get(pid)
            assert holder is None, f"backend {pid} lent to two threads at once"
            claims[pid] = threading.get_ident()

    def unclaim(pid: int) -> None:
        with lock:
            assert claims.pop(pid) == threading.get_ident()

    def worker(n: int) -> None:
        conn = connections[alias]
        try:
            barrier.wait(10)
            for i in range(12):
                with transaction.atomic(using=alias):
                    with conn.cursor() as cursor:
                        cursor.execute("SELECT pg_backend_pid(), txid_current()")
                        pid, txid = cursor.fetchone()
                    claim(pid)
                    try:
                        with conn.cursor() as cursor:  # a cursor closed mid-transaction
                            cursor.execute("SELECT pg_sleep(0.001)")
                        with conn.cursor() as cursor:
                            cursor.execute("SELECT pg_backend_pid(), txid_current()")
                            assert cursor.fetchone() == (pid, txid), "left its session"
                    finally:
                        unclaim(pid)
                if i % 3 == 0:
                    with conn.cursor() as cursor:  # autocommit: borrowed for one statement
                        cursor.execute("SELECT 1")
                    assert conn.connection is None  # given back once the cursor closed
        except BaseException as error:  # noqa: BLE001
            errors.append(error)
        finally:
            conn.close()

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    assert errors == [], errors[:3]
    (stats,) = pool_stats(alias)
    assert stats["checked_out"] == 0 and stats["size"] == stats["idle"] == 2
    assert stats["opened"] == 2 and stats["closed"] == 0
    assert stats["handoffs"] + stats["affinity_hits"] <= stats["checkouts"]
    assert monitor.settled_count(app, 2) == 2


def test_request_storm_with_overflow_and_timeouts_keeps_counts(pooled_alias, monitor) -> None:
    # lease='request', overflow, short timeouts, gc at every allocation: the
    # server's sessions, the pool's counters and the borrowers agree.
    alias, app = pooled_alias(
        pool_options={"pool_size": 2, "max_overflow": 2, "timeout": 0.05, "fair_after": 0}
    )
    body = one_thread_per_backend(0.002)
    lock = threading.Lock()
    outcome = collections.Counter[str]()
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            for _ in range(20):
                try:
                    run_request(alias, body)
                    key = "ok"
                except PoolTimeout:
                    key = "timeout"
                with lock:
                    outcome[key] += 1
        except BaseException as error:  # noqa: BLE001
            errors.append(error)
        finally:
            connections[alias].close()

    old = gc.get_threshold()
    gc.set_threshold(1)
    try:
        threads = [threading.Thread(target=worker) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        gc.set_threshold(*old)
    assert not any(t.is_alive() for t in threads)
    assert errors == [], errors[:3]
    (stats,) = pool_stats(alias)
    assert outcome["ok"] + outcome["timeout"] == 160
    assert stats["checkouts"] == outcome["ok"] and stats["timeouts"] == outcome["timeout"]
    assert stats["checked_out"] == 0
    assert stats["size"] == stats["idle"] == 2  # overflow closed as it came back
    assert stats["opened"] - stats["closed"] == 2
    assert monitor.settled_count(app, 2) == 2


@needs_main_thread
def test_a_request_interrupted_while_waiting_does_not_swallow_the_next_checkin(
    pooled_alias,
) -> None:
    alias, _ = pooled_alias(pool_options={"pool_size": 1, "max_overflow": 0, "timeout": 1})
    holding, release = threading.Event(), threading.Event()

    def hold(cursor: Any) -> None:
        cursor.execute("SELECT 1")
        holding.set()
        release.wait(10)

    def holder_thread() -> None:
        try:
            run_request(alias, hold)
        finally:
            connections[alias].close()

    holder = threading.Thread(target=holder_thread)
    holder.start()
    assert holding.wait(10)
    try:
        # A request deadline (SIGALRM) fires while this request waits for a connection.
        with pytest.raises(SignalRaised), alarm_raises(0.2):
            connections[alias].ensure_connection()
    finally:
        release.set()
        holder.join(10)
    assert run_request(alias, lambda c: (c.execute("SELECT 1"), c.fetchone()[0])[1]) == 1
