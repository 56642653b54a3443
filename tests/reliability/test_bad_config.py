"""Bad pool settings and database URLs: a clear error naming the key, never the password."""

from __future__ import annotations

import logging
from urllib.parse import quote

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.db import OperationalError, connections
from django.test import override_settings
from django_postgrespool import pool_stats, registry

from tests.reliability.figures import record
from tests.support.pgcluster import PASSWORD

pytestmark = pytest.mark.reliability

Q = quote(PASSWORD, safe="")
NAN, INF = float("nan"), float("inf")
VALID = "fair_after, leak_timeout, lease, max_idle, max_overflow, pool_size, pre_ping, recycle, reset, timeout, use_lifo"
MUST = {
    "pool_size": "an integer >= 1",
    "max_overflow": "an integer >= 0",
    "recycle": "a number of seconds > 0, or None (never recycle)",
    "timeout": "a number of seconds > 0",
    "pre_ping": "one of True, False or 'socket'",
    "use_lifo": "a boolean (True/False, 'true'/'false', 1/0)",
    "reset": "one of 'rollback' or 'discard'",
}
BAD_VALUES = [
    ("pool_size", -1),
    ("pool_size", 0),
    ("pool_size", "abc"),
    ("pool_size", 1.5),
    ("pool_size", True),
    ("pool_size", None),
    ("pool_size", ""),
    ("pool_size", [5]),
    ("pool_size", "5.0"),
    ("max_overflow", -1),
    ("max_overflow", "x"),
    ("max_overflow", 2.5),
    ("max_overflow", False),
    ("max_overflow", None),
    ("max_overflow", "-3"),
    ("recycle", 0),
    ("recycle", -5),
    ("recycle", "soon"),
    ("recycle", NAN),
    ("recycle", INF),
    ("recycle", True),
    ("recycle", "0"),
    ("timeout", 0),
    ("timeout", -1),
    ("timeout", "never"),
    ("timeout", NAN),
    ("timeout", INF),
    ("timeout", None),
    ("timeout", False),
    ("timeout", "30s"),
    ("pre_ping", "sometimes"),
    ("pre_ping", 2),
    ("pre_ping", None),
    ("pre_ping", "sockets"),
    ("pre_ping", 0.5),
    ("use_lifo", "maybe"),
    ("use_lifo", 2),
    ("use_lifo", None),
    ("use_lifo", -1),
    ("reset", "all"),
    ("reset", None),
    ("reset", True),
    ("reset", "DISCARD ALL"),
    ("reset", 1),
]
UNKNOWN_KEYS = [
    ("poolsize", " (did you mean 'pool_size'?)"),
    ("max_overflows", " (did you mean 'max_overflow'?)"),
    ("timout", " (did you mean 'timeout'?)"),
    ("prepping", " (did you mean 'pre_ping'?)"),
    ("sslmode_x", ""),
    ("password", ""),
]


def _pool_cases():
    for key, value in BAD_VALUES:
        yield pytest.param(
            {key: value},
            f"DATABASES['bad']['POOL_OPTIONS']: pool option {key!r} must be {MUST[key]}; got {value!r}.",
            id=f"{key}={value!r}",
        )
    for key, hint in UNKNOWN_KEYS:
        yield pytest.param(
            {key: 1},
            f"DATABASES['bad']['POOL_OPTIONS']: unknown pool option {key!r}{hint}. Valid options: {VALID}.",
            id=f"unknown-{key}",
        )
    for value, kind in (([("pool_size", 1)], "list"), ("pool_size=5", "str")):
        yield pytest.param(
            value,
            f"DATABASES['bad']['POOL_OPTIONS'] must be a dict of pool options, got {kind}. Valid options: {VALID}.",
            id=f"not-a-dict-{kind}",
        )


POOL_CASES = list(_pool_cases())


@pytest.fixture
def leak_watch(caplog):
    """Assert, after the test, that nothing logged, counted or shown holds the password."""
    caplog.set_level(logging.DEBUG)
    yield caplog
    shown = [caplog.text, repr(pool_stats()), *(repr(p) for p in registry._pools.values())]
    shown += [repr(connections[a]) for a in connections.settings if a != "default"]
    for text in shown:
        assert PASSWORD not in text and Q not in text


