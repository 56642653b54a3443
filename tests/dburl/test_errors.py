"""Bad database URLs fail at settings load with a clear message that never shows the password."""

from __future__ import annotations

import logging

import pytest
from django.core.exceptions import ImproperlyConfigured

import django_postgrespool_dburl as dburl

SECRET = "s3cret-Pw"
SCHEMES = "pgsql, postgis, postgres, postgrespool, postgrespool+postgis, postgresql"
NOT_A_URL = (
    " is not a valid URL: check that the port is a number, an IPv6 host is in [brackets], "
    "and any of : / @ ? # % in the user name or password is percent-encoded "
    "(urllib.parse.quote(password, safe=''))."
)
OPTIONS = "Valid options: fair_after, leak_timeout, lease, max_idle, max_overflow, pool_size, pre_ping, recycle, reset, timeout, use_lifo."


def error_of(call, *args, **kwargs) -> str:
    with pytest.raises(ImproperlyConfigured) as info:
        call(*args, **kwargs)
    message = str(info.value)
    assert SECRET not in message
    return message


def test_unset_variable_without_default_names_the_variable_and_the_fix(monkeypatch):
    monkeypatch.delenv("DATABASE_URL", raising=False)
    assert error_of(dburl.config) == (
        "DATABASE_URL is not set and config() was given no default: set DATABASE_URL to a URL "
        "such as postgres://USER:PASSWORD@HOST:5432/NAME, or pass default=."
    )


def test_empty_variable_without_default_says_it_is_empty(monkeypatch):
    monkeypatch.setenv("PRIMARY_URL", "")
    assert error_of(dburl.config, "PRIMARY_URL") == (
        "PRIMARY_URL is set but empty and config() was given no default: set PRIMARY_URL to a "
        "URL such as postgres://USER:PASSWORD@HOST:5432/NAME, or pass default=."
    )


def test_empty_url_to_parse_is_an_error():
    assert error_of(dburl.parse, "  ") == (
        "The database URL is empty: expected a URL such as postgres://USER:PASSWORD@HOST:5432/NAME."
    )


def test_url_that_is_not_a_string_is_an_error():
    assert error_of(dburl.parse, None) == "The database URL must be a str, got NoneType."


def test_non_postgres_scheme_lists_the_valid_schemes_and_masks_the_password(monkeypatch):
    monkeypatch.setenv("DATABASE_URL", f"mysql://app:{SECRET}@db/shop")
    assert error_of(dburl.config) == (
        "DATABASE_URL 'mysql://app:********@db/shop': scheme 'mysql://' is not PostgreSQL; "
        f"django-postgrespool pools PostgreSQL only. Valid schemes: {SCHEMES}."
    )


def test_url_without_scheme_says_so():
    assert error_of(dburl.parse, f"app:{SECRET}@db/shop") == (
        "database URL 'app:********@db/shop': has no scheme; "
        f"django-postgrespool pools PostgreSQL only. Valid schemes: {SCHEMES}."
    )


def test_the_error_is_also_a_value_error_like_dj_database_urls_own():
    with pytest.raises(ValueError):
        dburl.parse("mysql://u:p@h/db")


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (f"postgres://app:{SECRET}@db:port/shop", "postgres://app:********@db:port/shop"),
        (f"postgres://app:{SECRET}@[::1/shop", "postgres://app:********@[::1/shop"),
        # An unquoted "/" in the password: urllib reads the rest as a port.
        (f"postgres://app:pa/{SECRET}@db/shop", "postgres://app:********@db/shop"),
        (f"postgres://app:{SECRET}@db:99999/shop", "postgres://app:********@db:99999/shop"),
    ],
)
def test_malformed_url_gets_one_clear_error_that_masks_the_password(url, shown):
    assert error_of(dburl.parse, url) == f"database URL {shown!r}{NOT_A_URL}"


def test_bad_host_in_a_host_list_is_named():
    assert error_of(dburl.parse, f"postgres://u:{SECRET}@h1:5432,h2:x/db") == (
        "database URL 'postgres://u:********@h1:5432,h2:x/db': host 'h2:x' of the host list "
        "is not HOST or HOST:PORT."
    )


def test_bad_pool_value_in_the_url_names_key_choices_and_masked_url(monkeypatch):
    monkeypatch.setenv("DATABASE_URL", f"postgres://app:{SECRET}@db/shop?reset=truncate")
    assert error_of(dburl.config) == (
        "DATABASE_URL 'postgres://app:********@db/shop?reset=truncate': pool option 'reset' "
        "must be one of 'rollback' or 'discard'; got 'truncate'."
    )


def test_pool_size_zero_in_the_url_is_rejected():
    assert error_of(dburl.parse, f"postgres://app:{SECRET}@db/shop?pool_size=0") == (
        "database URL 'postgres://app:********@db/shop?pool_size=0': pool option 'pool_size' "
        "must be an integer >= 1; got 0."
    )


