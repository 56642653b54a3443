"""A signal handler's exception inside SQLAlchemy's QueuePool, on real PostgreSQL sessions.

tests/backend/test_interrupt_points.py enumerates every point of SQLAlchemy's
frames on a fake DB-API; these two cases are the losses it found, end to end
(both fail on the code before): SQLAlchemy's ``invalidate()`` cut short puts
its record back with the session open, and an interrupted give-back inside
its bookkeeping leaves a slot counted for nobody.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from django.db import close_old_connections, connections
from django_postgrespool import pool_stats
from sqlalchemy.pool import QueuePool
from sqlalchemy.pool.base import _ConnectionRecord

from tests.backend.test_signal_storm import _Interrupt
from tests.support.requests import run_request


@pytest.fixture
def raise_once(monkeypatch: pytest.MonkeyPatch) -> Callable[[type, str], list[int]]:
    """Make ``owner.name`` raise _Interrupt at its entry, once; return its call count."""

    def arm(owner: type, name: str) -> list[int]:
        real = getattr(owner, name)
        calls = [0]

        def patched(self: Any, *args: Any, **kwargs: Any) -> Any:
            calls[0] += 1
            if calls[0] == 1:
                raise _Interrupt(f"at {owner.__name__}.{name}")
            return real(self, *args, **kwargs)

        monkeypatch.setattr(owner, name, patched)
        return calls

    return arm


@pytest.fixture
def held_elsewhere(pooled_alias: Any) -> Iterator[Callable[[str], int]]:
    """Hold a checkout of ``alias`` in another thread until the test ends; return its pid."""
    release = threading.Event()
    threads: list[threading.Thread] = []

    def hold(alias: str) -> int:
        pid: list[int] = []
        held = threading.Event()

        def body(cursor: Any) -> None:
            cursor.execute("SELECT pg_backend_pid()")
            pid.append(cursor.fetchone()[0])
            held.set()
            release.wait(30)

        thread = threading.Thread(target=run_request, args=(alias, body))
        thread.start()
        threads.append(thread)
        assert held.wait(10)
        return pid[0]

    yield hold
    release.set()
    for thread in threads:
        thread.join(10)


def _end_request_interrupted() -> None:
    with pytest.raises(_Interrupt):
        close_old_connections()  # the request's end gives the connection back
    close_old_connections()  # the next request's start: the wrapper's recovery


def test_an_invalidate_cut_short_never_lends_its_session_again(
    pooled_alias: Any, monitor: Any, raise_once: Any, held_elsewhere: Any
) -> None:
    # Beyond pool_size, a connection given back is closed: SQLAlchemy's
    # invalidate() interrupted at its record's entry gave the record back,
    # session open, and the next new connection was that very session.
    alias, app = pooled_alias(pool_options={"pool_size": 1, "max_overflow": 1, "timeout": 1})
    other = held_elsewhere(alias)
    close_old_connections()
    conn = connections[alias]
    with conn.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        mine = cursor.fetchone()[0]
    calls = raise_once(_ConnectionRecord, "invalidate")
    _end_request_interrupted()
    assert calls[0] >= 1
    assert monitor.settled_count(app, 1) == 1, monitor.pids(app)  # the other's alone
    assert monitor.pids(app) == [other]
    pid = run_request(alias)
    assert pid not in (mine, other)
    stats = pool_stats(alias)[0]
    assert stats["opened"] - stats["closed"] == stats["size"], stats


def _at_once(alias: str, count: int) -> list[BaseException]:
    """Run ``count`` requests that each hold a connection until all have one; their errors."""
    barrier = threading.Barrier(count)
    errors: list[BaseException] = []

    def request() -> None:
        try:
            run_request(alias, lambda cursor: (cursor.execute("SELECT 1"), barrier.wait(10)))
        except BaseException as error:  # noqa: BLE001 - returned
            errors.append(error)  # a checkout's failure: the other's wait times out
        close_old_connections()

    threads = [threading.Thread(target=request) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(15)
    return errors


def test_a_slot_counted_for_nobody_is_freed_at_the_cap(
    pooled_alias: Any, monitor: Any, raise_once: Any
) -> None:
    # QueuePool's give-back interrupted at its entry, as the connection
    # beyond pool_size is closed: the record is neither queued nor closed by
    # it, its slot counted for ever; with max_connections 2, two requests at
    # once could no longer be served.
    alias, app = pooled_alias(pool_options={"pool_size": 1, "max_overflow": 1, "timeout": 1})
    assert _at_once(alias, 2) == []
    assert monitor.settled_count(app, 1) == 1  # the second given back was closed
    calls = raise_once(QueuePool, "_do_return_conn")
    errors = _at_once(alias, 2)
    assert calls[0] >= 1
    assert [type(e) for e in errors] == [_Interrupt], errors
    assert monitor.settled_count(app, 1) == 1, monitor.pids(app)  # closed all the same
    assert _at_once(alias, 2) == []  # the slot QueuePool lost count of is freed
    stats = pool_stats(alias)[0]
    assert stats["opened"] - stats["closed"] == stats["size"], stats
    assert stats["lost_slots"] == 1, stats  # and counted
