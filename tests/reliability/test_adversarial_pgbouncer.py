"""Adversarial review: the pool running behind a real PgBouncer ("both layers").

Ours with ``pool_size`` per process, PgBouncer in transaction mode with its own
server pool (docs/guide/pgbouncer.rst, docs/scaling.rst). PgBouncer's faults
(KILL, RESUME, RECONNECT, a restart, client_idle_timeout, query_wait_timeout,
idle_transaction_timeout, max_client_conn) come from its admin console and
its settings (tests/support/bouncer_faults.py); nothing of the database is mocked.

Two defects it found were fixed the same day (6 Dec 2026): postgrespool.E001
held the pools behind a declared PgBouncer to the server's max_connections, and
nothing flagged OPTIONS['assume_role'] behind a transaction-mode PgBouncer (now
postgrespool.W005). The other tests guard what held.
"""

from __future__ import annotations

import logging
import time

import pytest
from django.core import checks
from django.db import DatabaseError, transaction
from django.test import override_settings
from django_postgrespool import PoolTimeout, pool_stats

from tests.reliability.load import Load, assert_only_database_errors, failures, wait_until
from tests.support.bouncer_faults import admin, clients, restart, wait_for
from tests.support.db import connect
from tests.support.pgbouncer import PgBouncer
from tests.support.requests import connection_held_elsewhere, open_idle, run_request
from tests.support.settings import DATABASE

pytestmark = pytest.mark.reliability

POOL = {"pool_size": 4, "max_overflow": 2, "timeout": 2}
ROLE = "pp_adversarial_bouncer_role"


@pytest.fixture(scope="module")
def bouncer(cluster):
    """One transaction-mode PgBouncer for the tests that only use its admin console."""
    with PgBouncer(cluster, pool_mode="transaction", pool_size=4) as b:
        yield b


@pytest.fixture
def via(pooled_alias):
    """Return a factory of aliases that connect through a given PgBouncer."""

    def make(name, bouncer, *, options=None, extra=None, **pool_options):
        return pooled_alias(
            name,
            pool_options={**POOL, **pool_options},
            options=options,
            PORT=str(bouncer.port),
            DISABLE_SERVER_SIDE_CURSORS=True,
            **(extra or {}),
        )

    return make


def _one(alias: str, sql: str = "SELECT 1"):
    return run_request(alias, lambda c: (c.execute(sql), c.fetchone()[0])[1])


def _requests(alias: str, n: int) -> list:
    """Run ``n`` requests one after the other; return each result or its database error."""
    out: list = []
    for _ in range(n):
        try:
            out.append(_one(alias))
        except DatabaseError as error:
            out.append(error)
    return out


def _failed(outcomes: list) -> list:
    return [o for o in outcomes if isinstance(o, BaseException)]


def _cut(error: BaseException, reason: str) -> bool:
    """Tell whether ``error`` is PgBouncer closing the client for ``reason``.

    psycopg 3 reports PgBouncer's message; psycopg2 only that the connection closed.
    """
    return reason in str(error) or "server closed the connection unexpectedly" in str(error)


def _consistent(alias: str, bouncer: PgBouncer, app: str) -> dict:
    """Check pool_stats() against what PgBouncer holds for ``app``; return the stats."""
    (stats,) = pool_stats(alias)
    assert stats["checked_out"] == 0, stats
    assert stats["size"] == stats["idle"] <= POOL["pool_size"], stats
    assert stats["opened"] - stats["closed"] == stats["size"], stats
    # Every connection the pool counts is one PgBouncer still holds.
    assert wait_for(lambda: clients(bouncer, app) == stats["size"], 5), (
        clients(bouncer, app),
        stats,
    )
    return stats


# -- PgBouncer cuts the pool's idle client connections ---------------------------

PINGS = [False, "socket", True]
PING_IDS = ["no-ping", "socket", "ping"]


def _allowed_failures(pre_ping) -> int:
    # docs/reference/options.rst: 'socket' finds closed sockets, True pings;
    # False lends each closed one once, but the first failure marks every older
    # connection as suspect (pool.py, _suspect_before): one request at most.
    return 1 if pre_ping is False else 0


