"""The pool lifecycle, top to bottom: open, check out, check in, reset, retire.

SQLAlchemy's ``QueuePool`` owns the physical connections: it makes them
(through the callable the borrower gives, which opens a connection the way
Django would), it holds the cap (``pool_size + max_overflow``), and it closes
them when told to. Everything it hands out stays checked out of it for as long
as the connection lives; it is this module's :class:`Lease` that lends the
connection to one borrower after another. QueuePool's own queue therefore
holds only what this module retired (an empty slot, reopened on demand) or
never used. Each thing is counted once: the cap and the open connections by
QueuePool, the borrowers, the waiters and the timeout here.

A lease passes through these states, and only these::

    (QueuePool makes it) ─▶ IN_USE ──checkin: cursors closed, reset──▶ IDLE
    IDLE ──checkout: recycle age and health check──▶ IN_USE
    IN_USE ──checkin while a checkout waits──▶ RESERVED (handed to the waiter) ──▶ IN_USE
    IN_USE ──its borrower's thread ended, pool at its cap──▶ RESERVED ──reset──▶ IN_USE
    any ──broken, failed check, too old, beyond pool_size, pool retired──▶ GONE (closed)

Where idle leases live: in ``_idle``, a dict used as an ordered set. Claiming a
lease is ``del _idle[lease]``, which one thread only can win (the GIL makes it
the compare-and-set of HikariCP's ``ConcurrentBag``), with no call between the
claim and the holder's variable: a signal handler, which CPython runs only at
calls and loops' jumps, cannot leave a lease claimed by nobody. A borrower
first asks for the lease it used last (thread affinity: no trip through a
queue, and none of Django's per-connection setup again), then for any idle
lease, then QueuePool
for a new connection, and only at the cap does it wait, in FIFO order, for a
direct hand-off. One lock guards the waiters and the hand-off; checkouts and
checkins that find nobody waiting never take it.

A checkin gives back one checkout, the one its ``borrowed_at`` names: a lease
is IN_USE again only once its next borrower has set its own ``borrowed_at``
(RESERVED in between), so a late second checkin of a checkout finds another
time, or another state, and does nothing. A checkin from a thread other than
the borrower's (a thread that ended left its wrapper reachable) takes the
lease with the same compare-and-set as a reclaim, which may be taking it too.

Nothing here runs on a garbage-collection path: no SQLAlchemy event listener
and no finalizer is registered, and every lease keeps its SQLAlchemy proxy
alive until this module closes it.
"""

from __future__ import annotations

import _thread
import bisect
import ctypes
import functools
import gc
import logging
import math
import operator
import os
import random
import select
import socket
import sys
import threading
import time
import traceback
import weakref
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, TypedDict

from sqlalchemy import exc as sa_exc
from sqlalchemy.pool import PoolProxiedConnection, QueuePool

from django_postgrespool import metrics as _metrics
from django_postgrespool._rules import FAREWELL, roll_back, said_farewell
from django_postgrespool.errors import PoolError, PoolTimeout
from django_postgrespool.options import PoolOptions

__all__ = ["TIME_BUCKETS", "ConnectionPool", "HistogramSnapshot", "Lease", "PoolStats", "Target"]

logger = logging.getLogger("django_postgrespool")

# libpq's PGTransactionStatusType, the same numbers in psycopg2 and psycopg 3.
_IDLE, _ACTIVE, _INTRANS, _INERROR, _UNKNOWN = range(5)

# Lease states (compared by identity).
IDLE = "idle"
IN_USE = "in use"
RESERVED = "reserved"
GONE = "gone"

# Upper bounds, in seconds, of the wait/use/create histograms: the buckets the
# OpenTelemetry semantic conventions advise for db.client.connection.*_time.
TIME_BUCKETS: tuple[float, ...] = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0)

WAIT_WARNING_INTERVAL = 10.0
# A waiting checkout looks for connections of ended threads this often.
_RECLAIM_INTERVAL = 0.25
# A waiter wakes this long after fair_after, once a checkin has had the
# chance to serve it, to take a connection left idle meanwhile.
_FAIR_SLACK = 0.0005
# Reconnect backoff: the first pause after a failed connection attempt, and
# the longest (a server that is back serves within this of accepting).
_BACKOFF_FIRST = 0.1
_BACKOFF_MAX = 0.8
# Seconds after which a failed attempt no longer holds back the checkouts that
# need a new connection at once (see _open): nobody needed one since.
_FORGET_FAILURE = 5.0
# Each connection's recycle age is shortened by up to this fraction, so that
# connections opened together are not all replaced in the same second.
_RECYCLE_SPREAD = 0.05
_CURSORS_KEPT = 64  # prune closed cursors from a lease's list beyond this


class Target(TypedDict):
    """Where a pool connects to; never holds the password."""

    database: str
    host: str
    port: str
    user: str


class HistogramSnapshot(TypedDict):
    """Fixed-bucket counts: ``counts[i]`` observations in (buckets[i-1], buckets[i]]."""

    buckets: list[float]
    counts: list[int]
    sum: float
    count: int


class CountedStats(TypedDict):
    """What a pool counts over its life: the counters and the timings' histograms."""

    checkouts: int
    affinity_hits: int
    handoffs: int
    reclaimed: int
    waits: int
    timeouts: int
    leaks: int
    opened: int
    recycled: int
    invalidated: int
    closed: int
    connect_failures: int
    lost_slots: int
    wait_time: float
    use_time: float
    create_time: float
    wait_time_histogram: HistogramSnapshot
    use_time_histogram: HistogramSnapshot
    create_time_histogram: HistogramSnapshot


class PoolStats(CountedStats):
    """A snapshot of one pool, as returned by ``django_postgrespool.pool_stats()``."""

    alias: str
    database: str
    host: str
    port: str
    user: str
    pid: int
    pool_size: int
    max_overflow: int
    timeout: float
    recycle: float | None
    pre_ping: bool | str
    reset: str
    max_idle: float | None
    leak_timeout: float | None
    retired: bool
    size: int
    idle: int
    checked_out: int
    overflow: int
    waiting: int
    peak_checked_out: int
    backoff_until: float | None
    last_connect_error: str | None


class _Histogram:
    """Counts per fixed bucket and a running sum: no allocation per observation.

    ``low``/``high`` are the least and greatest timings since the last
    :meth:`take` (the OpenTelemetry feed's collection window).
    """

    __slots__ = ("__weakref__", "alias", "counts", "high", "kind", "low", "total")

    def __init__(self, alias: str, kind: _metrics.TimingKind) -> None:
        self.alias, self.kind = alias, kind
        self.counts = [0] * (len(TIME_BUCKETS) + 1)
        self.total = 0.0
        self.low, self.high = float("inf"), float("-inf")

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(TIME_BUCKETS, seconds)] += 1
        self.total += seconds
        if seconds < self.low:
            self.low = seconds
        if seconds > self.high:
            self.high = seconds
        if _metrics.timing_observers:  # an exporter that needs each timing
            _metrics.notify_timing(self.alias, self.kind, seconds)

    def take(self) -> tuple[list[int], float, float, float]:
        """Return the counts and sum so far, and the least and greatest timing since the last."""
        low, high = self.low, self.high
        self.low, self.high = float("inf"), float("-inf")
        return list(self.counts), self.total, low, high

    def snapshot(self) -> HistogramSnapshot:
        counts = list(self.counts)
        return HistogramSnapshot(
            buckets=list(TIME_BUCKETS), counts=counts, sum=self.total, count=sum(counts)
        )


class Lease:
    """One physical connection of a pool, and who has it."""

    __slots__ = (
        "__weakref__",
        "borrowed_at",
        "born",
        "configured",
        "cursors",
        "driver_state",
        "ended",
        "expires",
        "fairy",
        "heard",
        "isolation_level",
        "leak_stack",
        "leak_warned",
        "owner",
        "poller",
        "pool",
        "raw",
        "returned_at",
        "source",
        "state",
        "status",
        "verified",
        "wait",
    )

    def __init__(self, pool: ConnectionPool, fairy: PoolProxiedConnection, lifetime: float) -> None:
        now = time.monotonic()
        self.pool = pool
        self.fairy = fairy  # SQLAlchemy's proxy, kept checked out until the lease is GONE
        self.raw: Any = fairy.dbapi_connection
        self.status = _status_reader(self.raw)  # libpq's transaction status, cheaply
        self.state = IN_USE
        self.born = self.verified = self.borrowed_at = self.returned_at = now
        self.expires = now + lifetime
        # Set by the borrower: Django's per-connection setup is done (and is
        # not redone at the next checkout), and the isolation level it found.
        self.configured = False
        self.isolation_level: Any = None
        # What the driver's connection object had once set up (remember_setup()).
        self.driver_state: tuple[Any, ...] | None = None
        # The thread that has it; None while idle, or when it must never be
        # reclaimed (a connection shared between threads).
        self.owner: threading.Thread | None = None
        self.cursors: list[Any] = []  # opened during the current checkout
        self.source = "new"
        self.wait = 0.0
        self.poller: Any = None
        # The server said it ends the session (a FATAL message read after a
        # result): the socket may stay quiet until the backend has exited.
        # heard: psycopg 3 tells of each notice as it comes (_hear_farewell).
        self.ended = self.heard = False
        self.leak_warned = False
        self.leak_stack: list[str] | None = None

    def __repr__(self) -> str:
        return f"<Lease {self.state} of {self.pool!r}>"

    def remember_setup(self) -> None:
        """Note the driver connection's settings now that it is set up: restored at checkin."""
        self.driver_state = _driver_state(self.raw)

    def track(self, cursor: Any) -> None:
        """Remember ``cursor``: it is closed when the connection is given back."""
        cursors = self.cursors
        if cursors and cursors[-1].closed:
            # The usual way (``with connection.cursor() as c:``) closes each
            # cursor before the next: it is let go now. Kept until the list
            # is pruned, closed cursors would pile up on a connection held
            # across requests (CONN_MAX_AGE > 0) and set off the garbage
            # collector (about 5 us per request, measured).
            cursors[-1] = cursor
            return
        cursors.append(cursor)
        if len(cursors) > _CURSORS_KEPT:
            self.cursors = [c for c in cursors if not c.closed]


