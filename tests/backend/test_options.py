"""Configuration errors: exact messages, raised when the pool is built, never at import."""

from __future__ import annotations

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.db import connections
from django.test import override_settings
from django_postgrespool import PoolOptions, normalize_pool_options, pool_stats
from django_postgrespool.options import resolve_pool_options

from tests.support.requests import backend_pid, run_request

VALID = "Valid options: fair_after, leak_timeout, lease, max_idle, max_overflow, pool_size, pre_ping, recycle, reset, timeout, use_lifo."
SRC = "DATABASES['pooled']['POOL_OPTIONS']"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"pool_size": -1}, f"{SRC}: pool option 'pool_size' must be an integer >= 1; got -1."),
        ({"pool_size": 0}, f"{SRC}: pool option 'pool_size' must be an integer >= 1; got 0."),
        (
            {"pool_size": "five"},
            f"{SRC}: pool option 'pool_size' must be an integer >= 1; got 'five'.",
        ),
        ({"pool_size": 2.5}, f"{SRC}: pool option 'pool_size' must be an integer >= 1; got 2.5."),
        ({"pool_size": True}, f"{SRC}: pool option 'pool_size' must be an integer >= 1; got True."),
        (
            {"max_overflow": -1},
            f"{SRC}: pool option 'max_overflow' must be an integer >= 0; got -1.",
        ),
        ({"timeout": 0}, f"{SRC}: pool option 'timeout' must be a number of seconds > 0; got 0."),
        (
            {"timeout": "soon"},
            f"{SRC}: pool option 'timeout' must be a number of seconds > 0; got 'soon'.",
        ),
        (
            {"timeout": float("inf")},
            f"{SRC}: pool option 'timeout' must be a number of seconds > 0; got inf.",
        ),
        (
            {"recycle": 0},
            f"{SRC}: pool option 'recycle' must be a number of seconds > 0, or None (never recycle); got 0.",
        ),
        (
            {"pre_ping": "sometimes"},
            f"{SRC}: pool option 'pre_ping' must be one of True, False or 'socket'; got 'sometimes'.",
        ),
        (
            {"use_lifo": "maybe"},
            f"{SRC}: pool option 'use_lifo' must be a boolean (True/False, 'true'/'false', 1/0); got 'maybe'.",
        ),
        (
            {"reset": "all"},
            f"{SRC}: pool option 'reset' must be one of 'rollback' or 'discard'; got 'all'.",
        ),
        (
            {"fair_after": -0.01},
            f"{SRC}: pool option 'fair_after' must be a number of seconds >= 0 "
            "(0: first come, first served); got -0.01.",
        ),
        (
            {"fair_after": True},
            f"{SRC}: pool option 'fair_after' must be a number of seconds >= 0 "
            "(0: first come, first served); got True.",
        ),
        (
            {"fair_after": float("nan")},
            f"{SRC}: pool option 'fair_after' must be a number of seconds >= 0 "
            "(0: first come, first served); got nan.",
        ),
        (
            {"timeout": "soon"},
            f"{SRC}: pool option 'timeout' must be a number of seconds > 0; got 'soon'.",
        ),
        (
            {"poolsize": 5},
            f"{SRC}: unknown pool option 'poolsize' (did you mean 'pool_size'?). {VALID}",
        ),
        ({"max_connections": 5}, f"{SRC}: unknown pool option 'max_connections'. {VALID}"),
    ],
)
def test_bad_pool_option_fails_at_first_connection_with_exact_message(
    pooled_alias, options, message
):
    alias, _ = pooled_alias("pooled", pool_options=options)  # registering connects nothing
    with pytest.raises(ImproperlyConfigured) as raised:
        connections[alias].ensure_connection()
    assert str(raised.value) == message
    assert pool_stats(alias) == []


def test_pool_options_that_are_not_a_dict_are_rejected(pooled_alias):
    alias, _ = pooled_alias("pooled", pool_options=[("pool_size", 1)])
    with pytest.raises(ImproperlyConfigured) as raised:
        connections[alias].ensure_connection()
    assert str(raised.value) == f"{SRC} must be a dict of pool options, got list. {VALID}"


def test_bad_global_pool_args_name_the_setting(pooled_alias):
    alias, _ = pooled_alias("pooled")
    with override_settings(DATABASE_POOL_ARGS={"max_overflow": "lots"}):
        with pytest.raises(ImproperlyConfigured) as raised:
            connections[alias].ensure_connection()
    assert str(raised.value) == (
        "DATABASE_POOL_ARGS: pool option 'max_overflow' must be an integer >= 0; got 'lots'."
    )