@pytest.mark.parametrize("pre_ping", PINGS, ids=PING_IDS)
def test_kill_and_resume_cost_at_most_one_request_and_the_stats_follow(bouncer, via, pre_ping):
    alias, app = via("bkill", bouncer, pre_ping=pre_ping)
    open_idle(alias, 4)
    assert clients(bouncer, app) == 4
    admin(bouncer, f"KILL {DATABASE}")  # drops every client and server connection
    admin(bouncer, f"RESUME {DATABASE}")
    assert clients(bouncer, app) == 0
    out = _requests(alias, 6)
    assert len(_failed(out)) <= _allowed_failures(pre_ping), out
    assert out[-5:] == [1] * 5
    stats = _consistent(alias, bouncer, app)
    assert stats["invalidated"] == 4, stats  # the four killed ones, no more


@pytest.mark.parametrize("pre_ping", PINGS, ids=PING_IDS)
def test_client_idle_timeout_never_costs_more_than_one_request(cluster, via, pre_ping):
    with PgBouncer(cluster, pool_size=4, settings={"client_idle_timeout": "1"}) as b:
        alias, app = via("bidle", b, pre_ping=pre_ping)
        open_idle(alias, 4)
        # PgBouncer closes idle clients after 1 s (its janitor runs about once a second).
        assert wait_for(lambda: clients(b, app) == 0, 10)
        out = _requests(alias, 6)
        assert len(_failed(out)) <= _allowed_failures(pre_ping), out
        if pre_ping is False and _failed(out):
            assert _cut(out[0], "client_idle_timeout")
        _consistent(alias, b, app)


@pytest.mark.parametrize("pre_ping", PINGS, ids=PING_IDS)
def test_a_pgbouncer_restart_with_an_idle_pool_costs_at_most_one_request(cluster, via, pre_ping):
    with PgBouncer(cluster, pool_size=4) as b:
        alias, app = via("brestart", b, pre_ping=pre_ping)
        open_idle(alias, 4)
        restart(b)  # same port; every client connection was cut
        out = _requests(alias, 6)
        assert len(_failed(out)) <= _allowed_failures(pre_ping), out
        _consistent(alias, b, app)


def test_reconnect_closes_server_connections_only_and_costs_nothing(bouncer, via):
    alias, app = via("breconnect", bouncer, pre_ping=False)
    open_idle(alias, 4)
    admin(bouncer, f"RECONNECT {DATABASE}")
    assert _requests(alias, 6) == [1] * 6
    stats = _consistent(alias, bouncer, app)
    assert stats["invalidated"] == 0 and stats["opened"] == 4, stats


def test_a_pgbouncer_restart_under_load_recovers_within_a_second(cluster, via):
    with PgBouncer(cluster, pool_size=4) as b:
        alias, app = via("bload", b, timeout=5)
        with Load(alias, 8) as load:
            assert wait_until(lambda: sum(o.ok for o in load.snapshot()) >= 100, 20)
            went_down = time.monotonic()
            b.stop()
            time.sleep(0.3)
            b.start()  # returns once it accepts TCP connections
            back = time.monotonic()
            assert wait_until(
                lambda: any(o.ok and o.start >= back for o in load.snapshot()), 5, 0.005
            )
            time.sleep(0.5)
        outcomes = load.snapshot()
    assert_only_database_errors(outcomes)
    after = [o for o in outcomes if o.start >= back]
    first_ok = min(o.end for o in after if o.ok)
    # The reconnect backoff is at most 0.8 s (pool.py _BACKOFF_MAX).
    assert first_ok - back < 1.0, first_ok - back
    # Once one request succeeded, every later one did.
    assert not [o for o in after if o.start > first_ok and not o.ok]
    assert [o for o in outcomes if o.end < went_down and not o.ok] == []
    # Each request in flight when PgBouncer went away fails once, at most.
    assert len([o for o in outcomes if o.start < went_down and not o.ok]) <= 8
    (stats,) = pool_stats(alias)
    assert stats["checked_out"] == 0 and stats["size"] <= POOL["pool_size"], stats


# -- PgBouncer ends one request's client connection ------------------------------


def test_query_wait_timeout_fails_that_request_only_and_its_connection_is_dropped(cluster, via):
    with PgBouncer(cluster, pool_size=1, settings={"query_wait_timeout": "1"}) as b:
        alias, app = via("bqwait", b)
        blocker = connect(b.url(DATABASE))
        with blocker.cursor() as cur:
            cur.execute("BEGIN")  # holds PgBouncer's only server connection
            cur.execute("SELECT 1")
        try:
            with pytest.raises(DatabaseError) as raised:
                _one(alias)
            assert _cut(raised.value, "query_wait_timeout")
            (stats,) = pool_stats(alias)
            assert (stats["size"], stats["checked_out"], stats["invalidated"]) == (0, 0, 1)
        finally:
            with blocker.cursor() as cur:
                cur.execute("ROLLBACK")
            blocker.close()
        assert _requests(alias, 3) == [1] * 3
        _consistent(alias, b, app)