class _Doorbell:
    """One thread's eventfd, rung to wake it; reused by each of its waits.

    Why not a Lock: waking a thread blocked on a Lock is a futex wake made
    while holding the GIL, and on a busy machine the kernel often switches
    to the woken thread right there. The waker is then descheduled holding
    the GIL, and the woken thread cannot run without it: the profile of the
    fleet benchmark had 39% of its GIL time in ``Lock.release()``. Writing an
    eventfd is a syscall that CPython makes with the GIL released.
    """

    __slots__ = ("busy", "fd", "poller")

    def __init__(self) -> None:
        self.fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.poller = select.poll()  # not select(): descriptors above 1023 work too
        self.poller.register(self.fd, select.POLLIN)
        self.busy = False  # a waiter of this thread has it (a greenlet's may not)

    def ring(self) -> None:
        os.eventfd_write(self.fd, 1)

    def clear(self) -> None:
        """Forget the rings so far: called before sleeping, not after waking.

        A thread woken by a hand-off then runs no syscall (each gives the GIL
        away) before it uses its connection; a thread about to sleep gives
        the GIL away anyway.
        """
        try:
            os.eventfd_read(self.fd)
        except BlockingIOError:  # not rung
            pass

    def listen(self, timeout: float) -> None:
        """Return when rung (since the last clear()) or after ``timeout``."""
        self.poller.poll(timeout * 1000.0)

    def __del__(self) -> None:
        # Every _Waiter that may ring it holds it: no one writes to a closed fd.
        fd = getattr(self, "fd", None)
        if fd is not None:
            os.close(fd)


class _Doorbells(threading.local):
    bell: _Doorbell | None = None


_doorbells = _Doorbells()
_HAS_EVENTFD = hasattr(os, "eventfd")


class _Waiter:
    """A checkout waiting at the cap, woken by a hand-off."""

    __slots__ = ("bell", "guard", "lease", "lock", "reclaimed", "served", "since", "took")

    def __init__(self) -> None:
        self.since = 0.0  # when it joined the line
        self.guard = False  # it guards the line: it wakes up at fair_after (see _due)
        self.served = False  # written under the pool's lock, before the wake-up
        self.lease: Lease | None = None  # None when served: room for a new connection
        # Claimed by the waiting checkout itself (from _idle; from an ended
        # thread): given back if its wait is cut short before it returns them.
        self.took: Lease | None = None
        self.reclaimed: Lease | None = None
        self.bell = self.lock = None
        bell = _doorbells.bell if _HAS_EVENTFD else None
        if _HAS_EVENTFD and (bell is None or bell.busy):  # busy: greenlets sharing a thread
            try:
                bell = _Doorbell()
            except OSError:  # out of file descriptors: a lock will do
                bell = None
            else:
                if _doorbells.bell is None:
                    _doorbells.bell = bell
        if bell is not None:
            self.bell = bell  # busy while its wait lasts (see ConnectionPool._wait)
        else:  # no eventfd (not Linux): a plain lock, held until the hand-off
            self.lock = threading.Lock()
            self.lock.acquire()

    def start(self) -> None:
        """The wait starts: the thread's bell is this waiter's until :meth:`done`."""
        if self.bell is not None:
            self.bell.busy = True

    def done(self) -> None:
        """The wait is over (served or not): the thread's bell is free for its next wait."""
        if self.bell is not None:
            self.bell.busy = False

    def wake(self) -> None:
        """Wake the waiting thread (call it outside the pool's lock)."""
        if self.bell is not None:
            self.bell.ring()
        else:
            self.lock.release()  # type: ignore[union-attr]

    def sleep(self, timeout: float) -> bool:
        """Wait up to ``timeout`` for :meth:`wake`; tell whether it has been served."""
        bell = self.bell
        if bell is not None:
            bell.clear()  # rings of earlier waits; this one's, if any, set served first
            if not self.served:
                bell.listen(timeout)
            return self.served  # a ring of an earlier wait, left after a timeout: not served
        return self.lock.acquire(timeout=timeout)  # type: ignore[union-attr]


class _Opening(threading.local):
    # QueuePool calls its creator synchronously inside connect(): the callable
    # of the checkout running in this thread, and the connection it opened.
    open: Callable[[], Any] | None = None
    made: Any = None


_opening = _Opening()


