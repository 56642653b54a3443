"""The pooled PostgreSQL ``DatabaseWrapper``.

Django already decides when a connection is opened (``connect`` →
``get_new_connection`` → ``init_connection_state``) and closed (``close`` →
``_close``, at the end of each request with ``CONN_MAX_AGE = 0``). This
backend only changes what "open" and "close" mean: check out of, and back
into, the pool of :mod:`django_postgrespool.pool`.
"""

from __future__ import annotations

import contextlib
import gc
import os
import threading
import time
from asyncio import _get_running_loop
from collections import OrderedDict
from collections.abc import Hashable, Iterator, Mapping
from threading import current_thread, get_ident
from typing import Any, TypedDict

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured, SynchronousOnlyOperation
from django.core.signals import setting_changed
from django.db import connections
from django.db.backends.base.base import NO_DB_ALIAS, BaseDatabaseWrapper
from django.db.backends.postgresql import base as postgresql_base
from django.db.backends.postgresql.creation import DatabaseCreation as PostgreSQLCreation
from django.db.backends.signals import connection_created
from django.views.decorators.debug import sensitive_variables

from django_postgrespool import metrics, registry
from django_postgrespool._rules import (
    HiddenKey,
    HiddenParams,
    options_type_message,
    pool_settings,
    shown,
)
from django_postgrespool.errors import PoolError
from django_postgrespool.options import POOL_OPTION_NAMES, resolve_pool_options
from django_postgrespool.pool import _IDLE, IN_USE, ConnectionPool, Lease, Target

__all__ = [
    "CheckoutInfo",
    "DatabaseCreation",
    "DatabaseWrapper",
    "PooledDatabaseWrapperMixin",
    "checkout_info",
]


_SETUP_UNFINISHED = "Django's connection setup did not finish on it"


class CheckoutInfo(TypedDict):
    """One thread's current or last checkout of an alias (``checkout_info()``)."""

    alias: str
    source: str  # "affinity", "idle", "handoff", "new" or "reclaimed"
    wait: float  # seconds from asking to having the connection
    held: float  # seconds held so far, or until given back
    returned: bool
    started: float  # time.monotonic() when the checkout began


def _freeze(value: Any) -> Hashable:
    if isinstance(value, dict):
        return tuple(sorted((str(k), _freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple, set, frozenset)):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, (str, int, float, bool, type(None), bytes)):
        return value
    return repr(value)


def _copy(value: Any) -> Any:
    return dict(value) if isinstance(value, dict) else value


class DatabaseCreation(PostgreSQLCreation):
    """Close the pools of a test database before it is cloned or dropped."""

    # CREATE DATABASE ... TEMPLATE and DROP DATABASE fail while any session
    # is connected to that database, and idle pooled connections are sessions.

    def _clone_test_db(self, suffix: str, verbosity: int, keepdb: bool = False) -> None:
        self._let_go(self.connection.settings_dict["NAME"])
        super()._clone_test_db(suffix, verbosity, keepdb)  # type: ignore[misc]

    def _destroy_test_db(self, test_database_name: str, verbosity: int) -> None:
        self._let_go(test_database_name)
        super()._destroy_test_db(test_database_name, verbosity)  # type: ignore[misc]

    def _let_go(self, database: str) -> None:
        # This thread's wrappers on that database give their connections back
        # (a TEST MIRROR alias shares this alias's settings), then its pools close.
        self.connection.close()
        for wrapper in connections.all(initialized_only=True):
            if wrapper.connection is not None and wrapper.settings_dict["NAME"] == database:
                wrapper.close()
        registry.close_pools(database=database)


class _SettingsChanged(Exception):
    """The alias's settings changed while a checkout waited: its pool is not theirs."""


def _close_and_release(self: Any) -> None:
    self.cursor.close()
    self.db._release_if_idle()


_Database: Any = postgresql_base.Database  # type: ignore[attr-defined]
_RELEASING: dict[type, type] = {}
_GUARDED: dict[type, type] = {}


# Whether the garbage collector is running: its last phase is moved to the end
# (a "start" or "stop" callback). Finalizers run inside the collection, in
# whatever their thread was doing: in psycopg 3's code, holding a connection's
# lock, a finalizer that waits for that lock (an abandoned QuerySet.iterator()
# closing its cursor) never ends. The callback is OrderedDict's C method, not a
# function of ours: Python code there would run signal handlers, whose
# exceptions (KeyboardInterrupt) the collector can only print.
_gc_phase: OrderedDict[str, None] = OrderedDict(start=None, stop=None)
gc.callbacks.append(_gc_phase.move_to_end)  # type: ignore[arg-type]  # (phase, info): to the end


