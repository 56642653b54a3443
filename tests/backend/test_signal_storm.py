"""Signal storms: a real signal handler raising wherever CPython runs it, thousands of times.

test_adversarial_process.py raises at a chosen line with a line tracer; a line
tracer can raise where a real signal handler never runs, and only where the
test looks. Here an interval timer (SIGALRM every 0.3 ms) interrupts the main
thread wherever CPython lets a Python signal handler run: at calls and loops'
jumps. The handler raises once per attempt, as KeyboardInterrupt, gunicorn's
SystemExit or Celery's soft time limit do, and each attempt is followed by the
recovery a program makes (its next request, or close()). After every attempt
nothing may be lost: no connection checked out by nobody, none idle outside
the pool's idle set; after the storm the counts add up.

Before the claims were made with ``del`` (no call between the claim and the
lease reaching its holder), the pool lost a connection within a few hundred
attempts.
"""

from __future__ import annotations

import contextlib
import itertools
import signal
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from django.db import connections
from django_postgrespool import pool_stats, registry
from django_postgrespool.options import PoolOptions
from django_postgrespool.pool import GONE, IDLE, IN_USE, ConnectionPool, _Waiter

from tests.backend.test_adversarial import (  # noqa: F401 (_fake_db_reset: an autouse fixture)
    TARGET,
    FakeConnection,
    _fake_db_reset,
    assert_quiescent,
    make_pool,
)

INTERVAL = 0.0003  # between two signals: about one in three attempts is interrupted
DURATION = 2.0  # seconds of storm per test


class _Interrupt(BaseException):
    """What the signal handler raises (KeyboardInterrupt is pytest's own)."""


class Storm:
    """SIGALRM every INTERVAL; the handler raises _Interrupt once each time it is armed."""

    def __init__(self) -> None:
        self.armed = False
        self.raised = 0
        self.where = ""  # the last place it raised, for a failure's message

    def handler(self, signum: int, frame: Any) -> None:
        if self.armed and not _elsewhere(frame):
            self.armed = False
            self.raised += 1
            self.where = "".join(traceback.format_stack(frame)[-6:])
            raise _Interrupt


def _elsewhere(frame: Any) -> bool:
    """Tell whether the handler runs where these tests do not raise.

    Inside SQLAlchemy's pool: QueuePool's own bookkeeping is not safe from a
    signal handler's exception (a record taken from its queue is lost when
    the release of its lock is interrupted, a slot stays counted when the
    fairy's construction is). That is SQLAlchemy's, documented in
    docs/evidence/reliability.rst; these tests check ours. In a finalizer
    (``__del__``, a ``weakref.finalize``, a WeakSet's callback when a pool
    of an earlier test is collected): CPython prints such an exception and
    drops it.
    """
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if frame.f_code.co_name == "__del__" or module in ("weakref", "_weakrefset") or (
            module.startswith("sqlalchemy.")
        ):
            return True
        frame = frame.f_back
    return False


@contextlib.contextmanager
def storm(interval: float = INTERVAL) -> Iterator[Storm]:
    state = Storm()
    previous = signal.signal(signal.SIGALRM, state.handler)
    signal.setitimer(signal.ITIMER_REAL, interval, interval)
    try:
        yield state
    finally:
        state.armed = False
        signal.setitimer(signal.ITIMER_REAL, 0, 0)
        signal.signal(signal.SIGALRM, previous)


def attempt(state: Storm, body: Callable[[], None]) -> bool:
    """Run ``body`` armed; tell whether it ran to its end."""
    try:
        try:
            state.armed = True
            body()
            state.armed = False
            return True
        except _Interrupt:
            state.armed = False
    except _Interrupt:  # raised in the first handler, before it disarmed
        state.armed = False
    state.armed = False
    return False


def lost(pool: ConnectionPool, held: dict[str, Any]) -> list[str]:
    """Connections nobody can give back: checked out but not held, idle outside the idle
    set, or retired with their slot still counted."""
    mine = held.get("lease", (None,))[0]
    return [
        repr(lease)
        for lease in list(pool._leases)
        if (lease.state is IN_USE and lease is not mine)
        or (lease.state is IDLE and lease not in pool._idle)
        or lease.state is GONE  # closed (or not), its slot counted for ever
    ]


