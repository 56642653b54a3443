"""Load generators for the reliability tests: requests driven the way Django's handlers do."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from django.core.signals import request_finished, request_started
from django.db import Error as DjangoDatabaseError
from django.db import connections


@dataclass
class Outcome:
    """One request: when it started and ended, which backend served it, how it failed."""

    start: float
    end: float
    ok: bool
    pid: int | None = None
    error: BaseException | None = None
    finish_error: BaseException | None = None

    @property
    def duration(self) -> float:
        return self.end - self.start


def request(alias: str, body: Callable[[Any], Any] | None = None, sql: str = "SELECT 1") -> Outcome:
    """Run one request on ``alias``; never raise, return what happened."""
    start = time.monotonic()
    pid = None
    ok, error = False, None
    request_started.send(sender=None)
    try:
        wrapper = connections[alias]
        with wrapper.cursor() as cursor:
            # From libpq, no round trip: which backend this request got.
            pid = wrapper.connection.info.backend_pid
            if body is None:
                cursor.execute(sql)
                cursor.fetchall()
            else:
                body(cursor)
        ok = True
    except Exception as exc:  # noqa: BLE001 - recorded, judged by the test
        error = exc
    end = time.monotonic()
    finish_error = None
    try:
        request_finished.send(sender=None)
    except Exception as exc:  # noqa: BLE001 - must never happen: returning a connection raised
        finish_error = exc
    return Outcome(start, end, ok, pid, error, finish_error)


class Load:
    """``threads`` threads sending requests to ``alias`` until stopped (or paused)."""

    def __init__(
        self,
        alias: str,
        threads: int,
        *,
        sql: str = "SELECT 1",
        body: Callable[[Any], Any] | None = None,
        backoff: float = 0.02,
        think: float = 0.0,
        keep_successes: bool = True,
    ) -> None:
        self.alias, self.sql, self.body = alias, sql, body
        self.backoff, self.think = backoff, think
        # A soak keeps only its failures (and drops their tracebacks), so that
        # memory measures the pool, not the test's bookkeeping.
        self.keep_successes = keep_successes
        self.successes = 0
        self.outcomes: list[Outcome] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._running = threading.Event()
        self._running.set()
        self._idle = threading.Semaphore(0)
        self._threads = [
            threading.Thread(target=self._loop, name=f"load-{i}", daemon=True)
            for i in range(threads)
        ]

    def __enter__(self) -> Load:  # noqa: PYI034
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                if not self._running.is_set():
                    self._idle.release()
                    self._running.wait()
                    continue
                outcome = request(self.alias, self.body, self.sql)
                with self._lock:
                    if outcome.ok:
                        self.successes += 1
                    if self.keep_successes:
                        self.outcomes.append(outcome)
                    elif not outcome.ok:
                        for error in (outcome.error, outcome.finish_error):
                            if error is not None:
                                error.__traceback__ = None
                        self.outcomes.append(outcome)
                if not outcome.ok and self.backoff:
                    time.sleep(self.backoff * (0.5 + random.random()))
                elif self.think:
                    time.sleep(self.think)
        finally:
            connections[self.alias].close()
            connections.close_all()

    def pause(self, timeout: float = 30) -> None:
        """Stop sending requests; return once every thread is between requests."""
        self._running.clear()
        deadline = time.monotonic() + timeout
        for _ in self._threads:
            if not self._idle.acquire(timeout=max(0.0, deadline - time.monotonic())):
                raise AssertionError("a load thread did not finish its request: a hang")

    def resume(self) -> None:
        self._running.set()

    def stop(self, timeout: float = 60) -> None:
        self._stop.set()
        self._running.set()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        hung = [t.name for t in self._threads if t.is_alive()]
        assert not hung, f"load threads still running after {timeout}s (a hang): {hung}"

    def snapshot(self) -> list[Outcome]:
        with self._lock:
            return list(self.outcomes)


def failures(outcomes: list[Outcome]) -> list[Outcome]:
    return [o for o in outcomes if not o.ok]


def assert_only_database_errors(outcomes: list[Outcome]) -> None:
    """Every failure is a django.db error (OperationalError & co), and no checkin raised."""
    odd = [
        o.error
        for o in outcomes
        if o.error is not None and not isinstance(o.error, DjangoDatabaseError)
    ]
    assert not odd, f"failures that are not database errors: {odd[:5]!r}"
    finish = [o.finish_error for o in outcomes if o.finish_error is not None]
    assert not finish, f"request_finished raised (returning a connection failed): {finish[:5]!r}"


def rss_kib() -> int:
    """Return this process's resident set size in KiB."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def wait_until(predicate: Callable[[], bool], timeout: float = 15, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
