"""System checks of the pooled backend: exact ids, messages and hints, against the real server."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest
from django.core import checks
from django.db import connections
from django.test import override_settings
from django_postgrespool import pool_stats
from django_postgrespool import checks as pool_checks
from django_postgrespool._rules import DOCS_URL

from tests.support.proxy import pipe

SIZING = f"See {DOCS_URL}guide/sizing.html"
AGE_HINT = (
    "Set CONN_MAX_AGE = 0: the pool already keeps connections open, and each request then "
    f"gives its connection back to the pool. See {DOCS_URL}guide/configuration.html"
)
BUDGET_HINT_20 = (
    "Lower pool_size + max_overflow so that workers × (pool_size + max_overflow) stays within "
    "20, run fewer workers, or raise the server's limit. " + SIZING
)


def server() -> str:
    s = connections.settings["default"]
    return f"{s['HOST']}:{s['PORT']}"


def ids(messages: list[checks.CheckMessage]) -> list[str]:
    return [m.id for m in messages]  # type: ignore[misc]


def test_every_check_is_registered_with_django() -> None:
    registered = checks.registry.registry.get_checks()
    assert len(pool_checks._CHECKS) == 7
    for check, tags in pool_checks._CHECKS:
        assert check in registered
        assert set(tags) <= set(check.tags)  # type: ignore[attr-defined]


@override_settings(DATABASE_POOL_ARGS={"max_overflow": 10, "pool_size": 5}, POSTGRESPOOL_MAX_CONNECTIONS=20)
def test_original_readme_pool_args_exceed_heroku_limit_with_two_workers(monkeypatch) -> None:
    monkeypatch.setenv("WEB_CONCURRENCY", "2")
    assert pool_checks.check_budget_against_setting() == [
        checks.Error(
            f"The pools of alias 'default' may open 2 × (15) = 30 connections to {server()} "
            f"(workers: WEB_CONCURRENCY), more than the 20 it accepts (POSTGRESPOOL_MAX_CONNECTIONS).",
            hint=BUDGET_HINT_20,
            id="postgrespool.E001",
        )
    ]


@pytest.mark.parametrize("mode", ["session", "transaction", "statement", None])
@override_settings(DATABASE_POOL_ARGS={"max_overflow": 10, "pool_size": 5}, POSTGRESPOOL_MAX_CONNECTIONS=20)
def test_an_alias_behind_pgbouncer_is_left_out_of_the_servers_budget(monkeypatch, mode) -> None:
    # Its connections are PgBouncer's clients; None declares a proxy that is
    # not PgBouncer: still counted.
    monkeypatch.setenv("WEB_CONCURRENCY", "2")
    with override_settings(POSTGRESPOOL_PGBOUNCER={"default": mode}):
        found = ids(pool_checks.check_budget_against_setting())
    assert found == ([] if mode else ["postgrespool.E001"])


@pytest.mark.parametrize("mode", ["session", "transaction", "statement", None])
def test_assume_role_is_flagged_behind_a_transaction_mode_pgbouncer_only(pooled_alias, mode):
    alias, _ = pooled_alias("roled", options={"assume_role": "someone"})
    with override_settings(POSTGRESPOOL_PGBOUNCER={alias: mode}):
        found = pool_checks.check_role_behind_pgbouncer()
    if mode in ("transaction", "statement"):
        [warning] = found
        assert warning.id == "postgrespool.W005" and repr(alias) in warning.msg
        assert f"{mode} mode" in warning.msg and "USER" in warning.hint
    else:
        assert found == []


@override_settings(DATABASE_POOL_ARGS={"max_overflow": 10, "pool_size": 5}, POSTGRESPOOL_MAX_CONNECTIONS=20)
def test_one_process_of_fifteen_connections_fits_heroku_limit(monkeypatch) -> None:
    monkeypatch.delenv("WEB_CONCURRENCY", raising=False)
    assert pool_checks.check_budget_against_setting() == []


@override_settings(POSTGRESPOOL_WORKERS=1, POSTGRESPOOL_MAX_CONNECTIONS=20)
def test_budget_sums_every_alias_on_the_same_server(pooled_alias) -> None:
    pooled_alias("pooled", pool_options={"pool_size": 4, "max_overflow": 2})
    [error] = pool_checks.check_budget_against_setting()
    assert error.msg == (
        f"The pools of aliases 'default', 'pooled' may open 1 × (15 + 6) = 21 connections to "
        f"{server()} (workers: POSTGRESPOOL_WORKERS), more than the 20 it accepts "
        f"(POSTGRESPOOL_MAX_CONNECTIONS)."
    )


@pytest.mark.parametrize(
    ("overrides", "env", "message"),
    [
        ({"POSTGRESPOOL_WORKERS": 0}, None, "POSTGRESPOOL_WORKERS must be a positive integer; got 0."),
        ({"POSTGRESPOOL_WORKERS": "two"}, None, "POSTGRESPOOL_WORKERS must be a positive integer; got 'two'."),
        ({}, "lots", "The WEB_CONCURRENCY environment variable must be a positive integer; got 'lots'."),
        ({"POSTGRESPOOL_MAX_CONNECTIONS": -5}, None, "POSTGRESPOOL_MAX_CONNECTIONS must be a positive integer; got -5."),
    ],
)
def test_bad_worker_or_limit_setting_is_an_error(monkeypatch, overrides, env, message) -> None:
    monkeypatch.delenv("WEB_CONCURRENCY", raising=False)
    if env is not None:
        monkeypatch.setenv("WEB_CONCURRENCY", env)
    with override_settings(**overrides):
        assert pool_checks.check_budget_against_setting() == [
            checks.Error(message, hint=SIZING, id="postgrespool.E002")
        ]


def test_invalid_pool_options_are_reported_by_check(pooled_alias) -> None:
    pooled_alias("pooled", pool_options={"poolsize": 3})
    assert pool_checks.check_budget_against_setting() == [
        checks.Error(
            "DATABASES['pooled']['POOL_OPTIONS']: unknown pool option 'poolsize' (did you mean "
            "'pool_size'?). Valid options: fair_after, leak_timeout, lease, max_idle, "
            "max_overflow, pool_size, pre_ping, recycle, reset, timeout, use_lifo.",
            hint=f"Fix the pool options. See {DOCS_URL}reference/options.html",
            id="postgrespool.E005",
        )
    ]


def test_server_limit_is_only_queried_when_checks_run_for_a_database() -> None:
    with override_settings(POSTGRESPOOL_WORKERS=100):
        assert pool_checks.check_budget_against_server(databases=None) == []
        assert "postgrespool.E001" not in ids(checks.run_checks())
        assert pool_stats() == []  # no connection was made
        [error] = pool_checks.check_budget_against_server(databases=["default"])
    assert error == checks.Error(
        f"The pools of alias 'default' may open 100 × (15) = 1500 connections to {server()} "
        f"(workers: POSTGRESPOOL_WORKERS), more than the 300 it accepts (max_connections=300, "
        f"read through alias 'default').",
        hint=(
            "Lower pool_size + max_overflow so that workers × (pool_size + max_overflow) stays "
            "within 300, run fewer workers, or raise the server's limit. " + SIZING
        ),
        id="postgrespool.E001",
    )
    with override_settings(POSTGRESPOOL_WORKERS=20):  # 20 × 15 = 300: just fits
        assert pool_checks.check_budget_against_server(databases=["default"]) == []


def test_server_limit_leaves_superuser_reserved_slots_to_other_roles(pooled_alias, monitor) -> None:
    role = "pp_budget_role"
    monitor.query(f"DROP ROLE IF EXISTS {role}")
    monitor.query(f"CREATE ROLE {role} LOGIN PASSWORD 'role-pw'")
    try:
        pooled_alias("pooled", USER=role, PASSWORD="role-pw", HOST="localhost")
        with override_settings(POSTGRESPOOL_WORKERS=20):
            [error] = pool_checks.check_budget_against_server(databases=["pooled"])
        assert error.msg.endswith(
            "more than the 297 it accepts (max_connections=300 minus 3 reserved for superusers, "
            "read through alias 'pooled')."
        )
        assert error.msg.startswith("The pools of alias 'pooled' may open 20 × (15) = 300")
    finally:
        for conn in connections.all(initialized_only=True):
            conn.close()
        from django_postgrespool import close_pools

        close_pools()
        monitor.query(f"DROP ROLE IF EXISTS {role}")


def test_unreachable_server_is_a_warning_not_a_crash(pooled_alias) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]  # bound, never listening: connection refused
        pooled_alias("pooled", PORT=str(dead_port), POOL_OPTIONS={"timeout": 2})
        messages = pool_checks.check_budget_against_server(databases=["pooled"])
    assert messages == [
        checks.Warning(
            f"Could not read the connection limit of 127.0.0.1:{dead_port} through alias "
            f"'pooled' (OperationalError); the connection budget was not checked.",
            hint="Set POSTGRESPOOL_MAX_CONNECTIONS to the server's limit. " + SIZING,
            id="postgrespool.W001",
        )
    ]


def test_conn_max_age_none_warns_that_threads_never_give_back(pooled_alias) -> None:
    pooled_alias("pooled", CONN_MAX_AGE=None, POOL_OPTIONS={"pool_size": 2, "max_overflow": 1})
    assert pool_checks.check_conn_max_age() == [
        checks.Warning(
            "DATABASES['pooled']['CONN_MAX_AGE'] is None: each thread keeps its pooled "
            "connection for ever, so no more than pool_size + max_overflow = 3 threads can ever "
            "use alias 'pooled'; the others wait and time out.",
            hint=AGE_HINT,
            id="postgrespool.W002",
        )
    ]


def test_positive_conn_max_age_warns_that_connections_are_not_shared(pooled_alias) -> None:
    pooled_alias("pooled", CONN_MAX_AGE=60)
    assert pool_checks.check_conn_max_age() == [
        checks.Warning(
            "DATABASES['pooled']['CONN_MAX_AGE'] is 60: each thread keeps its pooled connection "
            "for up to 60 seconds between requests, and no other thread can borrow it meanwhile; "
            "with more threads than pool_size + max_overflow = 15, requests wait and time out.",
            hint=AGE_HINT,
            id="postgrespool.W003",
        )
    ]


def test_conn_max_age_zero_is_silent(pooled_alias) -> None:
    pooled_alias("pooled", CONN_MAX_AGE=0)
    assert pool_checks.check_conn_max_age() == []


PGB_HINT = (
    "Map each alias that connects through PgBouncer to its pool_mode, e.g. "
    "POSTGRESPOOL_PGBOUNCER = {'default': 'transaction'}; None means no PgBouncer. "
    f"See {DOCS_URL}guide/pgbouncer.html"
)


def test_declared_transaction_mode_pgbouncer_requires_disabled_server_side_cursors(pooled_alias) -> None:
    pooled_alias("pooled")
    with override_settings(POSTGRESPOOL_PGBOUNCER={"pooled": "transaction"}):
        assert pool_checks.check_declared_pgbouncer() == [
            checks.Error(
                "Alias 'pooled' connects through PgBouncer in transaction mode "
                "(POSTGRESPOOL_PGBOUNCER) but DATABASES['pooled']['DISABLE_SERVER_SIDE_CURSORS'] "
                "is not True: QuerySet.iterator() would fail with 'cursor does not exist'.",
                hint="Set DATABASES['pooled']['DISABLE_SERVER_SIDE_CURSORS'] = True. "
                f"See {DOCS_URL}guide/pgbouncer.html",
                id="postgrespool.E003",
            )
        ]
    with override_settings(POSTGRESPOOL_PGBOUNCER={"pooled": "session"}):
        assert pool_checks.check_declared_pgbouncer() == []


def test_declared_pgbouncer_with_disabled_server_side_cursors_passes(pooled_alias) -> None:
    pooled_alias("pooled", DISABLE_SERVER_SIDE_CURSORS=True)
    with override_settings(POSTGRESPOOL_PGBOUNCER={"pooled": "transaction"}):
        assert pool_checks.check_declared_pgbouncer() == []


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (["default"], "POSTGRESPOOL_PGBOUNCER must be a dict of alias: pool_mode; got list."),
        ({"nope": "transaction"}, "POSTGRESPOOL_PGBOUNCER names alias 'nope', which is not in DATABASES."),
        ({"default": "txn"}, "POSTGRESPOOL_PGBOUNCER['default'] must be one of 'session', 'transaction', 'statement' or None; got 'txn'."),
    ],
)
def test_bad_pgbouncer_setting_lists_the_valid_values(value, message) -> None:
    with override_settings(POSTGRESPOOL_PGBOUNCER=value):
        assert pool_checks.check_declared_pgbouncer() == [
            checks.Error(message, hint=PGB_HINT, id="postgrespool.E004")
        ]


@pytest.fixture
def tcp_proxy() -> Iterator[int]:
    """A real TCP forwarder on another loopback port, in front of the suite's server."""
    target = ("127.0.0.1", int(connections.settings["default"]["PORT"]))
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    stopping = threading.Event()

    pump = pipe

    def accept() -> None:
        while not stopping.is_set():
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(target)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=pump, args=(a, b), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    stopping.set()
    listener.close()


