"""The registry of this process's pools, and what happens to it at fork."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Hashable
from typing import Any

from django_postgrespool.pool import ConnectionPool, PoolStats

__all__ = ["close_pools", "get_pool", "on_fork_in_child", "pool_stats"]

# Held only while looking up or creating a pool (never while connecting), so
# that the first requests of several threads agree on one pool per key.
_lock = threading.Lock()
_pools: dict[Hashable, ConnectionPool] = {}
# A forked child keeps its parent's pools here, untouched, for ever: letting
# them be garbage-collected would close the parent's connections.
_abandoned: list[ConnectionPool] = []
_fork_callbacks: list[Callable[[], Any]] = []


def get_pool(key: Hashable, build: Callable[[], ConnectionPool]) -> ConnectionPool:
    """Return the pool for ``key``, building it with ``build()`` the first time."""
    pool = _pools.get(key)
    if pool is None:
        with _lock:
            pool = _pools.get(key)
            if pool is None:
                pool = _pools[key] = build()
    return pool


def close_pools(alias: str | None = None, database: str | None = None) -> int:
    """Close this process's pools of ``alias`` and/or ``database`` (all if neither).

    Idle connections close at once; checked-out ones when they are returned.
    The next checkout builds a new pool. Return how many pools were closed.
    """
    with _lock:
        doomed = [
            key
            for key, pool in _pools.items()
            if (alias is None or pool.alias == alias)
            and (database is None or pool.target["database"] == database)
        ]
        pools = [_pools.pop(key) for key in doomed]
    for pool in pools:
        pool.close()
    return len(pools)


def pool_stats(alias: str | None = None) -> list[PoolStats]:
    """Return a snapshot of each of this process's pools (of ``alias`` if given)."""
    with _lock:
        pools = list(_pools.values())
    return [pool.stats() for pool in pools if alias is None or pool.alias == alias]


def on_fork_in_child(callback: Callable[[], Any]) -> None:
    """Run ``callback`` in every forked child, after the registry has been reset."""
    _fork_callbacks.append(callback)


def _before_fork() -> None:
    _lock.acquire()


def _after_fork_in_parent() -> None:
    _lock.release()


def _after_fork_in_child() -> None:
    global _lock, _pools
    _lock = threading.Lock()
    inherited, _pools = list(_pools.values()), {}
    devnull = os.open(os.devnull, os.O_RDWR)
    try:
        for pool in inherited:
            pool.abandon_after_fork(devnull)
    finally:
        os.close(devnull)
    _abandoned.extend(inherited)
    for callback in _fork_callbacks:
        callback()


os.register_at_fork(
    before=_before_fork,
    after_in_parent=_after_fork_in_parent,
    after_in_child=_after_fork_in_child,
)
