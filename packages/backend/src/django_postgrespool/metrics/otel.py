"""OpenTelemetry: the pools' metrics under the semantic conventions for connection pools.

Install ``django-postgrespool[otel]`` (``opentelemetry-api`` only). With
``django_postgrespool`` in ``INSTALLED_APPS`` the instruments are created on
the global meter provider when Django starts; there is nothing else to write.
The API's default provider is a no-op: until an SDK is configured (in code, or
by ``opentelemetry-instrument``) nothing is measured and a checkout costs
nothing more.

Instruments (every one with ``db.client.connection.pool.name``, the alias):

* observable, read from ``pool_stats()`` when the SDK collects:
  ``db.client.connection.count`` (with ``db.client.connection.state`` =
  ``idle`` | ``used``), ``db.client.connection.idle.max``,
  ``db.client.connection.idle.min``, ``db.client.connection.max``,
  ``db.client.connection.pending_requests`` (up-down counters) and
  ``db.client.connection.timeouts`` (a counter);
* histograms, in seconds, with the conventions' advised bucket bounds:
  ``db.client.connection.create_time``, ``db.client.connection.wait_time``,
  ``db.client.connection.use_time``. The API has no observable histogram, and
  replaying the pool's bucket counts at each collection would invent the
  values; so every timing is taken from the pool's timing hook
  (:func:`django_postgrespool.metrics.add_timing_observer`) as it happens.
  A checkout only appends it to a queue (an SDK's ``record()`` costs
  microseconds); the SDK's next collection records the queued timings into the
  histograms before it reads them, from its own thread. The hook is attached
  once an SDK is there: at registration when the global provider is already an
  SDK's, else at the SDK's first collection (timings before it are not
  reported).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping
from typing import Any

from opentelemetry import metrics as otel_metrics
from opentelemetry.metrics import CallbackOptions, Meter, MeterProvider, Observation

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
)

__all__ = ["POOL_NAME", "STATE", "Instruments", "register"]

POOL_NAME = "db.client.connection.pool.name"
STATE = "db.client.connection.state"

# Every observable callback of one collection reads the same snapshot.
_SNAPSHOT_TTL = 0.05
# Timings waiting for the next collection; beyond this the oldest are dropped
# (an SDK that never collects must not make the queue grow for ever).
MAX_PENDING = 100_000


def _is_sdk(provider: MeterProvider) -> bool:
    # The API's own providers: the proxy handed out before an SDK is set, and
    # the explicit no-op one.
    return type(provider).__name__ not in {"_ProxyMeterProvider", "NoOpMeterProvider"}


class Instruments:
    """The pools' instruments on one meter, and the timing hook that feeds its histograms."""

    def __init__(self, meter: Meter, *, sdk: bool) -> None:
        self._lock = threading.Lock()
        self._snapshot: tuple[float, dict[str, list[Point]]] = (float("-inf"), {})
        self._attributes: dict[str, dict[str, str]] = {}
        self._pending: deque[tuple[str, TimingKind, float]] = deque(maxlen=MAX_PENDING)
        self.hooked = False
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
        """Start recording the pools' timings into the histograms."""
        if not self.hooked:
            self.hooked = True
            add_timing_observer(self.record)

    def unhook(self) -> None:
        """Stop recording the pools' timings."""
        self.hooked = False
        remove_timing_observer(self.record)

    def record(self, alias: str, kind: TimingKind, seconds: float) -> None:
        """Queue one timing of the pool of ``alias`` for the next collection (the timing hook)."""
        self._pending.append((alias, kind, seconds))  # atomic: no lock on the checkout path

    def flush(self) -> None:
        """Record the queued timings into the histograms."""
        pending, attributes, histograms = self._pending, self._attributes, self._histograms
        while True:
            try:
                alias, kind, seconds = pending.popleft()
            except IndexError:
                return
            labels = attributes.get(alias)
            if labels is None:
                labels = attributes[alias] = {POOL_NAME: alias}
            histograms[kind].record(seconds, labels)

    def _points(self) -> dict[str, list[Point]]:
        now = time.monotonic()
        with self._lock:
            taken, by_name = self._snapshot
            if now - taken > _SNAPSHOT_TTL:
                from django_postgrespool.registry import pool_stats

                by_name = {}
                for point in points(pool_stats()):
                    by_name.setdefault(point.name, []).append(point)
                self._snapshot = (now, by_name)
        return by_name

    def _callback(self, name: str) -> Any:
        def observe(options: CallbackOptions) -> Iterable[Observation]:
            # Only an SDK collects: from now on the histograms are worth feeding.
            # It calls the observable callbacks before it reads the histograms,
            # so the timings flushed here are part of this collection.
            self.hook()
            self.flush()
            return [_observation(p) for p in self._points().get(name, [])]

        return observe


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

