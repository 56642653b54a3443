# -*- coding: utf-8 -*-
"""ENGINE 'django_postgrespool' on Python 2.7 with Django 1.4-1.6 (the legacy lane).

``base.py`` loads this module instead of ``backend.py`` on Python 2; the
modern code never imports it. It keeps the modern backend's contract in
Python 2 syntax: the same options and error messages (``_rules.py``, shared
with ``options.py``; ``max_idle``, ``leak_timeout``, ``lease`` and ``fair_after`` are
refused here unless they have their defaults), a
QueuePool of SQLAlchemy 1.3/1.4 with a cap and a timeout, a rollback (or
DISCARD ALL) when a connection is returned, and a health check at checkout.

Django 1.6 has the hooks the modern backend overrides (``get_new_connection``,
``_close``). Django 1.4 and 1.5 open the connection inside ``_cursor`` and
close it in ``close``; for them ``_cursor`` is Django's own code run with a
``Database`` whose ``connect`` checks out of the pool.
"""
from __future__ import absolute_import

import logging
import os
import select
import threading
import time
import types

import django
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.db import utils as db_utils
from django.db.backends.postgresql_psycopg2 import base as _pg
from django.db.backends.postgresql_psycopg2.base import DatabaseError, IntegrityError
from django.db.backends.postgresql_psycopg2.creation import DatabaseCreation as _PGCreation

try:
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
_BORN = "django_postgrespool.born"
_DISCARDED = "django_postgrespool.discarded"


def _params(conn_params):
    """Return Django's connection parameters, without the pool's options, hidden."""
    return _rules.HiddenParams(
        (k, v) for k, v in conn_params.items() if k not in _rules.NORMALIZERS)


def _raw(fairy):
    # SQLAlchemy 1.4 calls it dbapi_connection; 1.3 only has .connection.
    return getattr(fairy, "dbapi_connection", None) or fairy.connection


class _Pool(object):
    """One QueuePool for one (process, alias, connection parameters)."""

    def __init__(self, alias, options, conn_params):
        self.alias = alias
        self.options = options
        self.pid = os.getpid()
        self.target = {
            "database": str(conn_params.get("database") or "postgres"),
            "host": str(conn_params.get("host") or "(default)"),
            "port": str(conn_params.get("port") or "5432"),
            "user": str(conn_params.get("user") or "(default)"),
        }
        self._cap = options["pool_size"] + options["max_overflow"]
        self._counts = {"checkouts": 0, "opened": 0, "invalidated": 0, "waits": 0, "timeouts": 0}
        self.closed = False
        recycle = options["recycle"]

        def create(connection_record):
            raw = _pg.Database.connect(**conn_params)
            connection_record.info[_BORN] = time.time()
            self._counts["opened"] += 1
            return raw

        self._queue = QueuePool(
            create,
            pool_size=options["pool_size"],
            max_overflow=options["max_overflow"],
            timeout=options["timeout"],
            recycle=-1 if recycle is None else int(recycle),
            use_lifo=options["use_lifo"],
            reset_on_return=None,  # checkin() resets, below
        )

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
                fairy = self._queue.connect()
            except _sa_exc.TimeoutError:
                self._counts["timeouts"] += 1
                raise PoolTimeout(self.alias, self.options["pool_size"],
                                  self.options["max_overflow"], self._queue.checkedout(),
                                  self.options["timeout"])
            fresh = fairy.info.get(_BORN, 0) >= started
            if fresh or self._is_alive(_raw(fairy)):
                self._counts["checkouts"] += 1
                return fairy
            self.discard(fairy, "it failed the health check at checkout")
        raise _OperationalError("%r could not find a live connection." % (self,))

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
        try:
            cursor = raw.cursor()
            cursor.execute("SELECT 1")
            cursor.close()
            if raw.get_transaction_status() != _IDLE:
                raw.rollback()
        except Exception:  # whatever the driver raises, it is unusable
            return False
        return True

    def checkin(self, fairy):
        """Roll back (or DISCARD ALL) and return ``fairy``; discard it if that fails."""
        raw = _raw(fairy)
        problem = "its pool was closed" if self.closed else self._reset(raw)
        if problem is None:
            fairy.close()
        else:
            self.discard(fairy, problem, warn=not self.closed)

    def _reset(self, raw):
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
                raw.rollback()
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
        self._counts["invalidated"] += 1
        if warn:
            logger.warning("Discarding a connection of database alias %r: %s.", self.alias, reason)
        fairy.info[_DISCARDED] = True
        fairy.invalidate()

    def close(self):
        """Close the idle connections; checked-out ones are closed at checkin."""
        self.closed = True
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
# Pools inherited through fork() are kept, never closed: closing would end the
# parent's sessions (Python 2 has no os.register_at_fork; the pid tells).
_abandoned = []


def _get_pool(alias, pool_settings, params):
    # pool_settings: _rules.pool_settings(); params: _params().
    key = _rules.HiddenKey((alias, tuple(sorted((k, repr(v)) for k, v in params.items())),
                repr(sorted((pool_settings.get("POOL_OPTIONS") or {}).items()))))
    with _lock:
        pool = _pools.get(key)
        if pool is not None and pool.pid != os.getpid():
            _abandoned.extend(_pools.values())
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


class DatabaseWrapper(_pg.DatabaseWrapper):
    """PostgreSQL, with connections borrowed from a pool."""

    def __init__(self, *args, **kwargs):
        super(DatabaseWrapper, self).__init__(*args, **kwargs)
        self.creation = DatabaseCreation(self)
        self._pool = self._pool_fairy = None

    def _checkout(self, params):
        """Check out of the pool for ``params`` (from ``_params()``)."""
        pool = _get_pool(self.alias, _rules.pool_settings(self.settings_dict), params)
        fairy = pool.checkout()
        self._pool, self._pool_fairy = pool, fairy
        return _raw(fairy)

    def _checkin(self):
        """Give the connection back to its pool; tell whether there was one."""
        fairy, pool = self._pool_fairy, self._pool
        if fairy is None:
            return False
        self._pool_fairy = None
        if getattr(self, "in_atomic_block", False):
            # Django 1.6 keeps self.connection after a close inside an atomic
            # block (closed_in_transaction); it must not be lent to anyone.
            pool.discard(fairy, "it was closed inside an atomic block")
        else:
            pool.checkin(fairy)
        return True

    if django.VERSION >= (1, 6):

        def get_new_connection(self, conn_params):
            params = _params(conn_params)
            del conn_params  # shown by Django's DEBUG page if the checkout fails
            return self._checkout(params)

        def _close(self):
            if self.connection is None or not self._checkin():
                return super(DatabaseWrapper, self)._close()

    else:  # Django 1.4 and 1.5: the connection is opened in _cursor, closed in close

        def _cursor(self):
            code = _pg.DatabaseWrapper._cursor.__func__
            run = types.FunctionType(
                code.__code__, dict(vars(_pg), Database=_PooledDatabase(self)), code.__name__)
            return run(self)

        def close(self):
            self.validate_thread_sharing()
            if self.connection is not None and self._checkin():
                self.connection = None
            else:
                super(DatabaseWrapper, self).close()