def _raise_from_backend(alias: str) -> BaseException:
    with pytest.raises(ImproperlyConfigured) as raised:
        connections[alias].ensure_connection()
    return raised.value


def _assert_clean(error: BaseException) -> None:
    for text in (str(error), repr(error), str(error.__cause__), str(error.__context__)):
        assert PASSWORD not in text and Q not in text


@pytest.mark.parametrize(("pool_options", "message"), POOL_CASES)
def test_bad_pool_option_names_the_key_and_not_the_password(
    pooled_alias, leak_watch, pool_options, message
):
    alias, _ = pooled_alias("bad", pool_options=pool_options)
    error = _raise_from_backend(alias)
    assert str(error) == message
    _assert_clean(error)
    assert pool_stats(alias) == []  # nothing was built


def test_bad_pool_option_in_options_names_its_place(pooled_alias, leak_watch):
    alias, _ = pooled_alias("bad", options={"pool_size": "many"})
    error = _raise_from_backend(alias)
    assert str(error) == (
        "DATABASES['bad']['OPTIONS']: pool option 'pool_size' must be an integer >= 1; got 'many'."
    )
    _assert_clean(error)


def test_bad_database_pool_args_names_the_setting(pooled_alias, leak_watch):
    alias, _ = pooled_alias("bad")
    with override_settings(DATABASE_POOL_ARGS={"max_overflow": -2}):
        error = _raise_from_backend(alias)
    assert str(error) == (
        "DATABASE_POOL_ARGS: pool option 'max_overflow' must be an integer >= 0; got -2."
    )
    _assert_clean(error)


def test_djangos_own_pool_option_is_refused_with_the_fix(pooled_alias, leak_watch):
    alias, _ = pooled_alias("bad", options={"pool": True})
    error = _raise_from_backend(alias)
    assert str(error) == (
        "DATABASES['bad']['OPTIONS']['pool'] turns on Django's own connection pool, which "
        "cannot be combined with ENGINE 'django_postgrespool'. Remove it and put the pool's "
        "settings in DATABASES['bad']['POOL_OPTIONS']."
    )


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"PASSWORD": "wrong-" + PASSWORD}, 'password authentication failed for user "postgres"'),
        ({"USER": "nobody"}, 'password authentication failed for user "nobody"'),
        ({"NAME": "no_such_db"}, 'database "no_such_db" does not exist'),
    ],
    ids=["wrong-password", "unknown-user", "unknown-database"],
)
def test_bad_credentials_fail_clearly_without_the_password(
    pooled_alias, leak_watch, overrides, needle
):
    alias, _ = pooled_alias("bad", **overrides)
    with pytest.raises(OperationalError) as raised:
        connections[alias].ensure_connection()
    assert needle in str(raised.value)
    _assert_clean(raised.value)
    (stats,) = pool_stats(alias)
    assert (stats["checked_out"], stats["size"]) == (0, 0)