def test_repeated_pool_key_in_the_url_is_rejected():
    assert error_of(dburl.parse, "postgres://u:p@db/shop?pool_size=2&pool_size=3") == (
        "database URL 'postgres://u:********@db/shop?pool_size=2&pool_size=3': pool option "
        "'pool_size' must be an integer >= 1; got [2, 3]."
    )


@pytest.mark.parametrize(
    ("key", "suggestion"),
    [("pool_sise", "pool_size"), ("pool_recycle", "recycle"), ("max_overflw", "max_overflow")],
)
def test_misspelt_pool_key_in_the_url_fails_at_settings_load_with_a_suggestion(key, suggestion):
    assert error_of(dburl.parse, f"postgres://u:{SECRET}@db/shop?{key}=3") == (
        f"database URL 'postgres://u:********@db/shop?{key}=3': unknown pool option {key!r} "
        f"(did you mean {suggestion!r}?). {OPTIONS}"
    )


def test_bad_keyword_pool_option_names_the_keyword_source():
    assert error_of(dburl.parse, f"postgres://u:{SECRET}@db/shop", max_overflow=-1) == (
        "database URL 'postgres://u:********@db/shop' (keyword arguments): pool option "
        "'max_overflow' must be an integer >= 0; got -1."
    )


def test_unknown_keyword_pool_option_lists_the_valid_ones():
    assert error_of(dburl.parse, "postgres://u:p@db/shop", poolsize=3) == (
        "database URL 'postgres://u:********@db/shop' (keyword arguments): unknown pool option "
        f"'poolsize' (did you mean 'pool_size'?). {OPTIONS}"
    )


def test_bad_value_in_the_default_url_names_the_default(monkeypatch):
    monkeypatch.delenv("DATABASE_URL", raising=False)
    assert error_of(dburl.config, default="postgres://u:p@db/shop?timeout=soon") == (
        "config() default 'postgres://u:********@db/shop?timeout=soon': pool option 'timeout' "
        "must be a number of seconds > 0; got 'soon'."
    )


def test_plain_dj_database_url_with_the_postgrespool_scheme_validates_too():
    import dj_database_url

    url = f"postgrespool://app:{SECRET}@db:5433/shop?use_lifo=maybe"
    assert error_of(dj_database_url.parse, url) == (
        "database URL 'postgrespool://app:********@db:5433/shop': pool option 'use_lifo' must be "
        "a boolean (True/False, 'true'/'false', 1/0); got 'maybe'."
    )


def test_a_password_in_the_query_string_is_masked_too():
    assert error_of(dburl.parse, f"postgres://db/shop?user=app&password={SECRET}&pool_size=x") == (
        "database URL 'postgres://db/shop?user=app&password=********&pool_size=x': pool option "
        "'pool_size' must be an integer >= 1; got 'x'."
    )


def test_a_very_long_url_is_shortened_in_the_message_and_still_masked():
    url = f"postgres://app:{SECRET}@db/shop?application_name={'a' * 5000}&pool_size=0"
    message = error_of(dburl.parse, url)
    assert message.startswith("database URL 'postgres://app:********@db/shop?application_name=aaa")
    assert f"... ({len(url)} characters)': pool option 'pool_size'" in message
    assert len(message) < 400


def test_mask_password_hides_only_the_password():
    assert dburl.mask_password(f"postgres://app:{SECRET}@db:5432/shop?sslmode=require") == (
        "postgres://app:********@db:5432/shop?sslmode=require"
    )
    assert dburl.mask_password("postgres://app@db/shop") == "postgres://app@db/shop"
    masked = dburl.mask_password(f"postgres://app:p@{SECRET}@db/shop")
    assert masked == "postgres://app:********@db/shop"


BAD_INPUTS = [
    f"mysql://app:{SECRET}@db/shop",
    f"postgres://app:{SECRET}@db:port/shop",
    f"postgres://app:{SECRET}@[::1/shop",
    f"postgres://app:pa/{SECRET}@db/shop",
    f"postgres://app:pa@{SECRET}@db/shop?pool_size=0",
    f"postgres://app:{SECRET}@h1,h2:x/shop",
    f"postgres://app:{SECRET}@db/shop?recycle=-5",
    f"postgres://app:{SECRET}@db/shop?pool_szie=5",
]


@pytest.mark.parametrize("url", BAD_INPUTS)
def test_no_bad_input_shows_the_password_in_the_error_or_the_log(url, monkeypatch, caplog):
    monkeypatch.setenv("DATABASE_URL", url)
    with caplog.at_level(logging.DEBUG):
        message = error_of(dburl.config)
    assert "********" in message
    assert SECRET not in caplog.text
