"""Prometheus: the pools' metrics in Prometheus naming, for one process or every worker.

Install ``django-postgrespool[prometheus]``. With ``django_postgrespool`` in
``INSTALLED_APPS`` the metrics join prometheus_client's default registry (so
any exporter you already run shows them), and :func:`metrics_view` serves
them::

    path("metrics", django_postgrespool.metrics.prometheus.metrics_view)

Several worker processes (gunicorn ``--workers``): set
``PROMETHEUS_MULTIPROC_DIR`` to an empty directory, the same for every worker
(prometheus_client's multiprocess mode). Each worker's sampler then writes its
pools' figures into its own files there every ``POSTGRESPOOL_METRICS_INTERVAL``
seconds (and the scraped worker just before answering), and one scrape of
any worker reports them all: counts and limits summed over the live workers,
timeouts and timings over every worker that ever ran. Call
:func:`mark_process_dead` from gunicorn's ``child_exit`` hook.

Names: ``db_client_connection_count{pool_name, state}``,
``db_client_connection_idle_max``, ``db_client_connection_idle_min``,
``db_client_connection_max``, ``db_client_connection_pending_requests``,
``db_client_connection_timeouts_total`` and the histograms
``db_client_connection_{create,wait,use}_time_seconds``; ``pool_name`` is the
database alias.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from django.http import HttpRequest, HttpResponse

from django_postgrespool.errors import missing_extra

try:
    from prometheus_client import (
        CONTENT_TYPE_LATEST,
        REGISTRY,
        CollectorRegistry,
        generate_latest,
        values,
    )
except ImportError as error:  # the extra is not installed
    raise missing_extra(
        "The Prometheus exporter (django_postgrespool.metrics.prometheus)", "prometheus", error
    ) from error
from prometheus_client import multiprocess as _multiprocess
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from django_postgrespool.metrics import (
    COUNTERS,
    GAUGES,
    HISTOGRAMS,
    Histogram,
    Point,
    points,
    snapshot,
)

__all__ = ["PoolCollector", "mark_process_dead", "metrics_view", "multiprocess_mode", "register"]

POOL_LABEL = "pool_name"
STATE_LABEL = "state"

# prometheus_client's multiprocess module has no annotations.
multiprocess: Any = _multiprocess

_HELP = {name: text for name, _, text in (*GAUGES, *COUNTERS)}
_HELP.update({name: text for name, _, text in HISTOGRAMS})
_KIND = {name: "gauge" for name, _, _ in GAUGES}
_KIND.update({name: "counter" for name, _, _ in COUNTERS})
_KIND.update({name: "histogram" for name, _, _ in HISTOGRAMS})


def prometheus_name(name: str) -> str:
    """Return the Prometheus family name of an OpenTelemetry metric name."""
    base = name.replace(".", "_")
    return base + "_seconds" if _KIND[name] == "histogram" else base


def multiprocess_mode() -> bool:
    """Tell whether prometheus_client runs in multiprocess mode (PROMETHEUS_MULTIPROC_DIR)."""
    return bool(getattr(values.ValueClass, "_multiprocess", False))


def _pool_stats() -> list[Mapping[str, Any]]:
    return snapshot()


def _labels(point: Point) -> tuple[list[str], list[str]]:
    if point.state is None:
        return [POOL_LABEL], [point.pool]
    return [POOL_LABEL, STATE_LABEL], [point.pool, point.state]


def _bound(bound: float) -> str:
    # The spelling prometheus_client gives a bucket bound ("0.001", "1.0").
    return repr(float(bound))


def _cumulative(h: Histogram) -> list[tuple[str, float]]:
    bounds = [_bound(b) for b in h.buckets] + ["+Inf"]
    running, out = 0, []
    for bound, count in zip(bounds, h.counts, strict=True):
        running += count
        out.append((bound, float(running)))
    return out


def families(pts: Iterable[Point]) -> list[Metric]:
    """Return the metric families of ``pts`` (one process)."""
    made: dict[str, Metric] = {}
    for point in pts:
        family = made.get(point.name)
        labelnames, labelvalues = _labels(point)
        name, kind, text = prometheus_name(point.name), _KIND[point.name], _HELP[point.name]
        if family is None:
            if kind == "gauge":
                family = GaugeMetricFamily(name, text, labels=labelnames)
            elif kind == "counter":
                family = CounterMetricFamily(name, text, labels=labelnames)
            else:
                family = HistogramMetricFamily(name, text, labels=labelnames, unit="seconds")
            made[point.name] = family
        value = point.value
        if isinstance(value, Histogram):
            assert isinstance(family, HistogramMetricFamily)
            family.add_metric(labelvalues, buckets=_cumulative(value), sum_value=value.sum)
        else:
            assert isinstance(family, (GaugeMetricFamily, CounterMetricFamily))
            family.add_metric(labelvalues, float(value))
    return list(made.values())


class PoolCollector(Collector):
    """Collect this process's pools when scraped (prometheus_client's single-process mode)."""

    def collect(self) -> Iterator[Metric]:
        yield from families(points(_pool_stats()))

    def describe(self) -> list[Metric]:
        return []  # unknown until collected: the pools are built lazily


class _Mirror:
    """Write this process's figures into its multiprocess files (prometheus_client's format).

    Gauges go to the ``livesum`` files (dropped by mark_process_dead when the
    worker exits), counters and histograms to the files kept after exit, so
    that totals never go backwards when a worker is replaced. A histogram's
    files hold each bucket's own count (not cumulative): prometheus_client
    adds the buckets of every process, then accumulates them.
    """

    def __init__(self, value_class: Any = None) -> None:
        self._value_class = value_class  # prometheus_client's, unless a test gives one
        self._lock = threading.Lock()
        self._values: dict[tuple[Any, ...], Any] = {}
        self._pid = os.getpid()

    def _value(self, typ: str, family: str, sample: str, labels: dict[str, str], text: str) -> Any:
        key = (typ, family, sample, tuple(labels.items()))
        value = self._values.get(key)
        if value is None:
            value = self._values[key] = (self._value_class or values.ValueClass)(
                typ, family, sample, list(labels), list(labels.values()), text,
                multiprocess_mode="livesum",
            )
        return value

    def write(self, stats: list[Mapping[str, Any]]) -> None:
        with self._lock:
            if self._pid != os.getpid():  # forked: the parent's values are not ours
                self._values, self._pid = {}, os.getpid()
            written: set[tuple[Any, ...]] = set()
            for point in points(stats):
                names, vals = _labels(point)
                labels = dict(zip(names, vals, strict=True))
                family = prometheus_name(point.name)
                kind, text = _KIND[point.name], _HELP[point.name]
                value = point.value
                if isinstance(value, Histogram):
                    bounds = [_bound(b) for b in value.buckets] + ["+Inf"]
                    for bound, count in zip(bounds, value.counts, strict=True):
                        self._value(kind, family, family + "_bucket", {**labels, "le": bound},
                                    text).set(float(count))
                    self._value(kind, family, family + "_sum", labels, text).set(value.sum)
                elif kind == "counter":
                    self._value(kind, family, family + "_total", labels, text).set(float(value))
                else:
                    key = (kind, family, family, tuple(labels.items()))
                    self._value(kind, family, family, labels, text).set(float(value))
                    written.add(key)
            # A pool closed since the last write: its gauges drop to 0.
            for key, value in self._values.items():
                if key[0] == "gauge" and key not in written:
                    value.set(0.0)


_mirror = _Mirror()
# Registries given the collector, held weakly: an id() would be reused by a
# new registry at the address of a collected one (which then got nothing).
_registered: weakref.WeakSet[CollectorRegistry] = weakref.WeakSet()
_register_lock = threading.Lock()


def register(registry: CollectorRegistry = REGISTRY) -> None:
    """Make the pools' metrics part of ``registry`` (and of the multiprocess files, in that mode).

    Idempotent. In multiprocess mode prometheus_client ignores collectors of
    the default registry, so the pools' figures go through this process's
    files instead, written by the sampler.
    """
    from django_postgrespool.metrics import sampler

    if multiprocess_mode():
        sampler.subscribe(_mirror.write)
        sampler.start_on_first_request()
        return
    with _register_lock:  # two threads at once would expose every metric twice
        if registry not in _registered:
            registry.register(PoolCollector())
            _registered.add(registry)


def mark_process_dead(pid: int) -> None:
    """Forget a dead worker's gauges (call it from gunicorn's ``child_exit`` hook)."""
    if multiprocess_mode():
        multiprocess.mark_process_dead(pid)


def metrics_view(request: HttpRequest) -> HttpResponse:
    """Serve the registered metrics in Prometheus' text format (every worker's, if multiprocess)."""
    if multiprocess_mode():
        _mirror.write(_pool_stats())  # this worker's figures, fresh
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        registry = REGISTRY
        register(registry)
    return HttpResponse(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)