URL = f"postgres://u:{Q}@h:5432/db"
SHOWN = "postgres://u:********@h:5432/db"
URL_CASES = [
    (
        f"{URL}?pool_size=-1",
        f"database URL '{SHOWN}?pool_size=-1': pool option 'pool_size' must be an integer >= 1; got '-1'.",
    ),
    (
        f"{URL}?max_overflow=lots",
        f"database URL '{SHOWN}?max_overflow=lots': pool option 'max_overflow' must be an integer >= 0; got 'lots'.",
    ),
    (
        f"{URL}?timeout=abc&sslmode=require",
        f"database URL '{SHOWN}?timeout=abc&sslmode=require': pool option 'timeout' must be a number of seconds > 0; got 'abc'.",
    ),
    (
        f"{URL}?recycle=0",
        f"database URL '{SHOWN}?recycle=0': pool option 'recycle' must be a number of seconds > 0, or None (never recycle); got 0.",
    ),
    (
        f"{URL}?pre_ping=maybe",
        f"database URL '{SHOWN}?pre_ping=maybe': pool option 'pre_ping' must be one of True, False or 'socket'; got 'maybe'.",
    ),
    (
        f"{URL}?use_lifo=2",
        f"database URL '{SHOWN}?use_lifo=2': pool option 'use_lifo' must be a boolean (True/False, 'true'/'false', 1/0); got 2.",
    ),
    (
        f"{URL}?reset=all",
        f"database URL '{SHOWN}?reset=all': pool option 'reset' must be one of 'rollback' or 'discard'; got 'all'.",
    ),
    (
        f"{URL}?pool_sise=3",
        f"database URL '{SHOWN}?pool_sise=3': unknown pool option 'pool_sise' (did you mean 'pool_size'?). Valid options: {VALID}.",
    ),
    (
        f"{URL}?pool_size=1&pool_size=2",
        f"database URL '{SHOWN}?pool_size=1&pool_size=2': pool option 'pool_size' must be an integer >= 1; got [1, 2].",
    ),
    (
        f"postgres://u:{Q}@h/db?password={Q}&pool_size=x",
        "database URL 'postgres://u:********@h/db?password=********&pool_size=x': pool option 'pool_size' must be an integer >= 1; got 'x'.",
    ),
    (
        f"mysql://u:{Q}@h/db",
        "database URL 'mysql://u:********@h/db': scheme 'mysql://' is not PostgreSQL; django-postgrespool pools PostgreSQL only. Valid schemes: pgsql, postgis, postgres, postgrespool, postgrespool+postgis, postgresql.",
    ),
    (f"u:{Q}@h/db", None),
    (
        f"postgres://u:{Q}@h:port/db",
        "database URL 'postgres://u:********@h:port/db' is not a valid URL: check that the port is a number, an IPv6 host is in [brackets], and any of : / @ ? # % in the user name or password is percent-encoded (urllib.parse.quote(password, safe='')).",
    ),
    (
        f"postgres://u:{Q}@h:99999/db",
        "database URL 'postgres://u:********@h:99999/db' is not a valid URL: check that the port is a number, an IPv6 host is in [brackets], and any of : / @ ? # % in the user name or password is percent-encoded (urllib.parse.quote(password, safe='')).",
    ),
    (
        f"postgres://u:{Q}@[::1/db",
        "database URL 'postgres://u:********@[::1/db' is not a valid URL: check that the port is a number, an IPv6 host is in [brackets], and any of : / @ ? # % in the user name or password is percent-encoded (urllib.parse.quote(password, safe='')).",
    ),
    (
        f"postgres://u:{Q}@h,/db",
        "database URL 'postgres://u:********@h,/db': host '' of the host list is not HOST or HOST:PORT.",
    ),
    (
        "",
        "The database URL is empty: expected a URL such as postgres://USER:PASSWORD@HOST:5432/NAME.",
    ),
    (12, "The database URL must be a str, got int."),
]


@pytest.mark.parametrize(
    ("url", "message"), URL_CASES, ids=[f"url{i}" for i in range(len(URL_CASES))]
)
def test_bad_database_url_names_the_problem_and_masks_the_password(url, message, leak_watch):
    dburl = pytest.importorskip("django_postgrespool_dburl")
    with pytest.raises((ImproperlyConfigured, ValueError)) as raised:
        dburl.parse(url)
    if message is not None:
        assert str(raised.value) == message
    _assert_clean(raised.value)


def test_bad_database_url_from_the_environment_masks_the_password(monkeypatch, leak_watch):
    dburl = pytest.importorskip("django_postgrespool_dburl")
    monkeypatch.setenv("DATABASE_URL", f"{URL}?pool_size=zero")
    with pytest.raises(ImproperlyConfigured) as raised:
        dburl.config()
    assert "pool option 'pool_size' must be an integer >= 1; got 'zero'." in str(raised.value)
    _assert_clean(raised.value)


def test_the_table_has_at_least_50_rows():
    rows = len(POOL_CASES) + 3 + 3 + len(URL_CASES) + 1
    record("bad configuration", "table rows", rows)
    record("bad configuration", "pool-setting rows", len(POOL_CASES) + 3)
    record("bad configuration", "URL rows", len(URL_CASES) + 1)
    assert rows >= 50
