"""The registry of this process's pools, the totals of those that departed, and fork."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Hashable
from typing import Any, Literal, cast

from django_postgrespool.metrics import TimingKind
from django_postgrespool.pool import ConnectionPool, CountedStats, PoolStats, _Histogram

__all__ = [
    "DepartedStats",
    "all_pools",
    "close_pools",
    "departed_stats",
    "get_pool",
    "on_fork_in_child",
    "pool_stats",
    "snapshot",
    "timing_sources",
]

# Held only while looking up or creating a pool (never while connecting), so
# that the first requests of several threads agree on one pool per key.
_lock: threading.Lock | None = threading.Lock()  # through _registry_lock(), never directly
_making = threading.Lock()  # held only to make _lock in a forked child
_pools: dict[Hashable, ConnectionPool] = {}
# A forked child keeps its parent's pools here, untouched, for ever: letting
# them be garbage-collected would close the parent's connections.
_abandoned: list[ConnectionPool] = []
_fork_callbacks: list[Callable[[], Any]] = []
# Pools retired because their alias's settings changed, the alias was removed
# or close_pools() closed them: held (strongly, under _lock) and shown by
# pool_stats() until they are closed and drained; then _sweep() adds their
# counters to _departed and drops them. Nothing runs on a garbage-collection
# path: a pool is only ever dropped here, by a thread that holds _lock.
_retired: list[ConnectionPool] = []
# Per alias, what its departed pools counted: the exporters add it to the
# alias's pools, so that counters never go backwards when a pool departs.
# One entry per alias, whatever the number of pools retired; forgotten once
# the alias has left DATABASES and has no pool left.
_departed: dict[str, _Departed] = {}

# The counters of PoolStats that only grow over a pool's life (the timings'
# sums are in the histograms).
_COUNTERS = (
    "checkouts",
    "affinity_hits",
    "handoffs",
    "reclaimed",
    "waits",
    "timeouts",
    "leaks",
    "opened",
    "recycled",
    "invalidated",
    "closed",
    "connect_failures",
    "lost_slots",
)
_KINDS: tuple[TimingKind, ...] = ("wait", "use", "create")


class DepartedStats(CountedStats):
    """What the departed pools of one alias counted, as returned by :func:`departed_stats`."""

    alias: str
    departed: Literal[True]
    pools: int


class _Departed:
    """The counters and timing histograms of an alias's departed pools, summed."""

    __slots__ = ("_histograms", "alias", "counters", "pools")

    def __init__(self, alias: str) -> None:
        self.alias = alias
        self.pools = 0
        self.counters = dict.fromkeys(_COUNTERS, 0)
        self._histograms = {kind: _Histogram(alias, kind) for kind in _KINDS}

    def add(self, pool: ConnectionPool, stats: PoolStats) -> None:
        self.pools += 1
        for key in _COUNTERS:
            self.counters[key] += stats[key]  # type: ignore[literal-required]
        mine = self._histograms
        for kind, histogram in pool.histograms().items():
            # take(): the least and greatest timing since the OpenTelemetry
            # feed last read the pool are now this record's to give it.
            counts, total, low, high = histogram.take()
            into = mine[kind]
            into.counts = [a + b for a, b in zip(into.counts, counts, strict=True)]
            into.total += total
            into.low, into.high = min(into.low, low), max(into.high, high)

    def histograms(self) -> dict[TimingKind, _Histogram]:
        return self._histograms

    def taken(self) -> _Departed:
        """A copy for the OpenTelemetry feed, with the least and greatest timings moved to it."""
        copy = _Departed(self.alias)
        for kind, histogram in self._histograms.items():
            counts, total, low, high = histogram.take()
            into = copy._histograms[kind]
            into.counts, into.total, into.low, into.high = counts, total, low, high
        return copy

    def stats(self) -> DepartedStats:
        wait, use, create = (self._histograms[kind].snapshot() for kind in _KINDS)
        return cast(
            "DepartedStats",
            {
                "alias": self.alias,
                "departed": True,
                "pools": self.pools,
                **self.counters,
                "wait_time": wait["sum"],
                "use_time": use["sum"],
                "create_time": create["sum"],
                "wait_time_histogram": wait,
                "use_time_histogram": use,
                "create_time_histogram": create,
            },
        )


def get_pool(key: Hashable, build: Callable[[], ConnectionPool]) -> ConnectionPool:
    """Return the pool for ``key``, building it with ``build()`` the first time.

    Building a pool retires the others of its alias (its settings changed)
    and those of aliases no longer in ``DATABASES``: one live pool per
    (process, alias), whatever number of tenants or settings come and go.
    """
    pool = _pools.get(key)
    if pool is not None:
        return pool
    with _registry_lock():
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
        _retire(stale)  # not closed yet: they stay until drained
        _pools[key] = pool
        _sweep()
    _close_retired()
    return pool


def _retire(keys: list[Hashable]) -> None:
    """Move the pools of ``keys`` from _pools to _retired (hold _lock)."""
    # One at a time, with no call between taking a pool out of _pools and
    # appending it to _retired (append's own check for a pending signal
    # comes after it has appended): a signal handler's exception (a
    # KeyboardInterrupt, a task's time limit) during a settings switch
    # leaves each pool in one of the two, never in neither, where it would
    # hold its idle connections, unclosed and uncounted, for ever.
    for key in keys:
        other = _pools[key]
        del _pools[key]
        _retired.append(other)


