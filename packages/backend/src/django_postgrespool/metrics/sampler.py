"""One background thread per process that reads the pools every few seconds.

For what must be known between requests: a Prometheus scrape of one gunicorn
worker reports the other workers from what their samplers last wrote, and the
example's pool page draws the last minutes from what its sampler kept.

It only reads the pools' figures (``django_postgrespool.metrics.snapshot()``:
``pool_stats()``, then what each alias's departed pools counted): it never
builds a pool or opens a connection.
It starts in the process that serves requests, at its first request
(``start_on_first_request()``): a thread does not survive ``fork()``, so a
sampler started in gunicorn's master before the workers are forked would run
in none of them. The receiver disconnects itself once the thread runs, so
later requests pay nothing.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections.abc import Callable, Mapping
from typing import Any

__all__ = [
    "DEFAULT_INTERVAL",
    "ensure_running",
    "sample_now",
    "start_on_first_request",
    "subscribe",
    "unsubscribe",
]

logger = logging.getLogger("django_postgrespool")

DEFAULT_INTERVAL = 1.0

Subscriber = Callable[[list[Mapping[str, Any]]], None]

# Guards _subscribers and _running_in (who starts the thread of this pid).
_lock = threading.Lock()
_subscribers: list[Subscriber] = []
_running_in: int | None = None


def subscribe(subscriber: Subscriber) -> None:
    """Call ``subscriber(snapshot())`` at each tick of this process's sampler.

    ``snapshot()`` is ``django_postgrespool.metrics.snapshot()``: the
    ``pool_stats()`` entries, then one ``departed_stats()`` entry per alias
    (``"departed": True``) whose pools were retired or closed, then drained.
    """
    with _lock:
        if subscriber not in _subscribers:
            _subscribers.append(subscriber)


def unsubscribe(subscriber: Subscriber) -> None:
    """Stop calling ``subscriber``."""
    with _lock:
        if subscriber in _subscribers:
            _subscribers.remove(subscriber)


def interval() -> float:
    """Return the sampling interval: ``POSTGRESPOOL_METRICS_INTERVAL`` seconds, default 1."""
    from django.conf import settings

    given = getattr(settings, "POSTGRESPOOL_METRICS_INTERVAL", DEFAULT_INTERVAL)
    try:
        every = float(given)
    except (TypeError, ValueError):
        every = math.nan
    if isinstance(given, bool) or not 0 < every < math.inf:  # NaN too
        logger.warning(
            "settings.POSTGRESPOOL_METRICS_INTERVAL must be a positive number of seconds, "
            "got %r; sampling every %g s.",
            given,
            DEFAULT_INTERVAL,
        )
        return DEFAULT_INTERVAL
    return every


def start_on_first_request() -> None:
    """Start this process's sampler at its first request (in each forked worker too)."""
    from django.core.signals import request_started

    request_started.connect(_first_request, dispatch_uid=_DISPATCH_UID)


_DISPATCH_UID = "django_postgrespool.metrics.sampler"


def _first_request(**_: object) -> None:
    from django.core.signals import request_started

    ensure_running()
    # This process's copy of the receiver only: a worker forked later from a
    # process that served no request (gunicorn's master) still has its own.
    request_started.disconnect(dispatch_uid=_DISPATCH_UID)


def ensure_running() -> None:
    """Start this process's sampler unless it runs."""
    global _running_in
    pid = os.getpid()
    if _running_in == pid:
        return
    every = interval()  # raises nothing: a bad setting is warned about
    with _lock:
        if _running_in == pid:
            return
        _running_in = pid
    thread = threading.Thread(
        target=_run, args=(every,), name="postgrespool-sampler", daemon=True
    )
    thread.start()


def sample_now() -> list[Mapping[str, Any]]:
    """Read the pools and pass the snapshot to every subscriber; return it."""
    from django_postgrespool.metrics import snapshot

    stats = snapshot()
    with _lock:
        subscribers = list(_subscribers)
    for subscriber in subscribers:
        try:
            subscriber(stats)
        except Exception:
            logger.exception("A pool metrics subscriber failed: %r", subscriber)
    return stats


def _run(every: float) -> None:
    pid, wait = os.getpid(), threading.Event().wait
    while _running_in == pid:
        sample_now()
        wait(every)


def _after_fork_in_child() -> None:
    global _lock
    _lock = threading.Lock()  # another thread may have held it at fork()


os.register_at_fork(after_in_child=_after_fork_in_child)