def test_idle_transaction_timeout_fails_that_request_only(cluster, via):
    with PgBouncer(cluster, pool_size=2, settings={"idle_transaction_timeout": "1"}) as b:
        alias, app = via("bidletx", b)

        def body(cursor):
            with transaction.atomic(using=alias):
                cursor.execute("SELECT 1")
                # PgBouncer's check runs about once a second: idle for up to 2 s.
                assert wait_for(lambda: clients(b, app) == 0, 4)
                cursor.execute("SELECT 2")

        with pytest.raises(DatabaseError) as raised:
            run_request(alias, body)
        assert _cut(raised.value, "idle transaction timeout")
        assert _requests(alias, 3) == [1] * 3
        stats = _consistent(alias, b, app)
        assert stats["invalidated"] == 1, stats


# -- max_client_conn --------------------------------------------------------------


def test_max_client_conn_refusal_is_clear_waits_within_timeout_and_hides_the_password(
    cluster, via, caplog
):
    caplog.set_level(logging.INFO, logger="django_postgrespool")
    with PgBouncer(cluster, pool_size=4, settings={"max_client_conn": "3"}) as b:
        alias, app = via("bmaxc", b, timeout=1)
        others = [connect(b.url(DATABASE)) for _ in range(3)]
        try:
            # Nothing lent that could come back: PgBouncer's refusal, at once.
            started = time.monotonic()
            with pytest.raises(DatabaseError) as raised:
                _one(alias)
            assert time.monotonic() - started < 1
            assert "max_client_conn" in str(raised.value)
            texts = [str(raised.value), repr(raised.value.__cause__)]
            others.pop().close()
            # The reconnect backoff after the refusal (0.1 s at first) is over.
            assert wait_until(lambda: pool_stats(alias)[0]["backoff_until"] is None, 5, 0.01)
            with connection_held_elsewhere(alias):
                assert wait_for(lambda: clients(b, app) == 1, 5)
                # Full again: two other clients and this one.
                # One of its connections is lent: it waits for it, within timeout.
                started = time.monotonic()
                with pytest.raises(PoolTimeout) as waited:
                    _one(alias)
                assert time.monotonic() - started < 2.5
                assert "max_client_conn" in str(waited.value.__cause__)
                texts += [str(waited.value), repr(waited.value.__cause__)]
            (stats,) = pool_stats(alias)
            assert (stats["size"], stats["checked_out"]) == (1, 0), stats
            assert "max_client_conn" in stats["last_connect_error"]
            texts += [repr(stats), caplog.text]
            assert all(b.password not in text for text in texts)
            assert _one(alias) == 1  # the connection it has still serves
        finally:
            for conn in others:
                conn.close()


# -- the two layers' sizes -------------------------------------------------------


def test_pgbouncer_sees_at_most_the_pools_cap_and_keeps_pool_size_idle(cluster, via):
    # docs/guide/pgbouncer.rst: "the pool's cap is the client connections
    # PgBouncer sees, its default_pool_size the server connections".
    with PgBouncer(cluster, pool_size=3) as b:
        alias, app = via("bsizes", b, timeout=10)
        peak_clients = peak_servers = 0

        def body(cursor):
            cursor.execute("SELECT pg_sleep(0.005)")

        with Load(alias, 12, body=body):
            deadline = time.monotonic() + 2
            while time.monotonic() < deadline:
                peak_clients = max(peak_clients, clients(b, app))
                peak_servers = max(peak_servers, b.server_connections(DATABASE))
                time.sleep(0.1)
        (stats,) = pool_stats(alias)
        assert stats["peak_checked_out"] == POOL["pool_size"] + POOL["max_overflow"]
        assert peak_clients <= POOL["pool_size"] + POOL["max_overflow"]
        assert peak_servers <= 3
        # Overflow closed at checkin: pool_size idle clients stay, as the docs' sum says.
        assert wait_for(lambda: clients(b, app) == POOL["pool_size"], 5)
        assert stats["size"] == POOL["pool_size"]


# -- session setup across the two layers -----------------------------------------