def _in_collection() -> bool:
    """Tell whether the garbage collector is running (its finalizers, in this
    thread, or in another while one of them let go of the GIL)."""
    try:
        return next(reversed(_gc_phase)) == "start"
    except RuntimeError:  # a collection ran meanwhile: none was running when asked
        return False


def _guarded(cursor_class: Any) -> type:
    """``cursor_class`` (psycopg 3's server-side cursor, or Django's) refusing to
    send anything once closed, and whose close() never waits for the
    connection when it need not.

    Closed at checkin, such a cursor kept past its lease still sends its
    CLOSE (execute() again) or MOVE (scroll()) before it checks: on the
    session of whoever borrowed the connection next, whose transaction the
    error aborts. psycopg2 checks first.

    psycopg 3 takes the connection's lock before it looks at ``closed``:
    a generator holding such a cursor, freed by the garbage collector in the
    thread that borrowed the connection next, while that thread was inside
    psycopg holding the lock, waited for itself for good. Closed already, it
    returns at once; run by the collector and the lock taken, the close is
    left to the checkin, which closes every cursor of the lease
    (close_at_checkin(), which waits).
    """
    made = _GUARDED.get(cursor_class)
    if made is None:
        interface_error = _Database.InterfaceError

        def close(self: Any) -> None:
            if self.closed:
                return
            if _in_collection():
                lock = self._conn.lock
                if not lock.acquire(blocking=False):  # perhaps this thread's
                    return
                lock.release()
            cursor_class.close(self)

        def execute(self: Any, *args: Any, **kwargs: Any) -> Any:
            if self.closed:
                raise interface_error("the cursor is closed")
            return cursor_class.execute(self, *args, **kwargs)

        def scroll(self: Any, *args: Any, **kwargs: Any) -> Any:
            if self.closed:
                raise interface_error("the cursor is closed")
            return cursor_class.scroll(self, *args, **kwargs)

        made = _GUARDED[cursor_class] = type(
            cursor_class.__name__,
            (cursor_class,),
            {
                "__slots__": (),
                "execute": execute,
                "scroll": scroll,
                "close": close,
                "close_at_checkin": cursor_class.close,
                "__doc__": cursor_class.__doc__,
                "__module__": cursor_class.__module__,
            },
        )
    return made


def _releasing(wrapper_class: type) -> type:
    """``wrapper_class`` (Django's cursor wrapper, or the backend's debug one) whose
    close() gives the connection back when nothing else holds it (lease='transaction')."""
    made = _RELEASING.get(wrapper_class)
    if made is None:
        made = _RELEASING[wrapper_class] = type(
            f"Releasing{wrapper_class.__name__}",
            (wrapper_class,),
            {"close": _close_and_release, "__doc__": wrapper_class.__doc__},
        )
    return made


# psycopg 3's server-side cursor (None with psycopg2, whose cursors check first).
_SERVER_CURSOR: type | None = getattr(_Database, "ServerCursor", None)
# psycopg2's cursor class (None with psycopg 3).
_PSYCOPG2_CURSOR: type | None = (
    None
    if _SERVER_CURSOR is not None
    else getattr(getattr(_Database, "extensions", None), "cursor", None)
)
_CLOSING_ONCE: dict[type, type] = {}


def _closing_once(cursor_class: Any) -> type:
    """``cursor_class`` (psycopg2's, or a cursor_factory) whose named cursors close once.

    psycopg2 looks at ``closed`` before it waits for the connection: a server-
    side cursor closed by two threads at once (a generator abandoned by an
    async view, finalized on the event loop's thread, while the request's
    end closes the cursors it left) sends CLOSE twice, and the second may run
    on the next borrower's session and abort its transaction. Closing takes a
    lock: without waiting (a finalizer may be the caller: if another thread
    is closing it, that one does), except at checkin (close_at_checkin()),
    which waits for such a close to end before the connection is lent again.

    A re-entrant lock: a signal handler's exception just after the lock was
    taken (before the ``try`` that releases it) leaves it held by that
    thread, whose own checkin must still close the cursor, not wait for
    itself. Held by a thread that has ended, checkin's wait times out and
    the pool closes the connection rather than lend it with the cursor open.
    """
    made = _CLOSING_ONCE.get(cursor_class)
    if made is None:

        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
            cursor_class.__init__(self, *args, **kwargs)
            self._closing = threading.RLock()

        def close_within(self: Any, wait: float) -> None:
            if self._closing.acquire(timeout=wait):  # 0: without waiting
                try:
                    if not self.closed:
                        cursor_class.close(self)
                finally:
                    self._closing.release()

        def close(self: Any) -> None:
            close_within(self, 0)

        def close_at_checkin(self: Any) -> None:
            close_within(self, 5.0)

        made = _CLOSING_ONCE[cursor_class] = type(
            cursor_class.__name__,
            (cursor_class,),
            {
                "__slots__": ("_closing",),
                "__init__": __init__,
                "close": close,
                "close_at_checkin": close_at_checkin,
                "__doc__": cursor_class.__doc__,
                "__module__": cursor_class.__module__,
            },
        )
    return made

