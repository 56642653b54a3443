"""The pools' metrics, under the OpenTelemetry names, for monitoring systems.

This module needs nothing beyond the core; the exporters are its submodules,
each behind an extra: :mod:`.otel` (``django-postgrespool[otel]``) and
:mod:`.prometheus` (``django-postgrespool[prometheus]``).
:func:`register_exporters` (called by the app's ``ready()``) registers
whichever is installed; ``POSTGRESPOOL_METRICS = False`` turns them all off.

Two ways in for an exporter:

* a snapshot of every pool and of what each alias's departed pools counted
  (:func:`snapshot`), read when the exporter is collected, turned into
  :class:`Point` values by :func:`points` (the one place that maps the pool's
  counters to the metric names);
* the timing hook: the pool calls :func:`notify_timing` for each checkout's
  wait, each checkout's use and each new physical connection, only while
  :data:`timing_observers` is not empty (so an app without an exporter that
  needs single observations pays one attribute lookup per checkout).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal, NamedTuple

__all__ = [
    "DEFAULT_TIME_BUCKETS",
    "Histogram",
    "Point",
    "TimingKind",
    "TimingObserver",
    "add_timing_observer",
    "enabled",
    "notify_timing",
    "points",
    "quantile",
    "register_exporters",
    "remove_timing_observer",
    "snapshot",
    "timing_observers",
]

TimingKind = Literal["wait", "use", "create"]
TimingObserver = Callable[[str, TimingKind, float], None]
"""Called as ``observer(alias, kind, seconds)``; must not raise and must not block."""

# The bucket bounds the semantic conventions advise for database durations,
# which the pool also uses (django_postgrespool.pool.TIME_BUCKETS).
DEFAULT_TIME_BUCKETS: tuple[float, ...] = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10)

# Replaced (never mutated) by add/remove, so the pool reads it without a lock.
timing_observers: tuple[TimingObserver, ...] = ()


def add_timing_observer(observer: TimingObserver) -> None:
    """Call ``observer(alias, kind, seconds)`` for every timing the pools take."""
    global timing_observers
    if observer not in timing_observers:
        timing_observers = (*timing_observers, observer)


def remove_timing_observer(observer: TimingObserver) -> None:
    """Stop calling ``observer``."""
    global timing_observers
    timing_observers = tuple(o for o in timing_observers if o != observer)


def notify_timing(alias: str, kind: TimingKind, seconds: float) -> None:
    """Pass one timing to every observer (the pool calls this; an observer's error is dropped)."""
    for observer in timing_observers:
        try:
            observer(alias, kind, seconds)
        except Exception:  # a broken exporter must not break a checkout
            pass


def enabled() -> bool:
    """Tell whether the settings let the metrics exporters register (POSTGRESPOOL_METRICS)."""
    from django.conf import settings

    return bool(getattr(settings, "POSTGRESPOOL_METRICS", True))


_exporters_registered = False


def register_exporters() -> None:
    """Register each exporter whose extra is installed, once, unless POSTGRESPOOL_METRICS is False.

    The app's ``ready()`` calls it; so may the backend when it builds its
    first pool, for projects without the app. Neither exporter builds a pool.
    """
    global _exporters_registered
    if _exporters_registered:
        return
    _exporters_registered = True
    if not enabled():
        return
    # opentelemetry.metrics, not opentelemetry: any opentelemetry-* distribution
    # (opentelemetry-proto alone, say) provides that namespace package.
    if _installed("opentelemetry.metrics"):
        from django_postgrespool.metrics import otel

        otel.register()
    if _installed("prometheus_client"):
        from django_postgrespool.metrics import prometheus

        prometheus.register()


def _installed(module: str) -> bool:
    """Tell whether ``module`` can be imported (its parent package too, if it has one)."""
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:  # the parent package is missing
        return False


# -- the metrics, from a snapshot ------------------------------------------


def snapshot() -> list[Mapping[str, Any]]:
    """Return ``pool_stats()``, then ``departed_stats()`` (one entry per alias), read at one moment.

    What :func:`points` takes: a pool retired or closed, then drained, leaves
    ``pool_stats()`` but its counts stay in its alias's departed entry, so
    the counters exported per alias never go backwards.
    """
    from django_postgrespool.registry import snapshot as registry_snapshot

    pools, departed = registry_snapshot()
    return [*pools, *departed]


# (OpenTelemetry name, kind, unit, description); the Prometheus name is the
# OpenTelemetry one with dots as underscores, "_seconds" for the unit s and
# "_total" on a counter's sample.
GAUGES: tuple[tuple[str, str, str], ...] = (
    ("db.client.connection.count", "{connection}",
     "The number of connections that are currently in state described by the state attribute"),
    ("db.client.connection.idle.max", "{connection}",
     "The maximum number of idle open connections allowed"),
    ("db.client.connection.idle.min", "{connection}",
     "The minimum number of idle open connections allowed"),
    ("db.client.connection.max", "{connection}",
     "The maximum number of open connections allowed"),
    ("db.client.connection.pending_requests", "{request}",
     "The number of current pending requests for an open connection"),
)
COUNTERS: tuple[tuple[str, str, str], ...] = (
    ("db.client.connection.timeouts", "{timeout}",
     "The number of connection timeouts that have occurred trying to obtain a connection "
     "from the pool"),
)
HISTOGRAMS: tuple[tuple[str, TimingKind, str], ...] = (
    ("db.client.connection.create_time", "create", "The time it took to create a new connection"),
    ("db.client.connection.wait_time", "wait",
     "The time it took to obtain an open connection from the pool"),
    ("db.client.connection.use_time", "use",
     "The time between borrowing a connection and returning it to the pool"),
)


class Histogram(NamedTuple):
    """A pool's fixed-bucket histogram: ``counts[i]`` observations in bucket i (not cumulative)."""

    buckets: tuple[float, ...]
    counts: tuple[int, ...]  # len(buckets) + 1: the last is above the last bound
    sum: float


class Point(NamedTuple):
    """One value of one metric for one pool name (and connection state)."""

    name: str  # the OpenTelemetry name
    pool: str
    state: str | None  # "idle" | "used" for db.client.connection.count, else None
    value: float | Histogram


def points(stats: Iterable[Mapping[str, Any]]) -> list[Point]:
    """Turn :func:`snapshot` (or ``pool_stats()``) into metric points, one pool name per alias.

    A retired pool still lending connections shares its alias with the
    current pool: their counts and timings add up; the limits are the current
    pool's. A departed entry (``departed_stats()``) adds its counts and
    timings only: an alias with no pool now has no gauges.
    """
    by_alias: dict[str, list[Mapping[str, Any]]] = {}
    for s in stats:
        by_alias.setdefault(s["alias"], []).append(s)
    out: list[Point] = []
    for alias, entries in by_alias.items():
        pools = [p for p in entries if not p.get("departed")]

        def total(key: str, pools: list[Mapping[str, Any]] = pools) -> int:
            return sum(int(p.get(key) or 0) for p in pools)

        if pools:
            current = next((p for p in pools if not p.get("retired")), pools[0])
            out += [
                Point("db.client.connection.count", alias, "idle", total("idle")),
                Point("db.client.connection.count", alias, "used", total("checked_out")),
                # At most pool_size connections stay idle when they come back:
                # overflow ones are closed; with max_idle they stay up to
                # max_idle seconds, so any of them. Nothing is opened ahead of use.
                Point(
                    "db.client.connection.idle.max",
                    alias,
                    None,
                    current["pool_size"]
                    + (current["max_overflow"] if current.get("max_idle") is not None else 0),
                ),
                Point("db.client.connection.idle.min", alias, None, 0),
                Point("db.client.connection.max", alias, None,
                      current["pool_size"] + current["max_overflow"]),
                Point("db.client.connection.pending_requests", alias, None, total("waiting")),
            ]
        out.append(Point("db.client.connection.timeouts", alias, None, total("timeouts", entries)))
        for name, kind, _ in HISTOGRAMS:
            merged = _merge([p.get(f"{kind}_time_histogram") for p in entries])
            if merged is not None:
                out.append(Point(name, alias, None, merged))
    return out


def _merge(histograms: list[Mapping[str, Any] | None]) -> Histogram | None:
    present = [h for h in histograms if h]
    if not present:
        return None  # a core without timings
    buckets = tuple(float(b) for b in present[0]["buckets"])
    counts = [0] * (len(buckets) + 1)
    total = 0.0
    for h in present:
        for i, c in enumerate(h["counts"]):
            counts[i] += int(c)
        total += float(h["sum"])
    return Histogram(buckets, tuple(counts), total)


def quantile(q: float, now: Histogram, before: Histogram | None = None) -> float | None:
    """Estimate the ``q`` quantile (0..1) of the observations of ``now`` since ``before``.

    As PromQL's ``histogram_quantile``: linear within the bucket the rank
    falls in; the last bound when it falls above it. None without observations
    (or when ``before`` is not an earlier state of the same histogram: then
    all of ``now`` counts).
    """
    counts = list(now.counts)
    if (
        before is not None
        and before.buckets == now.buckets
        and all(b <= c for b, c in zip(before.counts, now.counts, strict=True))
    ):
        counts = [c - b for c, b in zip(now.counts, before.counts, strict=True)]
    total = sum(counts)
    if total == 0:
        return None
    rank, seen, lower = q * total, 0, 0.0
    for bound, count in zip([*now.buckets, now.buckets[-1]], counts, strict=True):
        if count and seen + count >= rank:
            return lower + (bound - lower) * (rank - seen) / count
        seen += count
        lower = bound
    return now.buckets[-1]
