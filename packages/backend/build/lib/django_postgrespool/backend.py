"""The pooled PostgreSQL ``DatabaseWrapper``.

Django already decides when a connection is opened (``connect`` →
``get_new_connection`` → ``init_connection_state``) and closed (``close`` →
``_close``, at the end of each request with ``CONN_MAX_AGE = 0``). This
backend only changes what "open" and "close" mean: check out of, and back
into, the pool of :mod:`django_postgrespool.pool`.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.db import connections
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.backends.postgresql import base as postgresql_base
from django.db.backends.postgresql.creation import DatabaseCreation as PostgreSQLCreation
from sqlalchemy.pool import PoolProxiedConnection

from django_postgrespool import registry
from django_postgrespool.options import POOL_OPTION_NAMES, resolve_pool_options
from django_postgrespool.pool import _CONFIGURED, _ISOLATION, ConnectionPool, Target

__all__ = ["DatabaseCreation", "DatabaseWrapper", "PooledDatabaseWrapperMixin"]


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
        self.connection.close()
        registry.close_pools(database=self.connection.settings_dict["NAME"])
        super()._clone_test_db(suffix, verbosity, keepdb)  # type: ignore[misc]

    def _destroy_test_db(self, test_database_name: str, verbosity: int) -> None:
        self.connection.close()
        registry.close_pools(database=test_database_name)
        super()._destroy_test_db(test_database_name, verbosity)  # type: ignore[misc]


class PooledDatabaseWrapperMixin:
    """Turn a PostgreSQL ``DatabaseWrapper`` into a pooled one."""

    creation_class = DatabaseCreation
    _pool_connection: PoolProxiedConnection | None = None
    _pool: ConnectionPool | None = None
    _options_key: tuple[Any, Any, Hashable] | None = None
    _discard_reason: str | None = None

    # Django's own pool (OPTIONS['pool'], Django >= 5.1) is never used.
    pool = None

    def get_connection_params(self) -> dict[str, Any]:
        settings_dict = self.settings_dict  # type: ignore[attr-defined]
        if settings_dict["OPTIONS"].get("pool"):
            alias = self.alias  # type: ignore[attr-defined]
            raise ImproperlyConfigured(
                f"DATABASES[{alias!r}]['OPTIONS']['pool'] turns on Django's own "
                f"connection pool, which cannot be combined with ENGINE "
                f"{settings_dict['ENGINE']!r}. Remove it and put the pool's settings "
                f"in DATABASES[{alias!r}]['POOL_OPTIONS']."
            )
        params: dict[str, Any] = super().get_connection_params()  # type: ignore[misc]
        for name in POOL_OPTION_NAMES:
            params.pop(name, None)
        return params

    def get_new_connection(self, conn_params: dict[str, Any]) -> Any:
        pool = registry.get_pool(self._pool_key(), self._build_pool)
        conn = pool.checkout(self, conn_params)
        self._pool, self._pool_connection = pool, conn
        self.isolation_level = conn.info[_ISOLATION]
        return conn.dbapi_connection

    def _set_autocommit(self, autocommit: bool) -> None:
        # Checkin already restored the AUTOCOMMIT setting; don't pay the
        # driver's setter (a generator round in psycopg 3) at every checkout.
        if self.connection.autocommit != autocommit:  # type: ignore[attr-defined]
            super()._set_autocommit(autocommit)  # type: ignore[misc]

    def _create_physical_connection(self, conn_params: dict[str, Any]) -> Any:
        """Open a new physical connection the way Django would without a pool."""
        return super().get_new_connection(conn_params)  # type: ignore[misc]

    def init_connection_state(self) -> None:
        conn = self._pool_connection
        if conn is not None and conn.info.get(_CONFIGURED):
            # The session (time zone, role) was set up when this physical
            # connection was opened; only the once-per-alias checks remain.
            BaseDatabaseWrapper.init_connection_state(self)  # type: ignore[arg-type]
            return
        super().init_connection_state()  # type: ignore[misc]
        if conn is not None:
            conn.info[_CONFIGURED] = True

    def _close(self) -> None:
        conn, pool = self._pool_connection, self._pool
        if conn is None:
            if pool is None:  # a connection this wrapper did not borrow
                super()._close()  # type: ignore[misc]
            # else: already returned; self.connection is the pool's now.
            return
        self._pool_connection = None
        if self.in_atomic_block:  # type: ignore[attr-defined]
            # Django keeps self.connection after a close inside an atomic
            # block (closed_in_transaction); it must not be lent to anyone.
            pool.discard(conn, "it was closed inside an atomic block")
            return
        if self._discard_reason is not None:
            pool.discard(conn, self._discard_reason)
        else:
            with self.wrap_database_errors:  # type: ignore[attr-defined]
                pool.checkin(conn)
        # Lent to the next borrower from now on (Django's close() clears it
        # too, but _close() may be called alone).
        self.connection = None

    def is_usable(self) -> bool:
        # After _close() the connection is the pool's: not ours to probe
        # (Django < 5.0 would call None.cursor()).
        if self.connection is None:  # type: ignore[attr-defined]
            return False
        return bool(super().is_usable())  # type: ignore[misc]

    def close_if_health_check_failed(self) -> None:
        # A connection that fails Django's health check (CONN_HEALTH_CHECKS)
        # is closed for real, not returned to the pool.
        self._discard_reason = "it failed Django's health check (CONN_HEALTH_CHECKS)"
        try:
            super().close_if_health_check_failed()  # type: ignore[misc]
        finally:
            self._discard_reason = None

    def close_pool(self) -> None:
        """Close every pool of this alias in this process (Django >= 5.1 API)."""
        registry.close_pools(alias=self.alias)  # type: ignore[attr-defined]

    def _forget_after_fork(self) -> None:
        # The physical connection belongs to the parent process.
        self._pool_connection = self._pool = None
        self.connection = None
        self.in_atomic_block = False
        self.closed_in_transaction = False
        self.needs_rollback = False
        self.savepoint_ids: list[str] = []
        self.atomic_blocks: list[Any] = []
        self.run_on_commit: list[Any] = []

    # -- pools ------------------------------------------------------------

    def _pool_key(self) -> Hashable:
        # Everything a physical connection depends on; conn_params derive
        # from these. OPTIONS is frozen again only when it changed.
        sd = self.settings_dict  # type: ignore[attr-defined]
        options, pool_options = sd["OPTIONS"], sd.get("POOL_OPTIONS")
        cached = self._options_key
        if cached is None or cached[0] != options or cached[1] != pool_options:
            frozen = (_freeze(options), _freeze(pool_options))
            cached = self._options_key = (dict(options), _copy(pool_options), frozen)
        return (
            type(self),
            self.alias,  # type: ignore[attr-defined]
            sd["NAME"],
            sd["USER"],
            sd["PASSWORD"],
            sd["HOST"],
            sd["PORT"],
            sd["AUTOCOMMIT"],
            cached[2],
            self.timezone_name,  # type: ignore[attr-defined]
            settings.USE_TZ,
        )

    def _build_pool(self) -> ConnectionPool:
        alias: str = self.alias  # type: ignore[attr-defined]
        settings_dict = self.settings_dict  # type: ignore[attr-defined]
        options = resolve_pool_options(
            alias, settings_dict, getattr(settings, "DATABASE_POOL_ARGS", None)
        )
        target = Target(
            database=str(settings_dict["NAME"] or "postgres"),
            host=str(settings_dict["HOST"] or "(default)"),
            port=str(settings_dict["PORT"] or "5432"),
            user=str(settings_dict["USER"] or "(default)"),
        )
        return ConnectionPool(alias, options, target, autocommit=settings_dict["AUTOCOMMIT"])


class DatabaseWrapper(  # type: ignore[misc]
    PooledDatabaseWrapperMixin, postgresql_base.DatabaseWrapper
):
    """PostgreSQL, with connections borrowed from a pool."""


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
