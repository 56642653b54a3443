"""The last minutes of each alias's pool, kept in this process for the /pool/ page.

A ring buffer per alias, fed by django_postgrespool's sampler (one thread per
process, started at the first request): every POSTGRESPOOL_METRICS_INTERVAL
seconds, how many connections are used, idle, the cap, how many checkouts
wait, and the 95th percentile of the checkout waits since the last sample
(from the pool's wait-time histogram; None when nothing was checked out).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Mapping
from typing import Any, NamedTuple

from django_postgrespool.metrics import Histogram, points, quantile

KEEP_SECONDS = 300


class Sample(NamedTuple):
    at: float  # time.time()
    used: int
    idle: int
    cap: int
    waiting: int
    wait_p95: float | None  # seconds


_lock = threading.Lock()
_samples: dict[str, deque[Sample]] = {}
_last_waits: dict[str, Histogram] = {}


def record(stats: list[Mapping[str, Any]]) -> None:
    """Append one sample per alias (the sampler's subscriber)."""
    from django.conf import settings

    interval = float(getattr(settings, "POSTGRESPOOL_METRICS_INTERVAL", 1.0))
    keep = max(10, int(KEEP_SECONDS / interval))
    now = time.time()
    by_alias: dict[str, dict[str, Any]] = {}
    for p in points(stats):
        values = by_alias.setdefault(p.pool, {})
        values[p.name if p.state is None else p.state] = p.value
    with _lock:
        for alias, v in by_alias.items():
            if "used" not in v:  # no pool now: only what its departed pools counted
                continue
            waits = v.get("db.client.connection.wait_time")
            p95 = None
            if isinstance(waits, Histogram):
                p95 = quantile(0.95, waits, _last_waits.get(alias))
                _last_waits[alias] = waits
            ring = _samples.get(alias)
            if ring is None or ring.maxlen != keep:
                ring = _samples[alias] = deque(ring or (), maxlen=keep)
            ring.append(Sample(now, int(v["used"]), int(v["idle"]),
                               int(v["db.client.connection.max"]),
                               int(v["db.client.connection.pending_requests"]), p95))


def recent(alias: str) -> list[Sample]:
    """Return the samples of ``alias``, oldest first."""
    with _lock:
        return list(_samples.get(alias, ()))

