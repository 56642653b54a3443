"""What one borrower leaves on a connection, and what the next borrower of it sees.

The table measured here is the one in README.rst ("Reset coverage"): with the
default ``reset='rollback'`` only transaction state is cleaned; with
``reset='discard'`` (DISCARD ALL) all session state is.
"""

from __future__ import annotations

import pytest
from django.db import DatabaseError, connections
from django_postgrespool import pool_stats

from tests.reliability.figures import record
from tests.support.db import DRIVER
from tests.support.requests import run_request

pytestmark = pytest.mark.reliability

TABLE = "reliability_isolation"


def _one(cursor, sql, params=()):
    cursor.execute(sql, params)
    return cursor.fetchone()[0]


def _autocommit_off(alias):
    connections[alias].set_autocommit(False)


def leave_open_transaction(alias, cursor):
    _autocommit_off(alias)
    cursor.execute(f"INSERT INTO {TABLE} VALUES (1)")


def leave_failed_transaction(alias, cursor):
    _autocommit_off(alias)
    cursor.execute(f"INSERT INTO {TABLE} VALUES (2)")
    with pytest.raises(DatabaseError):
        cursor.execute("SELECT 1/0")


def leave_xact_advisory_lock(alias, cursor):
    _autocommit_off(alias)
    cursor.execute("SELECT pg_advisory_xact_lock(4243)")


def leave_session_set(alias, cursor):
    cursor.execute("SET work_mem = '7MB'")


def leave_advisory_lock(alias, cursor):
    cursor.execute("SELECT pg_advisory_lock(4242)")


def leave_temp_table(alias, cursor):
    cursor.execute("CREATE TEMP TABLE reliability_leak (x int)")


def leave_listen(alias, cursor):
    cursor.execute("LISTEN reliability_leak")


def leave_prepared_statement(alias, cursor):
    cursor.execute("PREPARE reliability_leak AS SELECT 1")


# (what the first borrower does, what the next one finds if it leaked)
CASES = {
    "open transaction": (leave_open_transaction, f"SELECT count(*) > 0 FROM {TABLE}"),
    "error mid-transaction": (leave_failed_transaction, f"SELECT count(*) > 0 FROM {TABLE}"),
    "transaction advisory lock": (
        leave_xact_advisory_lock,
        "SELECT count(*) > 0 FROM pg_locks WHERE locktype = 'advisory' AND objid = 4243",
    ),
    "SET session variable": (leave_session_set, "SELECT current_setting('work_mem') = '7MB'"),
    "advisory lock": (
        leave_advisory_lock,
        "SELECT count(*) > 0 FROM pg_locks WHERE locktype = 'advisory' AND objid = 4242",
    ),
    "temporary table": (
        leave_temp_table,
        (
            "SELECT count(*) > 0 FROM pg_class WHERE relname = 'reliability_leak' "
            "AND relpersistence = 't' AND pg_table_is_visible(oid)"
        ),
    ),
    "LISTEN": (
        leave_listen,
        "SELECT count(*) > 0 FROM pg_listening_channels() c WHERE c = 'reliability_leak'",
    ),
    "prepared statement": (
        leave_prepared_statement,
        "SELECT count(*) > 0 FROM pg_prepared_statements WHERE name = 'reliability_leak'",
    ),
}
# What we measured: does the next borrower see it?
LEAKS = {
    "rollback": {
        "open transaction": False,
        "error mid-transaction": False,
        "transaction advisory lock": False,
        "SET session variable": True,
        "advisory lock": True,
        "temporary table": True,
        "LISTEN": True,
        "prepared statement": True,
    },
    "discard": dict.fromkeys(CASES, False),
}


@pytest.fixture(scope="module", autouse=True)
def _table():
    from tests.support.db import connect
    from tests.support.settings import DATABASE, SERVER_URL

    conn = connect(SERVER_URL.rsplit("/", 1)[0] + "/" + DATABASE)
    with conn.cursor() as cur:
        cur.execute(f"CREATE TABLE IF NOT EXISTS {TABLE} (x int)")
    yield
    with conn.cursor() as cur:
        cur.execute(f"DROP TABLE IF EXISTS {TABLE}")
    conn.close()


@pytest.mark.parametrize("reset", ["rollback", "discard"])
@pytest.mark.parametrize("case", list(CASES))
def test_next_borrower_sees_what_the_reset_does_not_cover(pooled_alias, monitor, reset, case):
    alias, app = pooled_alias(
        "iso", pool_options={"pool_size": 1, "max_overflow": 0, "reset": reset}
    )
    leave, probe = CASES[case]

    def first_borrower(cursor):
        leave(alias, cursor)
        return connections[alias].connection.info.backend_pid  # no round trip

    first = run_request(alias, first_borrower)
    pid, seen = run_request(alias, lambda c: (_one(c, "SELECT pg_backend_pid()"), _one(c, probe)))
    assert pid == first  # the same physical connection: the reset was what was tested
    (stats,) = pool_stats(alias)
    assert stats["invalidated"] == 0  # reset and reused, not discarded
    assert monitor.pids(app) == [pid]
    record(
        f"reset coverage (next borrower sees it?), reset={reset}", case, "LEAKS" if seen else "no"
    )
    assert seen is LEAKS[reset][case]
    # The one connection is back in the pool, clean at the transaction level.
    assert run_request(alias, lambda c: _one(c, f"SELECT count(*) FROM {TABLE}")) == 0


@pytest.mark.parametrize("reset", ["rollback", "discard"])
@pytest.mark.parametrize("binding", ["client", "server"])
def test_driver_prepared_statements_survive_the_reset(pooled_alias, reset, binding):
    # psycopg 3 prepares a query on the server after its 5th run; DISCARD ALL
    # drops them on the server, and the driver must notice.
    options = {"server_side_binding": True} if binding == "server" else {}
    if DRIVER != "psycopg" and binding == "server":
        pytest.skip("server-side binding is psycopg 3's")
    alias, _ = pooled_alias(
        "prep", pool_options={"pool_size": 1, "max_overflow": 0, "reset": reset}, options=options
    )

    def repeat(cursor):
        return [_one(cursor, "SELECT %s::int + 1", [i]) for i in range(8)]

    for _ in range(3):
        assert run_request(alias, repeat) == list(range(1, 9))
    (stats,) = pool_stats(alias)
    assert stats["invalidated"] == 0