def test_proxy_with_another_port_is_detected_when_checks_run_for_the_database(
    pooled_alias, tcp_proxy
) -> None:
    pooled_alias("pooled", PORT=str(tcp_proxy))
    assert pool_checks.check_proxy_in_between(databases=None) == []
    assert pool_checks.check_proxy_in_between(databases=["default", "pooled"]) == [
        checks.Warning(
            f"Alias 'pooled' connects to port {tcp_proxy} but the server listens on port "
            f"{connections.settings['default']['PORT']}: a proxy sits in between. If it is "
            f"PgBouncer in transaction mode, QuerySet.iterator() will fail with 'cursor does "
            f"not exist'.",
            hint=(
                "Behind PgBouncer in transaction mode set DATABASES['pooled']"
                "['DISABLE_SERVER_SIDE_CURSORS'] = True; otherwise declare the proxy with "
                "POSTGRESPOOL_PGBOUNCER = {'pooled': 'session'} (or None). "
                f"See {DOCS_URL}guide/pgbouncer.html"
            ),
            id="postgrespool.W004",
        )
    ]
    with override_settings(POSTGRESPOOL_PGBOUNCER={"pooled": None}):
        assert pool_checks.check_proxy_in_between(databases=["pooled"]) == []


def test_proxy_check_is_silent_with_server_side_cursors_disabled(pooled_alias, tcp_proxy) -> None:
    pooled_alias("pooled", PORT=str(tcp_proxy), DISABLE_SERVER_SIDE_CURSORS=True)
    assert pool_checks.check_proxy_in_between(databases=["pooled"]) == []


def test_real_pgbouncer_in_transaction_mode_is_detected_as_a_proxy(pooled_alias, cluster) -> None:
    from tests.support.pgbouncer import PgBouncer

    with PgBouncer(cluster, pool_mode="transaction", pool_size=2) as bouncer:
        pooled_alias("pooled", PORT=str(bouncer.port))
        [warning] = pool_checks.check_proxy_in_between(databases=["pooled"])
        assert warning.id == "postgrespool.W004"
        assert warning.msg.startswith(
            f"Alias 'pooled' connects to port {bouncer.port} but the server listens on port "
            f"{cluster.port}: a proxy sits in between."
        )
        with override_settings(POSTGRESPOOL_PGBOUNCER={"pooled": "transaction"}):
            assert ids(pool_checks.check_declared_pgbouncer()) == ["postgrespool.E003"]
            assert pool_checks.check_proxy_in_between(databases=["pooled"]) == []
        for conn in connections.all(initialized_only=True):
            conn.close()
        from django_postgrespool import close_pools

        close_pools()
