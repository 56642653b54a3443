"""The pool's tax inside a real request: CPU time per request, and per phase.

    python bench/tax.py VARIANT REQUESTS   # prints one JSON line

VARIANT is ``persistent`` (the stock engine, one connection kept), ``ours``
(the defaults) or ``ours_no_ping`` (``pre_ping=False``). One thread runs the
bench project's one-query request as Django's handler would: the
request_started signal, ``benchapp.views.one_query()`` (a cursor, ``SELECT 1``,
fetch, close), then request_finished (which gives a pooled connection back). It
reports the process's CPU time per request (the best of 5 batches of
REQUESTS), and, in a second pass timed phase by phase, the borrow
(``ensure_connection()``) and the request's end (request_finished). The
clock's cost in a tight loop is taken off each phase; a phase still carries
some of it (4 µs for a persistent connection's no-op borrow): compare the
variants, not the figures alone.

Why not the tight loop of cycle.py: between two borrows a request runs its
query and Django's code, and the pool's code and objects leave the caches;
the same calls then cost two to three times as much (docs/evidence/fleet.rst). The
database is in ``BENCH_DB`` (JSON, as for the worker), on its own CPU with
``--split-cpus``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "project"))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "benchsite.settings")

VARIANTS = ("persistent", "ours", "ours_no_ping")
BATCHES = 5


def main(variant: str, requests: int) -> dict[str, float]:
    db = json.loads(os.environ["BENCH_DB"])
    if variant == "ours_no_ping":
        db["ours_pool_options"] = {"pre_ping": False}
    os.environ["BENCH_DB"] = json.dumps(db)
    os.environ["BENCH_ALT"] = "persistent" if variant == "persistent" else "ours"

    import django

    django.setup()
    from django.core.signals import request_finished, request_started
    from django.db import connection

    from benchapp.views import one_query  # the request body of workloads A and B

    def request() -> None:
        request_started.send(sender=None)
        try:
            one_query()
        finally:
            request_finished.send(sender=None)

    for _ in range(max(200, requests // 10)):  # warm-up: the connection, the caches
        request()
    clock = time.process_time
    best = float("inf")
    for _ in range(BATCHES):
        started = clock()
        for _ in range(requests):
            request()
        best = min(best, (clock() - started) / requests)

    # Phase by phase: the clock's own cost (one call) is taken off each phase.
    started = clock()
    for _ in range(requests):
        clock()
    timer = (clock() - started) / requests
    borrow = end = 0.0
    for _ in range(requests):
        request_started.send(sender=None)
        t0 = clock()
        connection.ensure_connection()  # what one_query's cursor() does first
        t1 = clock()
        one_query()
        t2 = clock()
        request_finished.send(sender=None)
        t3 = clock()
        borrow += t1 - t0
        end += t3 - t2
    connection.close()
    return {
        "variant": variant,
        "cpu_us": best * 1e6,
        "borrow_us": (borrow / requests - timer) * 1e6,
        "end_us": (end / requests - timer) * 1e6,
    }


if __name__ == "__main__":
    name, count = sys.argv[1], int(sys.argv[2])
    if name not in VARIANTS:
        sys.exit(f"tax.py: VARIANT must be one of {', '.join(VARIANTS)}, not {name!r}")
    print(json.dumps(main(name, count)))
