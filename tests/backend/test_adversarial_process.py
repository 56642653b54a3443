"""Adversarial tests, round 6: processes, servers and signals.

A signal handler's exception (KeyboardInterrupt, gunicorn's SystemExit,
Celery's soft time limit) can be raised between any two lines of Python. These
tests raise one at a chosen line of the checkout or checkin path (with a line
tracer, so the place is exact) and look at what the pool has left; and they
fork while another thread is in the middle of opening a connection.
"""

from __future__ import annotations

import dis
import gc
import sys
import threading
from collections.abc import Callable
from typing import Any

import pytest
from django.db import connections
from django_postgrespool import pool_stats, registry
from django_postgrespool.backend import PooledDatabaseWrapperMixin
from django_postgrespool.pool import ConnectionPool

from tests.backend.test_fork import in_child
from tests.support.requests import backend_pid, run_request


class _Interrupt(BaseException):
    """What a signal handler raises: not an Exception, as KeyboardInterrupt is not."""


def _line_of(function: Callable[..., Any], op: str, name: str) -> tuple[Any, int]:
    """The code object of ``function`` and the line of its first ``op`` (LOAD/STORE) of ``name``.

    Found in the bytecode, not the source: the file may change under a running suite.
    """
    code = function.__code__
    for instruction in dis.get_instructions(code):
        if instruction.opname.startswith(op) and instruction.argval == name:
            line = instruction.positions.lineno if instruction.positions else None
            if line is not None:
                return code, line
    raise LookupError(f"no {op} of {name!r} in {function.__qualname__}")


def _interrupt_at(function: Callable[..., Any], op: str, name: str) -> list[bool]:
    """Raise _Interrupt in this thread when it reaches the line of ``function`` (see _line_of).

    As a signal handler would, just before that line runs; once. Returns a
    flag set when it has been raised.
    """
    code, line = _line_of(function, op, name)
    fired = [False]

    def local(frame: Any, event: str, arg: Any) -> Any:
        if event == "line" and frame.f_lineno == line and not fired[0]:
            fired[0] = True
            sys.settrace(None)
            raise _Interrupt
        return local

    def tracer(frame: Any, event: str, arg: Any) -> Any:
        return local if frame.f_code is code and not fired[0] else None

    sys.settrace(tracer)
    return fired


def _close_interrupted(wrapper: Any, function: Callable[..., Any], op: str, name: str) -> None:
    """Close ``wrapper`` with an _Interrupt raised at that line of ``function`` (see _line_of)."""
    fired = _interrupt_at(function, op, name)
    try:
        wrapper.close()
    except _Interrupt:
        pass
    finally:
        sys.settrace(None)
    assert fired[0]


def _checked_out(alias: str) -> int:
    # The current pool's: those of earlier tests may still lend what they lost.
    return sum(stats["checked_out"] for stats in pool_stats(alias) if not stats["retired"])


# -- signals -----------------------------------------------------------------


def test_an_interrupt_as_a_new_connection_is_lent_does_not_lose_it_for_ever(pooled_alias) -> None:
    alias, _ = pooled_alias(pool_options={"pool_size": 1, "max_overflow": 0, "timeout": 1})
    seen: dict[str, Any] = {}

    def worker() -> None:
        fired = _interrupt_at(ConnectionPool.checkout, "STORE", "owner")  # lease.owner = owner
        try:
            run_request(alias)
        except _Interrupt:
            seen["interrupted"] = fired[0]
        finally:
            sys.settrace(None)
            connections[alias].close()  # what the request's end does

    t = threading.Thread(target=worker)
    t.start()
    t.join(10)
    assert seen == {"interrupted": True}
    # The thread has ended: whatever it was lent is the pool's again.
    run_request(alias)


