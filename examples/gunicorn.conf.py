"""Gunicorn settings for the example shop: open each worker's pool before its first request.

    gunicorn -c gunicorn.conf.py exampleproject.wsgi

Command-line options (``--workers``, ``--threads``, ``--bind``) override these.

With ``PROMETHEUS_MULTIPROC_DIR`` set, each worker writes its pools' figures
there and ``/metrics`` on any worker reports them all (docs/observability.rst).
"""

from __future__ import annotations

import glob
import os
from typing import Any

wsgi_app = "exampleproject.wsgi"
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
worker_class = "gthread"
threads = 8
bind = os.environ.get("BIND", "127.0.0.1:8000")


def post_worker_init(worker: object) -> None:
    """Open ``pool_size`` connections per pooled alias; fail the worker's start if unreachable."""
    import django_postgrespool

    opened = django_postgrespool.prewarm()
    print(f"worker {os.getpid()}: prewarmed {opened}", flush=True)


def on_starting(server: Any) -> None:
    """Start from an empty multiprocess directory: files of a previous run would add up."""
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if directory:
        os.makedirs(directory, exist_ok=True)
        for path in glob.glob(os.path.join(directory, "*.db")):
            os.remove(path)


def child_exit(server: Any, worker: Any) -> None:
    """Drop the gauges of a worker that exited; its totals stay."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from django_postgrespool.metrics.prometheus import mark_process_dead

        mark_process_dead(worker.pid)
