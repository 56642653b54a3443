"""Adversarial review of ``lease='transaction'`` and of high availability.

Against real PostgreSQL, in every lane (psycopg 3 and psycopg2). The review
(6 Dec) found the defects the tests below name; each test failed before its
fix (docs/evidence/reliability.rst).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from django.db import DatabaseError, IntegrityError, connections, transaction
from django.db.backends.signals import connection_created
from django_postgrespool import pool_stats

from tests.support.pgcluster import Cluster, start_pair
from tests.support.requests import open_idle

# One connection, given back between transactions.
T1 = {"pool_size": 1, "max_overflow": 0, "timeout": 0.5, "lease": "transaction"}


def checked_out(alias: str) -> int:
    return sum(s["checked_out"] for s in pool_stats(alias))


def one(alias: str, sql: str, params: Any = None) -> Any:
    with connections[alias].cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.fetchone()[0] if cursor.description else None


# -- lease='transaction' -----------------------------------------------------


def test_on_commit_in_autocommit_mode_does_not_keep_a_connection(pooled_alias):
    alias, _ = pooled_alias("adv_oncommit", pool_options=T1)
    one(alias, "SELECT 1")
    assert checked_out(alias) == 0
    ran: list[int] = []
    # Runs at once (no transaction): it needs no connection, and must not hold one
    # while it works (sending an e-mail, calling an API...).
    transaction.on_commit(lambda: ran.append(checked_out(alias)), using=alias)
    assert ran == [0]
    assert checked_out(alias) == 0


def test_get_autocommit_between_statements_does_not_keep_a_connection(pooled_alias):
    alias, _ = pooled_alias("adv_getauto", pool_options=T1)
    one(alias, "SELECT 1")
    assert transaction.get_autocommit(using=alias) is True
    assert checked_out(alias) == 0


def test_a_failing_on_commit_callback_still_gives_the_connection_back(pooled_alias):
    alias, _ = pooled_alias("adv_hookfail", pool_options=T1)

    def boom() -> None:
        raise RuntimeError("callback failed")

    with pytest.raises(RuntimeError):
        with transaction.atomic(using=alias):
            one(alias, "SELECT 1")
            transaction.on_commit(boom, using=alias)
    assert connections[alias].in_atomic_block is False
    assert checked_out(alias) == 0


@pytest.mark.parametrize("lease", ["request", "transaction"])
def test_a_receiver_failing_at_a_checkout_does_not_leave_the_connection_lent(pooled_alias, lease):
    alias, _ = pooled_alias("adv_receiver", pool_options={**T1, "lease": lease}, CONN_MAX_AGE=0)
    one(alias, "SET application_name = 'tenant_a'")  # the previous borrower's session
    connections[alias].close()
    calls: list[str] = []

    def receiver(sender: Any, connection: Any, **kwargs: Any) -> None:
        # A multi-tenant app sets the tenant's search_path here, at every checkout.
        if connection.alias != alias:
            return
        calls.append("called")
        if len(calls) == 1:
            raise RuntimeError("tenant lookup failed")
        with connection.cursor() as cursor:
            cursor.execute("SET application_name = 'tenant_b'")

    connection_created.connect(receiver)
    try:
        with pytest.raises(RuntimeError):
            one(alias, "SELECT 1")
        # The next query (an error handler's, say) must not run on a session whose
        # setup failed: on the previous borrower's tenant.
        assert one(alias, "SHOW application_name") == "tenant_b"
        assert len(calls) == 2
    finally:
        connection_created.disconnect(receiver)


def test_autocommit_turned_off_by_hand_keeps_the_connection_until_turned_on(pooled_alias):
    alias, _ = pooled_alias("adv_byhand", pool_options=T1)
    transaction.set_autocommit(False, using=alias)
    pid = one(alias, "SELECT pg_backend_pid()")
    one(alias, "CREATE TEMPORARY TABLE adv_t (x int)")
    transaction.commit(using=alias)
    assert checked_out(alias) == 1  # committed, but autocommit is still off
    assert one(alias, "SELECT count(*) FROM adv_t") == 0
    assert one(alias, "SELECT pg_backend_pid()") == pid
    transaction.rollback(using=alias)
    transaction.set_autocommit(True, using=alias)
    assert checked_out(alias) == 0


def test_a_durable_block_with_a_failed_savepoint_keeps_one_session(pooled_alias):
    alias, _ = pooled_alias("adv_durable", pool_options=T1)
    one(alias, "SELECT 1")
    with transaction.atomic(using=alias, durable=True):
        pid = one(alias, "SELECT pg_backend_pid()")
        one(alias, "CREATE TEMPORARY TABLE adv_d (x int PRIMARY KEY)")
        one(alias, "INSERT INTO adv_d VALUES (1)")
        with pytest.raises(IntegrityError):
            with transaction.atomic(using=alias):
                one(alias, "INSERT INTO adv_d VALUES (1)")  # a server error, in a savepoint
        assert checked_out(alias) == 1
        assert one(alias, "SELECT pg_backend_pid()") == pid
        assert one(alias, "SELECT count(*) FROM adv_d") == 1
    assert checked_out(alias) == 0


@pytest.mark.parametrize("reset", ["rollback", "discard"])
def test_the_isolation_level_of_options_holds_in_every_atomic_block(pooled_alias, reset):
    from django.db.backends.postgresql.psycopg_any import IsolationLevel

    alias, _ = pooled_alias(
        "adv_iso",
        pool_options={**T1, "reset": reset},
        options={"isolation_level": IsolationLevel.SERIALIZABLE},
    )
    for _ in range(3):
        with transaction.atomic(using=alias):
            assert one(alias, "SHOW transaction_isolation") == "serializable"
        assert checked_out(alias) == 0


# -- high availability ---------------------------------------------------------


@pytest.fixture
def pair() -> Iterator[tuple[Cluster, Cluster]]:
    """A primary and its streaming standby, for one test (a promotion uses them up)."""
    primary, standby = start_pair()
    try:
        yield primary, standby
    finally:
        standby.destroy()  # first: a synchronous primary waits for it
        primary.destroy()


def ha_alias(pooled_alias: Any, pair: tuple[Cluster, Cluster], options: dict[str, Any]) -> str:
    primary, standby = pair
    alias, _ = pooled_alias(
        "adv_ha",
        NAME="postgres",
        USER=primary.user,
        PASSWORD=primary.password,
        HOST=f"{primary.host},{standby.host}",
        PORT=f"{primary.port},{standby.port}",
        options={"connect_timeout": 2, **options},
        pool_options={"pool_size": 4, "max_overflow": 0, "timeout": 2},
    )
    return alias


def hold(alias: str, n: int) -> None:
    """``n`` idle connections of ``alias`` in the pool."""
    open_idle(alias, n)
    assert pool_stats(alias)[0]["idle"] == n


def lent(alias: str, sql: str, times: int = 4) -> list[Any]:
    """Run ``sql`` in ``times`` checkouts; what each lent session answered."""
    seen = []
    for _ in range(times):
        try:
            seen.append(one(alias, sql))
        except DatabaseError:
            pass  # no matching server left: refusing is right
        finally:
            connections[alias].close()
    return seen


@pytest.mark.parametrize("where", ["service file", "PGTARGETSESSIONATTRS"])
def test_read_write_given_to_libpq_elsewhere_is_checked_at_checkout(
    pooled_alias, pair, tmp_path, monkeypatch, where
):
    if where == "service file":
        service = tmp_path / "pg_service.conf"
        service.write_text("[adv]\ntarget_session_attrs=read-write\n")
        monkeypatch.setenv("PGSERVICEFILE", str(service))
        alias = ha_alias(pooled_alias, pair, {"service": "adv"})
    else:
        monkeypatch.setenv("PGTARGETSESSIONATTRS", "read-write")
        alias = ha_alias(pooled_alias, pair, {})
    hold(alias, 3)
    primary, _ = pair
    # A switchover's first step: the old primary turns read-only.
    primary.psql("ALTER SYSTEM SET default_transaction_read_only = on")
    primary.psql("SELECT pg_reload_conf()")
    time.sleep(0.2)
    seen = lent(alias, "SHOW transaction_read_only")
    assert "on" not in seen, f"read-only sessions lent for read-write: {seen}"


@pytest.mark.parametrize("attrs", ["standby", "read-only"])
def test_a_promoted_standby_is_not_lent_when_a_standby_was_asked(pooled_alias, pair, attrs):
    alias = ha_alias(pooled_alias, pair, {"target_session_attrs": attrs})
    hold(alias, 3)
    assert lent(alias, "SELECT pg_is_in_recovery()", 1) == [True]
    _, standby = pair
    standby.promote()
    seen = lent(alias, "SELECT pg_is_in_recovery()")
    assert False not in seen, f"sessions on a primary lent as standby sessions: {seen}"


def test_a_prefer_standby_connection_on_the_primary_is_recycled_soon(
    pooled_alias, pair, monkeypatch
):
    # prefer-standby takes the primary when no standby answers; once one answers
    # again, reads must go back to it within FALLBACK_LIFETIME, not at recycle (1 h).
    from django_postgrespool import pool as pool_module
    from django_postgrespool import registry

    monkeypatch.setattr(pool_module, "FALLBACK_LIFETIME", 1.0)
    _, standby = pair
    alias = ha_alias(pooled_alias, pair, {"target_session_attrs": "prefer-standby"})
    assert lent(alias, "SELECT pg_is_in_recovery()", 1) == [True]
    registry.close_pools(alias=alias)  # the next connections are new ones
    standby.stop("fast")
    assert lent(alias, "SELECT pg_is_in_recovery()", 2) == [False, False]  # fell back
    standby.start()
    deadline = time.monotonic() + 20
    seen: list[Any] = []
    while time.monotonic() < deadline:
        seen = lent(alias, "SELECT pg_is_in_recovery()", 1)
        if seen == [True]:
            break
        time.sleep(0.3)
    assert seen == [True], "reads stayed on the primary after the standby came back"