@pytest.mark.parametrize("lifo", [False, True])
def test_a_signal_storm_on_one_thread_loses_no_connection(lifo: bool) -> None:
    # A sync worker's main thread: checkout, a query, checkin, over and over.
    pool = make_pool(pool_size=2, max_overflow=0, timeout=1.0, use_lifo=lifo)
    held: dict[str, Any] = {}
    last: list[Any] = [None]
    me = threading.current_thread()

    def body() -> None:
        lease = pool.checkout(FakeConnection, last[0], me)
        # As the wrapper's `self._lease = lease`, no call in between; with the
        # checkout's time, as the wrapper's `self._checkout`: a give-back with
        # the lease's borrowed_at read later would give back its next
        # borrower's checkout, lending it twice (that was this test's flake).
        held["lease"] = lease, lease.borrowed_at
        last[0] = lease
        lease.raw.cursor().execute("SELECT 1")
        pool.checkin(lease, None, lease.borrowed_at)
        held.clear()

    attempts = completed = 0
    with storm() as state:
        deadline = time.monotonic() + DURATION
        while time.monotonic() < deadline:
            attempts += 1
            completed += attempt(state, body)
            state.armed = False
            lease, borrowed_at = held.pop("lease", (None, None))
            if lease is not None:  # what the wrapper's next connect() does
                pool.checkin(lease, None, borrowed_at)
            gone = lost(pool, held)
            assert not gone, f"attempt {attempts}, {state.raised} raised: {gone}\n{state.where}"
    assert state.raised > 100 and completed > 100, (state.raised, completed)
    assert_quiescent(pool)


@pytest.mark.parametrize("fair_after", [0.0, 0.03])
def test_a_signal_storm_on_the_main_thread_while_others_wait(fair_after: float) -> None:
    # The main thread is interrupted while three other threads share two
    # connections with it: hand-offs, waits, and the line, under the storm.
    pool = make_pool(pool_size=2, max_overflow=0, timeout=5.0, fair_after=fair_after)
    stop = threading.Event()
    errors: list[BaseException] = []
    cycles = [0]

    def worker() -> None:
        me = threading.current_thread()
        try:
            while not stop.is_set():
                lease = pool.checkout(FakeConnection, None, me)
                assert lease.raw.user is None, "lent to two borrowers"
                lease.raw.user = me
                time.sleep(0)
                lease.raw.user = None
                pool.checkin(lease, None, lease.borrowed_at)
                cycles[0] += 1
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for thread in threads:
        thread.start()
    held: dict[str, Any] = {}
    main = threading.current_thread()

    def body() -> None:
        lease = pool.checkout(FakeConnection, None, main)
        held["lease"] = lease, lease.borrowed_at  # see the test above
        assert lease.raw.user is None, "lent to two borrowers"
        lease.raw.user = main
        lease.raw.user = None
        pool.checkin(lease, None, lease.borrowed_at)
        held.clear()

    completed = 0
    try:
        # The main thread mostly waits (three threads share two connections
        # with it, fair_after lets them keep theirs): most signals end a wait.
        with storm(0.001) as state:
            deadline = time.monotonic() + DURATION
            while time.monotonic() < deadline and not errors:
                completed += attempt(state, body)
                state.armed = False
                lease, borrowed_at = held.pop("lease", (None, None))
                if lease is not None:
                    if lease.raw.user is main:  # not another borrower's mark
                        lease.raw.user = None
                    pool.checkin(lease, None, borrowed_at)
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)
    assert not errors, errors
    assert state.raised > 50 and cycles[0] > 100, (state.raised, completed, cycles)
    assert_quiescent(pool)


