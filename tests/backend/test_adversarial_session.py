"""Adversarial review: what one borrower's session leaves for the next, per driver and reset.

Each test borrows a pool of one connection (the next request gets the same
backend, checked) and looks for what the previous request left on it: on
the server (DISCARD ALL's business) and on the driver's connection object,
which no SQL reset touches. The review (5 Dec, night) found four defects,
each proven by a test below that failed before its fix
(docs/evidence/reliability.rst).
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest
from django.db import DatabaseError, connections, transaction
from django.db.backends.signals import connection_created
from django_postgrespool import pool_stats

from tests.support.db import DRIVER
from tests.support.requests import run_request

ONE = {"pool_size": 1, "max_overflow": 0}
RESETS = ["rollback", "discard"]
PSYCOPG3 = DRIVER == "psycopg"


def _one(cursor: Any, sql: str, params: Any = ()) -> Any:
    cursor.execute(sql, params)
    return cursor.fetchone()[0]


def _pid(cursor: Any) -> int:
    return _one(cursor, "SELECT pg_backend_pid()")


def _raw(alias: str) -> Any:
    return connections[alias].connection


@pytest.fixture
def table(monitor):
    """A table of the tests' database, dropped after the test."""
    from tests.support.db import connect
    from tests.support.settings import DATABASE, SERVER_URL

    name = f"adv_sess_{uuid.uuid4().hex[:8]}"
    conn = connect(SERVER_URL.rsplit("/", 1)[0] + "/" + DATABASE)
    with conn.cursor() as cur:
        cur.execute(f"CREATE TABLE {name} (x int)")
    yield name
    with conn.cursor() as cur:
        cur.execute(f"DROP TABLE IF EXISTS {name}")
    conn.close()


# -- the driver's connection object: no SQL reset touches it -------------------


def _set_read_only(raw: Any) -> None:
    if PSYCOPG3:
        raw.read_only = True
    else:
        raw.readonly = True


def _set_serializable(raw: Any) -> None:
    from django.db.backends.postgresql.psycopg_any import IsolationLevel

    raw.isolation_level = IsolationLevel.SERIALIZABLE


@pytest.mark.parametrize("reset", RESETS)
def test_a_read_only_flag_set_on_the_driver_connection_is_not_lent_on(pooled_alias, table, reset):
    alias, _ = pooled_alias("adv_ro", pool_options={**ONE, "reset": reset})

    def report(cursor: Any) -> int:
        _set_read_only(_raw(alias))  # a read-only report view, belt and braces
        return _pid(cursor)

    first = run_request(alias, report)

    def write(cursor: Any) -> int:
        assert _pid(cursor) == first  # the same session: the reset is what is tested
        with transaction.atomic(using=alias):
            cursor.execute(f"INSERT INTO {table} VALUES (1)")
        return 1

    run_request(alias, write)


@pytest.mark.parametrize("reset", RESETS)
def test_an_isolation_level_set_on_the_driver_connection_is_not_lent_on(pooled_alias, reset):
    alias, _ = pooled_alias("adv_iso_raw", pool_options={**ONE, "reset": reset})

    def serializable(cursor: Any) -> int:
        _set_serializable(_raw(alias))
        return _pid(cursor)

    first = run_request(alias, serializable)

    def level(cursor: Any) -> str:
        assert _pid(cursor) == first
        with transaction.atomic(using=alias):
            return _one(cursor, "SHOW transaction_isolation")

    assert run_request(alias, level) == "read committed"


def test_notifications_received_by_one_borrower_are_not_handed_to_the_next(pooled_alias):
    alias, _ = pooled_alias("adv_notify", pool_options={**ONE, "reset": "discard"})

    def listen(cursor: Any) -> int:
        cursor.execute("LISTEN adv_session")
        cursor.execute("NOTIFY adv_session, 'secret of request 1'")
        cursor.execute("SELECT 1")  # the notification is read with a result
        return _pid(cursor)

    first = run_request(alias, listen)

    def pending(cursor: Any) -> list[str]:
        assert _pid(cursor) == first
        raw = _raw(alias)
        if PSYCOPG3:
            return [n.payload for n in raw.notifies(timeout=0)]
        raw.poll()
        return [n.payload for n in raw.notifies]

    assert run_request(alias, pending) == []


@pytest.mark.skipif(not PSYCOPG3, reason="notice handlers are psycopg 3's")
def test_a_notice_handler_added_by_a_connection_created_receiver_does_not_pile_up(pooled_alias):
    alias, _ = pooled_alias("adv_notice", pool_options=ONE)
    heard: list[str] = []

    def receiver(sender: Any, connection: Any, **kwargs: Any) -> None:
        if connection.alias == alias:
            connection.connection.add_notice_handler(lambda d: heard.append(d.message_primary))

    connection_created.connect(receiver)
    try:
        for _ in range(5):
            run_request(alias)
        run_request(alias, lambda c: c.execute("DO $$ BEGIN RAISE NOTICE 'once'; END $$"))
    finally:
        connection_created.disconnect(receiver)
    assert heard == ["once"]


