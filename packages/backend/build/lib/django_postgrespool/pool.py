"""The pool lifecycle: checkout, checkin, reset, invalidate, dispose.

A physical connection passes through these states, and only these::

    created ──(Django's session setup, once)──▶ checked out
    checked out ──checkin: reset──▶ idle ──checkout: health check──▶ checked out
    checked out ──checkin: reset, a checkout is waiting──▶ checked out (the waiter's)
    checked out ──broken / reset failed / pool closed──▶ discarded
    idle ──older than ``recycle`` / failed health check──▶ discarded

Creating a physical connection is Django's job: the pool calls back into the
``DatabaseWrapper`` that asked for a connection (``get_new_connection``), so
every driver-specific setup Django does still happens. SQLAlchemy's
``QueuePool`` does the queueing, the cap and the waiting.
"""

from __future__ import annotations

import logging
import os
from collections import deque
import select
import threading
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypedDict, cast

from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy.pool import PoolProxiedConnection, QueuePool

from django_postgrespool.errors import PoolError, PoolTimeout
from django_postgrespool.options import PoolOptions

if TYPE_CHECKING:
    from django_postgrespool.backend import PooledDatabaseWrapperMixin

__all__ = ["ConnectionPool", "PoolStats", "Target"]

logger = logging.getLogger("django_postgrespool")

# libpq's PGTransactionStatusType, the same numbers in psycopg2 and psycopg 3.
_IDLE, _ACTIVE, _INTRANS, _INERROR, _UNKNOWN = range(5)

# Keys of the per-physical-connection ``info`` dict (SQLAlchemy clears it
# whenever the physical connection is replaced).
_BORN = "django_postgrespool.born"
_VERIFIED = "django_postgrespool.verified"
_CONFIGURED = "django_postgrespool.configured"
_ISOLATION = "django_postgrespool.isolation_level"
_DISCARDED = "django_postgrespool.discarded"
_RESET_DONE = "django_postgrespool.reset_done"
_POLLER = "django_postgrespool.poller"

WAIT_WARNING_INTERVAL = 10.0


class Target(TypedDict):
    """Where a pool connects to; never holds the password."""

    database: str
    host: str
    port: str
    user: str


class PoolStats(TypedDict):
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
    size: int
    idle: int
    checked_out: int
    overflow: int
    peak_checked_out: int
    checkouts: int
    waits: int
    timeouts: int
    opened: int
    recycled: int
    invalidated: int
    closed: int


class _Asking(threading.local):
    # The wrapper (and its connection parameters) whose checkout is running
    # in this thread: QueuePool calls the creator synchronously from
    # ``connect()``, so a new physical connection is always made by the
    # wrapper that asked for it, never by the one that created the pool.
    wrapper: PooledDatabaseWrapperMixin | None = None
    params: dict[str, Any] | None = None


_asking = _Asking()


class _Waiter:
    """A checkout waiting at the cap: it is handed a connection, or a free slot."""

    __slots__ = ("conn", "event")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.conn: PoolProxiedConnection | None = None


