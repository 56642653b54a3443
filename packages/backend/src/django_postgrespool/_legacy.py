# -*- coding: utf-8 -*-
"""ENGINE 'django_postgrespool' on Python 2.7 with Django 1.4-1.6 (the legacy lane).

``base.py`` loads this module instead of ``backend.py`` on Python 2; the
modern code never imports it. It keeps the modern backend's contract in
Python 2 syntax: the same options and error messages (``_rules.py``, shared
with ``options.py``; ``max_idle``, ``leak_timeout``, ``lease`` and ``fair_after`` are
refused here unless they have their defaults), a
QueuePool of SQLAlchemy 1.3/1.4 with a cap and a timeout, a rollback (or
DISCARD ALL) when a connection is returned, and a health check at checkout.
Returned means: by close(), by the end of the thread that borrowed it, or by
garbage collection (reset all the same); the cursors made on it are closed
then. A fork child neither uses nor closes the connections of its parent: it
points them at /dev/null when it first meets them (Python 2 has no fork hook).

Django 1.6 has the hooks the modern backend overrides (``get_new_connection``,
``_close``). Django 1.4 and 1.5 open the connection inside ``_cursor`` and
close it in ``close``; for them ``_cursor`` is Django's own code run with a
``Database`` whose ``connect`` checks out of the pool.
"""
from __future__ import absolute_import

import collections
import fcntl
import logging
import math
import os
import select
import socket
import thread
import threading
import time
import types
import weakref

import django
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.db import utils as db_utils
from django.db.backends.postgresql_psycopg2 import base as _pg
from django.db.backends.postgresql_psycopg2.base import DatabaseError, IntegrityError
from django.db.backends.postgresql_psycopg2.creation import DatabaseCreation as _PGCreation

try:
    from sqlalchemy import event as _sa_event
    from sqlalchemy import exc as _sa_exc
    from sqlalchemy.pool import QueuePool
except ImportError:  # pragma: no cover - told to the user
    raise ImproperlyConfigured(
        "ENGINE 'django_postgrespool' on Python 2.7 needs SQLAlchemy 1.3 or 1.4. "
        "Did you install it? pip install 'SQLAlchemy>=1.3,<2.0'"
    )

from django_postgrespool import _rules

__all__ = [
    "POOL_OPTION_NAMES",
    "DatabaseCreation",
    "DatabaseError",
    "DatabaseWrapper",
    "IntegrityError",
    "PoolTimeout",
    "close_pools",
    "normalize_pool_options",
    "pool_stats",
]

logger = logging.getLogger("django_postgrespool")

# -- options: the rules and messages of _rules.py, shared with options.py -------

POOL_OPTION_NAMES = _rules.NAMES
normalize_pool_options = _rules.normalize
_r = _rules._r
# Options this backend does not implement: refused unless they have their default.
_UNAVAILABLE = ("fair_after", "lease", "leak_timeout", "max_idle")


def resolve_pool_options(alias, settings_dict):
    """Merge DATABASE_POOL_ARGS < pool keys in OPTIONS < POOL_OPTIONS, validated."""
    merged = dict(_rules.DEFAULTS)
    merged.update(_rules.merge(alias, settings_dict, getattr(settings, "DATABASE_POOL_ARGS", None),
                               _UNAVAILABLE))
    return merged


# -- errors ---------------------------------------------------------------------

# django.db.utils.OperationalError exists from Django 1.6 on.
_OperationalError = getattr(db_utils, "OperationalError", _pg.Database.OperationalError)


class PoolTimeout(_OperationalError):
    """No connection became free within the pool's ``timeout``."""

    def __init__(self, alias, pool_size, max_overflow, checked_out, timeout):
        self.alias = alias
        super(PoolTimeout, self).__init__(
            _rules.timeout_message(alias, pool_size, max_overflow, checked_out, timeout))


# -- the pool ---------------------------------------------------------------------