@pytest.mark.skipif(not PSYCOPG3, reason="notice handlers are psycopg 3's")
@pytest.mark.parametrize("reset", RESETS)
def test_a_notice_handler_added_during_a_request_does_not_hear_the_next(pooled_alias, reset):
    alias, _ = pooled_alias("adv_notice2", pool_options={**ONE, "reset": reset})
    heard: list[str] = []

    def first(cursor: Any) -> None:
        _raw(alias).add_notice_handler(lambda d: heard.append(d.message_primary))
        cursor.execute("DO $$ BEGIN RAISE NOTICE 'request 1'; END $$")

    run_request(alias, first)
    run_request(alias, lambda c: c.execute("DO $$ BEGIN RAISE NOTICE 'request 2'; END $$"))
    assert heard == ["request 1"]


@pytest.mark.parametrize("reset", RESETS)
def test_a_row_factory_set_on_the_driver_connection_is_not_lent_on(pooled_alias, reset):
    alias, _ = pooled_alias("adv_rows", pool_options={**ONE, "reset": reset})

    def dict_rows(cursor: Any) -> int:
        raw = _raw(alias)
        if PSYCOPG3:
            from psycopg.rows import dict_row

            raw.row_factory = dict_row
        else:
            from psycopg2.extras import RealDictCursor

            raw.cursor_factory = RealDictCursor
        return _pid(cursor)

    first = run_request(alias, dict_rows)

    def row(cursor: Any) -> Any:
        cursor.execute("SELECT pg_backend_pid() AS pid")
        return cursor.fetchone()

    assert run_request(alias, row) == (first,)


@pytest.mark.skipif(PSYCOPG3, reason="conn.notices is psycopg2's")
@pytest.mark.parametrize("reset", RESETS)
def test_psycopg2_notices_of_one_borrower_are_not_shown_to_the_next(pooled_alias, reset):
    alias, _ = pooled_alias("adv_notices", pool_options={**ONE, "reset": reset})
    run_request(alias, lambda c: c.execute("DO $$ BEGIN RAISE NOTICE 'secret 1'; END $$"))
    assert run_request(alias, lambda c: list(_raw(alias).notices)) == []


# -- server-side session state with reset='discard' ----------------------------


@pytest.fixture
def role(monitor):
    """A role the tests' user may SET ROLE to."""
    name = f"adv_role_{uuid.uuid4().hex[:8]}"
    monitor.query(f"CREATE ROLE {name}")
    monitor.query(f"GRANT {name} TO CURRENT_USER")
    yield name
    monitor.query(f"DROP ROLE {name}")


def test_assume_role_is_set_again_after_a_borrowers_reset_role_with_discard(pooled_alias, role):
    import django

    if django.VERSION < (5, 2):
        pytest.skip("OPTIONS['assume_role'] is Django 5.2's")
    alias, _ = pooled_alias(
        "adv_role", pool_options={**ONE, "reset": "discard"}, options={"assume_role": role}
    )
    first = run_request(
        alias, lambda c: (_one(c, "SELECT current_user"), c.execute("RESET ROLE"), _pid(c))
    )
    assert first[0] == role
    pid, user = run_request(alias, lambda c: (_pid(c), _one(c, "SELECT current_user")))
    assert (pid, user) == (first[2], role)


def test_search_path_of_options_survives_discard_all(pooled_alias):
    alias, _ = pooled_alias(
        "adv_path",
        pool_options={**ONE, "reset": "discard"},
        options={"options": "-c search_path=adv_nowhere,public"},
    )
    first = run_request(alias, lambda c: (c.execute("SET search_path = pg_catalog"), _pid(c))[1])
    pid, path = run_request(alias, lambda c: (_pid(c), _one(c, "SHOW search_path")))
    assert (pid, path) == (first, "adv_nowhere,public")


@pytest.mark.parametrize(
    "leave, probe",
    [
        (
            "BEGIN; DECLARE adv_hold CURSOR WITH HOLD FOR SELECT 1; COMMIT",
            "SELECT count(*) FROM pg_cursors WHERE name = 'adv_hold'",
        ),
        (
            "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY",
            "SELECT (current_setting('default_transaction_read_only') = 'on')::int",
        ),
    ],
    ids=["cursor WITH HOLD", "SESSION CHARACTERISTICS"],
)
def test_discard_leaves_no_session_state_of_these_kinds(pooled_alias, leave, probe):
    alias, _ = pooled_alias("adv_disc", pool_options={**ONE, "reset": "discard"})
    first = run_request(alias, lambda c: (c.execute(leave), _pid(c))[1])

    def look(cursor: Any) -> tuple[int, Any]:
        pid = _pid(cursor)
        return pid, _one(cursor, probe)

    assert run_request(alias, look) == (first, 0)


