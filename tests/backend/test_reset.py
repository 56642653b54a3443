"""What one borrower leaves behind is never seen by the next one."""

from __future__ import annotations

import pytest
from django.db import DatabaseError, connections, transaction
from django_postgrespool import pool_stats

from tests.support.requests import run_request


@pytest.fixture
def table(pooled_alias):
    alias, app = pooled_alias(pool_options={"pool_size": 1, "max_overflow": 0})
    run_request(
        alias,
        lambda c: c.execute("CREATE TABLE IF NOT EXISTS borrowers (x int); TRUNCATE borrowers"),
    )
    yield alias
    run_request(alias, lambda c: c.execute("DROP TABLE borrowers"))


def count(alias: str) -> int:
    return run_request(
        alias, lambda c: (c.execute("SELECT count(*) FROM borrowers"), c.fetchone()[0])[1]
    )


def test_uncommitted_transaction_is_not_seen_by_next_borrower(table):
    def leave_open(cursor):
        connections[table].set_autocommit(False)
        cursor.execute("INSERT INTO borrowers VALUES (1)")
        # the request ends without commit; the pool must roll back

    run_request(table, leave_open)
    assert count(table) == 0
    assert connections[table].get_autocommit() is True


def test_failed_transaction_is_not_seen_by_next_borrower(table):
    def fail(cursor):
        connections[table].set_autocommit(False)
        cursor.execute("INSERT INTO borrowers VALUES (1)")
        with pytest.raises(DatabaseError):
            cursor.execute("SELECT 1/0")

    run_request(table, fail)
    assert count(table) == 0
    (stats,) = pool_stats(table)
    assert stats["invalidated"] == 0  # rolled back and reused, not discarded


def test_transaction_set_local_does_not_leak(table):
    def set_local(cursor):
        connections[table].set_autocommit(False)
        cursor.execute("SET LOCAL statement_timeout = '1234ms'")

    run_request(table, set_local)
    shown = run_request(table, lambda c: (c.execute("SHOW statement_timeout"), c.fetchone()[0])[1])
    assert shown == "0"


def test_connection_closed_inside_atomic_block_is_discarded_not_reused(table):
    alias = table
    first = run_request(alias)

    def close_inside(cursor):
        with pytest.raises(Exception):
            with transaction.atomic(using=alias):
                cursor.execute("INSERT INTO borrowers VALUES (1)")
                connections[alias].close()
                cursor.execute("SELECT 1")

    run_request(alias, close_inside)
    assert count(alias) == 0
    assert run_request(alias) != first
    (stats,) = pool_stats(alias)
    assert stats["invalidated"] == 1


def test_session_set_survives_default_reset_but_not_discard(pooled_alias):
    rollback_alias, _ = pooled_alias("rollback", pool_options={"pool_size": 1})
    discard_alias, _ = pooled_alias("discard", pool_options={"pool_size": 1, "reset": "discard"})
    for alias in (rollback_alias, discard_alias):
        run_request(
            alias, lambda c: c.execute("SET application_name = 'changed'; SET work_mem = '7MB'")
        )
    show = lambda c: (c.execute("SHOW work_mem"), c.fetchone()[0])[1]  # noqa: E731
    assert run_request(rollback_alias, show) == "7MB"
    assert run_request(discard_alias, show) == "4MB"


def test_discard_reset_redoes_session_setup(pooled_alias):
    alias, _ = pooled_alias(
        pool_options={"pool_size": 1, "reset": "discard"}, TIME_ZONE="Asia/Tokyo"
    )
    zone = lambda c: (c.execute("SHOW TIME ZONE"), c.fetchone()[0])[1]  # noqa: E731
    pid = run_request(alias)
    assert run_request(alias, zone) == "Asia/Tokyo"
    assert run_request(alias, zone) == "Asia/Tokyo"
    assert run_request(alias) == pid


def test_connection_of_a_thread_that_ended_without_closing_is_rolled_back(table):
    import gc
    import threading

    def abandon():
        connections[table].set_autocommit(False)
        with connections[table].cursor() as cursor:
            cursor.execute("INSERT INTO borrowers VALUES (1)")
        # the thread ends holding the pool's only connection, without close()

    gc.disable()  # reclaimed without the garbage collector's help
    try:
        worker = threading.Thread(target=abandon)
        worker.start()
        worker.join()
        assert pool_stats(table)[0]["checked_out"] == 1
        # the next checkout finds the pool at its cap and takes it back, rolled back
        assert count(table) == 0
    finally:
        gc.enable()
    (stats,) = pool_stats(table)
    assert stats["checked_out"] == 0
    assert stats["reclaimed"] == 1
    assert stats["invalidated"] == 0