# libpq's PGTransactionStatusType (psycopg2.extensions.TRANSACTION_STATUS_*).
_IDLE, _ACTIVE, _INTRANS, _INERROR, _UNKNOWN = range(5)
# A checkout waiting at the cap looks for connections of ended threads this often.
_WAIT_SLICE = 0.25
_BORN = "django_postgrespool.born"
_RETURNED = "django_postgrespool.returned"  # when checkin() last gave it back
_DISCARDED = "django_postgrespool.discarded"
# The driver's own state at connect (cursor_factory, notices, notifies), restored at checkin.
_INITIAL = "django_postgrespool.initial"
# Set by checkin() just before SQLAlchemy takes the connection back: already reset.
_RESET = "django_postgrespool.reset"


def _params(conn_params):
    """Return Django's connection parameters, without the pool's options, hidden."""
    return _rules.HiddenParams(
        (k, v) for k, v in conn_params.items() if k not in _rules.NORMALIZERS)


def _raw(fairy):
    # SQLAlchemy 1.4 calls it dbapi_connection; 1.3 only has .connection.
    return getattr(fairy, "dbapi_connection", None) or fairy.connection


def _lent(fairy):
    """Tell whether ``fairy`` still holds its connection (not closed, not invalidated)."""
    if hasattr(fairy, "dbapi_connection"):
        return fairy.dbapi_connection is not None
    return fairy.connection is not None


def _socket_identity(raw):
    st = os.fstat(raw.fileno())
    return st.st_dev, st.st_ino


def _neutralize(raw, identity):
    """Point a connection inherited through fork() at /dev/null: never the parent's socket.

    Whatever the child then does with it (garbage collection, exit: libpq's
    Terminate message) goes nowhere; the parent's session is untouched. Not
    when its descriptor is no longer that socket (a daemon closed it, and the
    number may be another file's now): return False then.
    """
    try:
        if raw.closed:
            return True
        fd = raw.fileno()
        if _socket_identity(raw) != identity:
            return False
    except Exception:
        return False
    null = os.open(os.devnull, os.O_RDWR)
    try:
        os.dup2(null, fd)
        fcntl.fcntl(fd, fcntl.F_SETFD, fcntl.fcntl(fd, fcntl.F_GETFD) | fcntl.FD_CLOEXEC)
    finally:
        os.close(null)
    return True


class _PingWatch(object):
    """Shut down the socket of a health check still unanswered at its deadline.

    psycopg2 waits for an answer without a time limit; a server that stops
    answering but keeps the connection open would hold the checkout for
    ever. Shutting the socket down from another thread ends that wait at
    once with an error, and the checkout closes the connection. One thread
    per process (see _ping_watch), started by the first round trip.

    A thread of the ``thread`` module that sleeps in C (poll() on a pipe
    that arm() writes to), not threading's Condition: Python 2.7's timed
    wait polls in Python, and a thread running Python code as the
    interpreter exits (module globals set to None) prints tracebacks.
    """

    def __init__(self):
        self._lock = thread.allocate_lock()
        self._armed = {}  # raw connection -> its deadline (time.time())
        self._wake, self._bell = os.pipe()  # arm() writes a byte to ring
        for fd in (self._wake, self._bell):
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)
        self._running = False  # set by the thread itself: a start cut short is tried again

    def close(self):
        """Close the pipe of a watch never used (its thread never started)."""
        for fd in (self._wake, self._bell):
            try:
                os.close(fd)
            except OSError:
                pass

    def arm(self, raw, deadline):
        with self._lock:
            self._armed[raw] = deadline
            start = not self._running
        if start:
            try:
                thread.start_new_thread(self._run, ())
            except Exception:  # "can't start new thread": the next round trip tries again
                pass
        else:
            try:
                os.write(self._bell, b"!")
            except OSError:  # full: rung already
                pass

    def disarm(self, raw):
        """Stop watching ``raw``; tell whether its round trip ended in time."""
        with self._lock:
            return self._armed.pop(raw, None) is not None

    def _run(self, now=time.time, read=os.read, interrupted=(select.error, OSError, IOError)):
        # Locals only from here (bound above): at the interpreter's exit the
        # module's globals become None, and any error then ends the thread
        # silently (a bare except: not even a builtin name is looked up).
        try:
            with self._lock:
                if self._running:  # another one started meanwhile
                    return
                self._running = True
            shut_down = _shut_down
            poller = select.poll()  # not select(): descriptors above 1023 work too
            poller.register(self._wake, select.POLLIN)
            wait = poller.poll
            while True:
                with self._lock:
                    at = now()
                    soonest = None
                    for raw, deadline in list(self._armed.items()):
                        if at >= deadline:
                            del self._armed[raw]  # disarm() now tells the checkout it was too late
                            shut_down(raw)
                        elif soonest is None or deadline < soonest:
                            soonest = deadline
                try:
                    wait(None if soonest is None else max(0.0, soonest - at) * 1000.0)
                    read(self._wake, 512)
                except interrupted:  # not rung (the time ran out), or a signal (EINTR)
                    pass
        except:  # noqa: E722 - see above
            self._running = False  # ended by an error, not at exit: the next arm() starts one
            return