def test_an_interrupt_at_the_start_of_close_does_not_lose_the_connection(pooled_alias) -> None:
    alias, _ = pooled_alias(pool_options={"pool_size": 1, "max_overflow": 0, "timeout": 1})
    wrapper = connections[alias]
    wrapper.ensure_connection()
    _close_interrupted(wrapper, PooledDatabaseWrapperMixin._close, "LOAD", "_held_lease")
    wrapper.close()  # the request's end, or an error handler's clean-up, closes again
    # A long-lived thread (a Celery worker's, after a soft time limit): its next task.
    run_request(alias)


@pytest.mark.parametrize(
    ("function", "op", "name"),
    [
        # borrowed_at = self._checkout[2], once _held_lease() has popped the lease
        (PooledDatabaseWrapperMixin._close, "LOAD", "_checkout"),
        # self._use_hist.observe(...), once _holds() said the caller has it
        (ConnectionPool._checkin, "LOAD", "_use_hist"),
        # lease.owner = None, the reset done
        (ConnectionPool._give_back, "STORE", "owner"),
    ],
    ids=["_close", "checkin", "_give_back"],
)
def test_an_interrupt_during_checkin_leaves_nothing_checked_out(
    pooled_alias, function: Callable[..., Any], op: str, name: str
) -> None:
    alias, _ = pooled_alias(pool_options={"pool_size": 2, "max_overflow": 0, "timeout": 1})
    wrapper = connections[alias]
    wrapper.ensure_connection()
    _close_interrupted(wrapper, function, op, name)
    wrapper.close()
    assert _checked_out(alias) == 0


def test_an_interrupt_while_waiting_at_the_cap_passes_the_connection_on(pooled_alias) -> None:
    # Holds today: the waiter leaves the line (a fix of an earlier review),
    # checked here with the interrupt raised inside the sleep of a real wait.
    from django_postgrespool.pool import _Waiter

    alias, _ = pooled_alias(pool_options={"pool_size": 1, "max_overflow": 0, "timeout": 5})
    holding, release = threading.Event(), threading.Event()

    def hold(cursor: Any) -> None:
        holding.set()
        release.wait(10)

    t = threading.Thread(target=run_request, args=(alias, hold))
    t.start()
    assert holding.wait(10)
    fired = _interrupt_at(_Waiter.sleep, "LOAD", "bell")
    try:
        with pytest.raises(_Interrupt):
            run_request(alias)
    finally:
        sys.settrace(None)
    assert fired[0]
    release.set()
    t.join(10)
    run_request(alias)
    assert _checked_out(alias) == 0


# -- fork ----------------------------------------------------------------------


def test_fork_while_another_thread_opens_a_connection(pooled_alias, monitor) -> None:
    # The connection being opened is in no list of the pool yet (QueuePool has
    # made it, _open has not recorded it): the child must not close it, and the
    # parent must keep it.
    alias, app = pooled_alias(pool_options={"pool_size": 2, "max_overflow": 0, "timeout": 5})
    opening, forked = threading.Event(), threading.Event()
    learn = ConnectionPool._learn_attrs
    seen: dict[str, Any] = {}

    def slow_learn(self: ConnectionPool, raw: Any) -> None:
        if threading.current_thread().name == "opener":
            opening.set()
            forked.wait(10)
        learn(self, raw)

    def opener(cursor: Any) -> None:
        cursor.execute("SELECT pg_backend_pid()")
        seen["pid"] = cursor.fetchone()[0]
        cursor.execute("SELECT pg_sleep(0.3)")  # the child has ended meanwhile
        cursor.execute("SELECT 1")

    def child() -> int:
        registry._abandoned.clear()  # the worst a child can do with what it inherited
        gc.collect()
        return backend_pid(alias)

    ConnectionPool._learn_attrs = slow_learn  # type: ignore[method-assign]
    try:
        t = threading.Thread(target=run_request, args=(alias, opener), name="opener")
        t.start()
        assert opening.wait(10)
        result = in_child(child)
        forked.set()
        t.join(10)
    finally:
        ConnectionPool._learn_attrs = learn  # type: ignore[method-assign]
    assert "ok" in result, result
    assert result["ok"] != seen["pid"]
    assert seen["pid"] in monitor.pids(app)
    assert _checked_out(alias) == 0
