"""The pool's own state machine, on a fake DB-API connection: races made likely.

No server here: each "physical connection" is a socketpair (so the socket
pre-ping has a real descriptor to poll) with libpq's transaction status. These
tests run thousands of checkouts in seconds; the same behaviours are proven
against real PostgreSQL in test_lease.py.
"""

from __future__ import annotations

import collections
import gc
import os
import random
import socket
import threading
import time

import pytest
from django_postgrespool._rules import said_farewell
from django_postgrespool.errors import PoolError, PoolTimeout
from django_postgrespool.options import PoolOptions
from django_postgrespool import pool as pool_module
from django_postgrespool.pool import GONE, IDLE, ConnectionPool, Lease, Target, _Waiter

# Lane-independent (a fake DB-API): with MATRIX=1, one lane per Python version (Makefile).
pytestmark = pytest.mark.pool_unit

TARGET = Target(database="db", host="h", port="1", user="u")


class FakePGconn:
    transaction_status = 0


class FakeCursor:
    def __init__(self, conn: FakeConnection | None = None) -> None:
        self.closed = False
        self.conn = conn

    def close(self) -> None:
        self.closed = True

    def execute(self, sql: str) -> None:
        if self.closed:
            raise RuntimeError("cursor already closed")
        if self.conn is not None:
            # What the server sent unasked (an error before it hung up) is
            # read as the answer: the round trip fails.
            try:
                unasked = self.conn._sock.recv(1, socket.MSG_DONTWAIT | socket.MSG_PEEK)
            except BlockingIOError:
                return
            raise OSError(f"the server sent {unasked!r} and closed the connection")

    def fetchone(self) -> tuple[bool]:
        return (True,)

    def __enter__(self) -> FakeCursor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class FakeConnection:
    opened = 0

    def __init__(self) -> None:
        type(self).opened += 1
        self.pgconn = FakePGconn()
        self.autocommit = True
        self.closed = False
        self._sock, self.server_side = socket.socketpair()

    def fileno(self) -> int:
        return self._sock.fileno()

    @property
    def info(self) -> FakePGconn:  # the ping reads info.transaction_status
        return self.pgconn

    def cursor(self) -> FakeCursor:
        return FakeCursor(self)

    def rollback(self) -> None:
        self.pgconn.transaction_status = 0

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.pgconn.transaction_status = 4
            self._sock.close()
            self.server_side.close()


def make_pool(**options: object) -> ConnectionPool:
    opts = {"pool_size": 2, "max_overflow": 0, "timeout": 5.0, **options}
    return ConnectionPool("fake", PoolOptions(**opts), TARGET)  # type: ignore[arg-type]


def assert_consistent(pool: ConnectionPool) -> None:
    """Nothing lent, nothing lost: our leases are exactly QueuePool's checkouts."""
    stats = pool.stats()
    assert stats["checked_out"] == 0, stats
    assert all(lease.state is IDLE for lease in pool._leases)
    assert len(pool._idle) == len(pool._leases) == pool._queue.checkedout()
    assert stats["opened"] - stats["closed"] == stats["size"] <= pool.options.max_connections
    assert not pool._waiters


