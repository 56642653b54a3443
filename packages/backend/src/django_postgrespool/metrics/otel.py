"""OpenTelemetry: the pools' metrics under the semantic conventions for connection pools.

Install ``django-postgrespool[otel]`` (``opentelemetry-api`` only). With
``django_postgrespool`` in ``INSTALLED_APPS`` the instruments are created on
the global meter provider when Django starts; there is nothing else to write.
The API's default provider is a no-op: until an SDK is configured (in code, or
by ``opentelemetry-instrument``) nothing is measured and a checkout costs
nothing more.

Instruments (every one with ``db.client.connection.pool.name``, the alias):

* observable, read from ``pool_stats()`` (and, for the counter, what the
  alias's departed pools counted: ``departed_stats()``) when the SDK collects:
  ``db.client.connection.count`` (with ``db.client.connection.state`` =
  ``idle`` | ``used``), ``db.client.connection.idle.max``,
  ``db.client.connection.idle.min``, ``db.client.connection.max``,
  ``db.client.connection.pending_requests`` (up-down counters) and
  ``db.client.connection.timeouts`` (a counter);
* histograms, in seconds, with the conventions' advised bucket bounds:
  ``db.client.connection.create_time``, ``db.client.connection.wait_time``,
  ``db.client.connection.use_time``.

The API has no observable histogram, and an SDK's ``record()`` costs about
6 µs (two per request: 12 µs, more than the pool's whole tax). So a checkout
records nothing for OpenTelemetry: the pool keeps its own fixed-bucket
histograms (the same bounds), and at each collection, before the SDK reads its
histograms, what the pools of each alias counted since the last collection
(those retired or closed, then drained, included: the registry keeps their
totals per alias) is added to the SDK's explicit-bucket aggregations: bucket
counts, sum, and the least and greatest timing of the interval; exact, at a
cost per collection, not per request. That reaches into the SDK's
aggregations, which the API does not expose: the feed checks their shape
first (the OpenTelemetry Python SDK's own, with the pool's bucket bounds, no
attribute filter dropping the pool name) and otherwise records every timing
through the API (``record()``) from a queue the pool fills as it times (the
*replay* feed: the same figures, at the SDK's price, paid by the collecting
thread). A view that changes the histograms'
aggregation or bounds selects the replay feed.
"""

from __future__ import annotations

import bisect
import logging
import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from django_postgrespool.errors import missing_extra

try:
    from opentelemetry import metrics as otel_metrics
    from opentelemetry.metrics import CallbackOptions, Meter, MeterProvider, Observation
except ImportError as error:  # the extra is not installed
    raise missing_extra(
        "The OpenTelemetry exporter (django_postgrespool.metrics.otel)", "otel", error
    ) from error

from django_postgrespool import __version__
from django_postgrespool.metrics import (
    COUNTERS,
    DEFAULT_TIME_BUCKETS,
    GAUGES,
    HISTOGRAMS,
    Point,
    TimingKind,
    add_timing_observer,
    points,
    remove_timing_observer,
    snapshot,
)

__all__ = ["POOL_NAME", "STATE", "Instruments", "register"]

logger = logging.getLogger("django_postgrespool")

POOL_NAME = "db.client.connection.pool.name"
STATE = "db.client.connection.state"

# The observable callbacks of one collection read the snapshot the first one took.
_SNAPSHOT_TTL = 0.05
# Timings waiting for the next collection; beyond this the oldest are dropped
# (an SDK that never collects must not make the queue grow for ever).
MAX_PENDING = 100_000


def _is_sdk(provider: MeterProvider) -> bool:
    # The API's own providers: the proxy handed out before an SDK is set, and
    # the explicit no-op one.
    return type(provider).__name__ not in {"_ProxyMeterProvider", "NoOpMeterProvider"}