def test_django_native_pool_option_is_rejected(pooled_alias):
    alias, _ = pooled_alias("pooled", options={"pool": True})
    with pytest.raises(ImproperlyConfigured) as raised:
        connections[alias].ensure_connection()
    assert str(raised.value) == (
        "DATABASES['pooled']['OPTIONS']['pool'] turns on Django's own connection pool, which "
        "cannot be combined with ENGINE 'django_postgrespool'. Remove it and put the pool's "
        "settings in DATABASES['pooled']['POOL_OPTIONS']."
    )


def test_global_args_apply_and_read_when_the_pool_is_built(pooled_alias):
    alias, _ = pooled_alias("pooled")
    with override_settings(DATABASE_POOL_ARGS={"max_overflow": 3, "pool_size": 2, "recycle": 300}):
        backend_pid(alias)
    (stats,) = pool_stats(alias)
    assert (stats["pool_size"], stats["max_overflow"], stats["recycle"]) == (2, 3, 300.0)


def test_per_alias_options_win_over_options_which_win_over_global_args():
    settings_dict = {
        "OPTIONS": {"pool_size": "3", "timeout": "7", "sslmode": "prefer"},
        "POOL_OPTIONS": {"pool_size": 4},
    }
    got = resolve_pool_options(
        "a", settings_dict, {"pool_size": 2, "max_overflow": 1, "timeout": 9}
    )
    assert got == PoolOptions(pool_size=4, max_overflow=1, timeout=7.0)


def test_pool_keys_in_options_are_not_passed_to_the_driver(pooled_alias):
    # libpq would reject them: 'invalid connection option "pool_size"'.
    alias, _ = pooled_alias("pooled", options={"pool_size": "2", "max_overflow": "0"})
    backend_pid(alias)
    (stats,) = pool_stats(alias)
    assert (stats["pool_size"], stats["max_overflow"]) == (2, 0)


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ({"pre_ping": "true"}, {"pre_ping": True}),
        ({"pre_ping": "Socket"}, {"pre_ping": "socket"}),
        ({"pre_ping": 0}, {"pre_ping": False}),
        ({"use_lifo": "yes"}, {"use_lifo": True}),
        ({"recycle": "none"}, {"recycle": None}),
        ({"recycle": -1}, {"recycle": None}),
        ({"recycle": "300"}, {"recycle": 300.0}),
        ({"pool_size": " 7 "}, {"pool_size": 7}),
        ({"reset": "DISCARD"}, {"reset": "discard"}),
        ({"fair_after": "0"}, {"fair_after": 0.0}),
        ({"fair_after": " 0.05 "}, {"fair_after": 0.05}),
    ],
)
def test_spellings_are_normalised_once(given, expected):
    assert normalize_pool_options(given, source="X") == expected


def test_conn_health_checks_turns_on_ping_at_checkout_unless_set():
    assert resolve_pool_options("a", {"CONN_HEALTH_CHECKS": True}, None).pre_ping is True
    explicit = {"CONN_HEALTH_CHECKS": True, "POOL_OPTIONS": {"pre_ping": "socket"}}
    assert resolve_pool_options("a", explicit, None).pre_ping == "socket"


def test_password_is_in_no_repr_and_no_stats(pooled_alias, server_url):
    from tests.support.pgcluster import PASSWORD

    alias, _ = pooled_alias("pooled")
    backend_pid(alias)
    from django_postgrespool import registry

    (pool,) = [p for p in registry._pools.values() if p.alias == alias]
    assert PASSWORD not in repr(pool)
    assert PASSWORD not in repr(pool_stats())
    assert PASSWORD not in str(pool_stats())


def test_changed_database_name_gets_its_own_pool(pooled_alias, server_url, monitor):
    from tests.support.db import connect

    admin = connect(server_url)
    with admin.cursor() as cur:
        cur.execute("DROP DATABASE IF EXISTS postgrespool_renamed")
        cur.execute("CREATE DATABASE postgrespool_renamed")
    try:
        alias, app = pooled_alias("pooled")
        name = lambda c: (c.execute("SELECT current_database()"), c.fetchone()[0])[1]  # noqa: E731
        assert run_request(alias, name) == "postgrespool_tests"
        connections[alias].settings_dict["NAME"] = "postgrespool_renamed"
        assert run_request(alias, name) == "postgrespool_renamed"
        # one live pool per alias: the first one was retired, its connection closed
        assert [s["database"] for s in pool_stats(alias)] == ["postgrespool_renamed"]
        assert monitor.settled_count(app, 1) == 1
        connections[alias].settings_dict["USER"] = "pg_nobody_here"
        with pytest.raises(Exception, match="pg_nobody_here"):
            run_request(alias, name)
    finally:
        from django_postgrespool import close_pools

        close_pools()
        with admin.cursor() as cur:
            cur.execute("DROP DATABASE IF EXISTS postgrespool_renamed")
        admin.close()