_watches = {}  # pid -> its _PingWatch: a fork child never uses its parent's lock


def _ping_watch():
    pid = os.getpid()
    watch = _watches.get(pid)
    if watch is None:
        made = _PingWatch()
        watch = _watches.setdefault(pid, made)  # one per process (atomic)
        if watch is not made:  # another thread's first ping made it meanwhile
            made.close()
    return watch


def _shut_down(raw):
    """Shut down the socket of the driver connection ``raw``, leaving it open."""
    try:
        if raw.closed:
            return
        fd = raw.fileno()
        sock = socket.fromfd(fd, socket.AF_INET, socket.SOCK_STREAM)  # a duplicate
    except Exception:  # no socket any more
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)  # the socket both descriptors share
    except Exception:
        pass
    finally:
        sock.close()  # the duplicate only


def _clear(items):
    try:
        del items[:]
    except TypeError:  # a deque or another container the application put there
        items.clear()


class _Pool(object):
    """One QueuePool for one (process, alias, connection parameters)."""

    def __init__(self, alias, options, conn_params):
        self.alias = alias
        self.options = options
        self.pid = os.getpid()
        self.target = {
            "database": _rules.shown(conn_params.get("database") or "postgres"),
            "host": _rules.shown(conn_params.get("host") or "(default)"),
            "port": _rules.shown(conn_params.get("port") or "5432"),
            "user": _rules.shown(conn_params.get("user") or "(default)"),
        }
        self._cap = options["pool_size"] + options["max_overflow"]
        self._slices = max(1, int(math.ceil(float(options["timeout"]) / _WAIT_SLICE)))
        self._counts = {"checkouts": 0, "opened": 0, "invalidated": 0, "waits": 0, "timeouts": 0}
        self.closed = False
        # Every connection this pool opened and has not freed, and its socket
        # (device, inode): neutralized in a fork child.
        self._opened = weakref.WeakKeyDictionary()
        self._forgotten = False
        # When a health check last got no answer: connections idle since
        # before then are closed unpinged (each ping would cost the timeout).
        self._silent_since = 0.0
        recycle = options["recycle"]

        def create(connection_record):
            raw = _pg.Database.connect(**conn_params)
            self._opened[raw] = _socket_identity(raw)
            connection_record.info[_BORN] = time.time()
            connection_record.info[_INITIAL] = (raw.cursor_factory, raw.notices, raw.notifies)
            self._counts["opened"] += 1
            return raw

        self._queue = QueuePool(
            create,
            pool_size=options["pool_size"],
            max_overflow=options["max_overflow"],
            # The wait is cut in slices (see _connect): the same in all.
            timeout=float(options["timeout"]) / self._slices,
            recycle=-1 if recycle is None else int(recycle),
            use_lifo=options["use_lifo"],
            reset_on_return=None,  # checkin() resets, below
        )
        _sa_event.listen(self._queue, "reset", self._reset_unreturned)

    def __repr__(self):
        t = self.target
        return "<ConnectionPool alias=%s database=%s host=%s port=%s user=%s pool_size=%d " \
            "max_overflow=%d%s>" % (
                _r(self.alias), _r(t["database"]), _r(t["host"]), _r(t["port"]), _r(t["user"]),
                self.options["pool_size"], self.options["max_overflow"],
                " closed" if self.closed else "")

    def checkout(self):
        """Return a checked-out, live connection (a SQLAlchemy fairy)."""
        if self._queue.checkedout() >= self._cap:
            self._counts["waits"] += 1
            logger.warning(
                "Pool of database alias %r has all %d connections checked out; "
                "waiting up to %gs for one to be returned.",
                self.alias, self._cap, self.options["timeout"])
        for _ in range(self._cap + 2):
            started = time.time()
            try:
                fairy = self._connect()
            except _sa_exc.TimeoutError:
                self._counts["timeouts"] += 1
                raise PoolTimeout(self.alias, self.options["pool_size"],
                                  self.options["max_overflow"], self._queue.checkedout(),
                                  self.options["timeout"])
            try:
                fresh = fairy.info.get(_BORN, 0) >= started
                returned = fairy.info.get(_RETURNED, fairy.info.get(_BORN, 0))
                if not fresh and returned < self._silent_since:
                    self.discard(fairy, "it was idle since before the server stopped answering "
                                 "a health check", warn=False)
                    continue
                if fresh or self._is_alive(_raw(fairy)):
                    self._counts["checkouts"] += 1
                    return fairy
                self.discard(fairy, "it failed the health check at checkout")
            except BaseException:  # KeyboardInterrupt, SystemExit: nobody will give it back
                if _lent(fairy):
                    self.discard(fairy, "its checkout was interrupted", warn=False)
                raise
        raise _OperationalError("%r could not find a live connection." % (self,))

    def _connect(self):
        """QueuePool's connect(), its wait at the cap cut in slices.

        Between two, the connections of threads that ended holding them come
        back: a thread's locals are freed a moment after join() returns, so
        one that ended just before this checkout may not be in _ended yet.
        """
        for left in range(self._slices - 1, -1, -1):
            try:
                return self._queue.connect()
            except _sa_exc.TimeoutError:
                if not left:
                    raise
                if _ended:
                    _give_back_ended()

    def _is_alive(self, raw):
        mode = self.options["pre_ping"]
        if mode is False:
            return True
        if raw.closed:
            return False
        if mode == "socket":
            poller = select.poll()
            poller.register(raw.fileno(), select.POLLIN | select.POLLPRI)
            if not poller.poll(0):
                return True
        timeout = self.options["timeout"]
        watch = _ping_watch()
        pinged_at = time.time()
        watch.arm(raw, pinged_at + timeout)
        answered = False
        try:
            cursor = raw.cursor()
            cursor.execute("SELECT 1")
            cursor.close()
            if raw.get_transaction_status() != _IDLE:
                raw.rollback()
            answered = True
        except Exception:  # whatever the driver raises, it is unusable
            pass
        finally:
            if not watch.disarm(raw):  # shut down at the deadline
                answered = False
                self._silent_since = max(self._silent_since, pinged_at)
                logger.warning(
                    "A health check of a connection of database alias %r got no answer "
                    "within %gs (the pool's timeout): its socket was shut down.",
                    self.alias, timeout)
        return answered

    def checkin(self, fairy, cursors=()):
        """Close ``cursors``, reset and return ``fairy``; discard it if the reset fails."""
        if self.forked():
            _abandoned.append(fairy)  # never reset, closed nor returned: the parent's
            return
        try:
            # Kept past close(), they would run on the next borrower's session.
            for cursor in list(cursors):
                try:
                    cursor.close()
                except Exception:
                    pass
            problem = "its pool was closed" if self.closed else self._reset(_raw(fairy), fairy.info)
            if problem is None:
                fairy.info[_RESET] = True
                fairy.info[_RETURNED] = time.time()
                fairy.close()
            else:
                self.discard(fairy, problem, warn=not self.closed)
        except BaseException:  # interrupted: the session is in an unknown state
            if _lent(fairy):
                fairy.info.pop(_RESET, None)
                self.discard(fairy, "its checkin was interrupted", warn=False)
            raise

    def _reset_unreturned(self, fairy, record):
        """SQLAlchemy's reset event: a connection nobody gave back (its holder was collected)."""
        if record.info.pop(_RESET, False):
            return  # checkin() reset it
        if self.forked():
            return  # forget() neutralized it (or keeps it): no I/O on the parent's session
        if self.closed:
            problem = "its pool was closed"
        else:
            problem = self._reset(_raw(fairy), record.info)
        if problem is not None:
            self._counts["invalidated"] += 1
            record.invalidate()
        else:
            record.info[_RETURNED] = time.time()  # given back now, as by checkin()

    def forked(self):
        """Tell whether this is a fork child of the pool's process (then forget() first)."""
        if self.pid == os.getpid():
            return False
        self.forget()
        return True

    def forget(self):
        """In a fork child: point every connection of this pool at /dev/null (see _neutralize)."""
        if not self._forgotten:
            self._forgotten = True
            _abandoned.append(self)
            for raw, identity in list(self._opened.items()):
                if not _neutralize(raw, identity):
                    _abandoned.append(raw)  # never freed, so never closed by libpq

    def _reset(self, raw, info):
        if raw.closed:
            return "the connection to the server was lost"
        status = raw.get_transaction_status()
        if status == _ACTIVE:
            return "a command was still running on it"
        if status == _UNKNOWN:
            return "the connection to the server was lost"
        if _rules.said_farewell(getattr(raw, "notices", None)):
            return "the server ended its session"
        try:
            if status != _IDLE:
                _rules.roll_back(raw, raw.get_transaction_status)
            # What the driver keeps and neither ROLLBACK nor DISCARD ALL resets
            # (Django sets the isolation level at each checkout itself).
            if getattr(raw, "readonly", None) is not None:
                raw.readonly = None
            if getattr(raw, "deferrable", None) is not None:
                raw.deferrable = None
            factory, notices, notifies = info.get(_INITIAL, (None, None, None))
            if raw.cursor_factory is not factory:
                raw.cursor_factory = factory
            if notices is not None:
                if raw.notices is not notices:
                    raw.notices = notices
                if notices:
                    _clear(notices)
            if notifies is not None:
                if raw.notifies is not notifies:
                    raw.notifies = notifies
                if notifies:
                    _clear(notifies)
            if self.options["reset"] == "discard":
                raw.autocommit = True
                cursor = raw.cursor()
                cursor.execute("DISCARD ALL")
                cursor.close()
        except Exception as error:  # any failure means "don't reuse"
            return "resetting it failed (%s)" % type(error).__name__
        return None

    def discard(self, fairy, reason, warn=True):
        """Close the physical connection of ``fairy`` and free its slot."""
        if self.forked():
            _abandoned.append(fairy)  # the parent's: never closed here
            return
        self._counts["invalidated"] += 1
        if warn:
            logger.warning("Discarding a connection of database alias %r: %s.", self.alias, reason)
        fairy.info[_DISCARDED] = True
        fairy.invalidate()

    def close(self):
        """Close the idle connections; checked-out ones are closed at checkin."""
        self.closed = True
        if not self.forked():  # in a fork child, the idle connections are the parent's
            self._queue.dispose()

    def stats(self):
        """Return a snapshot of this pool's counters (no password)."""
        checked_out = self._queue.checkedout()
        size = self._queue.checkedin() + checked_out
        stats = dict(self.target, alias=self.alias, pid=self.pid, size=size,
                     idle=self._queue.checkedin(), checked_out=checked_out,
                     pool_size=self.options["pool_size"],
                     max_overflow=self.options["max_overflow"])
        stats.update(self._counts)
        return stats


