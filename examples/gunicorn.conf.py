"""Gunicorn settings for the example shop: open each worker's pool before its first request.

    gunicorn -c gunicorn.conf.py exampleproject.wsgi

Command-line options (``--workers``, ``--threads``, ``--bind``) override these.
"""

from __future__ import annotations

import os

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