class ConnectionPool:
    """One pool of physical connections for one (process, alias, parameters)."""

    def __init__(
        self,
        alias: str,
        options: PoolOptions,
        target: Target,
        *,
        autocommit: bool = True,
        connect_errors: tuple[type[BaseException], ...] = (),
        session_attrs: str | None = None,
    ) -> None:
        self.alias = alias
        self.autocommit = autocommit
        self.options = options
        self.target = target
        self.pid = os.getpid()
        self.closed = False
        self.retired = False
        self.per_transaction = options.lease == "transaction"
        self._pre_ping = options.pre_ping
        self._lifo = options.use_lifo
        self._fair_after = options.fair_after
        # Read on every checkout and checkin: plain attributes, not the options'.
        self._pool_size = options.pool_size
        self._max_idle = options.max_idle
        self._leak_timeout = options.leak_timeout
        self._rounds = range(options.max_connections + 2)
        self._discard_all = options.reset == "discard"
        self._connect_errors = connect_errors
        # What a failed attempt to open raises (see _checkout_slow).
        self._refusals: tuple[type[BaseException], ...] = (PoolError, *connect_errors)
        # libpq checks target_session_attrs only when it connects; a pooled
        # session outlives a demotion (a server made read-only, a standby that
        # took over the address) or a promotion: with a value that refuses
        # some servers, every checkout asks again, in one round trip. Given
        # in OPTIONS (session_attrs), or found on the first connection opened
        # (a libpq service file, PGTARGETSESSIONATTRS): see _learn_attrs().
        self._ping_sql = "SELECT true"
        self._recheck = False
        self.session_attrs: str | None = None
        # prefer-standby: a connection that fell back to a primary (no standby
        # answered) is recycled soon, so that reads go back to a standby once
        # one answers again (see _learn_attrs()).
        self._prefer_standby = False
        # Not given (None): learnt from the first connection opened.
        self._attrs_known = session_attrs is not None
        self._expect(session_attrs)
        # Connections opened before the last disconnect this pool saw get a
        # real ping at their next checkout (see _check).
        self._suspect_before = float("-inf")
        # A health check got no answer (see _ping): connections idle since
        # before it began are closed at their checkout, not pinged in turn.
        self._silent_since = float("-inf")

        self._leases: set[Lease] = set()  # every open connection: idle, in use, reserved
        self._idle: dict[Lease, bool] = {}  # idle ones, oldest returned first
        # The one lock: guards _waiters and every hand-off, and _leases.
        self._lock = threading.Lock()
        self._waiters: deque[_Waiter] = deque()
        self._room = 0  # bumped whenever a connection closes: room under the cap
        # Reconnect backoff (see _open).
        self._failing = False
        self._attempting = False
        self._backoff_delay = 0.0
        self._backoff_until = float("-inf")
        self._last_error: str | None = None
        self._last_failure_at = 0.0
        # max_idle: the fewest idle connections seen since the last sweep.
        self._idle_low = 0
        self._next_sweep = time.monotonic() + (options.max_idle or 0.0)

        self._opened = self._closed = self._recycled = self._invalidated = 0
        self._checkouts = self._affinity = self._handoffs = self._reclaimed = 0
        self._waits = self._timeouts = self._leaks = self._connect_failures = 0
        self._connecting = 0  # checkouts between QueuePool's connect() and _leases
        self._closing: set[Lease] = set()  # out of _leases before their close (_surplus)
        self._lost_slots = 0  # slots QueuePool counted for nobody, freed (see _recount)
        self._recount_after = 0.0
        self._peak = 0
        self._wait_hist, self._use_hist, self._create_hist = (
            _Histogram(alias, "wait"),
            _Histogram(alias, "use"),
            _Histogram(alias, "create"),
        )
        self._last_wait_warning = float("-inf")
        self._waits_warned = 0
        self._queue = QueuePool(
            _create,  # type: ignore[arg-type]  # takes the record, as QueuePool allows
            pool_size=options.pool_size,
            max_overflow=options.max_overflow,
            # At the cap QueuePool says so at once; waiting is done here.
            timeout=0,
            recycle=-1,  # each lease has its own, spread, recycle age
            use_lifo=options.use_lifo,
            reset_on_return=None,  # reset is done here, at checkin
        )
        if options.leak_timeout is not None or options.max_idle is not None:
            _housekeeper.watch(self)

    def __repr__(self) -> str:
        t = self.target
        return (
            f"<ConnectionPool alias={self.alias!r} database={t['database']!r} "
            f"host={t['host']!r} port={t['port']!r} user={t['user']!r} "
            f"pool_size={self.options.pool_size} max_overflow={self.options.max_overflow}"
            f"{' closed' if self.closed else ''}>"
        )

    # -- checkout ---------------------------------------------------------

    def checkout(
        self,
        open_connection: Callable[[], Any],
        prefer: Lease | None = None,
        owner: threading.Thread | None = None,
    ) -> Lease:
        """Lend a connection: ``prefer`` if it is idle, else any idle one, else a new one.

        ``open_connection()`` opens a physical connection the way Django
        would; it is called only when a new one is needed, in this thread.
        At the cap, wait up to ``timeout`` for a connection to be handed over.
        ``owner`` is the borrowing thread (None: never reclaim it).
        """
        asked = time.monotonic()
        idle = self._idle
        lease: Lease | None = None
        if prefer is not None and prefer in idle:
            try:
                # The claim. `del`, not pop(): a signal handler runs only at
                # a call or a loop's jump, and would find the lease claimed
                # by nobody between pop() and the assignment (see _take_idle).
                del idle[prefer]
                lease, source = prefer, "affinity"
            except KeyError:  # claimed by another thread meanwhile
                pass
        if lease is None:
            lease, source = self._take_idle(), "idle"
        # An idle connection taken at once was not waited for: the clock is
        # read again only after a wait, a new connection or a ping.
        now = asked
        # Bounded: a failed health check marks every older connection as
        # suspect, so each further round either verifies one or opens one.
        checking = False  # a health check runs: interrupted, its connection is closed
        # A health check got no answer within the timeout (see _ping): the
        # checkout's own timeout is over, and the idle connections may be as
        # silent, each costing as much. A new connection, or PoolTimeout.
        unanswered = False
        try:
            for _ in self._rounds:
                if lease is None:
                    if unanswered:
                        lease, source = self._open_after_silence(open_connection), "new"
                    else:
                        lease, source = self._checkout_slow(open_connection, asked)
                    now = time.monotonic()
                checking = source != "new"
                problem = self._check(lease, now) if checking else None
                checking = False
                if problem is None:
                    if lease.verified > now:  # pinged just now: the round trip was waited for
                        now = lease.verified
                    lease.owner = owner
                    lease.source = source
                    lease.borrowed_at = now
                    lease.wait = wait = now - asked
                    lease.state = IN_USE  # last: see "A checkin gives back one checkout"
                    self._wait_hist.observe(wait)
                    self._checkouts += 1
                    if source == "affinity":
                        self._affinity += 1
                    used = len(self._leases) - len(idle)
                    if used > self._peak:
                        self._peak = used
                    if self._max_idle is not None and len(idle) < self._idle_low:
                        self._idle_low = len(idle)
                    if self._leak_timeout is not None:
                        lease.leak_warned = False
                        lease.leak_stack = traceback.format_stack()[:-2]
                    return lease
                # Retired before the next one is claimed: `lease` is always
                # this checkout's, or GONE.
                if problem is _TOO_OLD:
                    self._retire(lease, None, warn=False, recycled=True)
                else:
                    self._suspect_before = time.monotonic()
                    self._retire(lease, problem)
                    if problem is _NO_ANSWER:
                        unanswered = True
                        self._silent_since = max(self._silent_since, now)
                now = time.monotonic()
                lease, source = (None, "new") if unanswered else (self._take_idle(), "idle")
        except BaseException:
            # A signal handler's exception (or a check's own): the caller
            # never has the connection this checkout claimed. Closed if its
            # check was cut short (a round trip may be half done), or if it
            # is new (its borrower sets it up: Django's state of it is that
            # wrapper's), else given back as it is: a KeyboardInterrupt costs
            # no reconnection.
            if lease is not None and lease.state is not GONE:
                if checking or source == "new":
                    self._retire(lease, "its checkout was interrupted", warn=False)
                else:
                    self._give_back(lease)
            raise
        raise PoolError(f"{self!r} could not find a live connection.")

    def _take_idle(self) -> Lease | None:
        """Claim an idle lease, the oldest returned (newest with use_lifo)."""
        idle = self._idle
        # Claimed with `del` and returned with no call in between: a signal
        # handler (KeyboardInterrupt, a task's time limit) runs at calls and
        # loops' jumps only, so its exception comes before the claim or after
        # the caller has the lease. pop() would return it from a call, where
        # one may run, and the lease would be claimed by nobody for ever.
        order = reversed if self._lifo else iter
        while idle:
            try:
                lease = next(order(idle))
                del idle[lease]
            except (StopIteration, RuntimeError, KeyError):  # changed under us: look again
                continue
            return lease
        return None

    def _checkout_slow(self, open_connection: Callable[[], Any], asked: float) -> tuple[Lease, str]:
        """Open a new connection, reclaim an ended thread's, or wait for a hand-off."""
        deadline = asked + self.options.timeout
        refused: BaseException | None = None  # the last attempt's error, while waiting
        while True:
            room = self._room
            # A connection whose borrower ended first (a streaming response
            # that failed, a task that outlived its request): below the cap
            # too, else each would cost one more connection until the cap.
            lease = self._reclaim_dead()
            if lease is not None:
                return lease, "reclaimed"
            # QueuePool's own count says whether it is at its cap: asking it
            # for a connection there would only raise, at a price.
            if self._has_room() or self._failing:
                try:
                    lease = self._open(open_connection)
                except self._refusals as error:
                    # The server refuses (full, a role's connection limit, a
                    # password changed) or the backoff holds: with connections
                    # of the pool lent, which will come back (or given back
                    # meanwhile), wait for one within the timeout (HikariCP's
                    # and psycopg_pool's way). With none, nothing can come
                    # (the server is down, or refuses us everything): fail at once.
                    if not self._leases:
                        raise
                    refused = error
                if lease is not None:
                    return lease, "new"
            try:
                lease = self._wait(deadline, room)
            except PoolTimeout as timeout:
                if refused is None:
                    raise
                raise timeout from refused
            if lease is not None:
                return lease, "handoff"
            # None: a connection closed meanwhile, there is room for a new one.

    def _open_after_silence(self, open_connection: Callable[[], Any]) -> Lease:
        """Open a connection once a health check went unanswered, or raise PoolTimeout."""
        lease = self._open(open_connection) if self._has_room() else None
        if lease is None:  # at the cap: others took the room the silent one left
            self._timeouts += 1
            raise self._timeout_error() from PoolError(
                f"A health check of {self!r} got no answer within "
                f"{self.options.timeout:g}s (the pool's timeout)."
            )
        return lease

    def _has_room(self) -> bool:
        cap = self.options.max_connections
        if self._queue.checkedout() < cap:
            return True
        # QueuePool is at its cap: so are we, unless it lost count (_recount).
        held = len(self._leases) + self._connecting + len(self._closing)
        return held < cap and self._recount(0)

    def _open(self, open_connection: Callable[[], Any]) -> Lease | None:
        """Open a new connection through QueuePool; None when it is at the cap."""
        attempting = False
        if self._failing:
            # After a failed attempt: fail at once until the backoff is over,
            # then let one checkout at a time try. A failure older than
            # _FORGET_FAILURE (nobody needed a new connection since) holds
            # nobody back: checkouts that need one at once all try.
            now = time.monotonic()
            if now - self._last_failure_at <= _FORGET_FAILURE:
                with self._lock:
                    if now < self._backoff_until or self._attempting:
                        raise self._backoff_error(now)
                    self._attempting = attempting = True
        started = time.monotonic()
        with self._lock:
            self._connecting += 1
        try:
            fairy = self._connect(open_connection)
        finally:
            if attempting:
                self._attempting = False
        if fairy is None:  # at the cap
            with self._lock:
                self._connecting -= 1
            return None
        lease = None
        try:
            now = time.monotonic()
            if self._failing:
                self._failing = False
                self._backoff_delay = 0.0
                logger.info("Database alias %r is reachable again.", self.alias)
            self._create_hist.observe(now - started)
            recycle = self.options.recycle
            lifetime = (
                float("inf")
                if recycle is None
                else recycle * (1.0 - _RECYCLE_SPREAD * random.random())
            )
            lease = Lease(self, fairy, lifetime)
            self._learn_attrs(lease)
            _hear_farewell(lease)
            if self._pre_ping == "socket":
                _poller(lease)
            with self._lock:
                self._leases.add(lease)
                self._connecting -= 1
            self._opened += 1
        except BaseException:
            # A signal handler's exception (or a failure setting it up): close
            # it, its slot back to QueuePool, whoever waits for room told.
            self._opened += 1
            counted = lease is not None and lease in self._leases  # then no longer connecting
            try:
                if lease is not None:
                    self._retire(lease, None, warn=False)
                    raise
                try:
                    fairy.invalidate()
                except Exception:
                    pass
                self._closed += 1
                self._signal_room()
                raise
            finally:
                if not counted:  # after its slot is freed: _recount never sees it lost
                    with self._lock:
                        self._connecting -= 1
        return lease

    def _connect(self, open_connection: Callable[[], Any]) -> Any:
        """QueuePool's connect() for a new connection of this checkout; None at the cap.

        Counted in ``_connecting`` by the caller, which takes it out again
        when this raises.
        """
        for _ in range(3):
            _opening.open = open_connection
            _opening.made = None
            try:
                fairy = self._queue.connect()
            except sa_exc.TimeoutError:  # at the cap
                if self._recount(1):
                    continue
                return None
            except BaseException as error:
                with self._lock:
                    self._connecting -= 1
                # Cut short inside SQLAlchemy once the driver had connected:
                # nobody holds that connection.
                made, _opening.made = _opening.made, None
                _close_quietly(made)
                # QueuePool has freed the slot this attempt held: a checkout that
                # found it at the cap meanwhile is waiting for that room.
                if isinstance(error, self._connect_errors):
                    self._note_connect_failure(error)
                self._signal_room()
                raise
            finally:
                _opening.open = None
            made, _opening.made = _opening.made, None
            if fairy.dbapi_connection is made:
                return fairy
            # Every connection of ours is checked out of QueuePool, so it has
            # none to lend but a record an interrupted invalidate() put back
            # with its connection (see _retire): never lent, closed.
            try:
                fairy.invalidate()
            except Exception:
                pass
        return None

    def _recount(self, mine: int) -> bool:
        """Free the slots QueuePool counts for nobody; tell whether there were any.

        A signal handler's exception inside SQLAlchemy's bookkeeping (a
        checkin, an invalidate(), a connect()) can leave QueuePool counting a
        connection nobody holds: a slot lost under the cap for good. Every
        slot QueuePool counts is a lease of ours, a checkout between its
        connect() and its lease (``_connecting``; ``mine``: this thread's,
        which holds none), or a lease out of ``_leases`` before its close
        (``_closing``). Rare (the counts disagree only after such an
        exception), so the garbage collector runs first: a connection
        QueuePool lent to a frame the exception cut short goes back to it
        when collected, and must not be freed twice.
        """
        queue = self._queue
        overflow_lock = getattr(queue, "_overflow_lock", None)
        if overflow_lock is None or not isinstance(getattr(queue, "_overflow", None), int):
            return False  # not the QueuePool this was written for
        now = time.monotonic()
        if now < self._recount_after:
            return False
        self._recount_after = now + 1.0  # a collection a second at most, whatever happens
        gc.collect()  # no lock held: finalizers may take QueuePool's
        with self._lock, overflow_lock:
            held = len(self._leases) + self._connecting - mine + len(self._closing)
            lost = queue.checkedout() - held
            if lost <= 0:
                return False
            queue._overflow -= lost
            self._lost_slots += lost
        logger.warning(
            "Database alias %r: QueuePool counted %d connection(s) nobody holds (an "
            "exception raised inside its bookkeeping, by a signal handler); freed.",
            self.alias,
            lost,
        )
        return True

    def _expect(self, session_attrs: str | None) -> None:
        """Check at each checkout that the server still is what ``session_attrs`` asks."""
        self._prefer_standby = session_attrs == "prefer-standby"
        sql = _SESSION_CHECKS.get(session_attrs or "")
        if sql is None:  # any, prefer-standby (which takes a primary when it must)
            self._recheck = False
            self._ping_sql = "SELECT true"
            self.session_attrs = None
            return
        self._ping_sql = sql  # before _recheck: a checkout may read both meanwhile
        self._recheck = True
        self.session_attrs = session_attrs

    def _learn_attrs(self, lease: Lease) -> None:
        """Without target_session_attrs in OPTIONS, take the one libpq connected with.

        Given by a libpq service file or PGTARGETSESSIONATTRS: read once, from
        the first connection. Only the values that refuse a primary's
        demotion are taken: psycopg 3 makes prefer-standby's attempts
        "standby", then none, so a "standby" seen on one connection may not
        be what was asked. With prefer-standby (in OPTIONS), a connection on a
        primary lives at most FALLBACK_LIFETIME: libpq took the primary
        because no standby answered.
        """
        if not self._attrs_known:
            self._attrs_known = True
            found = _target_session_attrs(lease.raw)
            if found in _LEARNT_ATTRS:
                self._expect(found)
        if self._prefer_standby and _in_hot_standby(lease.raw) is False:
            lease.expires = min(lease.expires, lease.born + FALLBACK_LIFETIME)

    def _note_connect_failure(self, error: BaseException) -> None:
        now = time.monotonic()
        with self._lock:
            self._connect_failures += 1
            self._failing = True
            delay = min(_BACKOFF_MAX, max(_BACKOFF_FIRST, self._backoff_delay * 2))
            self._backoff_delay = delay
            self._backoff_until = now + delay * random.uniform(0.9, 1.0)
            self._last_failure_at = now
            self._last_error = _first_line(error)
        logger.warning(
            "Cannot connect to database alias %r at %s:%s (%s); next attempt in %.2fs.",
            self.alias,
            self.target["host"],
            self.target["port"],
            self._last_error,
            self._backoff_until - now,
        )

    def _backoff_error(self, now: float) -> PoolError:
        t = self.target
        wait = max(0.0, self._backoff_until - now)
        when = f"in {wait:.2f}s" if wait > 0 else "now, by another checkout"
        return PoolError(
            f"Cannot connect to database alias {self.alias!r} at {t['host']}:{t['port']}: "
            f"the last attempt, {now - self._last_failure_at:.2f}s ago, failed "
            f"({self._last_error}). Not trying again yet: the next attempt is {when} "
            f"(reconnect backoff after {self._connect_failures} failed attempt(s))."
        )

    def _reclaim_dead(self) -> Lease | None:
        """Take back a connection whose borrowing thread has ended, reset."""
        for lease in list(self._leases):
            owner = lease.owner
            if lease.state is not IN_USE or owner is None or _alive(owner):
                continue
            claimed = False
            try:
                with self._lock:  # the compare-and-set: IN_USE → RESERVED
                    if lease.state is not IN_USE or lease.owner is not owner:
                        continue
                    lease.state = RESERVED
                    claimed = True
                logger.warning(
                    "Reclaiming a connection of database alias %r from thread %r, which "
                    "ended without giving it back.",
                    self.alias,
                    owner.name,
                )
                if any(_double_close(c) for c in lease.cursors):
                    # A psycopg2 server-side cursor left open (a stream that
                    # failed): a generator's finalizer may close it from another
                    # thread at any moment, and psycopg2 looks at `closed` before
                    # it waits for the connection: its CLOSE may be sent twice,
                    # the second on the next borrower's session. Not lent again,
                    # and closed without a CLOSE of ours: the server drops it.
                    lease.cursors = []
                    self._retire(lease, "its thread ended with a server-side cursor open")
                    continue
                if not self._reset_or_retire(lease):
                    continue
                self._reclaimed += 1
            except BaseException:  # a signal handler's: nobody else would have it
                if claimed and lease.state is RESERVED:
                    self._retire(lease, "its reclaim was interrupted", warn=False)
                raise
            return lease
        return None

    def _wait(self, deadline: float, room: int) -> Lease | None:
        """Wait for a hand-off: a lease, or None for room to open one."""
        waiter = _Waiter()
        bell = waiter.bell
        try:
            # Busy from here, not in _Waiter(): a signal handler's exception
            # as it returned would leave the thread's bell busy for good.
            waiter.start()
            lease = self._wait_as(waiter, deadline, room)
        except BaseException:
            self._leave_line(waiter)
            raise
        finally:
            # waiter.done(), with no call (see _take_idle) from here to the return.
            if bell is not None:
                bell.busy = False
        return lease

    def _leave_line(self, waiter: _Waiter) -> None:
        """Take ``waiter`` out of the line when its wait raised (a signal handler, a timeout
        of the caller's): else the next checkin hands it a connection nobody takes."""
        to_wake: list[_Waiter] = []
        with self._lock:
            served = waiter.served
            if not served:
                if waiter in self._waiters:  # not if it had left with a lease of its own
                    self._waiters.remove(waiter)
                # Whoever is first now may be due, or need to guard the line.
                to_wake = self._serve_from_idle()
        for other in to_wake:
            other.wake()
        if served:  # handed over as it gave up: pass it on
            if waiter.lease is not None:
                self._give_back(waiter.lease)
            else:
                self._signal_room()  # room to open a connection, for the next in line
        # Claimed by this wait and not returned (a signal handler's exception
        # between the claim and the return): nobody else would give them back.
        took, waiter.took = waiter.took, None
        if took is not None and took.state is IDLE and took not in self._idle:
            self._give_back(took)
        reclaimed, waiter.reclaimed = waiter.reclaimed, None
        if reclaimed is not None and reclaimed.state is RESERVED:
            self._give_back(reclaimed)

    def _wait_as(self, waiter: _Waiter, deadline: float, room: int) -> Lease | None:
        with self._lock:
            if self._room != room:
                return None  # a connection closed since we asked QueuePool
            waiter.since = time.monotonic()
            # Within fair_after of joining, the first in line lets a connection
            # given back stay idle for whoever asks first (see _due), and
            # wakes up at fair_after to take one left idle. It guards the
            # line from the start when it found it empty; one that becomes
            # first while still young is rung once to start guarding (see
            # _serve_from_idle). A waiter that is first only when it has
            # waited fair_after is served at every checkin and needs no
            # wake-up of its own: in a long line, that would be one per wait.
            waiter.guard = bool(self._fair_after) and waiter.bell is not None and not self._waiters
            # In line before it looks at _idle: a checkin that takes no lock puts
            # a connection idle, then looks at the line; one of the two sees the
            # other (looking first, it could sleep with a connection idle).
            self._waiters.append(waiter)
            lease = waiter.took = self._take_idle()
            if lease is not None:
                self._waiters.remove(waiter)  # the last in line: nobody's turn changes
                return lease
        self._note_wait()
        fair_checked = False  # it looked for a connection left idle at fair_after
        to_wake: list[_Waiter]
        while True:
            now = time.monotonic()
            remaining = deadline - now
            reclaimed = None
            if remaining > 0:
                nap = min(remaining, _RECLAIM_INTERVAL)
                if self._failing and now < self._backoff_until:
                    # Refused (see _checkout_slow): look again as the backoff ends.
                    nap = min(nap, self._backoff_until - now + _FAIR_SLACK)
                if waiter.guard and not fair_checked:
                    nap = min(nap, max(waiter.since + self._fair_after - now, 0.0) + _FAIR_SLACK)
                if waiter.sleep(nap):
                    return waiter.lease
                # Not served: the nap is over, or a ring told it to guard the line.
                if (
                    waiter.guard
                    and not fair_checked
                    and time.monotonic() >= waiter.since + self._fair_after
                ):
                    fair_checked = True
                    if self._idle:
                        lease, to_wake = None, []
                        with self._lock:
                            if not waiter.served:
                                lease = waiter.took = self._take_idle()
                                if lease is not None:
                                    self._waiters.remove(waiter)
                                    to_wake = self._serve_from_idle()
                        for other in to_wake:
                            other.wake()
                        if lease is not None:
                            return lease
                        if waiter.served:
                            return waiter.lease
                # Still waiting: a borrower's thread may have ended meanwhile,
                # or (belt and braces) room may have appeared unannounced.
                reclaimed = waiter.reclaimed = self._reclaim_dead()
                if reclaimed is None and not self._has_room():
                    continue
            to_wake = []
            timed_out = False
            with self._lock:
                if waiter.served:  # handed over as we gave up: take it
                    lease = waiter.lease
                else:
                    self._waiters.remove(waiter)
                    lease = None
                    if reclaimed is None and remaining <= 0:
                        lease = waiter.took = self._take_idle()  # left idle within fair_after
                        timed_out = lease is None
                        if timed_out:
                            self._timeouts += 1
                    # Whoever is first now may be due, or need to guard the line.
                    to_wake = self._serve_from_idle()
            for other in to_wake:
                other.wake()
            if timed_out:
                raise self._timeout_error()
            if reclaimed is not None:  # served twice: keep one, give the other back
                if lease is None:
                    return reclaimed
                waiter.reclaimed = None  # not ours from here on
                self._give_back(reclaimed)
            return lease  # None: room to open a connection

    def _timeout_error(self) -> PoolTimeout:
        return PoolTimeout(
            alias=self.alias,
            pool_size=self.options.pool_size,
            max_overflow=self.options.max_overflow,
            checked_out=len(self._leases) - len(self._idle),
            timeout=self.options.timeout,
        )

    def _note_wait(self) -> None:
        self._waits += 1
        now = time.monotonic()
        # Under sustained load every checkout may wait: warn at most every
        # WAIT_WARNING_INTERVAL seconds, with the count since the last warning.
        if now - self._last_wait_warning >= WAIT_WARNING_INTERVAL:
            waits = self._waits - self._waits_warned
            self._last_wait_warning, self._waits_warned = now, self._waits
            logger.warning(
                "Pool of database alias %r has all %d connections checked out; "
                "waiting up to %gs for one to be returned (%d wait(s) since the last warning).",
                self.alias,
                self.options.max_connections,
                self.options.timeout,
                waits,
            )

    def _check(self, lease: Lease, now: float) -> str | None:
        """Tell why an idle ``lease`` must not be lent at ``now``, if it must not."""
        if now >= lease.expires:
            return _TOO_OLD
        if lease.returned_at < self._silent_since:
            # Idle since before the server stopped answering another of this
            # pool's connections: as silent, most likely; each ping would
            # cost the whole timeout.
            return _SILENT
        mode = True if self._recheck else self._pre_ping
        if lease.verified < self._suspect_before:
            # Opened before a disconnect this pool saw: ping it once rather
            # than hand it out to fail in its turn.
            mode = True
        if mode is False:
            return None
        if mode == "socket":
            readable = lease.poller or _poller(lease)
            if readable is not None and not readable():
                return None
        problem = self._ping(lease.raw)
        if problem is None:
            lease.verified = time.monotonic()
        return problem

    def _ping(self, raw: Any) -> str | None:
        """Run one round trip on ``raw``; tell why it failed (or found no primary), if it did.

        Within the pool's ``timeout``: a server that stops answering but
        keeps the connection open (frozen, or behind a network that drops
        packets while the kernel still retries) would hold the checkout
        until it answers. The watch shuts the socket down at the deadline,
        which ends the driver's wait with an error (see _PingWatch).
        """
        problem: str | None = _PING_FAILED
        try:
            _ping_watch.arm(raw, time.monotonic() + self.options.timeout)
            with raw.cursor() as cursor:
                cursor.execute(self._ping_sql)
                if cursor.fetchone()[0]:
                    problem = None
            if raw.info.transaction_status != _IDLE:
                raw.rollback()
        except Exception:  # whatever the driver raises, the connection is unusable
            problem = _PING_FAILED
        finally:
            if not _ping_watch.disarm(raw):  # shut down at the deadline
                problem = _NO_ANSWER
        return problem

    # -- checkin ----------------------------------------------------------

    def checkin(
        self, lease: Lease, now: float | None = None, borrowed_at: float | None = None
    ) -> None:
        """Close the cursors of ``lease``, reset it, and lend it on or keep it idle.

        ``now``: the caller's time.monotonic() when it gave the connection back.
        ``borrowed_at``: the checkout's (``lease.borrowed_at`` when it was lent);
        nothing is done if the lease has been lent again since.
        """
        if not self._holds(lease, borrowed_at):
            return
        mine = lease.borrowed_at  # this checkout's, from here on
        try:
            self._checkin(lease, now)
        except BaseException:
            # A signal handler's exception before the connection was reset and
            # given back (the reset's own is _reset_or_retire's): nobody else
            # would give it back. Once given back it may be IN_USE again, by
            # a waiter it was handed to (woken by this very checkin when the
            # exception came): that is the next checkout's, with its own
            # borrowed_at (set before IN_USE), not to be closed under it.
            if lease.state is IN_USE and lease.borrowed_at == mine:
                self._retire(lease, "its checkin was interrupted", warn=False)
            raise

    def _checkin(self, lease: Lease, now: float | None) -> None:
        if now is None:
            now = time.monotonic()
        self._use_hist.observe(now - lease.borrowed_at)
        if lease.leak_warned:
            logger.info(
                "A connection of database alias %r reported as leaked was returned after %.1fs.",
                self.alias,
                now - lease.borrowed_at,
            )
        if self.closed:
            self._retire(lease, "its pool was closed", warn=False)
            return
        if not self._reset_or_retire(lease):
            return
        lease.returned_at = now
        if (
            len(self._leases) > self._pool_size
            and self._max_idle is None
            and self._surplus(lease)
        ):
            # Beyond pool_size, with nobody waiting: close it (QueuePool's way).
            self._retire(lease, None, warn=False)
            # Others given back beyond pool_size within fair_after, while
            # someone waited, may be idle still: nobody would close them.
            self._close_idle_surplus()
            return
        self._give_back(lease)
        if self.closed and lease in self._idle:  # close() drained _idle meanwhile
            try:
                del self._idle[lease]  # claimed (see _take_idle)
            except KeyError:
                return
            self._retire(lease, None, warn=False)
            return
        if self._max_idle is not None and now >= self._next_sweep:
            self.sweep_idle(now)

    def _surplus(self, lease: Lease) -> bool:
        """Take ``lease`` out of the pool if it is beyond ``pool_size`` and nobody waits."""
        # Under the lock: connections returned at once must not all see
        # themselves as the surplus one.
        with self._lock:
            if len(self._leases) > self.options.pool_size and not self._waiters:
                self._leases.discard(lease)
                self._closing.add(lease)  # QueuePool counts it until _retire
                return True
        return False

    def _close_idle_surplus(self, most: float = math.inf) -> None:
        """Close up to ``most`` idle connections beyond ``pool_size`` while nobody waits."""
        while most > 0 and len(self._leases) > self._pool_size and not self._waiters:
            lease = self._take_idle()
            if lease is None:
                return
            most -= 1
            try:
                surplus = self._surplus(lease)
                if surplus:
                    self._retire(lease, None, warn=False)
            except BaseException:
                # A signal handler's, before _retire had it (GONE): put it
                # back, or, out of _leases already, close it; nobody else would.
                if lease.state is not GONE:
                    if lease in self._leases:
                        self._idle[lease] = True
                    else:
                        self._retire(lease, None, warn=False)
                raise
            if not surplus:  # someone started waiting meanwhile
                self._give_back(lease)
                return

    def discard(self, lease: Lease, reason: str, borrowed_at: float | None = None) -> None:
        """Close the connection of ``lease`` instead of lending it again (see checkin)."""
        if self._holds(lease, borrowed_at):
            self._use_hist.observe(time.monotonic() - lease.borrowed_at)
            self._retire(lease, reason)

    def _holds(self, lease: Lease, borrowed_at: float | None) -> bool:
        """Tell whether the caller may give back ``lease``: it is the checkout lent at
        ``borrowed_at`` (any, if None), and no reclaim takes it."""
        if lease.state is not IN_USE or (
            borrowed_at is not None and lease.borrowed_at != borrowed_at
        ):
            return False
        owner = lease.owner
        if owner is None or _active.get(_get_ident()) is owner:
            return True  # shared (never reclaimed), or given back by its borrower
        # Another thread gives back a lease whose borrower has ended, maybe
        # while a checkout reclaims it: whoever changes it first, under the
        # lock, has it (the reclaim's compare-and-set).
        with self._lock:
            if lease.state is not IN_USE or lease.owner is not owner:
                return False
            lease.owner = None
        return True

    def release_owner(self, lease: Lease) -> None:
        """Never reclaim ``lease`` from its thread (it is shared with others)."""
        lease.owner = None

    def _give_back(self, lease: Lease) -> None:
        """Hand ``lease`` to the oldest waiter, or make it idle."""
        lease.owner = None
        to_wake: list[_Waiter]
        if self._waiters:
            # One look at the line, under the lock: the first in line is due
            # and is handed the connection, or the connection stays idle.
            with self._lock:
                if self._due():
                    to_wake = [self._hand_over(lease)]
                    if self._idle:  # left idle while it guarded the line
                        to_wake += self._serve_from_idle()
                else:
                    lease.state = IDLE
                    self._idle[lease] = True
                    to_wake = self._ring_guard([])
            for waiter in to_wake:
                waiter.wake()  # outside the lock: the woken one may need it
            return
        lease.state = IDLE
        self._idle[lease] = True
        # A checkout may have started waiting between our look and the line
        # above: it looked at _idle after joining the line, so one of us sees
        # the other (or, within fair_after, it takes one when it wakes up).
        if self._waiters:
            with self._lock:
                to_wake = self._serve_from_idle()
            for waiter in to_wake:
                waiter.wake()

    def _serve_from_idle(self) -> list[_Waiter]:
        """Hand idle connections to the waiters that are due (under the lock).

        Return the waiters to wake once the lock is released: those served,
        and a first in line that is not due yet and must start guarding the
        line.
        """
        to_wake: list[_Waiter] = []
        while self._due():
            other = self._take_idle()
            if other is None:
                return to_wake
            try:
                waiter = self._hand_over(other)
            except BaseException:  # a signal handler's, before it was handed over
                if other.state is IDLE:
                    self._idle[other] = True
                raise
            to_wake.append(waiter)
        return self._ring_guard(to_wake)

    def _ring_guard(self, to_wake: list[_Waiter]) -> list[_Waiter]:
        """Have a young first in line guard the line while a connection is idle (under the lock).

        Rung once, it sleeps until its fair_after, then takes a connection
        left idle. Return ``to_wake``, with it added if it must be rung.
        """
        if self._waiters and self._idle:
            head = self._waiters[0]
            if not head.guard:
                head.guard = True
                to_wake.append(head)
        return to_wake

    def _due(self) -> bool:
        """Tell whether a connection given back now goes to the line (under the lock).

        Not while the first in line has waited less than fair_after: the
        connection stays idle, and the thread that gave it back usually asks
        again first. Waking a sleeping thread costs more CPU time than a
        request's whole borrowing; with more threads than connections it
        would happen at every request. A waiter without an eventfd bell
        (not Linux) is always due: it could not be rung to guard the line.
        """
        waiters = self._waiters
        if not waiters:
            return False
        head = waiters[0]
        return (
            not self._fair_after
            or head.bell is None
            or time.monotonic() - head.since >= self._fair_after
        )

    def _hand_over(self, lease: Lease | None) -> _Waiter:
        # Under self._lock: the waiter accepts before it can give up; the
        # caller wakes it up once the lock is released.
        # No call from here to the return (a signal handler could run there):
        # served, and out of the line, together.
        waiter = self._waiters[0]
        waiter.lease = lease
        if lease is not None:
            lease.state = RESERVED  # IN_USE once the waiter's checkout has it
            self._handoffs += 1
        waiter.served = True
        del self._waiters[0]
        return waiter

    def _reset_or_retire(self, lease: Lease) -> bool:
        """Reset ``lease``; if that fails, or is interrupted, close it and tell so."""
        try:
            problem = self._reset(lease)
        except BaseException:  # a signal handler's exception: nobody would give it back
            self._retire(lease, "its reset was interrupted", warn=False)
            raise
        if problem is not None:
            self._retire(lease, problem)
            return False
        return True

    def _reset(self, lease: Lease) -> str | None:
        """Leave the connection idle: no open cursor, no transaction; or say why not."""
        raw = lease.raw
        try:
            status = lease.status()
        except Exception:  # psycopg2 raises on a closed connection
            status = _UNKNOWN
        if status == _UNKNOWN:
            self._suspect_before = time.monotonic()
            return "the connection to the server was lost"
        if status == _ACTIVE:
            return "a command was still running on it"
        if lease.ended or (not lease.heard and said_farewell(getattr(raw, "notices", None))):
            self._suspect_before = time.monotonic()
            return "the server ended its session"
        try:
            cursors = lease.cursors
            if cursors:
                # Before the rollback, while a cursor WITH HOLD can still be
                # closed: no cursor outlives its lease, so none ever runs on
                # the next borrower's session.
                lease.cursors = []
                for cursor in cursors:
                    if not cursor.closed:
                        if status == _INERROR:
                            roll_back(raw, lease.status)
                        # psycopg2's server-side ones: waits for another
                        # thread's close of it to end (backend._closing_once).
                        getattr(cursor, "close_at_checkin", cursor.close)()
                        if not cursor.closed:
                            # That close never ended (its thread interrupted
                            # as it began): a cursor WITH HOLD would outlive
                            # the rollback on the next borrower's session.
                            return "a server-side cursor on it could not be closed"
                        status = lease.status()
            if status != _IDLE:  # in a transaction, or a failed one
                roll_back(raw, lease.status)
            # Kept on the driver's connection object, which neither ROLLBACK nor
            # DISCARD ALL touches: settings (read_only, isolation_level, the row
            # or cursor factory), handlers added, notifications and notices.
            state = lease.driver_state
            if state is not None and state[1](raw) != state[2]:  # one C call, one compare
                _restore_driver_state(raw, state)
            if self._discard_all:
                if not raw.autocommit:
                    raw.autocommit = True
                with raw.cursor() as cursor:
                    cursor.execute("DISCARD ALL")
                # DISCARD ALL also undid the session setup (time zone, role).
                lease.configured = False
            if raw.autocommit != self.autocommit:
                raw.autocommit = self.autocommit
        except Exception as error:  # any failure means "don't reuse"
            if raw.closed:
                self._suspect_before = time.monotonic()
            return f"resetting it failed ({type(error).__name__})"
        return None

    # -- closing connections ---------------------------------------------

    def _retire(
        self, lease: Lease, problem: str | None, *, warn: bool = True, recycled: bool = False
    ) -> None:
        """Close the connection of ``lease`` (its slot goes back to QueuePool)."""
        lease.state = GONE  # the claim: whoever set it closes the connection
        lease.owner = None
        # Closed and its slot freed even if a signal handler's exception cuts
        # what comes first short: a GONE lease is nobody's to close after this.
        try:
            self._idle.pop(lease, None)
            for cursor in lease.cursors:  # no cursor outlives its lease
                try:
                    cursor.close()
                except Exception:
                    pass
            lease.cursors = []
            if problem is not None:
                self._invalidated += 1
                if warn:
                    logger.warning(
                        "Discarding a connection of database alias %r: %s.", self.alias, problem
                    )
            elif recycled:
                self._recycled += 1
        finally:
            try:
                try:
                    lease.fairy.invalidate()  # closes it; QueuePool frees the slot
                except Exception:  # closing a broken connection may fail: it is gone anyway
                    pass
                except BaseException:
                    # A signal handler's exception. As the call began: SQLAlchemy
                    # has done nothing yet, and nobody else would close it.
                    if lease.fairy.dbapi_connection is not None:
                        try:
                            lease.fairy.invalidate()
                        except Exception:
                            pass
                    # Inside it: SQLAlchemy may have put the record back in
                    # its queue with the connection still open (a checkout
                    # never takes it: see _connect), or lost count (_recount).
                    _close_quietly(lease.raw)
                    raise
            finally:
                self._closed += 1
                try:
                    self._signal_room(lease)
                except BaseException:
                    # Cut short as it was called: the slot leaves _leases all
                    # the same (a set's -= is one step), or the pool would count
                    # it for ever. Waiters see the room at their next look
                    # (each nap is at most _RECLAIM_INTERVAL).
                    self._leases -= {lease}
                    self._closing -= {lease}
                    self._room += 1
                    raise

    def _signal_room(self, gone: Lease | None = None) -> None:
        """A slot under the cap is free: wake the oldest waiter to open a connection."""
        with self._lock:
            if gone is not None:
                self._leases.discard(gone)
                self._closing.discard(gone)
            self._room += 1
            waiter = self._hand_over(None) if self._waiters else None
            served = self._serve_from_idle() if waiter is not None and self._idle else []
        if waiter is not None:
            waiter.wake()
        for other in served:
            other.wake()

    def sweep_idle(self, now: float | None = None) -> None:
        """Close connections beyond ``pool_size`` that stayed idle for ``max_idle``."""
        max_idle = self.options.max_idle
        if max_idle is None:
            return
        now = time.monotonic() if now is None else now
        if now < self._next_sweep:
            return
        self._next_sweep = now + max_idle
        spare, self._idle_low = self._idle_low, len(self._idle)
        self._close_idle_surplus(spare)

    def check_leaks(self, now: float | None = None) -> None:
        """Warn once about each connection checked out longer than ``leak_timeout``."""
        limit = self.options.leak_timeout
        if limit is None:
            return
        now = time.monotonic() if now is None else now
        for lease in list(self._leases):
            owner = lease.owner
            if lease.state is IN_USE and not lease.leak_warned and now - lease.borrowed_at > limit:
                lease.leak_warned = True
                self._leaks += 1
                logger.warning(
                    "A connection of database alias %r has been checked out by thread %r for "
                    "%.1fs (leak_timeout=%gs); it was borrowed at:\n%s",
                    self.alias,
                    owner.name if owner is not None else "(shared)",
                    now - lease.borrowed_at,
                    limit,
                    "".join(lease.leak_stack or ()).rstrip(),
                )

    # -- the whole pool ---------------------------------------------------

    def close(self, *, retired: bool = False) -> None:
        """Close the idle connections; checked-out ones are closed at checkin."""
        self.closed = True
        self.retired = retired
        # Connections of borrowers that ended without giving them back first
        # (a closed pool has no next checkout to reclaim them), then the idle ones.
        self._close_claimed(idle_too=True)
        self._queue.dispose()
        if self.in_use():
            # A borrower still running may end without giving its connection
            # back: with no next checkout to reclaim it, the housekeeper does.
            _housekeeper.watch(self)

    def close_ended_borrowers(self) -> None:
        """Close the connections of a closed pool's borrowers that ended without returning them."""
        self._close_claimed(idle_too=False)

    def _close_claimed(self, *, idle_too: bool) -> None:
        """Close, one by one, the connections of ended borrowers (and the idle ones)."""
        # `while True` with the claim inside, not `while (lease := claim())`:
        # CPython evaluates a loop's condition again at the end of the body,
        # and the jump back after it runs signal handlers, whose exception
        # would find the lease claimed by nobody (test_signal_storm.py).
        while True:
            lease = self._reclaim_dead() or (self._take_idle() if idle_too else None)
            if lease is None:
                return
            try:
                self._retire(lease, None, warn=False)
            except BaseException:  # a signal handler's, before it was closed
                if lease.state is not GONE:  # idle (reclaimed too): the next close() closes it
                    lease.state = IDLE
                    self._idle[lease] = True
                raise

    def histograms(self) -> dict[_metrics.TimingKind, _Histogram]:
        """The pool's timing histograms, by kind (for exporters that read them directly)."""
        return {"wait": self._wait_hist, "use": self._use_hist, "create": self._create_hist}

    def in_use(self) -> int:
        """Return how many connections are lent right now."""
        return len(self._leases) - len(self._idle)

    def idle_count(self) -> int:
        """Return how many connections are idle right now."""
        return len(self._idle)

    def abandon_after_fork(self, devnull: int) -> None:
        """In a forked child: detach this pool's sockets without a word to the server.

        The parent still uses these sockets. Closing them with the driver
        (explicitly or when garbage-collected) would send libpq's Terminate
        message and end the parent's sessions, so each descriptor is pointed at
        ``devnull`` instead; whatever the child's copies write later goes
        nowhere.
        """
        for lease in list(self._leases):
            try:
                fd = lease.raw.fileno()
            except Exception:  # already closed: no socket left to protect
                continue
            # Not inheritable: a program the child execs gets no stray descriptors.
            os.dup2(devnull, fd, inheritable=False)

    def stats(self) -> PoolStats:
        """Return a snapshot of this pool's counters."""
        o = self.options
        size = len(self._leases)
        idle = len(self._idle)
        wait, use, create = (
            self._wait_hist.snapshot(),
            self._use_hist.snapshot(),
            self._create_hist.snapshot(),
        )
        backoff = self._backoff_until - time.monotonic() if self._failing else 0.0
        return PoolStats(
            alias=self.alias,
            pid=self.pid,
            **self.target,
            pool_size=o.pool_size,
            max_overflow=o.max_overflow,
            timeout=o.timeout,
            recycle=o.recycle,
            pre_ping=o.pre_ping,
            reset=o.reset,
            max_idle=o.max_idle,
            leak_timeout=o.leak_timeout,
            retired=self.retired,
            size=size,
            idle=idle,
            checked_out=max(0, size - idle),
            overflow=max(0, size - o.pool_size),
            waiting=len(self._waiters),
            peak_checked_out=self._peak,
            checkouts=self._checkouts,
            affinity_hits=self._affinity,
            handoffs=self._handoffs,
            reclaimed=self._reclaimed,
            waits=self._waits,
            timeouts=self._timeouts,
            leaks=self._leaks,
            opened=self._opened,
            recycled=self._recycled,
            invalidated=self._invalidated,
            closed=self._closed,
            connect_failures=self._connect_failures,
            lost_slots=self._lost_slots,
            backoff_until=time.time() + backoff if backoff > 0 else None,
            last_connect_error=self._last_error,
            wait_time=wait["sum"],
            use_time=use["sum"],
            create_time=create["sum"],
            wait_time_histogram=wait,
            use_time_histogram=use,
            create_time_histogram=create,
        )