# -- the registry: pools per process --------------------------------------------

# Held only while looking up or creating a pool, so that the first requests of
# several threads agree on one pool per key.
_lock = threading.Lock()
_pools = {}
# What a fork child inherited (pools, connections lent when it forked, and
# those whose descriptor it closed, see _neutralize) is kept here, never closed
# nor freed: that would end the parent's sessions (Python 2 has no
# os.register_at_fork; the pid tells).
_abandoned = []


def _get_pool(alias, pool_settings, params):
    # pool_settings: _rules.pool_settings(); params: _params().
    options = pool_settings.get("POOL_OPTIONS") or {}
    # Not a dict: resolve_pool_options() below refuses it, naming the setting.
    options = sorted(options.items()) if hasattr(options, "items") else options
    key = _rules.HiddenKey((alias, tuple(sorted((k, repr(v)) for k, v in params.items())),
                            repr(options)))
    with _lock:
        pool = _pools.get(key)
        if pool is not None and pool.pid != os.getpid():
            for inherited in _pools.values():
                inherited.forget()
            _pools.clear()
            pool = None
        if pool is None:
            pool = _pools[key] = _Pool(alias, resolve_pool_options(alias, pool_settings), params)
    return pool


def close_pools(alias=None, database=None):
    """Close this process's pools of ``alias`` and/or ``database``; return how many."""
    with _lock:
        doomed = [k for k, p in _pools.items()
                  if (alias is None or p.alias == alias)
                  and (database is None or p.target["database"] == database)]
        pools = [_pools.pop(k) for k in doomed]
    for pool in pools:
        pool.close()
    return len(pools)


