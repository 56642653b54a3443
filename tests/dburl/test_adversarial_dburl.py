"""Adversarial review of the dburl helper: malformed URLs, host lists, the query string.

Each test marked ``xfail(strict=True)`` proves a defect still present.
"""

from __future__ import annotations

import django_postgrespool_dburl as dburl
import pytest
from django.core.exceptions import ImproperlyConfigured

SECRET = "hunter2-Pw"


def error_of(url: str) -> str:
    with pytest.raises(ImproperlyConfigured) as info:
        dburl.parse(url)
    return str(info.value)


# -- the password, never shown -------------------------------------------------


@pytest.mark.parametrize("key", ["pass%77ord", "%70assword", "sslpass%77ord"])
def test_a_percent_encoded_password_key_is_masked_in_errors(key):
    url = f"postgres://app@db:5432/shop?{key}={SECRET}&pool_size=0"
    message = error_of(url)
    assert "pool_size" in message
    assert SECRET not in message, message


@pytest.mark.parametrize(
    "url",
    [
        f"postgres://app:{SECRET}@db/shop?password={SECRET}&pool_size=0",
        f"postgres://app@db/shop?PassWord={SECRET}&pool_size=0",
        f"postgres://app@db/shop?pool_size=0&sslpassword={SECRET}",
        f"postgres://app:{SECRET}@db1:5432,db2:5433/shop?pool_size=0",
        f"postgres://app:{SECRET}@db1,[::1]:5433/shop?pool_sise=1",
        f"mysql://app:{SECRET}@db/shop",
        f"postgres://app:{SECRET}@db:99999/shop",
        f"postgres://app:{SECRET}@db1:0,db2/shop",
        f"postgres://app:{SECRET}@db1,/shop",
    ],
)
def test_errors_never_show_the_password(url):
    message = error_of(url)
    assert SECRET not in message, message
    assert SECRET not in repr(dburl.DatabaseURLError(message))


def test_an_unencoded_question_mark_in_a_password_is_refused():
    # Password "2024?Summer=1": host 'app', port 2024, OPTIONS {'Summer': '1@db...'}.
    url = "postgres://app:2024?Summer=1@db.internal:5432/shop"
    try:
        entry = dburl.parse(url)
    except ImproperlyConfigured as error:
        assert "Summer" not in str(error)
        return
    raise AssertionError(f"accepted, read as {entry['HOST']}:{entry['PORT']} {entry['OPTIONS']}")


# -- the query string ----------------------------------------------------------


def test_all_digit_query_values_keep_their_leading_zeros():
    entry = dburl.parse("postgres://app@db/shop?password=0123&application_name=007")
    assert entry["OPTIONS"]["password"] == "0123"
    assert entry["OPTIONS"]["application_name"] == "007"


def test_pool_options_leave_options_and_libpq_options_stay():
    entry = dburl.parse(
        "postgres://app:pw@db/shop?lease=transaction&pre_ping=socket&reset=discard"
        "&target_session_attrs=read-write&keepalives_idle=5&options=-c%20search_path%3Dx"
    )
    assert entry["POOL_OPTIONS"] == {
        "lease": "transaction",
        "pre_ping": "socket",
        "reset": "discard",
    }
    assert entry["OPTIONS"] == {
        "target_session_attrs": "read-write",
        "keepalives_idle": 5,
        "options": "-c search_path=x",
    }


@pytest.mark.parametrize("query", ["pool_size=", "pool_size=5&pool_size=", "lease=statement"])
def test_a_bad_or_blank_pool_option_is_refused(query):
    assert "pool option" in error_of(f"postgres://app:{SECRET}@db/shop?{query}")


# -- host lists ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("netloc", "host", "port"),
    [
        ("db1,db2", "db1,db2", ""),
        ("db1:5432,db2:5433", "db1,db2", "5432,5433"),
        ("db1,db2:5433", "db1,db2", ",5433"),
        ("[::1]:5432,[fe80::1%25eth0]:5433", "::1,fe80::1%eth0", "5432,5433"),
        ("%2Fvar%2Frun%2Fpostgresql,db2:5433", "/var/run/postgresql,db2", ",5433"),
    ],
)
def test_host_lists_become_libpq_lists(netloc, host, port):
    entry = dburl.parse(f"postgres://app:p%40ss%2Cw%3Ard@{netloc}/shop")
    assert (entry["HOST"], entry["PORT"], entry["PASSWORD"]) == (host, port, "p@ss,w:rd")


def test_a_host_list_port_of_non_ascii_digits_is_refused_as_a_single_host_is():
    error_of("postgres://app@db1:５４３２/shop")  # a single host: refused
    try:
        entry = dburl.parse("postgres://app@db1:５４３２,db2/shop")
    except ImproperlyConfigured:
        return
    raise AssertionError(f"accepted: PORT={entry['PORT']!r}")