# Django's methods that close_if_unusable_or_obsolete() calls, which its fast
# way does not (a subclass or a test that replaces one gets Django's way).
_SKIPPED_AT_CLOSE = frozenset(
    ("close", "get_autocommit", "ensure_connection", "validate_thread_sharing")
)


# Times DATABASE_POOL_ARGS was switched (override_settings): part of every
# pool's key, as the settings are read when a pool is built.
_pool_args_changes = 0


def _note_pool_args(*, setting: str, **kwargs: Any) -> None:
    global _pool_args_changes
    if setting == "DATABASE_POOL_ARGS":
        _pool_args_changes += 1


setting_changed.connect(_note_pool_args, dispatch_uid="django_postgrespool.pool_args")


class PooledDatabaseWrapperMixin:
    """Turn a PostgreSQL ``DatabaseWrapper`` into a pooled one."""

    creation_class = DatabaseCreation
    _djangos_close = False  # set per class (__init_subclass__)
    _pool: ConnectionPool | None = None
    _pool_key_cached: Hashable = None
    _lease: Lease | None = None  # checked out now
    _last_lease: Lease | None = None  # checked out last: tried first (thread affinity)
    _new_lease: Lease | None = None  # for get_new_connection, during connect()
    _options_key: tuple[Any, Any, Hashable] | None = None
    _discard_reason: str | None = None
    _checkout: tuple[str, float, float] | None = None  # (source, wait, borrowed at)
    _checkout_returned_at: float | None = None
    _per_transaction = False  # lease='transaction': given back between transactions
    _connecting = False  # inside connect(): connection_created receivers may query

    # Django's own pool (OPTIONS['pool'], Django >= 5.1) is never used.
    pool = None

    def get_connection_params(self) -> dict[str, Any]:
        # No local holds the settings (nor, until nothing can raise, the
        # parameters): Django's DEBUG page shows every local of every frame.
        self._check_options()
        if self.settings_dict["OPTIONS"].get("pool"):  # type: ignore[attr-defined]
            alias = self.alias  # type: ignore[attr-defined]
            raise ImproperlyConfigured(
                f"DATABASES[{alias!r}]['OPTIONS']['pool'] turns on Django's own "
                f"connection pool, which cannot be combined with ENGINE "
                f"{self.settings_dict['ENGINE']!r}. Remove it and put the pool's "  # type: ignore[attr-defined]
                f"settings in DATABASES[{alias!r}]['POOL_OPTIONS']."
            )
        params: dict[str, Any] = super().get_connection_params()  # type: ignore[misc]
        for name in POOL_OPTION_NAMES:
            params.pop(name, None)
        return params

    def connect(self) -> None:  # ensure_connection(), its caller, is @async_unsafe
        """Borrow a connection; run Django's connect path only for a new physical one."""
        # Django's connect() opens a connection, sets it up (autocommit, time
        # zone, role) and sends connection_created. A pooled physical
        # connection was set up when it was opened, and checkin restored
        # autocommit: taking it back only needs the per-connect state that
        # connect() resets, and the signal.
        if self.alias == NO_DB_ALIAS:  # type: ignore[attr-defined]
            # _nodb_cursor()'s throwaway wrapper (CREATE/DROP DATABASE): a
            # connection of its own, as with the stock engine.
            super().connect()  # type: ignore[misc]
            return
        if self._lease is not None:
            # A close() interrupted (a signal handler's exception) before it
            # gave the lease back, which Django's close() forgot: give it back.
            self._close()
        elif self._last_lease is not None and self._last_lease.state is IN_USE:
            self._give_back_dropped()  # the same, interrupted a little later
        # What Django's connect() does before connecting (@async_unsafe, whose
        # way of asking costs a raised exception, and check_settings()).
        if _get_running_loop() is not None and not os.environ.get("DJANGO_ALLOW_ASYNC_UNSAFE"):
            raise SynchronousOnlyOperation(
                "You cannot call this from an async context - use a thread or sync_to_async."
            )
        self.check_settings()  # type: ignore[attr-defined]
        self._connecting = True
        try:
            self._borrow()
        finally:
            self._connecting = False

    def _borrow(self) -> None:
        started = 0.0
        while True:
            pool = self._current_pool()
            try:
                lease = pool.checkout(
                    self._open_physical_connection,
                    self._last_lease,
                    # Shared with other threads (allow_thread_sharing): never reclaimed.
                    None if self._thread_sharing_count else current_thread(),  # type: ignore[attr-defined]
                )
                break
            except _SettingsChanged:
                # Switched while this checkout waited: the pool of the settings
                # as they are now, within the pool's timeout.
                now = time.monotonic()
                started = started or now
                if now - started > pool.options.timeout:
                    raise PoolError(
                        f"The settings of database alias {self.alias!r} changed each time "  # type: ignore[attr-defined]
                        f"a connection was about to be opened, for {pool.options.timeout:g}s "
                        f"(the pool's timeout): DATABASES[{self.alias!r}] is switched in "  # type: ignore[attr-defined]
                        f"place over and over, or holds a value that is never equal to itself."
                    ) from None
        self._lease = self._last_lease = lease
        self._per_transaction = pool.per_transaction
        self._checkout = (lease.source, lease.wait, lease.borrowed_at)
        self._checkout_returned_at = None
        if lease.configured:
            self.in_atomic_block = False
            self.savepoint_ids: list[str] = []
            self.atomic_blocks: list[Any] = []
            self.needs_rollback = False
            # Not bound to a local (a connection_created receiver may raise,
            # and Django's DEBUG page shows every local): they hold the password.
            self.health_check_enabled = self.settings_dict["CONN_HEALTH_CHECKS"]  # type: ignore[attr-defined]
            max_age = self.settings_dict["CONN_MAX_AGE"]  # type: ignore[attr-defined]
            self.close_at = None if max_age is None else lease.borrowed_at + max_age
            self.closed_in_transaction = False
            self.errors_occurred = False
            self.health_check_done = True
            self.connection = lease.raw
            self.isolation_level = lease.isolation_level
            self.autocommit = self.settings_dict["AUTOCOMMIT"]  # type: ignore[attr-defined]
            self.run_on_commit: list[Any] = []
            # As Django sends it at every connect(): receivers see each checkout.
            if connection_created.receivers:
                try:
                    connection_created.send(sender=self.__class__, connection=self)
                except BaseException:
                    # A receiver's setup (a tenant's search_path, say) failed
                    # midway: the next query must not run without it, on the
                    # previous borrower's session. Given back (reset), so the
                    # next query borrows again and the receivers run again.
                    self._lease = None
                    self.connection = None
                    self._checkout_returned_at = now = time.monotonic()
                    lease.pool.checkin(lease, now, lease.borrowed_at)
                    raise
            return
        self._connect_new(lease)

    @sensitive_variables()
    def _connect_new(self, lease: Lease) -> None:
        # A connection never set up (new, or reset by DISCARD ALL): Django's
        # whole connect path, get_new_connection() returning this lease's.
        self._new_lease = lease
        try:
            super().connect()  # type: ignore[misc]
        except BaseException:
            self._lease = self._new_lease = None
            lease.pool.discard(lease, "Django's connection setup failed on it")
            self.connection = None
            raise
        lease.configured = True

    def init_connection_state(self) -> None:
        super().init_connection_state()  # type: ignore[misc]
        lease = self._lease
        if lease is not None and not lease.configured:
            # Set up by Django, before the connection_created receivers run (as
            # they do at every checkout): what checkin restores the driver's
            # connection object to.
            lease.remember_setup()

    @sensitive_variables()
    def get_new_connection(self, conn_params: dict[str, Any]) -> Any:
        lease = self._new_lease
        if lease is None:
            # Called directly (not through connect()): a connection of the
            # caller's own, outside the pool, as the stock engine gives.
            params = HiddenParams(conn_params)
            del conn_params  # Django's DEBUG page shows every local if connecting fails
            return super().get_new_connection(params)  # type: ignore[misc]
        self._new_lease = None
        if lease.isolation_level is None:  # opened by this very checkout
            lease.isolation_level = self.isolation_level
        else:
            self.isolation_level = lease.isolation_level
        return lease.raw

    @sensitive_variables()
    def _open_physical_connection(self) -> Any:
        """Open a new physical connection the way Django would without a pool."""
        # The pool was chosen by the settings when the checkout began; a
        # checkout that waited may open its connection after the alias's
        # settings were switched in place (and perhaps back): that connection
        # would be made with the new settings and kept in the old pool.
        if self._settings_key() != self._pool_key_cached:
            raise _SettingsChanged
        return super().get_new_connection(self.get_connection_params())  # type: ignore[misc]

    def create_cursor(self, name: str | None = None) -> Any:
        if name and _PSYCOPG2_CURSOR is not None:
            # A server-side cursor of psycopg2: made by the connection's
            # cursor_factory (a C type's instances cannot change class later).
            raw = self.connection  # type: ignore[attr-defined]
            factory = raw.cursor_factory
            raw.cursor_factory = _closing_once(factory or _PSYCOPG2_CURSOR)
            try:
                cursor = super().create_cursor(name)  # type: ignore[misc]
            finally:
                raw.cursor_factory = factory
        else:
            cursor = super().create_cursor(name)  # type: ignore[misc]
        if name and _SERVER_CURSOR is not None and isinstance(cursor, _SERVER_CURSOR):
            cursor.__class__ = _guarded(type(cursor))
        lease = self._lease
        if lease is not None:
            lease.track(cursor)  # closed when the connection is given back
        return cursor

    # -- lease='transaction' ----------------------------------------------

    def make_cursor(self, cursor: Any) -> Any:
        wrapped = super().make_cursor(cursor)  # type: ignore[misc]
        if self._per_transaction:
            wrapped.__class__ = _releasing(type(wrapped))
        return wrapped

    def make_debug_cursor(self, cursor: Any) -> Any:
        wrapped = super().make_debug_cursor(cursor)  # type: ignore[misc]
        if self._per_transaction:
            wrapped.__class__ = _releasing(type(wrapped))
        return wrapped

    def set_autocommit(self, autocommit: bool, *args: Any, **kwargs: Any) -> None:
        try:
            super().set_autocommit(autocommit, *args, **kwargs)  # type: ignore[misc]
        finally:
            # The end of an atomic block, its on_commit callbacks run (one
            # that raised too: the connection is not needed any more).
            if autocommit:
                self._release_if_idle()

    def get_autocommit(self) -> bool:
        # With lease='transaction' and nothing borrowed, the answer is known
        # without borrowing a connection that nothing would give back
        # (on_commit() outside atomic asks, then runs its callback at once):
        # a borrow would set the AUTOCOMMIT setting (self.autocommit may
        # still be what a closed connection had).
        if self._per_transaction and self._lease is None and self.connection is None:  # type: ignore[attr-defined]
            return bool(self.settings_dict["AUTOCOMMIT"])  # type: ignore[attr-defined]
        return bool(super().get_autocommit())  # type: ignore[misc]

    def _release_if_idle(self) -> None:
        """With lease='transaction', give the connection back if nothing needs it now.

        Nothing needs it in autocommit mode, outside any atomic block, with
        no transaction open on the server and every cursor closed (a server-
        side cursor of QuerySet.iterator() keeps it until it is exhausted).
        The next query borrows one again (this one, if it is still idle).
        """
        lease = self._held_lease()
        if (
            lease is None
            or not self._per_transaction
            or self._connecting  # a connection_created receiver's query, or the setup
            or not self.autocommit  # type: ignore[attr-defined]
            or self.in_atomic_block  # type: ignore[attr-defined]
            or self._thread_sharing_count  # type: ignore[attr-defined]
            # Another thread: a generator abandoned by an async view, closed
            # on the event loop's thread, while this wrapper's thread may be
            # entering atomic() (autocommit off, its flags not set yet). The
            # owner gives it back at its next statement's end.
            or self._thread_ident != get_ident()  # type: ignore[attr-defined]
            # A finalizer run by the garbage collector (an abandoned iterator's
            # cursor closed): this thread may be anywhere, even inside psycopg
            # about to send a query on this connection. Same as above.
            or _in_collection()
        ):
            return
        for cursor in lease.cursors:
            if not cursor.closed:
                return
        try:
            if lease.status() != _IDLE:  # a transaction begun by hand, or a query running
                return
        except Exception:  # a broken connection: Django's close() deals with it
            return
        self._close()

    def ensure_timezone(self) -> bool:
        # Django runs it on the connection held when TIME_ZONE or USE_TZ is
        # changed (override_settings): the session's zone is then not that of
        # the pool it goes back to. Set up again at its next checkout.
        changed = bool(super().ensure_timezone())  # type: ignore[misc]
        lease = self._lease
        if changed and lease is not None:
            lease.configured = False
        return changed

    def _set_autocommit(self, autocommit: bool) -> None:
        # Checkin already restored the AUTOCOMMIT setting; don't pay the
        # driver's setter (a generator round in psycopg 3) at every checkout.
        if self.connection.autocommit != autocommit:  # type: ignore[attr-defined]
            super()._set_autocommit(autocommit)  # type: ignore[misc]

    def _give_back_dropped(self) -> None:
        """Give back this wrapper's last checkout if it was dropped before it was given back.

        A signal handler's exception (KeyboardInterrupt, a task's time limit)
        as _held_lease() took the lease from this wrapper (pop() returns from
        a call, where one may run), or between letting go of it and giving it
        back: the lease is still IN_USE for the checkout this wrapper made, and
        nothing else would give it back while this thread lives.
        """
        last, checkout = self._last_lease, self._checkout
        if (
            last is not None
            and checkout is not None
            and last.state is IN_USE
            and last.borrowed_at == checkout[2]
            and self._lease is None
        ):
            self.connection = None
            if last.configured:
                last.pool.checkin(last, None, checkout[2])
            else:  # see _close()
                last.pool.discard(last, _SETUP_UNFINISHED, checkout[2])

    def _held_lease(self, *, giving_back: bool = False) -> Lease | None:
        """The lease this wrapper holds, or None if the pool took it back.

        A thread that ended holding its connection leaves its wrapper behind,
        reachable through a cursor or a reference kept elsewhere; the pool
        reclaims the connection and lends it to another thread. That wrapper
        must then let go of it, not give back or roll back the new borrower's.
        ``giving_back``: also let go of it here, at once (see _close()).
        """
        # dict.pop is one step under the GIL: of two threads closing a shared
        # wrapper at once, one only gets the lease.
        lease = self.__dict__.pop("_lease", None) if giving_back else self._lease
        if lease is not None and (
            lease.state is not IN_USE or lease.borrowed_at != self._checkout[2]  # type: ignore[index]
        ):
            self._lease = None
            self.connection = None
            return None
        return lease

    def _close(self) -> None:
        lease = self._held_lease(giving_back=True)
        if lease is None:
            last = self._last_lease
            if last is None:  # a connection this wrapper did not borrow
                super()._close()  # type: ignore[misc]
            else:
                self._give_back_dropped()
            return
        try:
            borrowed_at = self._checkout[2]  # type: ignore[index]
            self._checkout_returned_at = now = time.monotonic()
            if self.in_atomic_block:  # type: ignore[attr-defined]
                # Django keeps self.connection after a close inside an atomic
                # block (closed_in_transaction); it must not be lent to anyone.
                lease.pool.discard(lease, "it was closed inside an atomic block", borrowed_at)
                return
            if self._discard_reason is not None:
                lease.pool.discard(lease, self._discard_reason, borrowed_at)
            elif not lease.configured:
                # Django's setup never ran on it (_connect_new interrupted as it
                # began): another wrapper, which did not open it, cannot run it.
                lease.pool.discard(lease, _SETUP_UNFINISHED, borrowed_at)
            else:
                # Raises nothing (a failed reset discards); does nothing if the
                # pool has lent it again since (it took it back from an ended thread).
                lease.pool.checkin(lease, now, borrowed_at)
        except BaseException:
            # A signal handler's exception after this wrapper let go of the
            # lease: the pool closes it unless it has it back already, maybe
            # lent on (handed to a waiting thread as the exception came). Let
            # go of the session first: a query before the next request's
            # start (an exception handler's, a logging handler's) would run
            # on the next borrower's. Django's close() clears it too; the
            # other callers of _close() do not reach their own clearing.
            if not self.in_atomic_block:  # type: ignore[attr-defined]
                self.connection = None
            lease.pool.discard(lease, "giving it back was interrupted", self._checkout[2])  # type: ignore[index]
            raise
        # Lent to the next borrower from now on (Django's close() clears it
        # too, but _close() may be called alone).
        self.connection = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # The fast way of close_if_unusable_or_obsolete() skips these: only
        # for a class that kept Django's own.
        cls._djangos_close = all(
            getattr(cls, name)
            in (getattr(BaseDatabaseWrapper, name), PooledDatabaseWrapperMixin.__dict__.get(name))
            for name in _SKIPPED_AT_CLOSE
        )

    def close_if_unusable_or_obsolete(self) -> None:
        # Django calls it at the start and at the end of every request
        # (close_old_connections). Its usual case at the end, a connection
        # past close_at to give back, is done here without the layers around
        # it (get_autocommit(), close(), their checks for a running event
        # loop and for the thread): 0.9 of the 6.8 us that borrowing and
        # giving back cost on one core. Any other case goes Django's way.
        if self._lease is None:
            if self.connection is None:  # type: ignore[attr-defined]
                # Returned already (at the start of every request): Django's
                # does nothing. Unless a close() was interrupted (see connect()).
                if self._last_lease is not None and self._last_lease.state is IN_USE:
                    self._give_back_dropped()
                return
            super().close_if_unusable_or_obsolete()  # type: ignore[misc]
            return
        if self.connection is None:  # type: ignore[attr-defined]
            self._close()  # a close() interrupted before it gave the lease back (see connect())
            return
        if (
            self._djangos_close
            and self.close_at is not None
            and not self.errors_occurred  # type: ignore[attr-defined]
            and not self.in_atomic_block  # type: ignore[attr-defined]
            and not self.closed_in_transaction  # type: ignore[attr-defined]
            and self.connection is not None  # type: ignore[attr-defined]
            and self.autocommit == self.settings_dict["AUTOCOMMIT"]  # type: ignore[attr-defined]
            and self._thread_ident == get_ident()  # type: ignore[attr-defined]
            and _get_running_loop() is None  # else close() raises SynchronousOnlyOperation
            # Nothing patched on the instance (looks up 4 names, not every attribute).
            and self.__dict__.keys().isdisjoint(_SKIPPED_AT_CLOSE)
            and time.monotonic() >= self.close_at
        ):
            self.health_check_done = False
            self.run_on_commit = []
            self._close()
            self.connection = None
            return
        super().close_if_unusable_or_obsolete()  # type: ignore[misc]

    def is_usable(self) -> bool:
        # After _close() the connection is the pool's: not ours to probe
        # (Django < 5.0 would call None.cursor()).
        if self.connection is None:  # type: ignore[attr-defined]
            return False
        return bool(super().is_usable())  # type: ignore[misc]

    def close_if_health_check_failed(self) -> None:
        # Called before every cursor: Django's own test first, at no more cost.
        if self.connection is None or not self.health_check_enabled or self.health_check_done:  # type: ignore[attr-defined]
            return
        # A connection that fails Django's health check (CONN_HEALTH_CHECKS)
        # is closed for real, not returned to the pool.
        self._discard_reason = "it failed Django's health check (CONN_HEALTH_CHECKS)"
        try:
            super().close_if_health_check_failed()  # type: ignore[misc]
        finally:
            self._discard_reason = None

    def inc_thread_sharing(self) -> None:
        super().inc_thread_sharing()  # type: ignore[misc]
        # Used by other threads from now on: never reclaim it when the
        # thread that borrowed it ends.
        lease = self._held_lease()
        if lease is not None:
            lease.pool.release_owner(lease)

    def close_pool(self) -> None:
        """Close every pool of this alias in this process (Django >= 5.1 API)."""
        registry.close_pools(alias=self.alias)  # type: ignore[attr-defined]

    def checkout_info(self) -> CheckoutInfo | None:
        """Describe this wrapper's current (or last) checkout."""
        if self._checkout is None:
            return None
        source, wait, borrowed_at = self._checkout
        returned = self._checkout_returned_at
        return CheckoutInfo(
            alias=self.alias,  # type: ignore[attr-defined]
            source=source,
            wait=wait,
            held=(time.monotonic() if returned is None else returned) - borrowed_at,
            returned=returned is not None,
            started=borrowed_at - wait,
        )

    def _forget_after_fork(self) -> None:
        # The physical connection belongs to the parent process.
        self._lease = self._last_lease = self._new_lease = self._pool = None
        self.connection = None
        self.in_atomic_block = False
        self.closed_in_transaction = False
        self.needs_rollback = False
        self.savepoint_ids = []
        self.atomic_blocks = []
        self.run_on_commit = []

    # -- pools ------------------------------------------------------------

    def _current_pool(self) -> ConnectionPool:
        pool = self._pool
        settings_key = self._settings_key()
        if pool is None or pool.closed or settings_key != self._pool_key_cached:
            # From here on, an error (invalid POOL_OPTIONS) puts this frame
            # and the registry's in Django's error report: the key they hold
            # must not show the password.
            settings_key = HiddenKey(settings_key)
            key = (type(self), self.alias, settings_key)  # type: ignore[attr-defined]
            pool = registry.get_pool(key, self._build_pool)
            self._pool, self._pool_key_cached = pool, settings_key
        return pool

    def _settings_key(self) -> tuple[Any, ...]:
        # Everything a physical connection depends on, checked at every
        # connect (an alias's NAME may be switched in place): conn_params
        # derive from these, the session's time zone from timezone_name
        # (which follows TIME_ZONE and USE_TZ). OPTIONS is frozen again only
        # when it changed. timezone_name first: it may raise, and the
        # settings (with the password) are not a local of this frame yet.
        timezone_name = self.timezone_name  # type: ignore[attr-defined]
        self._check_options()
        sd = self.settings_dict  # type: ignore[attr-defined]
        options, pool_options = sd["OPTIONS"], sd.get("POOL_OPTIONS")
        cached = self._options_key
        if cached is None or cached[0] != options or cached[1] != pool_options:
            frozen = (_freeze(options), _freeze(pool_options))
            cached = self._options_key = (dict(options), _copy(pool_options), frozen)
        return (
            sd["NAME"],
            sd["USER"],
            sd["PASSWORD"],
            sd["HOST"],
            sd["PORT"],
            sd["AUTOCOMMIT"],
            cached[2],
            timezone_name,
            _pool_args_changes,
        )

    def _check_options(self) -> None:
        # Else dict() or .get() would fail on it with the settings in a
        # local. Not bound to a local either: a conninfo string may hold the
        # password.
        if not isinstance(self.settings_dict["OPTIONS"], Mapping):  # type: ignore[attr-defined]
            raise ImproperlyConfigured(
                options_type_message(self.alias, self.settings_dict["OPTIONS"])  # type: ignore[attr-defined]
            )

    @sensitive_variables()
    def _build_pool(self) -> ConnectionPool:
        # Metrics exporters, for projects without 'django_postgrespool' in
        # INSTALLED_APPS too (once per process; nothing without the extras).
        metrics.register_exporters()
        alias: str = self.alias  # type: ignore[attr-defined]
        # Read where they are, not bound to a local: Django's DEBUG page shows
        # every local of every frame (sensitive_variables hides them from
        # the emailed report only), and reading the options may raise.
        options = resolve_pool_options(
            alias,
            pool_settings(self.settings_dict),  # type: ignore[attr-defined]
            getattr(settings, "DATABASE_POOL_ARGS", None),
        )
        # A libpq service (OPTIONS['service']) names what the settings leave empty.
        service = self.settings_dict["OPTIONS"].get("service")  # type: ignore[attr-defined]
        given = f"(service {str(service)!r})" if service else None
        target = Target(
            database=shown(self.settings_dict["NAME"] or given or "postgres"),  # type: ignore[attr-defined]
            host=shown(self.settings_dict["HOST"] or given or "(default)"),  # type: ignore[attr-defined]
            port=shown(self.settings_dict["PORT"] or given or "(default)"),  # type: ignore[attr-defined]
            user=shown(self.settings_dict["USER"] or given or "(default)"),  # type: ignore[attr-defined]
        )
        attrs = self.settings_dict["OPTIONS"].get("target_session_attrs")  # type: ignore[attr-defined]
        return ConnectionPool(
            alias,
            options,
            target,
            autocommit=self.settings_dict["AUTOCOMMIT"],  # type: ignore[attr-defined]
            connect_errors=(self.Database.OperationalError,),  # type: ignore[attr-defined]
            session_attrs=None if attrs is None else str(attrs).lower(),
        )