def pool_stats(alias=None):
    """Return a snapshot of each of this process's pools (of ``alias`` if given)."""
    with _lock:
        pools = list(_pools.values())
    return [p.stats() for p in pools if alias is None or p.alias == alias]


# -- the Django side ------------------------------------------------------------

class DatabaseCreation(_PGCreation):
    """Close the pools of a test database before it is dropped."""

    def _destroy_test_db(self, test_database_name, verbosity):
        # DROP DATABASE fails while any session (an idle pooled one too) is in it.
        close_pools(database=test_database_name)
        return super(DatabaseCreation, self)._destroy_test_db(test_database_name, verbosity)


class _PooledDatabase(object):
    """psycopg2, except that ``connect`` checks out of the wrapper's pool (Django < 1.6)."""

    def __init__(self, wrapper):
        self._wrapper = wrapper

    def connect(self, **conn_params):
        params = _params(conn_params)
        del conn_params  # shown by Django's DEBUG page if the checkout fails
        return self._wrapper._checkout(params)

    def __getattr__(self, name):
        return getattr(_pg.Database, name)


# The wrappers to which each thread lent a connection (see _Leases).
_threads = threading.local()
# (wrapper weakref, thread id) of threads that ended holding a connection:
# given back at the next checkout of any thread (see _Leases).
_ended = collections.deque()