_TOO_OLD = "it is older than recycle"
_PING_FAILED = "it failed the health check at checkout"
_NO_ANSWER = "its health check got no answer within the pool's timeout"
_SILENT = "it was idle when the server stopped answering another connection's health check"


def _close_quietly(raw: Any) -> None:
    """Close a driver connection nobody holds (closing twice is harmless)."""
    if raw is not None:
        try:
            raw.close()
        except Exception:
            pass


def _create(record: Any) -> Any:
    """QueuePool's creator: the running checkout's way to open a connection."""
    open_connection = _opening.open
    if open_connection is None:
        raise PoolError("A pooled connection was asked for outside of a checkout.")
    _opening.made = made = open_connection()
    return made


_transaction_status = operator.attrgetter("transaction_status")

# target_session_attrs whose servers a session can stop being (promoted,
# demoted, made read-only): the query a checkout asks, true if it still is.
_SESSION_CHECKS = {
    "read-write": (
        "SELECT NOT pg_is_in_recovery() AND current_setting('transaction_read_only') = 'off'"
    ),
    "primary": "SELECT NOT pg_is_in_recovery()",
    "standby": "SELECT pg_is_in_recovery()",
    "read-only": (
        "SELECT pg_is_in_recovery() OR current_setting('transaction_read_only') = 'on'"
    ),
}


