"""Workload A: Django's request cycle, in process, on N threads.

Each thread does what Django's handlers do for a request: ``request_started``,
the view's body (one query, or a few ORM queries), ``request_finished``
(which closes or returns the connection). Prints one JSON line::

    python bench/worker.py --threads 16 --body one --warmup 0.5 --duration 2

with ``BENCH_ALT`` and ``BENCH_DB`` in the environment (see benchsite/settings.py).
Several processes measure one window together (the in-process fleet) with
``--sync``: each prints ``ready`` once set up, starts when a line arrives
on its standard input, and closes its pool at the next line; ``--raw`` adds
every latency to the JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "project"))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "benchsite.settings")


def percentile(sorted_values: list[float], fraction: float) -> float:
    """Return the value below which ``fraction`` of ``sorted_values`` lie (nearest rank)."""
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, int(round(fraction * len(sorted_values))) - 1))
    return sorted_values[index]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--body", choices=("one", "orm"), required=True)
    parser.add_argument("--warmup", type=float, default=0.5)
    parser.add_argument("--duration", type=float, default=2.0)
    parser.add_argument("--sync", action="store_true", help="start when stdin says so")
    parser.add_argument("--raw", action="store_true", help="print every latency too")
    args = parser.parse_args()

    import django

    django.setup()
    from django.core.signals import request_finished, request_started
    from django.db import connections

    from benchapp.views import one_query, orm_queries

    body = one_query if args.body == "one" else orm_queries
    latencies: list[list[float]] = [[] for _ in range(args.threads)]
    errors = [0] * args.threads
    served = [0] * args.threads  # every request, warm-up too: the CPU figures' divisor
    first_error: list[str] = []
    barrier = threading.Barrier(args.threads + 1)
    window: dict[str, float] = {}
    finished = [threading.Event() for _ in range(args.threads)]
    # With --sync a thread keeps its connection until the fleet has read the
    # server's CPU time: a persistent connection closed at once would take its
    # backend's CPU time with it.
    release = threading.Event()
    if not args.sync:
        release.set()

    def run(n: int) -> None:
        mine = latencies[n]
        clock = time.perf_counter
        barrier.wait()
        start, end = window["start"], window["end"]
        while True:
            t0 = clock()
            if t0 >= end:
                break
            failed = False
            request_started.send(sender=None)
            try:
                body()
            except Exception as error:  # counted and reported, never fatal
                failed = True
                if not first_error:
                    first_error.append(f"{type(error).__name__}: {error}")
            finally:
                try:
                    request_finished.send(sender=None)
                except Exception as error:
                    failed = True
                    if not first_error:
                        first_error.append(f"{type(error).__name__}: {error}")
            t1 = clock()
            served[n] += 1
            if start <= t1 < end:
                if failed:
                    errors[n] += 1
                else:
                    mine.append(t1 - t0)
        finished[n].set()
        release.wait()
        connections.close_all()

    # The first request imports the backend and builds its pool: not measured.
    request_started.send(sender=None)
    try:
        body()
    except Exception as error:  # the measured requests will tell whether it lasts
        first_error.append(f"{type(error).__name__}: {error}")
    finally:
        request_finished.send(sender=None)
    connections.close_all()  # a persistent connection would outlive the first request
    if args.sync:
        print("ready", flush=True)
        sys.stdin.readline()
    threads = [threading.Thread(target=run, args=(n,), daemon=True) for n in range(args.threads)]
    for t in threads:
        t.start()
    window["start"] = time.perf_counter() + args.warmup
    window["end"] = window["start"] + args.duration
    before = resource.getrusage(resource.RUSAGE_SELF)
    barrier.wait()
    deadline = time.monotonic() + args.duration + 30
    for done in finished:
        done.wait(max(0.0, deadline - time.monotonic()))
    after = resource.getrusage(resource.RUSAGE_SELF)
    stuck = sum(not done.is_set() for done in finished)
    if stuck and not first_error:
        first_error.append(f"{stuck} thread(s) still in a request 30 s after the end")

    merged = sorted(x for per_thread in latencies for x in per_thread)
    result = {
        "requests": len(merged),
        "errors": sum(errors) + stuck,
        "seconds": args.duration,
        "p50_ms": percentile(merged, 0.50) * 1000,
        "p99_ms": percentile(merged, 0.99) * 1000,
        "first_error": first_error[0] if first_error else None,
        # This process's CPU time and context switches over all its requests.
        "served": sum(served),
        "cpu_s": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
        "switches": (after.ru_nvcsw - before.ru_nvcsw) + (after.ru_nivcsw - before.ru_nivcsw),
        "preempted": after.ru_nivcsw - before.ru_nivcsw,  # involuntary: the CPU was taken away
    }
    if args.raw:
        result["latencies"] = merged
    # Ours: how the checkouts were served (the process's one pool of 'default').
    pool = getattr(connections["default"], "_pool", None)
    if pool is not None and type(pool).__module__ == "django_postgrespool.pool":
        stats = pool.stats()
        result["pool"] = {k: stats[k] for k in ("checkouts", "affinity_hits", "handoffs", "waits")}
    print(json.dumps(result), flush=True)
    if stuck:
        os._exit(0)
    if args.sync:  # the fleet reads the server's CPU time before the pools close
        sys.stdin.readline()
        release.set()
    for t in threads:
        t.join()
    close_pool = getattr(connections["default"], "close_pool", None)
    if close_pool is not None:
        close_pool()
    if os.environ["BENCH_ALT"] == "dj_db_conn_pool":
        from dj_db_conn_pool.core import pool_container

        pool_container.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