def test_a_checkin_interrupted_after_its_hand_off_leaves_the_next_borrower_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The storm above lost a connection once in CI (opened - closed one short
    # of size): a checkin hands its connection to a waiter and rings it; the
    # signal handler's exception comes in the ring, after the waiter has it
    # (IN_USE, its own checkout). The checkin's clean-up took "IN_USE" for
    # "never given back" and closed the connection under its new borrower,
    # which then found it closed ("the connection to the server was lost"),
    # and the pool counted it closed twice. Made certain here: the ring raises
    # once the waiter holds the connection.
    pool = make_pool(pool_size=1, max_overflow=0, timeout=5.0, fair_after=0)
    first = pool.checkout(FakeConnection, None, None)
    got: list[Any] = []
    waiter = threading.Thread(target=lambda: got.append(pool.checkout(FakeConnection, None, None)))
    waiter.start()
    while not pool._waiters:
        time.sleep(0.001)
    real_wake = _Waiter.wake

    def wake_then_interrupt(self: _Waiter) -> None:
        real_wake(self)
        deadline = time.monotonic() + 5
        while not got and time.monotonic() < deadline:
            time.sleep(0.001)
        raise _Interrupt

    monkeypatch.setattr(_Waiter, "wake", wake_then_interrupt)
    with pytest.raises(_Interrupt):
        pool.checkin(first, None, first.borrowed_at)
    monkeypatch.setattr(_Waiter, "wake", real_wake)
    waiter.join(5)
    (second,) = got
    assert second is first and second.state is IN_USE
    assert not second.raw.closed, "closed under its next borrower"
    pool.checkin(second, None, second.borrowed_at)
    assert pool.stats()["invalidated"] == 0
    assert_quiescent(pool)


def test_a_signal_storm_on_django_requests_loses_no_connection(pooled_alias) -> None:
    # The wrapper on the suite's PostgreSQL: borrow, query, close; the
    # recovery after an interrupt is the next request's close_old_connections().
    alias, _ = pooled_alias(pool_options={"pool_size": 2, "max_overflow": 0, "timeout": 2})
    conn = connections[alias]

    def body() -> None:
        with conn.cursor() as cursor:
            cursor.execute("SELECT 1")
        conn.close()

    attempts = completed = 0
    # A request takes about 0.5 ms, opening a connection 5 ms: one signal per 2 ms.
    # On a loaded machine an opening can take longer than that: interrupted
    # (and so closed) again and again, until one is quicker. The storm runs
    # on until enough requests have also been served, within a limit.
    with storm(0.002) as state:
        started = time.monotonic()
        while time.monotonic() < started + DURATION or (
            completed <= 20 and time.monotonic() < started + 5 * DURATION
        ):
            attempts += 1
            completed += attempt(state, body)
            state.armed = False
            conn.close_if_unusable_or_obsolete()  # the next request's start
            conn.close()
            stats = pool_stats(alias)  # [] until a first checkout got as far as the pool
            assert sum(s["checked_out"] for s in stats) == 0, (attempts, state.raised, state.where)
    assert state.raised > 20 and completed > 20, (state.raised, completed)
    with conn.cursor() as cursor:  # and it still serves
        cursor.execute("SELECT 1")
        assert cursor.fetchone() == (1,)
    conn.close()


@pytest.mark.parametrize("how", ["settings switch", "close_pools"])
def test_a_signal_storm_on_retiring_pools_leaves_no_connection_open(
    monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    # A settings switch (a new pool of the alias) or close_pools() retires
    # the alias's pool and closes its idle connections. Interrupted, the pool
    # must stay in the registry until its close() has run to its end (the
    # next switch, close_pools() or look at the stats finishes it), never
    # be dropped with its connections open and nobody to close them.
    alias = f"storm_{uuid.uuid4().hex[:8]}"
    monkeypatch.setitem(connections.settings, alias, {"ENGINE": "django.db.backends.dummy"})
    versions = itertools.count()
    me = threading.current_thread()

    def switch() -> ConnectionPool:
        return registry.get_pool(
            (alias, next(versions)),
            lambda: ConnectionPool(alias, PoolOptions(pool_size=2, max_overflow=0), TARGET),
        )

    def filled() -> None:  # the new pool's first requests: two idle connections
        pool = switch()
        first = pool.checkout(FakeConnection, None, me)
        second = pool.checkout(FakeConnection, None, me)
        pool.checkin(first)
        pool.checkin(second)

    body = switch if how == "settings switch" else lambda: registry.close_pools(alias=alias)
    attempts = completed = 0
    with storm(0.0005) as state:
        deadline = time.monotonic() + DURATION
        while time.monotonic() < deadline:
            filled()
            attempts += 1
            completed += attempt(state, body)
            state.armed = False
            # Every connection left open is one a pool of the registry holds.
            held = {id(lease.raw) for pool in registry.all_pools() for lease in pool._leases}
            loose = [c for c in FakeConnection.every if not c.closed and id(c) not in held]
            gone = [lost(pool, {}) for pool in registry.all_pools() if pool.alias == alias]
            assert not loose and not any(gone), (
                f"attempt {attempts}, {state.raised} raised: {gone}\n{state.where}"
            )
    assert state.raised > 100 and completed > 100, (state.raised, completed)
    registry.close_pools(alias=alias)  # what a switch or close_pools() does next
    assert [c for c in FakeConnection.every if not c.closed] == []
    assert [pool for pool in registry.all_pools() if pool.alias == alias] == []