def _close_retired() -> None:
    """Close each retired pool whose close() has not run to its end (outside _lock)."""
    # Every retired one, not just those the caller retired: a close() cut
    # short by a signal handler's exception (or never reached) is finished
    # by the next switch, close_pools() or look at the stats (an exporter's
    # scrape). Closing again is harmless: it closes what is idle and
    # reclaims dead borrowers' connections.
    for other in _retired[:]:
        if not other.closed or other.idle_count():
            other.close(retired=True)


def _configured_aliases() -> Any:
    try:
        from django.db import connections

        return connections.settings
    except Exception:  # settings not configured: nothing to compare with
        return None


def _sweep() -> None:
    """Move each retired pool that is closed and drained into _departed (hold _lock)."""
    kept = []
    for pool in _retired:
        stats = pool.stats()
        # Closed (a pool is retired before close() runs, outside the lock),
        # with no connection open and nobody waiting: its counters are final.
        if not pool.closed or stats["size"] or stats["waiting"]:
            kept.append(pool)
            continue
        departed = _departed.get(pool.alias)
        if departed is None:
            departed = _departed[pool.alias] = _Departed(pool.alias)
        departed.add(pool, stats)
    if len(kept) < len(_retired):
        _retired[:] = kept
        # An alias gone from DATABASES, with no pool left: its series end.
        configured = _configured_aliases()
        if configured is not None:
            live = {pool.alias for pool in (*_pools.values(), *_retired)}
            for alias in [a for a in _departed if a not in configured and a not in live]:
                del _departed[alias]


def close_pools(alias: str | None = None, database: str | None = None) -> int:
    """Close this process's pools of ``alias`` and/or ``database`` (all if neither).

    Idle connections close at once; checked-out ones when they are returned,
    or soon after their borrowing thread ends without returning them. The
    next checkout builds a new pool. Return how many pools were closed.
    """
    with _registry_lock():
        doomed = [
            key
            for key, pool in _pools.items()
            if (alias is None or pool.alias == alias)
            and (database is None or pool.target["database"] == database)
        ]
        _retire(doomed)  # shown by pool_stats() while they still lend
        _sweep()
    _close_retired()
    return len(doomed)


def snapshot(alias: str | None = None) -> tuple[list[PoolStats], list[DepartedStats]]:
    """Return :func:`pool_stats` and :func:`departed_stats`, read at one moment.

    What the exporters sum per alias: a pool that departs in between is
    counted once, never twice nor not at all.
    """
    with _registry_lock():
        _sweep()
        pools = [p for p in (*_pools.values(), *_retired) if alias is None or p.alias == alias]
        departed = [d.stats() for a, d in _departed.items() if alias is None or a == alias]
    _close_retired()
    return [pool.stats() for pool in pools], departed


def pool_stats(alias: str | None = None) -> list[PoolStats]:
    """Return a snapshot of each of this process's pools (of ``alias`` if given).

    The current pools, and the retired ones until they are closed and drained
    (then their counts are in :func:`departed_stats`).
    """
    return snapshot(alias)[0]


def departed_stats(alias: str | None = None) -> list[DepartedStats]:
    """Return, per alias, what its pools that were retired or closed, then drained, counted."""
    return snapshot(alias)[1]


def all_pools() -> list[ConnectionPool]:
    """Every pool of this process: the current ones and retired ones not yet drained."""
    with _registry_lock():
        _sweep()
        return [*_pools.values(), *_retired]


def timing_sources() -> list[Any]:
    """Every pool and each alias's departed histograms, at one moment (the OpenTelemetry feed's)."""
    with _registry_lock():
        _sweep()
        return [*_pools.values(), *_retired, *(d.taken() for d in _departed.values())]


def on_fork_in_child(callback: Callable[[], Any]) -> None:
    """Run ``callback`` in every forked child, after the registry has been reset."""
    _fork_callbacks.append(callback)


def _registry_lock() -> threading.Lock:
    """The registry's lock, made at its first use in a forked child.

    Not in the fork hook: a gunicorn gevent worker patches threading after
    the fork. A lock made before is an OS lock, and a greenlet switch while
    it is held (building a pool starts the housekeeper, a greenlet then)
    would block the whole process as soon as another greenlet asks for it.
    """
    global _lock
    lock = _lock
    if lock is None:
        with _making:
            lock = _lock
            if lock is None:
                lock = _lock = threading.Lock()
    return lock


def _before_fork() -> None:
    _registry_lock().acquire()


def _after_fork_in_parent() -> None:
    _registry_lock().release()


def _after_fork_in_child() -> None:
    global _lock, _making, _pools
    _lock = None
    _making = threading.Lock()
    inherited, _pools = list(_pools.values()) + _retired, {}
    _retired.clear()
    # The child counts from zero: what the parent's pools counted stays the
    # parent's to report (with prometheus_client's multiprocess files, both
    # would be summed).
    _departed.clear()
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