@pytest.mark.skipif(not PSYCOPG3, reason="prepare_threshold is psycopg 3's")
@pytest.mark.parametrize("binding", [False, True])
def test_prepare_every_statement_with_discard_all(pooled_alias, binding):
    options: dict[str, Any] = {"prepare_threshold": 0}
    if binding:
        options["server_side_binding"] = True
    alias, _ = pooled_alias("adv_prep0", pool_options={**ONE, "reset": "discard"}, options=options)
    for _ in range(4):
        rows = run_request(alias, lambda c: [_one(c, "SELECT %s::int", [i]) for i in range(3)])
        assert rows == [0, 1, 2]
    (stats,) = pool_stats(alias)
    assert stats["invalidated"] == 0


# -- COPY, two-phase ------------------------------------------------------------


@pytest.mark.parametrize("reset", RESETS)
def test_a_copy_abandoned_midway_leaves_the_next_borrower_a_clean_session(
    pooled_alias, table, reset
):
    alias, _ = pooled_alias("adv_copy", pool_options={**ONE, "reset": reset})

    def abandon(cursor: Any) -> None:
        connections[alias].set_autocommit(False)
        if PSYCOPG3:
            with pytest.raises(ZeroDivisionError):
                with cursor.copy(f"COPY {table} FROM STDIN") as copy:
                    copy.write_row((1,))
                    1 / 0  # noqa: B018
        else:

            class Broken:
                def read(self, size: int = -1) -> str:
                    raise ZeroDivisionError

                readline = read

            with pytest.raises(Exception, match="ZeroDivisionError"):  # psycopg2 wraps it
                cursor.copy_expert(f"COPY {table} FROM STDIN", Broken())

    run_request(alias, abandon)
    assert run_request(alias, lambda c: _one(c, f"SELECT count(*) FROM {table}")) == 0
    (stats,) = pool_stats(alias)
    assert stats["checked_out"] == 0


@pytest.mark.parametrize("reset", RESETS)
def test_copy_through_execute_leaves_the_next_borrower_a_working_session(
    pooled_alias, table, reset
):
    alias, _ = pooled_alias("adv_copy2", pool_options={**ONE, "reset": reset})

    def wrong_way(cursor: Any) -> None:
        with pytest.raises(DatabaseError):
            cursor.execute(f"COPY {table} FROM STDIN")

    run_request(alias, wrong_way)
    assert run_request(alias, lambda c: _one(c, f"SELECT count(*) FROM {table}")) == 0


@pytest.mark.parametrize("reset", RESETS)
def test_a_two_phase_transaction_left_begun_is_not_lent(pooled_alias, table, reset):
    alias, _ = pooled_alias("adv_tpc", pool_options={**ONE, "reset": reset})

    def begin(cursor: Any) -> None:
        raw = _raw(alias)
        raw.autocommit = False
        raw.tpc_begin(raw.xid(1, "adv", "tpc"))
        cursor.execute(f"INSERT INTO {table} VALUES (1)")

    run_request(alias, begin)

    def write(cursor: Any) -> int:
        with transaction.atomic(using=alias):
            cursor.execute(f"INSERT INTO {table} VALUES (2)")
        return _one(cursor, f"SELECT sum(x) FROM {table}")

    assert run_request(alias, write) == 2


# -- the server ends idle pooled sessions ---------------------------------------


@pytest.mark.parametrize("pre_ping", ["socket", True])
def test_idle_session_timeout_while_idle_in_the_pool_fails_no_request(
    pooled_alias, monitor, pre_ping
):
    if monitor.query("SHOW server_version_num")[0][0] < "140000":
        pytest.skip("idle_session_timeout is PostgreSQL 14's")
    alias, _ = pooled_alias(
        "adv_idle",
        pool_options={**ONE, "pre_ping": pre_ping},
        options={"options": "-c idle_session_timeout=300"},
    )
    first = run_request(alias)
    time.sleep(0.8)
    second = run_request(alias)
    assert second != first
    (stats,) = pool_stats(alias)
    assert stats["invalidated"] == 1


def test_idle_session_timeout_with_pre_ping_off_fails_one_request_only(pooled_alias, monitor):
    if monitor.query("SHOW server_version_num")[0][0] < "140000":
        pytest.skip("idle_session_timeout is PostgreSQL 14's")
    alias, _ = pooled_alias(
        "adv_idle_off",
        pool_options={**ONE, "pre_ping": False},
        options={"options": "-c idle_session_timeout=300"},
    )
    first = run_request(alias)
    time.sleep(0.8)
    with pytest.raises(DatabaseError):
        run_request(alias)
    assert run_request(alias) != first
    assert pool_stats(alias)[0]["checked_out"] == 0
