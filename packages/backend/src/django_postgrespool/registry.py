"""The registry of this process's pools, and what happens to it at fork."""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable, Hashable
from typing import Any

from django_postgrespool.pool import ConnectionPool, PoolStats

__all__ = ["all_pools", "close_pools", "get_pool", "on_fork_in_child", "pool_stats"]

# Held only while looking up or creating a pool (never while connecting), so
# that the first requests of several threads agree on one pool per key.
_lock = threading.Lock()
_pools: dict[Hashable, ConnectionPool] = {}
# A forked child keeps its parent's pools here, untouched, for ever: letting
# them be garbage-collected would close the parent's connections.
_abandoned: list[ConnectionPool] = []
_fork_callbacks: list[Callable[[], Any]] = []
# Pools retired because their alias's settings changed or the alias was
# removed: shown by pool_stats() while they still have connections lent.
# Read and changed under _lock: a WeakSet may not change while it is iterated
# (list() of it in one thread while another retires a pool raises).
_retired: weakref.WeakSet[ConnectionPool] = weakref.WeakSet()


def get_pool(key: Hashable, build: Callable[[], ConnectionPool]) -> ConnectionPool:
    """Return the pool for ``key``, building it with ``build()`` the first time.

    Building a pool retires the others of its alias (its settings changed)
    and those of aliases no longer in ``DATABASES``: one live pool per
    (process, alias), whatever number of tenants or settings come and go.
    """
    pool = _pools.get(key)
    if pool is not None:
        return pool
    with _lock:
        pool = _pools.get(key)
        if pool is not None:
            return pool
        pool = build()
        configured = _configured_aliases()
        stale = [
            k
            for k, other in _pools.items()
            if other.alias == pool.alias
            or (configured is not None and other.alias not in configured)
        ]
        retired = [_pools.pop(k) for k in stale]
        _pools[key] = pool
        _retired.update(retired)
    for other in retired:
        other.close(retired=True)
    return pool


def _configured_aliases() -> Any:
    try:
        from django.db import connections

        return connections.settings
    except Exception:  # settings not configured: nothing to compare with
        return None


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
        _retired.update(pools)  # shown by pool_stats() while they still lend
    for pool in pools:
        pool.close(retired=True)
    return len(pools)


def pool_stats(alias: str | None = None) -> list[PoolStats]:
    """Return a snapshot of each of this process's pools (of ``alias`` if given)."""
    with _lock:
        pools = list(_pools.values())
        retired = list(_retired)
    pools += [pool for pool in retired if pool.in_use() > 0]
    return [pool.stats() for pool in pools if alias is None or pool.alias == alias]


def all_pools() -> list[ConnectionPool]:
    """Every pool of this process: the current ones and retired ones not yet collected."""
    with _lock:
        return list(_pools.values()) + list(_retired)


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
    inherited, _pools = list(_pools.values()) + list(_retired), {}
    _retired.clear()
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