# Values of target_session_attrs a pool takes from its first connection.
_LEARNT_ATTRS = ("read-write", "primary", "read-only")

# The driver connection's own settings, restored at checkin: psycopg 3's
# (private attributes where the property would cost a call; the handlers'
# lists, cut back to those of the setup; the notifications nobody read),
# then psycopg2's (with its lists of notifications and notices).
_PSYCOPG3_STATE = (
    "_read_only", "_isolation_level", "_deferrable", "row_factory", "cursor_factory",
    "server_cursor_factory", "_notice_handlers", "_notify_handlers", "_notifies_backlog",
)
_PSYCOPG2_STATE = (
    "readonly", "isolation_level", "deferrable", "cursor_factory", "notifies", "notices",
)
_QUEUES = (list, deque)


def _driver_state(raw: Any) -> tuple[Any, ...] | None:
    """Return (names, a getter of their values, the values now) for ``raw``'s settings."""
    known: tuple[str, ...] = (
        _PSYCOPG3_STATE if getattr(raw, "pgconn", None) is not None else _PSYCOPG2_STATE
    )
    names = tuple(name for name in known if hasattr(raw, name))
    if len(names) < 2:  # not a driver this knows (a test's fake)
        return None
    getter = operator.attrgetter(*names)  # one C call, a tuple
    saved = tuple(
        # Handlers: those of the setup stay. Messages: none is left for the next borrower.
        (type(v)(v) if name.endswith("handlers") else type(v)()) if isinstance(v, _QUEUES) else v
        for name, v in zip(names, getter(raw), strict=True)
    )
    return names, getter, saved


