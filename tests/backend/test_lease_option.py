"""POOL_OPTIONS lease='transaction': the connection goes back between transactions.

Against real PostgreSQL. One connection (pool_size=1) shared by two threads
whose requests overlap: with lease='request' the second waits for the first
request to end; with lease='transaction' it waits only while the first talks
to the server, in a statement, an atomic block, an open cursor or a
transaction begun by hand.
"""

from __future__ import annotations

import threading

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.db import connections, transaction
from django.db.backends.signals import connection_created
from django_postgrespool import pool_stats
from django_postgrespool.errors import PoolTimeout

from tests.support.requests import run_request

ONE = {"pool_size": 1, "max_overflow": 0, "timeout": 0.5}


def checked_out(alias: str) -> int:
    return sum(s["checked_out"] for s in pool_stats(alias))


def query_in_another_thread(alias: str) -> str:
    """Run one request in a new thread: "ok", or the error's name."""
    out: list[str] = []

    def request() -> None:
        try:
            run_request(alias, lambda c: c.execute("SELECT 1"))
            out.append("ok")
        except PoolTimeout:
            out.append("PoolTimeout")
        finally:
            connections[alias].close()

    t = threading.Thread(target=request)
    t.start()
    t.join(10)
    return out[0]


@pytest.mark.parametrize("lease", ["request", "transaction"])
def test_between_statements_another_thread_gets_the_connection_only_per_transaction(
    pooled_alias, lease
):
    alias, _ = pooled_alias("lease_stmt", pool_options={**ONE, "lease": lease})
    wrapper = connections[alias]
    with wrapper.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        first = cursor.fetchone()[0]
    # The request goes on, between two statements.
    if lease == "transaction":
        assert wrapper.connection is None and checked_out(alias) == 0
        assert query_in_another_thread(alias) == "ok"
    else:
        assert checked_out(alias) == 1
        assert query_in_another_thread(alias) == "PoolTimeout"
    with wrapper.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        assert cursor.fetchone()[0] == first  # the one connection, lent again
    wrapper.close()
    assert checked_out(alias) == 0


def test_an_atomic_block_keeps_its_connection_until_it_ends(pooled_alias):
    alias, _ = pooled_alias("lease_atomic", pool_options={**ONE, "lease": "transaction"})
    wrapper = connections[alias]
    committed: list[str] = []
    with transaction.atomic(using=alias):
        with wrapper.cursor() as cursor:
            cursor.execute("CREATE TEMPORARY TABLE t (x int)")
        assert checked_out(alias) == 1
        assert query_in_another_thread(alias) == "PoolTimeout"
        with wrapper.cursor() as cursor:
            cursor.execute("INSERT INTO t VALUES (1)")  # the same session: the table is there
        transaction.on_commit(lambda: committed.append("run"), using=alias)
    assert committed == ["run"]
    assert wrapper.connection is None and checked_out(alias) == 0
    assert query_in_another_thread(alias) == "ok"


def test_an_open_cursor_or_a_transaction_begun_by_hand_keeps_the_connection(pooled_alias):
    alias, _ = pooled_alias("lease_open", pool_options={**ONE, "lease": "transaction"})
    wrapper = connections[alias]
    left_open = wrapper.cursor()
    left_open.execute("SELECT 1")
    with wrapper.cursor() as cursor:
        cursor.execute("SELECT 2")
    assert checked_out(alias) == 1  # the first cursor is still open
    left_open.close()
    assert checked_out(alias) == 0

    with wrapper.cursor() as cursor:
        cursor.execute("BEGIN")
        cursor.execute("CREATE TEMPORARY TABLE u (x int)")
    assert checked_out(alias) == 1  # a transaction is open on the server
    with wrapper.cursor() as cursor:
        cursor.execute("INSERT INTO u VALUES (1)")
        cursor.execute("COMMIT")
    assert checked_out(alias) == 0
    wrapper.close()


def test_a_server_side_cursor_keeps_the_connection_until_it_is_closed(pooled_alias):
    alias, _ = pooled_alias("lease_chunked", pool_options={**ONE, "lease": "transaction"})
    wrapper = connections[alias]
    cursor = wrapper.chunked_cursor()
    cursor.execute("SELECT generate_series(1, 5000)")
    assert len(cursor.fetchmany(100)) == 100
    assert checked_out(alias) == 1
    assert len(cursor.fetchmany(100)) == 100
    cursor.close()
    assert checked_out(alias) == 0
    wrapper.close()


def test_each_checkout_is_a_connect_for_connection_created_receivers_that_may_query(
    pooled_alias,
):
    alias, _ = pooled_alias("lease_signal", pool_options={**ONE, "lease": "transaction"})
    seen: list[str] = []

    def receiver(sender, connection, **kwargs):
        if connection.alias == alias:
            seen.append(alias)
            # As django.contrib.postgres's receiver does: a query inside connect(),
            # which must not give the connection back before connect() returns.
            with connection.cursor() as cursor:
                cursor.execute("SELECT 1")

    connection_created.connect(receiver)
    try:
        for _ in range(3):
            with connections[alias].cursor() as cursor:
                cursor.execute("SELECT 1")
    finally:
        connection_created.disconnect(receiver)
        connections[alias].close()
    assert seen == [alias] * 3


def test_an_unknown_lease_is_refused_naming_the_choices(pooled_alias):
    alias, _ = pooled_alias("lease_bad", pool_options={"lease": "statement"})
    with pytest.raises(ImproperlyConfigured) as info:
        connections[alias].ensure_connection()
    assert str(info.value) == (
        f"DATABASES[{alias!r}]['POOL_OPTIONS']: pool option 'lease' must be one of "
        "'request' or 'transaction'; got 'statement'."
    )


def test_debug_cursors_are_still_the_backends_and_log_every_query(pooled_alias):
    from django.db.backends.postgresql.base import CursorDebugWrapper

    alias, _ = pooled_alias("lease_debug", pool_options={**ONE, "lease": "transaction"})
    wrapper = connections[alias]
    wrapper.force_debug_cursor = True
    try:
        for n in (1, 2):
            with wrapper.cursor() as cursor:
                assert isinstance(cursor, CursorDebugWrapper)  # its copy() logging, for one
                cursor.execute(f"SELECT {n}")
            assert checked_out(alias) == 0
        assert [q["sql"] for q in wrapper.queries] == ["SELECT 1", "SELECT 2"]
    finally:
        wrapper.force_debug_cursor = False
        wrapper.close()
