"""Drive Django's request cycle in-process, the way its handlers do."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

from django.core.signals import request_finished, request_started
from django.db import connections


def run_request(alias: str, body: Callable[[Any], Any] | None = None) -> Any:
    """Run one request: request_started, ``body(cursor)`` (default: the backend pid), request_finished."""
    request_started.send(sender=None)
    try:
        with connections[alias].cursor() as cursor:
            if body is None:
                cursor.execute("SELECT pg_backend_pid()")
                return cursor.fetchone()[0]
            return body(cursor)
    finally:
        request_finished.send(sender=None)


def backend_pid(alias: str) -> int:
    """Return the backend pid of one request on ``alias``."""
    return run_request(alias)


def hold_at_once(alias: str, count: int) -> None:
    """Run ``count`` requests in threads that each hold a connection until all have one."""
    barrier = threading.Barrier(count)

    def hold(cursor: Any) -> None:
        cursor.execute("SELECT 1")
        barrier.wait(timeout=10)

    threads = [threading.Thread(target=run_request, args=(alias, hold)) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def hammer(
    alias: str,
    threads: int,
    requests: int,
    body: Callable[[Any], Any],
    count_sessions: Callable[[], int],
) -> tuple[int, list[BaseException]]:
    """Run ``threads`` × ``requests`` requests at once; return (peak server sessions, errors).

    ``count_sessions`` is sampled every 5 ms while the requests run.
    """
    import threading
    import time

    errors: list[BaseException] = []
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, count_sessions())
            time.sleep(0.005)

    def work() -> None:
        try:
            for _ in range(requests):
                run_request(alias, body)
        except BaseException as error:  # noqa: BLE001 - returned to the caller
            errors.append(error)
        finally:
            connections[alias].close()

    sampler = threading.Thread(target=sample)
    sampler.start()
    workers = [threading.Thread(target=work) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    done.set()
    sampler.join()
    return peak, errors


def one_thread_per_backend(sleep: float = 0.001) -> Callable[[Any], int]:
    """A request body that fails if its backend serves another thread meanwhile.

    It claims the backend (``pg_backend_pid()``), holds it ``sleep`` seconds on
    the server, lets it go, and returns the pid: run it from many threads at once.
    """
    claims: dict[int, int] = {}
    lock = threading.Lock()

    def body(cursor: Any) -> int:
        cursor.execute("SELECT pg_backend_pid()")
        (pid,) = cursor.fetchone()
        with lock:
            assert pid not in claims, f"backend {pid} lent to two threads at once"
            claims[pid] = threading.get_ident()
        try:
            cursor.execute("SELECT pg_sleep(%s)", [sleep])
        finally:
            with lock:
                del claims[pid]
        return int(pid)

    return body


@contextlib.contextmanager
def connection_held_elsewhere(alias: str) -> Iterator[None]:
    """Have another thread's request hold a connection of ``alias`` during the block."""
    holding, release = threading.Event(), threading.Event()

    def hold(cursor: Any) -> None:
        cursor.execute("SELECT 1")
        holding.set()
        release.wait(10)

    holder = threading.Thread(target=run_request, args=(alias, hold))
    holder.start()
    try:
        assert holding.wait(10)
        yield
    finally:
        release.set()
        holder.join(10)


def open_idle(alias: str, n: int) -> None:
    """Open ``n`` connections of ``alias`` at once (one thread each) and give them back:
    ``n`` idle connections in the pool, opened before whatever the test does next."""
    barrier = threading.Barrier(n)

    def hold() -> None:
        with connections[alias].cursor() as cursor:
            cursor.execute("SELECT 1")
            barrier.wait(10)
        connections[alias].close()

    threads = [threading.Thread(target=hold) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