def _restore_driver_state(raw: Any, state: tuple[Any, ...]) -> None:
    names, getter, saved = state
    for name, value, now in zip(names, saved, getter(raw), strict=True):
        if now == value:
            continue
        if isinstance(value, _QUEUES) and isinstance(now, _QUEUES):
            # Handlers added since the setup go, and what nobody read.
            now.clear()
            now.extend(value)
        else:
            # The public setter (psycopg 3's property without the underscore):
            # it checks that no transaction is open, and psycopg2's sends the SET.
            setattr(raw, name.lstrip("_"), value)


#: Seconds a prefer-standby connection that fell back to a primary is kept.
FALLBACK_LIFETIME = 30.0


def _in_hot_standby(raw: Any) -> bool | None:
    """Tell whether the server of ``raw`` is a standby, as it said at login (None: unknown).

    PostgreSQL 14+ reports in_hot_standby with the session's parameters: no round trip.
    """
    try:
        info = getattr(raw, "info", None)
        if getattr(raw, "pgconn", None) is not None and info is not None:  # psycopg 3
            value = info.parameter_status("in_hot_standby")
        else:  # psycopg2
            value = raw.get_parameter_status("in_hot_standby")
    except Exception:
        return None
    return None if value is None else value == "on"


def _target_session_attrs(raw: Any) -> str | None:
    """The target_session_attrs libpq used for ``raw`` (None if it cannot tell).

    Read from libpq's own record of the connection: OPTIONS, a service file
    and PGTARGETSESSIONATTRS all end up there.
    """
    try:
        pgconn = getattr(raw, "pgconn", None)
        if pgconn is not None:  # psycopg 3
            for option in pgconn.info:
                if option.keyword == b"target_session_attrs":
                    return None if option.val is None else option.val.decode().lower()
            return None
        get_parameters = getattr(raw, "get_dsn_parameters", None)  # psycopg2
        if get_parameters is not None:
            value = get_parameters().get("target_session_attrs")
            return None if value is None else str(value).lower()
    except Exception:  # a closed connection, an older libpq: no re-check learnt
        return None
    return None


