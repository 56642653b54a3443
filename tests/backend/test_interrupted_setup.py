"""A new connection whose Django setup was interrupted as it began is never lent again.

Found by the Django-frames interrupt review (test_interrupt_points_django.py,
test_an_interrupted_connect, point 394 on Python 3.12, 6 Dec, night): an
interrupt at the entry of the wrapper's _connect_new() left the new lease
unconfigured on the wrapper; given back at the request's end, it was lent to
another thread's wrapper, whose setup then failed ("'DatabaseWrapper' object
has no attribute 'isolation_level'": only the wrapper that opened it had
run get_new_connection()). Fails on the code before.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest
from django.db import close_old_connections, connections
from django_postgrespool import pool_stats
from django_postgrespool.backend import PooledDatabaseWrapperMixin

from tests.backend.test_signal_storm import _Interrupt
from tests.support.requests import run_request


def test_a_setup_interrupted_as_it_began_is_not_lent_to_another_thread(
    pooled_alias: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    alias, _ = pooled_alias(pool_options={"pool_size": 1, "max_overflow": 0, "timeout": 2})
    real = PooledDatabaseWrapperMixin._connect_new
    calls = [0]

    def interrupted(self: Any, lease: Any) -> None:
        calls[0] += 1
        if calls[0] == 1:
            raise _Interrupt("at _connect_new's entry")
        real(self, lease)

    monkeypatch.setattr(PooledDatabaseWrapperMixin, "_connect_new", interrupted)
    close_old_connections()
    with pytest.raises(_Interrupt):
        connections[alias].ensure_connection()
    close_old_connections()  # the request's end
    answers: list[Any] = []

    def other() -> None:
        try:
            answers.append(run_request(alias))
        except BaseException as error:  # noqa: BLE001 - checked below
            answers.append(error)

    thread = threading.Thread(target=other)
    thread.start()
    thread.join(10)
    assert len(answers) == 1 and isinstance(answers[0], int), answers
    stats = pool_stats(alias)[0]
    assert stats["invalidated"] == 1, stats  # the unfinished one, closed
    assert stats["opened"] - stats["closed"] == stats["size"], stats