class DatabaseWrapper(  # type: ignore[misc]
    PooledDatabaseWrapperMixin, postgresql_base.DatabaseWrapper
):
    """PostgreSQL, with connections borrowed from a pool."""


@contextlib.contextmanager
def borrowed_cursor(alias: str) -> Iterator[Any]:
    """A cursor of ``alias``; the connection is given back after if this borrowed it.

    For code outside a request (checks, management commands): a connection
    the caller already holds (inside its atomic block, say) is the caller's to
    give back.
    """
    wrapper = connections[alias]
    borrowed_here = wrapper.connection is None
    try:
        with wrapper.cursor() as cursor:
            yield cursor
    finally:
        if borrowed_here:
            wrapper.close()


def checkout_info(alias: str = "default") -> CheckoutInfo | None:
    """Describe the calling thread's current (or last) checkout of ``alias``."""
    # Only this thread's wrapper, if it has one: connections[alias] would make one.
    wrapper = getattr(connections._connections, alias, None)  # type: ignore[attr-defined]
    if not isinstance(wrapper, PooledDatabaseWrapperMixin):
        return None
    return wrapper.checkout_info()


def prewarm(alias: str | None = None) -> dict[str, int]:
    """Open ``pool_size`` connections of ``alias`` (every pooled alias if None).

    For a worker's start (gunicorn's ``post_worker_init``, celery's
    ``worker_process_init``): the first requests find connections ready, and
    a server that cannot be reached is reported at once. Return how many
    connections each alias's pool has open.
    """
    aliases = [alias] if alias is not None else list(connections.settings)
    opened: dict[str, int] = {}
    for name in aliases:
        first = connections.create_connection(name)
        if not isinstance(first, PooledDatabaseWrapperMixin):
            if alias is not None:
                raise ImproperlyConfigured(
                    f"prewarm({alias!r}): database alias {alias!r} does not use a pooled ENGINE."
                )
            continue
        pool = first._current_pool()
        wrappers = [first] + [
            connections.create_connection(name) for _ in range(pool.options.pool_size - 1)
        ]
        try:
            for wrapper in wrappers:
                try:
                    wrapper.ensure_connection()  # type: ignore[attr-defined]
                except Exception as error:
                    t = pool.target
                    raise PoolError(
                        f"prewarm: cannot open the {pool.options.pool_size} connection(s) of "
                        f"database alias {name!r} at {t['host']}:{t['port']} "
                        f"(database {t['database']!r}, user {t['user']!r}): "
                        f"{type(error).__name__}: {str(error).strip()}"
                    ) from error
        finally:
            for wrapper in wrappers:
                wrapper.close()  # type: ignore[attr-defined]
        opened[name] = pool.stats()["size"]
    return opened


def _forget_parent_connections() -> None:
    for wrapper in connections.all(initialized_only=True):
        if isinstance(wrapper, PooledDatabaseWrapperMixin) and wrapper._pool is not None:
            wrapper._forget_after_fork()


registry.on_fork_in_child(_forget_parent_connections)


def _register_checks() -> None:
    # Also without 'django_postgrespool' in INSTALLED_APPS, as soon as the
    # backend is loaded.
    from django_postgrespool import checks

    checks.register_all()


_register_checks()