def _status_reader(raw: Any) -> Callable[[], int]:
    """Return a callable reading ``raw``'s transaction status without allocating."""
    pgconn = getattr(raw, "pgconn", None)
    if pgconn is not None:  # psycopg 3 (raw.info would build an object per call)
        return functools.partial(_transaction_status, pgconn)
    return raw.get_transaction_status  # type: ignore[no-any-return]  # psycopg2


_get_ident = threading.get_ident
# Running threads by ident: threading's own table (current_thread() reads it).
_active: dict[int, threading.Thread] = getattr(threading, "_active", {})


def _double_close(cursor: Any) -> bool:
    """Tell whether ``cursor`` is an open psycopg2 server-side cursor (see _reclaim_dead)."""
    return (
        not cursor.closed
        and getattr(cursor, "name", None) is not None
        and type(cursor).__module__.startswith("psycopg2")
    )


def _alive(thread: threading.Thread) -> bool:
    """Tell whether ``thread`` is still running, cheaply (no lock, unlike is_alive())."""
    # A thread leaves threading's table of running threads when it ends; a
    # later thread may reuse its ident, hence the identity check.
    active = getattr(threading, "_active", None)
    if active is None:  # pragma: no cover - another threading implementation
        return thread.is_alive()
    return active.get(thread.ident) is thread


def _poller(lease: Lease) -> Callable[[], Any] | None:
    """Return a callable telling, without a round trip, whether the server sent anything unasked.

    An idle connection has nothing to read; a backend that was terminated, a
    server that shut down or restarted, has sent an error and closed the
    socket, which makes it readable (NOTIFY payloads too: those pass the ping).
    None if the connection has no socket left to watch (then it is pinged).
    """
    try:
        fd = lease.raw.fileno()
    except Exception:
        return None
    if _libc_poll is not None:
        fds = _PollFd(fd, select.POLLIN | select.POLLPRI, 0)
        # The arguments are C values made once (byref keeps fds alive): ctypes
        # converts none at each call, 1.4 us instead of 2.4 on one core.
        readable: Callable[[], Any] = functools.partial(
            _libc_poll, ctypes.byref(fds), ctypes.c_ulong(1), ctypes.c_int(0)
        )
    else:
        poll_object = select.poll()
        poll_object.register(fd, select.POLLIN | select.POLLPRI)
        readable = functools.partial(poll_object.poll, 0)
    lease.poller = readable
    return readable


class _PollFd(ctypes.Structure):
    """struct pollfd (poll(2))."""

    _fields_ = (("fd", ctypes.c_int), ("events", ctypes.c_short), ("revents", ctypes.c_short))


def _libc_poll_function() -> Any:
    """libc's poll(), called with the GIL held; None where it cannot be had.

    select.poll() releases the GIL around the system call even with a zero
    timeout; with several threads per process each release hands the GIL to
    another thread, and taking it back costs context switches: in one
    process of 8 threads, 26 % of the requests per second (bench, A-one).
    A zero-timeout poll() never blocks, so keeping the GIL is safe.
    """
    try:
        poll = ctypes.PyDLL(None).poll  # PyDLL: the GIL is not released
    except Exception:  # pragma: no cover - no C library with poll() here (Windows)
        return None
    # No argtypes: _poller passes C values (struct pollfd *, nfds_t, int)
    # made once, which ctypes hands over as they are.
    poll.restype = ctypes.c_int
    return poll


_libc_poll = _libc_poll_function()


def _hear_farewell(lease: Lease) -> None:
    """With psycopg 3, have ``lease.ended`` set when the server says it ends the session.

    See :func:`_rules.said_farewell`: a farewell read with a result leaves the
    socket quiet. psycopg 3 calls a handler for each notice, at no cost per
    request; psycopg2 keeps them in ``conn.notices``, whose last one checkin
    reads (``lease.heard`` stays False).
    """
    add_handler = getattr(lease.raw, "add_notice_handler", None)
    if add_handler is None:
        return
    ref = weakref.ref(lease)

    def heard(diagnostic: Any) -> None:
        if (diagnostic.severity_nonlocalized or diagnostic.severity) in FAREWELL:
            heard_lease = ref()
            if heard_lease is not None:
                heard_lease.ended = True

    add_handler(heard)
    lease.heard = True


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": ")