def test_the_time_zone_set_up_once_per_connection_survives_transaction_pooling(cluster, via):
    # PgBouncer tracks TimeZone per client, so Django's one-time SET TIME ZONE
    # (init_connection_state, once per pooled connection) holds on any server session.
    with PgBouncer(cluster, pool_size=1) as b:  # one server session for both aliases
        tokyo, _ = via("btokyo", b, extra={"TIME_ZONE": "Asia/Tokyo"})
        utc, _ = via("butc", b)
        sql = "SELECT current_setting('TimeZone')"
        seen = [(_one(tokyo, sql), _one(utc, sql)) for _ in range(3)]
        assert seen == [("Asia/Tokyo", "UTC")] * 3


def test_a_transaction_stays_on_one_server_session_with_transaction_leases(cluster, via):
    with PgBouncer(cluster, pool_size=2) as b:
        alias, _ = via("btxlease", b, lease="transaction", pool_size=2, max_overflow=0)
        mixed: list = []

        def body(cursor):
            with transaction.atomic(using=alias):
                pids = set()
                for _ in range(3):
                    cursor.execute("SELECT pg_backend_pid()")
                    pids.add(cursor.fetchone()[0])
                    time.sleep(0.002)
                if len(pids) != 1:
                    mixed.append(pids)

        with Load(alias, 6, body=body) as load:
            assert wait_until(lambda: sum(o.ok for o in load.snapshot()) >= 60, 20)
        outcomes = load.snapshot()
        assert failures(outcomes) == [], [repr(o.error) for o in failures(outcomes)[:3]]
        assert mixed == []
        (stats,) = pool_stats(alias)
        assert stats["checked_out"] == 0 and stats["peak_checked_out"] <= 2


# -- DEFECTS ----------------------------------------------------------------------


def _messages(alias: str, *, databases: list[str] | None = None) -> list[checks.CheckMessage]:
    return [
        m
        for m in checks.run_checks(databases=databases, include_deployment_checks=True)
        if m.id and m.id.startswith("postgrespool.") and repr(alias) in m.msg
    ]


def test_e001_does_not_hold_the_pools_behind_pgbouncer_to_the_servers_max_connections(bouncer, via):
    # docs/scaling.rst: "Add PgBouncer when that sum no longer fits". Behind it
    # the pools' connections are PgBouncer's clients (max_client_conn=1000 here);
    # the server only ever sees PgBouncer's default_pool_size (4).
    alias, _ = via("bbudget", bouncer)
    admin_conn = connect(bouncer.cluster.url(DATABASE))
    with admin_conn.cursor() as cur:
        cur.execute("SELECT current_setting('max_connections')::int")
        (max_connections,) = cur.fetchone()
    admin_conn.close()
    cap = POOL["pool_size"] + POOL["max_overflow"]
    workers = max_connections // cap + 1  # workers × cap > max_connections, < max_client_conn
    assert workers * cap < 1000
    with override_settings(
        POSTGRESPOOL_PGBOUNCER={alias: "transaction"}, POSTGRESPOOL_WORKERS=workers
    ):
        found = _messages(alias, databases=[alias])
    assert [m.id for m in found] == [], [m.msg for m in found]


def test_assume_role_behind_transaction_mode_pgbouncer_is_flagged(cluster, via, server_url):
    admin_conn = connect(server_url)
    with admin_conn.cursor() as cur:
        cur.execute(
            f"DO $$BEGIN CREATE ROLE {ROLE}; EXCEPTION WHEN duplicate_object THEN NULL; END$$"
        )
    try:
        with PgBouncer(cluster, pool_size=1) as b:  # one server session for both aliases
            roled, _ = via("broled", b, options={"assume_role": ROLE})
            plain, _ = via("bplain", b)
            sql = "SELECT current_user"
            _one(roled, sql)  # Django's setup: SET ROLE, once, on PgBouncer's server session
            # Evidence of the leak, for the message: the other alias (another
            # client of PgBouncer, which never asked for the role) runs as it.
            leaked = [_one(plain, sql) for _ in range(3)]
            with override_settings(POSTGRESPOOL_PGBOUNCER={roled: "transaction"}):
                found = [m.id for m in _messages(roled) if "assume_role" in m.msg]
        assert found, f"no check; another client of PgBouncer ran as: {leaked}"
    finally:
        with admin_conn.cursor() as cur:
            cur.execute(f"DROP ROLE IF EXISTS {ROLE}")
        admin_conn.close()