@pytest.fixture(params=["eventfd", "lock"])
def wake_up(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both ways a waiter sleeps: its thread's eventfd (Linux), or a lock (elsewhere)."""
    if request.param == "eventfd" and not pool_module._HAS_EVENTFD:
        pytest.skip("no eventfd on this system: the lock is what runs here")
    if request.param == "lock":
        monkeypatch.setattr(pool_module, "_HAS_EVENTFD", False)
    return str(request.param)


@pytest.mark.parametrize("fair_after", [0.0, 0.001])
def test_hand_off_to_a_waiter_that_gives_up_at_that_moment_is_never_lost(
    wake_up: str, fair_after: float
) -> None:
    # Timeouts as long as the hold: waiters give up just as they are served,
    # over and over. A connection handed to a waiter that then raised would
    # stay IN_USE for ever (and the pool would shrink by one each time).
    # With fair_after, waiters also wake up to take connections left idle.
    pool = make_pool(pool_size=2, timeout=0.002, fair_after=fair_after)
    stop = time.monotonic() + 2.0
    counts = {"ok": 0, "timeout": 0}
    lock = threading.Lock()

    def borrower() -> None:
        while time.monotonic() < stop:
            try:
                lease = pool.checkout(FakeConnection, None, threading.current_thread())
            except PoolTimeout:
                with lock:
                    counts["timeout"] += 1
                continue
            time.sleep(random.choice((0, 0.001, 0.002)))
            pool.checkin(lease)
            with lock:
                counts["ok"] += 1

    threads = [threading.Thread(target=borrower) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads)
    print(f"hand-off race ({wake_up}, fair_after={fair_after}): {counts}, "
          f"{pool.stats()['handoffs']} hand-offs")
    assert counts["ok"] > 100 and counts["timeout"] > 10  # the race really ran
    assert pool.stats()["handoffs"] > 100
    assert_consistent(pool)
    assert pool.stats()["size"] == 2


@pytest.mark.parametrize("fair_after", [0.0, 0.05])
def test_returned_connection_goes_to_the_oldest_waiter(wake_up: str, fair_after: float) -> None:
    pool = make_pool(pool_size=1, fair_after=fair_after)
    me = threading.current_thread()
    held = pool.checkout(FakeConnection, None, me)
    order: list[int] = []

    def wait(n: int) -> None:
        lease = pool.checkout(FakeConnection, None, threading.current_thread())
        order.append(n)
        pool.checkin(lease)

    threads = []
    for n in range(5):
        t = threading.Thread(target=wait, args=(n,))
        t.start()
        threads.append(t)
        while len(pool._waiters) < n + 1:  # each joins the line before the next starts
            time.sleep(0.001)
    assert all((w.lock is not None) == (wake_up == "lock") for w in pool._waiters)
    time.sleep(fair_after)  # every waiter has waited fair_after: the line is served in order
    pool.checkin(held)
    for t in threads:
        t.join(10)
    assert order == [0, 1, 2, 3, 4]
    assert pool.stats()["handoffs"] == 5
    assert_consistent(pool)


def start_waiter(
    pool: ConnectionPool, got: list[tuple[Lease, float]], hold: threading.Event | None = None
) -> threading.Thread:
    """Start a thread whose checkout waits; it records what it got and when, and gives it back
    (once ``hold`` is set, if given: until then the test may look at the pool)."""

    def wait() -> None:
        lease = pool.checkout(FakeConnection, None, threading.current_thread())
        got.append((lease, time.monotonic()))
        if hold is not None:
            hold.wait(5)
        pool.checkin(lease)

    waiters = len(pool._waiters)
    thread = threading.Thread(target=wait)
    thread.start()
    while len(pool._waiters) == waiters:
        time.sleep(0.001)
    return thread


def test_within_fair_after_a_returned_connection_stays_for_whoever_asks_first() -> None:
    # The thread that gives a connection back and asks again at once keeps
    # it without waking the sleeping waiter; the waiter gets it when it has
    # waited fair_after, even though no checkin happens by then.
    pool = make_pool(pool_size=1, fair_after=0.3)
    me = threading.current_thread()
    held = pool.checkout(FakeConnection, None, me)
    got: list[tuple[Lease, float]] = []
    joined = time.monotonic()
    thread = start_waiter(pool, got)
    for _ in range(50):
        pool.checkin(held)
        again = pool.checkout(FakeConnection, held, me)
        assert again is held and again.source == "affinity"
    assert not got and len(pool._waiters) == 1
    pool.checkin(held)  # and nobody asks again: the waiter takes it at fair_after
    thread.join(5)
    ((lease, at),) = got
    assert lease is held and lease.source == "handoff"
    assert 0.3 <= at - joined < 1.0
    stats = pool.stats()
    assert stats["handoffs"] == 0 and stats["waits"] == 1
    assert_consistent(pool)


def test_a_waiter_first_in_line_while_young_is_rung_to_guard_it(wake_up: str) -> None:
    # B joins behind A and is first once A is served: a connection given
    # back then stays idle for whoever asks first, and B, rung once, takes
    # it at its own fair_after, though no checkin happens by then. (Without
    # eventfd a waiter cannot be rung: B is served at the checkin.)
    pool = make_pool(pool_size=1, fair_after=0.3, timeout=5)
    me = threading.current_thread()
    held = pool.checkout(FakeConnection, None, me)
    got_a: list[tuple[Lease, float]] = []
    got_b: list[tuple[Lease, float]] = []
    start_waiter(pool, got_a)
    time.sleep(0.35)  # A is due
    b_joined = time.monotonic()
    b = start_waiter(pool, got_b)
    pool.checkin(held)  # to A, who gives it back at once: B is first, and young
    deadline = time.monotonic() + 5
    while not got_a and time.monotonic() < deadline:
        time.sleep(0.001)
    if wake_up == "lock":
        b.join(5)
        assert pool.stats()["handoffs"] == 2
        assert_consistent(pool)
        return
    while not pool._idle and time.monotonic() < deadline:
        time.sleep(0.001)
    assert pool._waiters[0].guard and not got_b
    for _ in range(20):
        again = pool.checkout(FakeConnection, held, me)
        assert again is held
        pool.checkin(again)
    assert not got_b
    b.join(5)
    ((lease, at),) = got_b
    assert lease is held
    assert 0.3 <= at - b_joined < 1.0  # not at the timeout
    stats = pool.stats()
    assert stats["handoffs"] == 1 and stats["waits"] == 2
    assert_consistent(pool)


def test_a_waiter_that_has_waited_fair_after_is_served_by_the_next_checkin() -> None:
    pool = make_pool(pool_size=1, fair_after=0.05, timeout=0.2)
    me = threading.current_thread()
    held = pool.checkout(FakeConnection, None, me)
    got: list[tuple[Lease, float]] = []
    hold = threading.Event()  # the waiter keeps it until the pool has been looked at
    thread = start_waiter(pool, got, hold)
    time.sleep(0.1)
    pool.checkin(held)  # the waiter is due: it is handed the connection, not left idle
    assert pool.stats()["handoffs"] == 1 and not pool._idle
    hold.set()
    thread.join(5)
    assert [lease for lease, _ in got] == [held]
    assert_consistent(pool)


def test_fair_after_zero_serves_the_line_at_every_checkin() -> None:
    pool = make_pool(pool_size=1, fair_after=0)
    me = threading.current_thread()
    held = pool.checkout(FakeConnection, None, me)
    got: list[tuple[Lease, float]] = []
    hold = threading.Event()  # the waiter keeps it until the pool has been looked at
    thread = start_waiter(pool, got, hold)
    pool.checkin(held)  # at once: the waiter has it, asking again finds nothing idle
    assert pool.stats()["handoffs"] == 1 and not pool._idle
    hold.set()
    thread.join(5)
    assert [lease for lease, _ in got] == [held]
    assert_consistent(pool)


def test_overflow_left_idle_for_a_young_waiter_is_closed_when_the_load_drops() -> None:
    # Within fair_after, connections given back stay idle for whoever asks
    # first, even beyond pool_size while someone waits. When the load drops
    # (the waiter takes one and gives it back, nobody else asks), the last
    # checkin closes every connection beyond pool_size, not only its own.
    pool = make_pool(pool_size=1, max_overflow=2, fair_after=0.2)
    me = threading.current_thread()
    held = [pool.checkout(FakeConnection, None, me) for _ in range(3)]
    got: list[tuple[Lease, float]] = []
    thread = start_waiter(pool, got)
    for lease in held:
        pool.checkin(lease)
    if pool_module._HAS_EVENTFD:  # it guards the line: all three stayed idle
        assert pool.stats()["handoffs"] == 0 and len(pool._idle) == 3
    thread.join(5)
    assert [lease for lease, _ in got] and got[0][0] in held
    assert len(pool._leases) == 1 == pool.options.pool_size
    assert_consistent(pool)


def test_fair_after_saves_the_wake_up_under_contention(wake_up: str) -> None:
    # More threads than connections, each asking again at once: with
    # fair_after most connections go straight back to the thread that
    # returned them; without it nearly every checkout waits to be handed one.
    # Without eventfd (not Linux) a waiter cannot be rung to guard the line:
    # every checkin serves it, as with fair_after=0.
    def run(fair_after: float) -> dict[str, int]:
        pool = make_pool(pool_size=2, fair_after=fair_after)
        stop = time.monotonic() + 1.0

        def borrower() -> None:
            me = threading.current_thread()
            last = None
            while time.monotonic() < stop:
                last = pool.checkout(FakeConnection, last, me)
                time.sleep(0.0005)  # the query: the GIL is free meanwhile
                pool.checkin(last)

        threads = [threading.Thread(target=borrower) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not any(t.is_alive() for t in threads)
        assert_consistent(pool)
        stats = pool.stats()
        return {"checkouts": stats["checkouts"], "handoffs": stats["handoffs"]}

    strict, barging = run(0.0), run(0.01)
    print(f"contention ({wake_up}): fair_after=0 {strict}, fair_after=0.01 {barging}")
    assert strict["handoffs"] > strict["checkouts"] // 2
    if wake_up == "eventfd":
        assert barging["handoffs"] < barging["checkouts"] // 4
    else:
        assert barging["handoffs"] > barging["checkouts"] // 2


def test_a_thread_gets_its_own_connection_back_before_older_idle_ones() -> None:
    pool = make_pool(pool_size=3)
    me = threading.current_thread()
    a, b, c = (pool.checkout(FakeConnection, None, me) for _ in range(3))
    for lease in (a, c, b):  # b returned last, a first
        pool.checkin(lease)
    again = pool.checkout(FakeConnection, c, me)
    assert again is c and again.source == "affinity"
    pool.checkin(again)
    assert pool.checkout(FakeConnection, None, me) is a  # FIFO without affinity
    assert pool.stats()["affinity_hits"] == 1


def test_no_lock_is_taken_on_a_garbage_collection_path() -> None:
    # Borrowers die holding connections while the collector runs at every
    # allocation; with the old design a collection inside the pool's lock
    # deadlocked. Here nothing of ours runs at collection time at all.
    pool = make_pool(pool_size=3, max_overflow=1, timeout=10.0)
    old = gc.get_threshold()
    errors: list[BaseException] = []

    class Borrower:
        def __init__(self) -> None:
            self.me = self  # a reference cycle, like Django's wrapper
            self.lease = pool.checkout(FakeConnection, None, threading.current_thread())

    def die_holding() -> None:
        try:
            Borrower()
        except BaseException as error:  # noqa: BLE001
            errors.append(error)

    def churn() -> None:
        try:
            for _ in range(300):
                lease = pool.checkout(FakeConnection, None, threading.current_thread())
                [object() for _ in range(5)]
                pool.checkin(lease)
        except BaseException as error:  # noqa: BLE001
            errors.append(error)

    gc.set_threshold(1)
    try:
        threads = [threading.Thread(target=churn) for _ in range(4)]
        threads += [threading.Thread(target=die_holding) for _ in range(20)]
        random.shuffle(threads)
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        hung = [t for t in threads if t.is_alive()]
    finally:
        gc.set_threshold(*old)
    assert not hung, f"{len(hung)} thread(s) hung"
    assert errors == []
    # the dead borrowers' connections are reclaimed by the next checkouts at the cap
    for _ in range(3):
        pool.checkin(pool.checkout(FakeConnection, None, threading.current_thread()))
    leases = [pool.checkout(FakeConnection, None, threading.current_thread()) for _ in range(4)]
    for lease in leases:
        pool.checkin(lease)
    assert_consistent(pool)
    assert pool.stats()["reclaimed"] >= 1


def test_connections_of_ended_threads_are_reclaimed_before_more_are_opened_without_gc() -> None:
    pool = make_pool(pool_size=2, timeout=2.0)
    gc.disable()
    try:
        for _ in range(50):  # each thread ends holding a connection
            t = threading.Thread(
                target=lambda: pool.checkout(FakeConnection, None, threading.current_thread())
            )
            t.start()
            t.join()
    finally:
        gc.enable()
    stats = pool.stats()
    assert stats["timeouts"] == 0
    assert stats["reclaimed"] == 49  # below the cap too: one connection serves them all
    assert stats["opened"] == 1


def test_ended_borrowers_of_a_closed_pool_are_closed_once_while_late_checkins_race() -> None:
    # Borrowers still running when their pool is closed, that then end without
    # giving their connections back: close_ended_borrowers() closes them (the
    # process's housekeeper calls it: close() asked it to watch this pool, so
    # it races too), while wrappers left reachable give the same connections
    # back from other threads (a checkin's compare-and-set against a
    # reclaim's). Each connection is closed once, by one of them, and the
    # pool ends empty.
    for _ in range(200):
        pool = make_pool(pool_size=3, max_overflow=1)
        held: list[tuple[Lease, float]] = []
        ended = threading.Event()

        def borrow() -> None:
            lease = pool.checkout(FakeConnection, None, threading.current_thread())
            held.append((lease, lease.borrowed_at))
            ended.wait(10)

        borrowers = [threading.Thread(target=borrow) for _ in range(4)]
        for t in borrowers:
            t.start()
        while len(held) < 4:
            time.sleep(0.001)
        pool.close()
        assert pool.in_use() == 4  # nothing to reclaim yet: all four still run
        ended.set()
        for t in borrowers:
            t.join()
        start = threading.Barrier(3)
        errors: list[BaseException] = []

        def late_checkins(part: list[tuple[Lease, float]]) -> None:
            start.wait(5)
            try:
                for lease, borrowed_at in part:
                    pool.checkin(lease, None, borrowed_at)
            except BaseException as error:  # noqa: BLE001 - reported below
                errors.append(error)

        def reclaim() -> None:
            start.wait(5)
            try:
                pool.close_ended_borrowers()
            except BaseException as error:  # noqa: BLE001 - reported below
                errors.append(error)

        racers = [
            threading.Thread(target=late_checkins, args=(held[:2],)),
            threading.Thread(target=late_checkins, args=(held[2:],)),
            threading.Thread(target=reclaim),
        ]
        for t in racers:
            t.start()
        for t in racers:
            t.join()
        assert errors == []
        # The housekeeper may be closing one still (GONE, its slot not yet freed).
        deadline = time.monotonic() + 5
        while pool.in_use() and time.monotonic() < deadline:
            time.sleep(0.001)
        stats = pool.stats()
        assert pool.in_use() == 0 and stats["size"] == 0, stats
        assert stats["opened"] == stats["closed"] == 4, stats
        assert all(lease.raw.closed and lease.state is GONE for lease, _ in held)


def test_a_shared_connection_is_never_reclaimed() -> None:
    pool = make_pool(pool_size=1, timeout=0.3)
    holder: list = []
    t = threading.Thread(
        target=lambda: holder.append(pool.checkout(FakeConnection, None, threading.current_thread()))
    )
    t.start()
    t.join()
    pool.release_owner(holder[0])  # as inc_thread_sharing() does
    with pytest.raises(PoolTimeout):
        pool.checkout(FakeConnection, None, threading.current_thread())
    pool.checkin(holder[0])


def test_open_cursors_are_closed_at_checkin() -> None:
    pool = make_pool()
    lease = pool.checkout(FakeConnection, None, threading.current_thread())
    cursors = [FakeCursor() for _ in range(3)]
    for cursor in cursors:
        lease.track(cursor)
    pool.checkin(lease)
    assert all(c.closed for c in cursors)
    assert lease.cursors == []


def test_closed_cursors_are_let_go_while_open_ones_are_kept() -> None:
    # A connection held across many requests (CONN_MAX_AGE > 0) must not keep
    # every cursor it ever made: only those still open, to close at checkin.
    pool = make_pool()
    lease = pool.checkout(FakeConnection, None, threading.current_thread())
    still_open = FakeCursor()
    lease.track(still_open)
    for _ in range(1000):
        cursor = FakeCursor()
        lease.track(cursor)
        cursor.close()
    assert lease.cursors == [still_open, cursor]  # the last one, closed, until the next
    last_open = FakeCursor()
    lease.track(last_open)
    assert lease.cursors == [still_open, last_open]
    pool.checkin(lease)
    assert still_open.closed and last_open.closed


def test_a_connection_in_a_transaction_is_rolled_back_at_checkin() -> None:
    pool = make_pool()
    lease = pool.checkout(FakeConnection, None, threading.current_thread())
    lease.raw.pgconn.transaction_status = 3  # failed transaction
    pool.checkin(lease)
    assert lease.raw.pgconn.transaction_status == 0 and lease.state is IDLE


def test_a_lost_connection_is_discarded_at_checkin_and_its_room_reused() -> None:
    pool = make_pool(pool_size=1)
    lease = pool.checkout(FakeConnection, None, threading.current_thread())
    lease.raw.close()
    pool.checkin(lease)
    assert lease.state is GONE
    again = pool.checkout(FakeConnection, None, threading.current_thread())
    assert again is not lease
    pool.checkin(again)
    assert pool.stats()["invalidated"] == 1
    assert_consistent(pool)


def test_a_server_that_hung_up_is_found_by_the_socket_check() -> None:
    pool = make_pool(pool_size=1)
    lease = pool.checkout(FakeConnection, None, threading.current_thread())
    pool.checkin(lease)
    lease.raw.server_side.send(b"E")  # the server wrote (an error) and hung up
    again = pool.checkout(FakeConnection, lease, threading.current_thread())
    assert again is not lease and lease.state is GONE


def test_recycle_ages_are_spread_over_five_percent() -> None:
    pool = make_pool(pool_size=20, recycle=1000)
    me = threading.current_thread()
    leases = [pool.checkout(FakeConnection, None, me) for _ in range(20)]
    lifetimes = [lease.expires - lease.born for lease in leases]
    assert all(950 <= life <= 1000 for life in lifetimes)
    assert len({round(life, 3) for life in lifetimes}) > 10


def test_connections_beyond_pool_size_close_when_returned_unless_max_idle() -> None:
    me = threading.current_thread()
    for max_idle, kept in ((None, 1), (30.0, 3)):
        pool = make_pool(pool_size=1, max_overflow=2, max_idle=max_idle)
        leases = [pool.checkout(FakeConnection, None, me) for _ in range(3)]
        for lease in leases:
            pool.checkin(lease)
        assert pool.stats()["size"] == kept
        pool.close()


def test_max_idle_closes_spare_connections_that_stayed_idle() -> None:
    me = threading.current_thread()
    pool = make_pool(pool_size=1, max_overflow=3, max_idle=0.2)
    leases = [pool.checkout(FakeConnection, None, me) for _ in range(4)]
    for lease in leases:
        pool.checkin(lease)
    assert pool.stats()["size"] == 4
    deadline = time.monotonic() + 5
    while pool.stats()["size"] > 1 and time.monotonic() < deadline:
        time.sleep(0.05)  # the housekeeper sweeps
    assert pool.stats()["size"] == 1  # pool_size is never closed for idleness
    pool.close()


class Refused(Exception):
    pass


def refusing_pool(**options: object) -> ConnectionPool:
    """A pool that takes Refused as a failed connection attempt (reconnect backoff)."""
    opts = {"max_overflow": 0, **options}
    return ConnectionPool(
        "fake", PoolOptions(**opts), TARGET, connect_errors=(Refused,)  # type: ignore[arg-type]
    )


def test_reconnect_backoff_lets_one_attempt_through_at_a_time() -> None:
    attempts: list[float] = []
    up = threading.Event()

    def connect() -> FakeConnection:
        attempts.append(time.monotonic())
        if not up.is_set():
            raise Refused('connection to server at "h", port 1 failed: Connection refused')
        return FakeConnection()

    pool = refusing_pool(pool_size=2, timeout=5.0)
    stop = time.monotonic() + 2.0
    slowest = [0.0]
    errors: dict[str, int] = {}

    def request() -> None:
        while time.monotonic() < stop:
            t0 = time.monotonic()
            try:
                pool.checkin(pool.checkout(connect, None, threading.current_thread()))
            except (Refused, PoolError) as error:
                errors[type(error).__name__] = errors.get(type(error).__name__, 0) + 1
            slowest[0] = max(slowest[0], time.monotonic() - t0)
            time.sleep(0.001)

    threads = [threading.Thread(target=request) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    print(f"backoff: {len(attempts)} attempts in 2 s from 16 threads, {errors}, slowest {slowest[0]:.3f}s")
    assert len(attempts) <= 6  # 0.1, 0.2, 0.4, 0.8 s apart at most
    assert slowest[0] < 2.0  # by design < 0.5 s (never waits for another attempt); room for a busy machine
    assert pool.stats()["connect_failures"] == len(attempts)
    assert pool.stats()["backoff_until"] is not None
    with pytest.raises(PoolError) as info:
        pool.checkout(connect, None, threading.current_thread())
    assert str(info.value).startswith(
        "Cannot connect to database alias 'fake' at h:1: the last attempt, "
    )
    assert "(Refused: connection to server at \"h\", port 1 failed: Connection refused)" in str(
        info.value
    )
    up.set()
    back = time.monotonic()
    while True:
        try:
            pool.checkin(pool.checkout(connect, None, threading.current_thread()))
            break
        except PoolError:
            time.sleep(0.01)
    assert time.monotonic() - back < 2.0  # by design <= 0.8 s (the longest backoff)
    assert pool.stats()["backoff_until"] is None


@pytest.mark.parametrize(
    ("failure", "signalled"), [(Refused, True), (ValueError, True), (ValueError, False)]
)
def test_a_checkout_waiting_at_the_cap_hears_of_a_failed_attempt_at_once(
    failure: type, signalled: bool
) -> None:
    # The cap is reached by attempts still connecting; one fails, which frees
    # its slot in QueuePool. The checkout waiting for that room must hear of
    # it (and fail fast with the backoff, or try itself), not sit out its
    # whole timeout (a CI run once saw a 30 s PoolTimeout this way).
    release = threading.Event()
    calls = []

    def connect() -> FakeConnection:
        calls.append(threading.current_thread().name)
        if len(calls) == 1:
            release.wait(10)
            raise failure("connection to server failed")
        return FakeConnection()

    pool = refusing_pool(pool_size=1, timeout=30.0)
    if not signalled:  # a missed signal: the waiter's periodic look finds the room
        pool._signal_room = lambda gone=None: None  # type: ignore[method-assign]
    outcome: dict[str, object] = {}

    def first() -> None:
        try:
            pool.checkout(connect, None, threading.current_thread())
        except Exception as error:  # noqa: BLE001 - recorded
            outcome["first"] = type(error).__name__

    def second() -> None:
        t0 = time.monotonic()
        try:
            pool.checkin(pool.checkout(connect, None, threading.current_thread()))
            outcome["second"] = "ok"
        except Exception as error:  # noqa: BLE001 - recorded
            outcome["second"] = type(error).__name__
        outcome["took"] = time.monotonic() - t0

    a = threading.Thread(target=first)
    a.start()
    while not calls:
        time.sleep(0.001)
    b = threading.Thread(target=second)
    b.start()
    while not pool._waiters:  # the second checkout waits at the cap
        time.sleep(0.001)
    release.set()
    a.join(10)
    b.join(40)
    print(f"{failure.__name__}: {outcome}")
    assert outcome["first"] == failure.__name__
    # Refused: the backoff answers the waiter at once. Anything else: no
    # backoff, so the waiter opens its own connection.
    assert outcome["second"] == ("PoolError" if failure is Refused else "ok")
    assert outcome["took"] < 10.0  # not the 30 s timeout: woken, not timed out
    assert pool.stats()["timeouts"] == 0
    assert not pool._waiters


needs_eventfd = pytest.mark.skipif(not pool_module._HAS_EVENTFD, reason="Linux's eventfd")


@needs_eventfd
def test_a_ring_left_over_from_an_earlier_wait_does_not_serve_the_next_one() -> None:
    # A waiter that gave up as it was served leaves its thread's bell rung.
    pool = make_pool(pool_size=1, timeout=5.0)
    held = pool.checkout(FakeConnection, None, None)
    waiter = _Waiter()
    waiter.start()
    waiter.done()
    waiter.bell.ring()  # the stale ring
    threading.Timer(0.3, pool.checkin, (held,)).start()
    lease = pool.checkout(FakeConnection, None, threading.current_thread())
    assert lease.source == "handoff"  # the stale ring did not end the wait
    assert lease.wait >= 0.25
    pool.checkin(lease)
    assert_consistent(pool)


@needs_eventfd
def test_a_hand_off_rung_before_the_waiter_sleeps_wakes_it_at_once() -> None:
    # Handed a connection between joining the line and sleeping: the bell
    # is cleared before the sleep, which must not lose this ring.
    waiter = _Waiter()
    waiter.start()
    waiter.served = True
    waiter.wake()
    started = time.monotonic()
    assert waiter.sleep(5.0)
    assert time.monotonic() - started < 1.0
    waiter.done()
    # And the ring is gone: the thread's next wait sleeps until woken.
    again = _Waiter()
    again.start()
    assert again.bell is waiter.bell
    started = time.monotonic()
    assert not again.sleep(0.2)
    assert time.monotonic() - started >= 0.19
    again.done()


@needs_eventfd
def test_waits_of_one_thread_at_once_get_bells_of_their_own() -> None:
    # Greenlets of one OS thread may wait at once, where threading.local is not patched.
    first = _Waiter()
    first.start()
    second = _Waiter()
    second.start()
    assert first.bell is not second.bell
    first.done()
    second.done()
    third = _Waiter()
    third.start()
    assert third.bell is pool_module._doorbells.bell
    third.done()


@needs_eventfd
def test_a_forked_child_does_not_share_its_parents_bell() -> None:
    _Waiter().done()  # this thread has a bell now
    assert pool_module._doorbells.bell is not None
    pid = os.fork()
    if pid == 0:  # the child: exit 0 only if it got a bell of its own
        os._exit(0 if pool_module._doorbells.bell is None else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_leak_warning_names_the_borrowers_code(caplog: pytest.LogCaptureFixture) -> None:
    pool = make_pool(leak_timeout=0.2)

    def view_that_holds_a_connection() -> None:
        lease = pool.checkout(FakeConnection, None, threading.current_thread())
        time.sleep(0.7)
        pool.checkin(lease)

    with caplog.at_level("INFO", logger="django_postgrespool"):
        view_that_holds_a_connection()
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert message.startswith("A connection of database alias 'fake' has been checked out by thread ")
    assert "view_that_holds_a_connection" in message and __file__ in message
    assert any("reported as leaked was returned after" in r.getMessage() for r in caplog.records)
    assert pool.stats()["leaks"] == 1


def test_histograms_count_every_checkout() -> None:
    pool = make_pool()
    me = threading.current_thread()
    for _ in range(10):
        pool.checkin(pool.checkout(FakeConnection, None, me))
    stats = pool.stats()
    for key in ("wait_time_histogram", "use_time_histogram"):
        h = stats[key]  # type: ignore[literal-required]
        assert h["count"] == sum(h["counts"]) == 10
        assert len(h["counts"]) == len(h["buckets"]) + 1
    assert stats["create_time_histogram"]["count"] == 1
    assert stats["wait_time"] == stats["wait_time_histogram"]["sum"]



def test_the_socket_check_sees_data_and_a_closed_peer_and_keeps_the_gil():
    # libc's poll() through ctypes.PyDLL: a zero-timeout call that never
    # releases the GIL (select.poll() does, and with several threads per
    # process each release costs a hand-off of the GIL).
    import ctypes
    import socket

    from django_postgrespool import pool as pool_module

    assert isinstance(pool_module._libc_poll, ctypes._CFuncPtr)
    assert pool_module._libc_poll._flags_ & ctypes._FUNCFLAG_PYTHONAPI  # PyDLL: GIL held
    ours, server = socket.socketpair()
    with ours, server:

        class FakeLease:
            poller = None
            raw = ours

        lease = FakeLease()
        readable = pool_module._poller(lease)
        assert lease.poller is readable
        assert not readable()
        server.send(b"E")
        assert readable()
        ours.recv(1)
        assert not readable()
        server.close()
        assert readable()  # end of file: the server hung up


@pytest.mark.parametrize(
    ("notices", "said"),
    [
        (None, False),
        ([], False),
        (["WARNING:  there is no transaction in progress\n"], False),
        (["NOTICE:  x\n", "FATAL:  terminating connection due to administrator command\n"], True),
        (collections.deque(["PANIC:  could not write to file\n"]), True),
        (["FATAL:  an old one\n", "NOTICE:  the last one\n"], False),
        (object(), False),  # replaced by something that is not a sequence
    ],
)
def test_a_farewell_is_the_last_notice_a_fatal_or_panic_one(notices, said):
    assert said_farewell(notices) is said


# -- the health check's deadline (_PingWatch) ------------------------------------


def _shut(sock: socket.socket) -> bool:
    """Tell whether ``sock`` was shut down (reads the end of the stream) without blocking."""
    try:
        return sock.recv(1, socket.MSG_DONTWAIT | socket.MSG_PEEK) == b""
    except BlockingIOError:
        return False


class SilentCursor(FakeCursor):
    """A round trip whose answer never comes: waits on the socket, as a driver does."""

    def __init__(self, conn: FakeConnection, hold: float | None) -> None:
        super().__init__(conn)
        self.conn: FakeConnection = conn
        self.hold = hold

    def execute(self, sql: str) -> None:
        sock = self.conn._sock
        if self.hold is None:
            if sock.recv(1) == b"":  # blocks until the socket is shut down
                raise OSError("server closed the connection unexpectedly")
            return
        time.sleep(self.hold)  # answered after `hold`, unless shut down meanwhile
        if _shut(sock):
            raise OSError("server closed the connection unexpectedly")


class SilentConnection(FakeConnection):
    hold: float | None = None  # None: never answers

    def cursor(self) -> FakeCursor:
        return SilentCursor(self, self.hold)


def test_a_round_trip_never_answered_is_given_up_at_the_pools_timeout() -> None:
    pool = make_pool(pool_size=1, max_overflow=1, pre_ping=True, timeout=0.3)
    me = threading.current_thread()
    first = pool.checkout(SilentConnection, None, me)
    pool.checkin(first)
    started = time.monotonic()
    lease = pool.checkout(FakeConnection, first, me)  # pings `first`: no answer
    took = time.monotonic() - started
    assert lease is not first and first.state is GONE
    assert 0.3 <= took < 2.0, took
    assert first.raw.closed and not _shut(lease.raw._sock)
    pool.checkin(lease)
    stats = pool.stats()
    assert stats["invalidated"] == 1 and stats["size"] == 1, stats
    assert not pool_module._ping_watch._armed
    assert_consistent(pool)


def test_a_round_trip_answered_in_time_is_never_cut() -> None:
    pool = make_pool(pool_size=1, max_overflow=0, pre_ping=True, timeout=1.0)
    me = threading.current_thread()
    SlowAnswer = type("SlowAnswer", (SilentConnection,), {"hold": 0.05})
    lease = pool.checkout(SlowAnswer, None, me)
    pool.checkin(lease)
    for _ in range(5):
        again = pool.checkout(SlowAnswer, lease, me)
        assert again is lease and not _shut(lease.raw._sock)
        pool.checkin(again)
    assert pool.stats()["invalidated"] == 0
    assert not pool_module._ping_watch._armed


def test_a_round_trip_ending_at_its_deadline_never_lends_a_shut_socket() -> None:
    # Answers come just before or just after the deadline, on 6 threads at
    # once: whichever of the watch and the round trip ends first, a
    # connection whose socket was shut down is never lent.
    pool = make_pool(pool_size=4, max_overflow=2, pre_ping=True, timeout=0.004)
    stop = time.monotonic() + 3.0
    lent_shut: list[Lease] = []
    counts = collections.Counter()

    class Borderline(SilentConnection):
        @property  # type: ignore[override]
        def hold(self) -> float:
            return random.uniform(0.002, 0.006)

    def borrower() -> None:
        me = threading.current_thread()
        while time.monotonic() < stop:
            try:
                lease = pool.checkout(Borderline, None, me)
            except (PoolTimeout, PoolError):
                counts["timeout"] += 1
                continue
            counts[lease.source] += 1
            if _shut(lease.raw._sock):
                lent_shut.append(lease)
            pool.checkin(lease)

    threads = [threading.Thread(target=borrower) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads)
    stats = pool.stats()
    print(f"pings at their deadline: {dict(counts)}, invalidated {stats['invalidated']}")
    assert not lent_shut
    assert stats["invalidated"] > 20 and counts["idle"] + counts["affinity"] > 20  # both ways ran
    assert not pool_module._ping_watch._armed
    assert_consistent(pool)


def test_the_watch_runs_in_a_forked_child() -> None:
    # The parent's watch thread does not exist in a child: the child's first
    # round trip starts one of its own.
    pool = make_pool(pool_size=1, max_overflow=1, pre_ping=True, timeout=0.2)
    me = threading.current_thread()
    warm = pool.checkout(FakeConnection, None, me)
    pool.checkin(warm)
    pool.checkout(FakeConnection, warm, me)  # a ping in the parent: its watch runs
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            child = make_pool(pool_size=1, max_overflow=1, pre_ping=True, timeout=0.2)
            first = child.checkout(SilentConnection, None, threading.current_thread())
            child.checkin(first)
            started = time.monotonic()
            lease = child.checkout(FakeConnection, first, threading.current_thread())
            code = 0 if lease is not first and time.monotonic() - started < 2 else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


@pytest.mark.parametrize("room", [True, False])
def test_one_unanswered_round_trip_is_all_a_checkout_waits_for(
    monkeypatch: pytest.MonkeyPatch, room: bool
) -> None:
    # Three idle connections to a server that stopped answering: pinging each
    # in turn would cost three timeouts. After the first, the checkout opens
    # a new connection; if it may not (others took the room meanwhile: made
    # so here), it raises at once, saying why.
    pool = make_pool(pool_size=3, max_overflow=0, pre_ping=True, timeout=0.3)
    me = threading.current_thread()
    silent = [pool.checkout(SilentConnection, None, me) for _ in range(3)]
    for lease in silent:
        pool.checkin(lease)
    if not room:
        monkeypatch.setattr(pool, "_has_room", lambda: False)
    started = time.monotonic()
    if room:
        lease = pool.checkout(FakeConnection, silent[0], me)
        assert lease.source == "new" and type(lease.raw) is FakeConnection
        pool.checkin(lease)
    else:
        with pytest.raises(PoolTimeout) as raised:
            pool.checkout(FakeConnection, silent[0], me)
        cause = raised.value.__cause__
        assert isinstance(cause, PoolError) and "got no answer within 0.3s" in str(cause)
    took = time.monotonic() - started
    assert 0.3 <= took < 0.55, took  # one timeout, not three
    assert pool.stats()["invalidated"] == 1
    assert [lease.state for lease in silent] == [GONE, IDLE, IDLE]
    assert not pool_module._ping_watch._armed