_START_AGAIN_AFTER = 1.0  # seconds: a thread asked for this long ago and not running is asked again


class _ThreadPerProcess:
    """On-demand start of one daemon thread per process, whatever cuts a start short.

    The starter asks under ``self._lock`` (:meth:`_should_start`) and starts
    the thread outside it; the thread itself records that it runs
    (:meth:`_runs_here`). A start cut short where it is seen ("can't start
    new thread": a pids limit) is asked again by the next caller; one cut
    short anywhere else (a signal handler's exception, at a call or as the
    lock is let go) after _START_AGAIN_AFTER. A second thread, started while
    the first had not recorded itself yet, finds it recorded and ends.
    Inherited through fork, nothing runs: the child asks again.
    """

    _lock: Any

    def _no_thread(self) -> None:
        self._pid = 0  # the process whose thread runs (recorded by that thread)
        self._asked = -math.inf  # when a start was last asked

    def _should_start(self) -> bool:
        """Under ``self._lock``: tell whether the caller starts the thread now."""
        if self._pid == os.getpid():  # each round trip asks: one compare when it runs
            return False
        now = time.monotonic()
        if now - self._asked < _START_AGAIN_AFTER:
            return False
        self._asked = now
        return True

    def _start_failed(self) -> None:
        with self._lock:
            self._asked = -math.inf  # the next caller tries again

    def _runs_here(self) -> bool:
        """In the new thread: record it, or tell it to end (another one runs)."""
        with self._lock:
            if self._pid == os.getpid():
                return False
            self._pid = os.getpid()
            return True


class _Housekeeper(_ThreadPerProcess):
    """One daemon thread per process for the pools with max_idle or leak_timeout.

    And for closed pools still lending: it closes the connections of their
    borrowers that end without giving them back, and forgets each once drained.
    """

    def __init__(self) -> None:
        self._pools: weakref.WeakSet[ConnectionPool] = weakref.WeakSet()
        self._no_thread()
        self._lock = threading.Lock()
        self._bell = _unrung()  # rung by a new pool: look at the intervals again

    def _ring(self) -> None:
        # A lock's release is one call into C: a signal handler's exception
        # leaves it rung or not, never half done. (An Event's set() runs
        # Python code with its own lock held: cut short there, it leaves that
        # lock held, and the next set() -- close() again, say -- blocks for good.)
        try:
            self._bell.release()
        except RuntimeError:  # rung already
            pass

    def watch(self, pool: ConnectionPool) -> None:
        with self._lock:
            self._pools.add(pool)
            self._ring()
            start = self._should_start()
        if start:
            # Not under the lock: under gevent, start() switches to the new
            # greenlet, whose first look at the pools takes the lock. Made in
            # the fork hook, before a gevent worker patches threading, it is
            # an OS lock: held by the greenlet that switched, the process
            # would block on it for good.
            started = False
            try:
                threading.Thread(
                    target=self._run, name="django_postgrespool housekeeper", daemon=True
                ).start()
                started = True
            finally:
                if not started:  # "can't start new thread": the next pool tries again
                    self._start_failed()

    def _watched(self) -> list[ConnectionPool]:
        # A WeakSet may not change while it is iterated: watch() adds to it
        # from the threads that build pools, so it is read under the lock.
        with self._lock:
            return list(self._pools)

    def _run(self) -> None:
        if not self._runs_here():
            return
        # Made by the thread: the one of __init__, made in the fork hook before
        # a gevent worker patched threading, would block the hub in acquire().
        self._bell = _unrung()
        while True:
            self._bell.acquire(timeout=self._interval(self._watched()))  # rung, or the time
            for pool in self._watched():
                try:
                    if pool.closed:
                        pool.close_ended_borrowers()
                        if pool.in_use() == 0:
                            with self._lock:
                                self._pools.discard(pool)
                            continue
                    pool.check_leaks()
                    pool.sweep_idle()
                except Exception:  # never let housekeeping kill the thread
                    logger.exception("Housekeeping of %r failed.", pool)

    @staticmethod
    def _interval(pools: Iterable[ConnectionPool]) -> float:
        periods = [
            p
            for pool in pools
            for p in (pool.options.leak_timeout, pool.options.max_idle)
            if p is not None
        ]
        return max(0.05, min([1.0, *(p / 4 for p in periods)]))


def _unrung() -> Any:
    """A bell for the housekeeper: a lock held until it is rung (released)."""
    bell = threading.Lock()
    bell.acquire()
    return bell


_housekeeper = _Housekeeper()


class _PingWatch(_ThreadPerProcess):
    """Shut down the socket of a health check still unanswered at its deadline.

    The drivers wait for a round trip's answer without a time limit (psycopg2
    in C, on a blocking connection). Shutting the socket down from another
    thread ends that wait at once: the driver reads the end of the stream and
    raises, and the checkout closes the connection and goes on. One daemon
    thread per process, started by the first health check with a round trip;
    it sleeps until the soonest deadline, or until one is armed.

    An OS thread with OS locks even where gevent patched threading: a
    blocking driver (psycopg2 without psycogreen) holds the gevent hub for
    the whole round trip, and a greenlet watch would never run.
    """

    def __init__(self) -> None:
        _, allocate_lock = _os_threads()
        # raw connection -> its deadline. A round trip is made by the one
        # checkout that holds the connection: one entry per connection.
        self._armed: dict[Any, float] = {}
        self._no_thread()
        self._lock = allocate_lock()
        # Held except while arm() wakes the sleeping thread (a lock, not an
        # Event: gevent's would be a greenlet's).
        self._bell = allocate_lock()
        self._bell.acquire()
        self._rung = True  # no ring until the thread sleeps
        self._wake_at = math.inf  # when the thread looks next
        self._warned = False

    def arm(self, raw: Any, deadline: float) -> None:
        with self._lock:
            self._armed[raw] = deadline
            start = self._should_start()
            if not start and deadline < self._wake_at and not self._rung:
                self._rung = True
                self._bell.release()
        if start:  # not under the lock: see _Housekeeper.watch
            self._start()

    def _start(self) -> None:
        started = False
        try:
            start_new_thread, _ = _os_threads()
            if start_new_thread is _thread.start_new_thread:
                threading.Thread(target=self._run, name=_WATCH_NAME, daemon=True).start()
            else:  # gevent patched threading
                start_new_thread(self._run, ())
            started = True
        except Exception as error:  # "can't start new thread": a pids limit
            if not self._warned:
                self._warned = True
                logger.warning(
                    "The thread that gives up unanswered health checks could not start "
                    "(%s): pre_ping round trips have no time limit until it can.",
                    _first_line(error),
                )
        finally:
            if not started:  # the next round trip tries again
                self._start_failed()

    def disarm(self, raw: Any) -> bool:
        """Stop watching ``raw``; tell whether its round trip ended in time."""
        with self._lock:
            return self._armed.pop(raw, None) is not None

    def _run(self) -> None:
        if not self._runs_here():
            return
        while True:
            with self._lock:
                now = time.monotonic()
                soonest = math.inf
                for raw, deadline in list(self._armed.items()):
                    if now < deadline:
                        soonest = min(soonest, deadline)
                        continue
                    del self._armed[raw]  # disarm() now tells the checkout it was too late
                    _shut_down(raw)
                self._wake_at = soonest
                self._rung = False  # under the lock: an arm() after this rings
            if soonest == math.inf:
                rung = self._bell.acquire()
            else:
                rung = self._bell.acquire(True, max(0.0, soonest - now))
            with self._lock:
                if not rung and self._rung:
                    # Rung as the time ran out: take the bell back (at once).
                    self._bell.acquire()
                self._rung = True  # the bell is held again: no ring until the next sleep


def _os_threads() -> tuple[Callable[..., Any], Callable[[], Any]]:
    """The OS's start_new_thread and allocate_lock, even where gevent patched them."""
    monkey = sys.modules.get("gevent.monkey")
    if monkey is not None:
        return (
            monkey.get_original("_thread", "start_new_thread"),
            monkey.get_original("_thread", "allocate_lock"),
        )
    return _thread.start_new_thread, _thread.allocate_lock


def _shut_down(raw: Any) -> None:
    """Shut down the socket of the driver connection ``raw``, leaving it open."""
    # An entry left armed by a signal handler's exception in disarm()'s call
    # belongs to a connection its checkout closed (an interrupted health
    # check closes it): its descriptor may be another socket's now.
    try:
        if raw.closed:
            return
        fd = raw.fileno()
    except Exception:  # no socket any more
        return
    if _libc_shutdown is not None:
        _libc_shutdown(fd, socket.SHUT_RDWR)  # not gevent's socket, in this OS thread
        return
    sock = socket.socket(fileno=fd)  # pragma: no cover - no C library here
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        sock.detach()  # the driver's descriptor: not closed here


def _libc_shutdown_function() -> Any:
    try:
        function = ctypes.CDLL(None).shutdown
    except Exception:  # pragma: no cover - no C library with shutdown() here
        return None
    function.argtypes = (ctypes.c_int, ctypes.c_int)
    function.restype = ctypes.c_int
    return function


_libc_shutdown = _libc_shutdown_function()
_WATCH_NAME = "django_postgrespool ping watch"
_ping_watch = _PingWatch()


def _forget_pools_in_child() -> None:
    global _doorbells
    # The parent's pools are abandoned in a forked child (see registry): never
    # sweep them, nor report their leaks, from the child's housekeeper.
    _housekeeper.__init__()  # type: ignore[misc]
    _ping_watch.__init__()  # type: ignore[misc]
    # The forking thread's eventfd is shared with the parent: a bell of its own.
    _doorbells = _Doorbells()


os.register_at_fork(after_in_child=_forget_pools_in_child)