class Instruments:
    """The pools' instruments on one meter, and the feed of its histograms."""

    def __init__(
        self,
        meter: Meter,
        *,
        sdk: bool,
        pools: Callable[[], Iterable[Any]] | None = None,
        merge: bool = True,
    ) -> None:
        self._lock = threading.Lock()
        self._snapshot: tuple[float, dict[str, list[Point]]] = (float("-inf"), {})
        self._attributes: dict[str, dict[str, str]] = {}
        self._pending: deque[tuple[str, TimingKind, float]] = deque(maxlen=MAX_PENDING)
        self._pools = pools or _timing_sources
        # What was added to the SDK's histograms, per (alias, kind): the
        # counts and sum of the alias's pools and departed pools, all summed;
        # in this process (a forked child counts from zero).
        self._fed: dict[tuple[str, TimingKind], tuple[list[int], float]] = {}
        self._fed_pid = os.getpid()
        self._allow_merge = merge
        self.feed: str | None = None  # "merge" | "replay" once an SDK is there
        for name, unit, text in GAUGES:
            meter.create_observable_up_down_counter(
                name, [self._callback(name)], unit=unit, description=text
            )
        for name, unit, text in COUNTERS:
            meter.create_observable_counter(
                name, [self._callback(name)], unit=unit, description=text
            )
        self._histograms = {
            kind: meter.create_histogram(
                name, unit="s", description=text,
                explicit_bucket_boundaries_advisory=list(DEFAULT_TIME_BUCKETS),
            )
            for name, kind, text in HISTOGRAMS
        }
        if sdk:
            self.hook()

    def hook(self) -> None:
        """Start feeding the histograms: merged at each collection, or replayed."""
        if self.feed is None:
            if self._allow_merge and all(
                _sdk_matches(h) is not None for h in self._histograms.values()
            ):
                self.feed = "merge"  # the first collection takes all the pools counted
            else:
                self._replay()

    def _replay(self) -> None:
        self.feed = "replay"
        add_timing_observer(self.record)

    def unhook(self) -> None:
        """Stop feeding the histograms."""
        self.feed = None
        remove_timing_observer(self.record)
        self._pending.clear()

    def record(self, alias: str, kind: TimingKind, seconds: float) -> None:
        """Queue one timing of the pool of ``alias`` for the next collection (the replay feed)."""
        self._pending.append((alias, kind, seconds))  # atomic: no lock on the checkout path

    def flush(self) -> None:
        """Add what the pools timed since the last collection to the histograms."""
        if self.feed == "merge":
            try:
                self._merge()
                return
            except _CannotMerge as why:
                logger.warning(
                    "django_postgrespool: the OpenTelemetry SDK's histograms cannot take the "
                    "pools' counts (%s); recording every timing through the API from now on.",
                    why,
                )
                self._replay()
        pending, histograms = self._pending, self._histograms
        while True:
            try:
                alias, kind, seconds = pending.popleft()
            except IndexError:
                return
            histograms[kind].record(seconds, self._labels(alias))

    def _labels(self, alias: str) -> dict[str, str]:
        labels = self._attributes.get(alias)
        if labels is None:
            labels = self._attributes[alias] = {POOL_NAME: alias}
        return labels

    def _merge(self) -> None:
        targets = {}
        for kind, instrument in self._histograms.items():
            matches = _sdk_matches(instrument)
            if matches is None:
                raise _CannotMerge("an unknown SDK or a view with another aggregation")
            targets[kind] = (instrument, matches)
        if self._fed_pid != os.getpid():
            self._fed, self._fed_pid = {}, os.getpid()
        # Summed per alias: a pool that departs (retired or closed, then
        # drained) moves its counts to its alias's departed totals, which the
        # registry gives here with the pools, read at one moment.
        now: dict[tuple[str, TimingKind], tuple[list[int], float, float, float]] = {}
        for source in list(self._pools()):
            for kind, histogram in source.histograms().items():
                counts, total, low, high = histogram.take()
                key = (source.alias, kind)
                if key in now:
                    had, had_total, had_low, had_high = now[key]
                    counts = [a + b for a, b in zip(had, counts, strict=True)]
                    total, low, high = had_total + total, min(had_low, low), max(had_high, high)
                now[key] = (counts, total, low, high)
        fed = self._fed
        for key, (counts, total, low, high) in now.items():
            before, total_before = fed.get(key, (None, 0.0))
            if before is None or any(n < b for n, b in zip(counts, before, strict=True)):
                before, total_before = [0] * len(counts), 0.0  # first seen, or counting again
            new = [n - b for n, b in zip(counts, before, strict=True)]
            if any(new):
                instrument, matches = targets[key[1]]
                _add(instrument, matches, self._labels(key[0]), new, total - total_before,
                     low, high)
                fed[key] = (counts, total)
            else:
                # take() reads the counts, then the sum, with no lock: a
                # checkout timed in between is in the sum only. Its seconds
                # go with its count, at the next collection.
                fed[key] = (counts, total_before)
        for key in [k for k in fed if k not in now]:  # an alias gone from DATABASES
            del fed[key]

    def _points(self, first: bool) -> dict[str, list[Point]]:
        now = time.monotonic()
        with self._lock:
            taken, by_name = self._snapshot
            if first:
                # Once per collection (the first instrument's callback): the
                # SDK calls every observable callback before it reads the
                # histograms, so what is fed here is part of this collection.
                self.flush()
            if first or now - taken > _SNAPSHOT_TTL:
                by_name = {}
                for point in points(snapshot()):
                    by_name.setdefault(point.name, []).append(point)
                self._snapshot = (now, by_name)
        return by_name

    def _callback(self, name: str) -> Any:
        first = name == GAUGES[0][0]

        def observe(options: CallbackOptions) -> Iterable[Observation]:
            # Only an SDK collects: from now on the histograms are worth feeding.
            self.hook()
            return [_observation(p) for p in self._points(first).get(name, [])]

        return observe