class ConnectionPool:
    """One pool of physical connections for one (process, alias, parameters)."""

    def __init__(
        self, alias: str, options: PoolOptions, target: Target, *, autocommit: bool = True
    ) -> None:
        self.alias = alias
        self.autocommit = autocommit
        self.options = options
        self.target = target
        self.pid = os.getpid()
        self.closed = False
        self._cap = options.max_connections
        self._pre_ping = options.pre_ping
        self._discard_all = options.reset == "discard"
        # Connections that were opened before the last disconnect this pool
        # saw get a real ping at their next checkout (see _is_alive).
        self._suspect_before = float("-inf")
        # Every physical connection this pool made, so that a forked child can
        # detach their sockets without closing them (see abandon_after_fork).
        self._physical: weakref.WeakSet[Any] = weakref.WeakSet()
        self._counts_lock = threading.Lock()
        # Slots: connections checked out or being checked out, <= the cap.
        # A connection returned while checkouts wait goes straight to the
        # oldest of them (first come, first served) instead of back through
        # SQLAlchemy's queue, where the woken thread would race the running
        # ones for it. The lock guards _in_use and _waiters only.
        self._lock = threading.Lock()
        self._in_use = 0
        self._waiters: deque[_Waiter] = deque()
        self._opened = self._closed_count = self._recycled = self._invalidated = 0
        self._checkouts = self._waits = self._timeouts = self._peak = 0
        self._last_wait_warning = float("-inf")
        self._waits_warned = 0
        self._queue = QueuePool(
            cast(Any, self._create),
            pool_size=options.pool_size,
            max_overflow=options.max_overflow,
            timeout=options.timeout,
            recycle=-1 if options.recycle is None else int(options.recycle),
            use_lifo=options.use_lifo,
            # Resetting is done here (see _on_reset), not by SQLAlchemy.
            reset_on_return=None,
        )
        event.listen(self._queue, "close", self._on_close)
        event.listen(self._queue, "reset", self._on_reset)

    def __repr__(self) -> str:
        t = self.target
        return (
            f"<ConnectionPool alias={self.alias!r} database={t['database']!r} "
            f"host={t['host']!r} port={t['port']!r} user={t['user']!r} "
            f"pool_size={self.options.pool_size} max_overflow={self.options.max_overflow}"
            f"{' closed' if self.closed else ''}>"
        )

    # -- creation ---------------------------------------------------------

    def _create(self, record: Any) -> Any:
        wrapper, params = _asking.wrapper, _asking.params
        if wrapper is None or params is None:
            raise PoolError(f"{self!r} was asked for a connection outside of a checkout.")
        raw = wrapper._create_physical_connection(params)
        info = record.info
        info[_BORN] = time.monotonic()
        info[_ISOLATION] = wrapper.isolation_level
        if self._pre_ping == "socket":
            poller = select.poll()
            poller.register(raw.fileno(), select.POLLIN | select.POLLPRI)
            info[_POLLER] = poller
        self._physical.add(raw)
        with self._counts_lock:
            self._opened += 1
        return raw

    def _on_close(self, raw: Any, record: Any) -> None:
        info = record.info
        recycle = self.options.recycle
        with self._counts_lock:
            self._closed_count += 1
            if (
                not info.get(_DISCARDED)
                and recycle is not None
                and _BORN in info
                and time.monotonic() - info[_BORN] > recycle
            ):
                self._recycled += 1

    # -- checkout ---------------------------------------------------------

    def checkout(
        self, wrapper: PooledDatabaseWrapperMixin, params: dict[str, Any]
    ) -> PoolProxiedConnection:
        """Return a checked-out connection, creating one through ``wrapper`` if needed."""
        conn = self._acquire()  # a connection handed over, or None: a free slot
        _asking.wrapper, _asking.params = wrapper, params
        try:
            # Bounded: a failed health check marks every older connection as
            # suspect, so each further round either verifies one or opens one.
            for _ in range(self._cap + 2):
                if conn is None:
                    conn = self._connect()
                info = conn.info
                # A connection made by this very checkout needs no check.
                if _CONFIGURED not in info or self._is_alive(conn, info):
                    self._checkouts += 1
                    return conn
                self._suspect_before = time.monotonic()
                self._invalidate(conn, "it failed the health check at checkout")
                conn = None  # keep the slot, try another connection
            raise PoolError(f"{self!r} could not find a live connection.")
        except BaseException:
            self._release_slot()
            raise
        finally:
            _asking.wrapper = _asking.params = None

    def _connect(self) -> PoolProxiedConnection:
        # Holding a slot, SQLAlchemy's queue has a connection or room for one,
        # but for the moment a returned one takes to get back into it.
        try:
            return self._queue.connect()
        except sa_exc.TimeoutError:
            self._timeouts += 1
            raise self._timeout_error() from None

    def _timeout_error(self) -> PoolTimeout:
        return PoolTimeout(
            alias=self.alias,
            pool_size=self.options.pool_size,
            max_overflow=self.options.max_overflow,
            checked_out=self._in_use,
            timeout=self.options.timeout,
        )

    def _acquire(self) -> PoolProxiedConnection | None:
        """Reserve a slot (return None), or wait to be handed a connection or a slot."""
        with self._lock:
            if self._in_use < self._cap:
                self._in_use += 1
                if self._in_use > self._peak:
                    self._peak = self._in_use
                return None
            waiter = _Waiter()
            self._waiters.append(waiter)
        self._note_wait()
        if not waiter.event.wait(self.options.timeout):
            with self._lock:
                try:
                    self._waiters.remove(waiter)
                except ValueError:  # served while giving up: take it
                    pass
                else:
                    self._timeouts += 1
                    raise self._timeout_error()
        return waiter.conn

    def _release_slot(self) -> None:
        """Give a slot whose connection is gone to the oldest waiter, or free it."""
        with self._lock:
            waiter = self._waiters.popleft() if self._waiters else None
            if waiter is None:
                self._in_use -= 1
        if waiter is not None:
            waiter.event.set()  # waiter.conn is None: it opens or takes one

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
                self._cap,
                self.options.timeout,
                waits,
            )

    def _is_alive(self, conn: PoolProxiedConnection, info: dict[str, Any]) -> bool:
        mode = self._pre_ping
        if info.get(_VERIFIED, info[_BORN]) < self._suspect_before:
            # Opened before a disconnect this pool saw: ping it once rather
            # than hand it out to fail in its turn.
            mode = True
        if mode is False:
            return True
        raw = conn.dbapi_connection
        if mode == "socket" and not _has_pending_input(raw, info):
            return True
        if _ping(raw):
            info[_VERIFIED] = time.monotonic()
            return True
        return False

    # -- checkin ----------------------------------------------------------

    def checkin(self, conn: PoolProxiedConnection) -> None:
        """Reset ``conn`` and lend it to a waiter or return it to the pool, or discard it."""
        if self.closed:
            self.discard(conn, "its pool was closed", warn=False)
            return
        problem = self._broken(conn.dbapi_connection) or self._reset(
            conn.dbapi_connection, conn.info
        )
        if problem is not None:
            self.discard(conn, problem)
            return
        with self._lock:
            waiter = self._waiters.popleft() if self._waiters else None
            if waiter is None:
                self._in_use -= 1
        if waiter is not None:
            waiter.conn = conn  # stays checked out: a new borrower
            waiter.event.set()
            return
        conn.info[_RESET_DONE] = True
        conn.close()  # back to SQLAlchemy's queue

    def _on_reset(self, raw: Any, record: Any, state: Any) -> None:
        # Every way back into SQLAlchemy's queue passes here: checkin above
        # (already reset), and a connection whose borrower was
        # garbage-collected without closing it (a thread that ended with a
        # connection checked out): reset it, and free its slot.
        info = record.info
        if info.pop(_RESET_DONE, False) or state.terminate_only:
            return
        self._release_slot()
        problem = self._broken(raw) or self._reset(raw, info)
        if problem is not None:
            self._note_discard(problem)
            info[_DISCARDED] = True
            # SQLAlchemy invalidates a connection whose reset raised.
            raise PoolError(f"Connection of database alias {self.alias!r} not reused: {problem}.")

    def _broken(self, raw: Any) -> str | None:
        """Tell why ``raw`` cannot be reset, if it can't."""
        if raw.closed:
            self._suspect_before = time.monotonic()
            return "the connection to the server was lost"
        status = raw.info.transaction_status
        if status == _ACTIVE:
            return "a command was still running on it"
        if status == _UNKNOWN:
            self._suspect_before = time.monotonic()
            return "the connection to the server was lost"
        return None

    def _reset(self, raw: Any, info: dict[str, Any]) -> str | None:
        """Leave ``raw`` idle, out of any transaction; return why not if it can't be."""
        try:
            if raw.info.transaction_status != _IDLE:  # in a transaction, or a failed one
                raw.rollback()
            if self._discard_all:
                if not raw.autocommit:
                    raw.autocommit = True
                with raw.cursor() as cursor:
                    cursor.execute("DISCARD ALL")
                # DISCARD ALL also reset the session setup (time zone, role).
                info.pop(_CONFIGURED, None)
            if raw.autocommit != self.autocommit:
                raw.autocommit = self.autocommit
        except Exception as error:  # any failure means "don't reuse"
            if raw.closed:
                self._suspect_before = time.monotonic()
            return f"resetting it failed ({type(error).__name__})"
        return None

    def discard(self, conn: PoolProxiedConnection, reason: str, *, warn: bool = True) -> None:
        """Close the physical connection of ``conn`` and free its slot."""
        self._invalidate(conn, reason, warn=warn)
        self._release_slot()

    def _invalidate(self, conn: PoolProxiedConnection, reason: str, *, warn: bool = True) -> None:
        self._note_discard(reason, warn=warn)
        conn.info[_DISCARDED] = True
        conn.invalidate()

    def _note_discard(self, reason: str, *, warn: bool = True) -> None:
        with self._counts_lock:
            self._invalidated += 1
        if warn:
            logger.warning("Discarding a connection of database alias %r: %s.", self.alias, reason)

    # -- the whole pool ---------------------------------------------------

    def close(self) -> None:
        """Close the idle connections; checked-out ones are closed at checkin."""
        self.closed = True
        self._queue.dispose()

    def abandon_after_fork(self, devnull: int) -> None:
        """In a forked child: detach this pool's sockets without a word to the server.

        The parent still uses these sockets. Closing them with the driver
        (explicitly or when garbage-collected) would send libpq's Terminate
        message and end the parent's sessions, so each descriptor is pointed at
        ``devnull`` instead; whatever the child's copies write later goes
        nowhere.
        """
        for raw in list(self._physical):
            try:
                fd = raw.fileno()
            except Exception:  # already closed: no socket left to protect
                continue
            os.dup2(devnull, fd)

    def stats(self) -> PoolStats:
        """Return a snapshot of this pool's counters."""
        queue = self._queue
        checked_out = queue.checkedout()
        with self._counts_lock:
            opened, closed = self._opened, self._closed_count
            recycled, invalidated = self._recycled, self._invalidated
        size = opened - closed
        o = self.options
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
            size=size,
            idle=max(0, size - checked_out),
            checked_out=checked_out,
            overflow=max(0, size - o.pool_size),
            peak_checked_out=self._peak,
            checkouts=self._checkouts,
            waits=self._waits,
            timeouts=self._timeouts,
            opened=opened,
            recycled=recycled,
            invalidated=invalidated,
            closed=closed,
        )


def _has_pending_input(raw: Any, info: dict[str, Any]) -> bool:
    """Tell, without a round trip, whether the server sent anything unasked.

    An idle connection has nothing to read; a backend that was terminated, a
    server that shut down or restarted, has sent an error and closed the
    socket, which makes it readable (NOTIFY payloads too: those pass the ping).
    """
    poller = info.get(_POLLER)
    if poller is None:
        try:
            fd = raw.fileno()
        except Exception:
            return True
        poller = info[_POLLER] = select.poll()
        poller.register(fd, select.POLLIN | select.POLLPRI)
    return bool(poller.poll(0))


def _ping(raw: Any) -> bool:
    """Run one round trip on ``raw``; tell whether it worked."""
    try:
        with raw.cursor() as cursor:
            cursor.execute("SELECT 1")
        if raw.info.transaction_status != _IDLE:
            raw.rollback()
    except Exception:  # whatever the driver raises, the connection is unusable
        return False
    return True


PoolFactory = Callable[[], ConnectionPool]