class _Leases(object):
    """Held by a thread (in ``_threads``) while it lends connections: noted when it ends.

    A thread that ends holding a connection leaves its DatabaseWrapper in a
    reference cycle (Django's ``creation``, ``ops``... point back at it): the
    connection would come back only at the next garbage collection, without
    a reset. This object has no cycle: it is freed as soon as the thread's
    locals are. Its finalizer takes no lock and runs no I/O: it only appends
    to ``_ended`` (one step under the GIL); the next checkout gives the
    connections back, reset.
    """

    __slots__ = ("ident", "wrappers")

    def __init__(self):
        self.ident = thread.get_ident()
        self.wrappers = {}  # id(wrapper): weakref to it

    def __del__(self):
        for ref in list(self.wrappers.values()):
            _ended.append((ref, self.ident))


def _give_back_ended():
    """Give back the connections of threads that ended holding them (see _Leases)."""
    while _ended:
        try:
            ref, ident = _ended.popleft()
        except IndexError:  # taken by another thread meanwhile
            return
        wrapper = ref()
        if wrapper is not None:
            wrapper._give_back_at_thread_end(ident)


class DatabaseWrapper(_pg.DatabaseWrapper):
    """PostgreSQL, with connections borrowed from a pool."""

    def __init__(self, *args, **kwargs):
        self._pool = self._pool_fairy = self._pool_cursors = self._pool_thread = None
        super(DatabaseWrapper, self).__init__(*args, **kwargs)
        self.creation = DatabaseCreation(self)

    # Django reads and writes self.connection everywhere: in a fork child, the
    # connection the parent had lent this wrapper is forgotten at the first
    # read, before anything runs on (or closes) the parent's session.
    def _get_connection(self):
        raw = self.__dict__.get("connection")
        if raw is not None and self._pool_fairy is not None and self._pool.pid != os.getpid():
            self._checkin()  # the pool neutralizes it
            raw = self.__dict__["connection"] = None
        return raw

    def _set_connection(self, raw):
        self.__dict__["connection"] = raw

    connection = property(_get_connection, _set_connection)

    def _checkout(self, params):
        """Check out of the pool for ``params`` (from ``_params()``)."""
        pool = _get_pool(self.alias, _rules.pool_settings(self.settings_dict), params)
        if _ended:
            _give_back_ended()
        fairy = pool.checkout()
        try:
            self._pool, self._pool_fairy = pool, fairy
            self._pool_cursors = weakref.WeakSet()
            self._pool_thread = thread.get_ident()
            leases = getattr(_threads, "leases", None)
            if leases is None:
                leases = _threads.leases = _Leases()
            leases.wrappers[id(self)] = weakref.ref(self)
            return _raw(fairy)
        except BaseException:
            if self._pool_fairy is fairy:
                self._pool_fairy = None
            pool.discard(fairy, "its checkout was interrupted", warn=False)
            raise

    def _checkin(self, thread_ending=False):
        """Give the connection back to its pool; tell whether there was one."""
        fairy, pool, cursors = self._pool_fairy, self._pool, self._pool_cursors
        if fairy is None:
            return False
        self._pool_fairy = self._pool_cursors = None
        # (An ending thread's locals are being freed: not read then.)
        leases = None if thread_ending else getattr(_threads, "leases", None)
        if leases is not None:
            leases.wrappers.pop(id(self), None)
        if getattr(self, "in_atomic_block", False):
            # Django 1.6 keeps self.connection after a close inside an atomic
            # block (closed_in_transaction); it must not be lent to anyone.
            pool.discard(fairy, "it was closed inside an atomic block")
        else:
            pool.checkin(fairy, cursors or ())
        return True

    def _give_back_at_thread_end(self, ident):
        """Thread ``ident`` ended: give back what it still holds (unless shared)."""
        if self._pool_fairy is None or self._pool_thread != ident or \
                getattr(self, "allow_thread_sharing", False):
            return
        self._checkin(thread_ending=True)
        self.__dict__["connection"] = None

    def _given_back_on_error(self):
        """A new connection's setup failed (a connection_created receiver raised): give it back.

        Else the wrapper would keep it, and its next query would run without
        that setup.
        """
        if self._pool_fairy is not None:
            self._checkin()
        self.__dict__["connection"] = None

    def _track(self, cursor):
        if self._pool_cursors is not None:
            self._pool_cursors.add(cursor)
        return cursor

    if django.VERSION >= (1, 6):

        def get_new_connection(self, conn_params):
            params = _params(conn_params)
            del conn_params  # shown by Django's DEBUG page if the checkout fails
            return self._checkout(params)

        def connect(self):
            try:
                super(DatabaseWrapper, self).connect()
            except BaseException:
                self._given_back_on_error()
                raise

        def create_cursor(self):
            return self._track(super(DatabaseWrapper, self).create_cursor())

        def _close(self):
            if self.connection is None or not self._checkin():
                return super(DatabaseWrapper, self)._close()

    else:  # Django 1.4 and 1.5: the connection is opened in _cursor, closed in close

        def _cursor(self):
            code = _pg.DatabaseWrapper._cursor.__func__
            run = types.FunctionType(
                code.__code__, dict(vars(_pg), Database=_PooledDatabase(self)), code.__name__)
            new = self.connection is None
            try:
                cursor = run(self)
            except BaseException:
                if new:
                    self._given_back_on_error()
                raise
            self._track(getattr(cursor, "cursor", cursor))  # psycopg2's, in Django's CursorWrapper
            return cursor

        def close(self):
            self.validate_thread_sharing()
            if self.connection is None or self._pool_fairy is None:
                return super(DatabaseWrapper, self).close()
            try:
                self._checkin()
            finally:  # interrupted too: the pool took it back or closed it, never ours again
                self.connection = None