class _CannotMerge(Exception):
    pass


def _timing_sources() -> list[Any]:
    from django_postgrespool.registry import timing_sources

    return timing_sources()


_BOUNDS = tuple(float(b) for b in DEFAULT_TIME_BUCKETS)


def _sdk_matches(instrument: Any) -> list[Any] | None:
    """The SDK's view matches of ``instrument`` if every one can take merged counts, else None.

    Private parts of the OpenTelemetry Python SDK, checked before use: each
    reader's storage, its views of the instrument, each an explicit-bucket
    histogram with the pool's bounds (or dropped). Anything else: None.
    """
    real = getattr(instrument, "_real_instrument", None) or instrument  # the API's proxy
    try:
        storages = list(real._measurement_consumer._reader_storages.values())
        matches = []
        for storage in storages:
            for match in storage._get_or_init_view_instrument_match(real):
                kind = type(match._aggregation).__name__
                if kind == "_DropAggregation":
                    continue
                if kind != "_ExplicitBucketHistogramAggregation":
                    return None
                prototype = match._aggregation
                if tuple(prototype._boundaries) != _BOUNDS:
                    return None
                for name in ("_value", "_sum", "_min", "_max", "_record_min_max", "_lock"):
                    if not hasattr(prototype, name):
                        return None
                keys = match._view._attribute_keys
                if keys is not None and POOL_NAME not in keys:
                    return None
                if not isinstance(match._attributes_aggregation, dict):
                    return None
                matches.append(match)
        return matches
    except (AttributeError, TypeError):
        return None


def _inside(bucket: int) -> float:
    """A value in bucket ``bucket`` (the bounds are upper bounds, inclusive)."""
    if bucket == 0:
        return _BOUNDS[0] / 2
    if bucket == len(_BOUNDS):
        return _BOUNDS[-1] * 2
    return (_BOUNDS[bucket - 1] + _BOUNDS[bucket]) / 2


def _aggregation_of(match: Any, labels: dict[str, str]) -> Any:
    for aggregation in list(match._attributes_aggregation.values()):
        if aggregation._attributes == labels:
            return aggregation
    return None


def _add(
    instrument: Any,
    matches: list[Any],
    labels: dict[str, str],
    counts: list[int],
    total: float,
    low: float,
    high: float,
) -> None:
    """Add an interval's counts to the SDK's aggregation of ``labels`` in every view."""
    real = getattr(instrument, "_real_instrument", None) or instrument
    if any(_aggregation_of(m, labels) is None for m in matches):
        # The SDK makes its aggregation of a set of attributes at its first
        # measurement: make it with one real timing of the interval, the least
        # (or, if a checkout timed it at the edge of the interval, a value
        # inside the lowest bucket that has counts).
        seed = low
        if not math.isfinite(low) or not counts[bisect.bisect_left(_BOUNDS, low)]:
            seed = _inside(next(i for i, count in enumerate(counts) if count))
        real.record(seed, labels)
        counts = list(counts)
        counts[bisect.bisect_left(_BOUNDS, seed)] -= 1
        # The other timings' sum is added below, even with no count left (a
        # sum read ahead of its count, see _merge).
        total -= seed
    for match in matches:
        aggregation = _aggregation_of(match, labels)
        if aggregation is None:
            raise _CannotMerge("no aggregation for the pool name")
        with aggregation._lock:
            if aggregation._value is None:
                aggregation._value = aggregation._get_empty_bucket_counts()
            value = aggregation._value
            for i, count in enumerate(counts):
                if count:
                    value[i] += count
            aggregation._sum += total
            if aggregation._record_min_max:
                if math.isfinite(low):
                    aggregation._min = min(aggregation._min, low)
                if math.isfinite(high):
                    aggregation._max = max(aggregation._max, high)


def _observation(point: Point) -> Observation:
    attributes: Mapping[str, str] = {POOL_NAME: point.pool}
    if point.state is not None:
        attributes = {POOL_NAME: point.pool, STATE: point.state}
    assert isinstance(point.value, (int, float))
    return Observation(point.value, attributes)


_instruments: Instruments | None = None


def register(meter_provider: MeterProvider | None = None) -> Instruments:
    """Create the pools' instruments on ``meter_provider`` (the global one by default); once."""
    global _instruments
    if _instruments is None:
        provider = meter_provider or otel_metrics.get_meter_provider()
        meter = provider.get_meter("django_postgrespool", __version__)
        _instruments = Instruments(meter, sdk=_is_sdk(provider))
    return _instruments

