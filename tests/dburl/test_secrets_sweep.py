"""Secrets sweep of the URL helper: passwords with special characters, and the gaps of
test_errors.py (host lists, blank query values, sslpassword, a password inside the host)."""

from __future__ import annotations

import logging
from urllib.parse import quote

import django_postgrespool_dburl as dburl
import pytest
from django.core.exceptions import ImproperlyConfigured

from tests.backend.test_secrets_sweep import role  # noqa: F401  (a fixture: a login role)

SPECIAL = "p@ss:w/rd?#%"
QUOTED = quote(SPECIAL, safe="")
NOT_A_URL = (
    " is not a valid URL: check that the port is a number, an IPv6 host is in [brackets], "
    "and any of : / @ ? # % in the user name or password is percent-encoded "
    "(urllib.parse.quote(password, safe=''))."
)


def error_of(url: str, *secrets: str, **kwargs) -> str:
    """Return the message of the error ``url`` raises; no secret may be in it or its chain."""
    with pytest.raises(ImproperlyConfigured) as info:
        dburl.parse(url, **kwargs)
    error: BaseException | None = info.value
    while error is not None:  # the whole chain: a traceback prints every link
        for secret in secrets:
            assert secret not in str(error), f"{secret!r} in {error!r}"
        error = error.__cause__ or error.__context__
    return str(info.value)


# A percent-encoded password of every special character, in each kind of bad URL: the
# message names the part at fault and shows neither the encoded nor the decoded password.
@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            f"mysql://app:{QUOTED}@db/shop",
            "database URL 'mysql://app:********@db/shop': scheme 'mysql://' is not PostgreSQL; "
            "django-postgrespool pools PostgreSQL only. Valid schemes: pgsql, postgis, "
            "postgres, postgrespool, postgrespool+postgis, postgresql.",
        ),
        (
            f"postgres://app:{QUOTED}@db:5x/shop",
            f"database URL 'postgres://app:********@db:5x/shop'{NOT_A_URL}",
        ),
        (
            f"postgres://app:{QUOTED}@h1:5432,h2:port/shop",
            "database URL 'postgres://app:********@h1:5432,h2:port/shop': host 'h2:port' of the "
            "host list is not HOST or HOST:PORT.",
        ),
        (
            f"postgres://app:{QUOTED}@db/shop?max_idle=0",
            "database URL 'postgres://app:********@db/shop?max_idle=0': pool option 'max_idle' "
            "must be a number of seconds > 0, or None (off); got 0.",
        ),
        (
            f"postgres://app:{QUOTED}@db/shop?lease=always",
            "database URL 'postgres://app:********@db/shop?lease=always': pool option 'lease' "
            "must be one of 'request' or 'transaction'; got 'always'.",
        ),
    ],
    ids=["scheme", "port", "host-list", "max_idle", "lease"],
)
def test_percent_encoded_special_password_is_in_no_message(url, expected, caplog):
    caplog.set_level(logging.DEBUG)
    assert error_of(url, SPECIAL, QUOTED) == expected
    assert SPECIAL not in caplog.text and QUOTED not in caplog.text


@pytest.mark.parametrize(
    ("key", "suggestion"),
    [
        ("leak_timout", "leak_timeout"),
        ("max_idel", "max_idle"),
        ("fairafter", "fair_after"),
        ("leese", "lease"),
        ("recyle", "recycle"),
    ],
)
def test_misspelt_newer_pool_options_in_the_url_get_a_suggestion(key, suggestion):
    # test_errors.py covers pool_size/recycle/max_overflow spellings; these options came later.
    message = error_of(f"postgres://app:{QUOTED}@db/shop?{key}=3", SPECIAL, QUOTED)
    assert message.startswith(
        f"database URL 'postgres://app:********@db/shop?{key}=3': unknown pool option {key!r} "
        f"(did you mean {suggestion!r}?). Valid options: "
    )


@pytest.mark.parametrize("key", ["sslpassword", "PASSWORD", "Password"])
def test_every_spelling_of_a_password_in_the_query_is_masked(key):
    secret = "Qs3cret-in-query"
    message = error_of(f"postgres://app@db/shop?{key}={secret}&pool_size=x", secret)
    assert message == (
        f"database URL 'postgres://app@db/shop?{key}=********&pool_size=x': pool option "
        "'pool_size' must be an integer >= 1; got 'x'."
    )


def test_a_password_that_is_part_of_the_host_name_leaves_the_host_readable():
    # Masking works on the URL's structure, not by replacing the password's text:
    # the host 'db' stays readable although the password is 'db' too.
    assert dburl.mask_password("postgres://app:db@db:5432/db?sslmode=require") == (
        "postgres://app:********@db:5432/db?sslmode=require"
    )
    message = error_of("postgres://app:db@db:99999/db")
    assert message == f"database URL 'postgres://app:********@db:99999/db'{NOT_A_URL}"
    assert message.count("db") == 2  # the host and the database: the password is masked


def test_a_password_in_the_keyword_arguments_source_is_masked():
    # The keyword arguments' errors quote the URL too (masked), and never a keyword's value
    # other than the bad one.
    message = error_of(f"postgres://app:{QUOTED}@db/shop", SPECIAL, QUOTED, lease="sometimes")
    assert message == (
        "database URL 'postgres://app:********@db/shop' (keyword arguments): pool option "
        "'lease' must be one of 'request' or 'transaction'; got 'sometimes'."
    )


def test_a_percent_encoded_special_password_parses_to_the_decoded_one():
    # The counterpart of the messages above: encoding is the documented way, and it works.
    settings = dburl.parse(f"postgres://app:{QUOTED}@h1:5433,h2/shop?pool_size=2")
    assert (settings["PASSWORD"], settings["HOST"], settings["PORT"]) == (
        SPECIAL,
        "h1,h2",
        "5433,",
    )
    assert settings["POOL_OPTIONS"] == {"pool_size": 2}


# -- passwords with unencoded special characters, blank values, host-list ports ----------


def test_unencoded_comma_and_slash_in_password_is_not_quoted_in_the_error():
    secret = "Pp-s3cret!pass"
    # urlsplit ends the authority at the '/', so the host list is 'app:Pp-s3cret!pass,x'.
    message = error_of(f"postgres://app:{secret},x/y@db/shop", secret)
    assert message == f"database URL 'postgres://app:********@db/shop'{NOT_A_URL}"


def test_unencoded_comma_in_password_does_not_become_a_host():
    # 'app:2024,Summer' reads as hosts app:2024 and Summer; the rest is a fragment.
    with pytest.raises(ImproperlyConfigured) as info:
        dburl.parse("postgres://app:2024,Summer#x@db/shop")
    assert "Summer" not in str(info.value)
    assert str(info.value).endswith(NOT_A_URL)


@pytest.mark.parametrize("query", ["pool_size=", "pool_size", "timeout=&sslmode=require"])
def test_a_pool_option_with_a_blank_value_in_the_url_is_refused(query):
    with pytest.raises(ImproperlyConfigured) as info:
        dburl.parse(f"postgres://app:{QUOTED}@db/shop?{query}")
    key = query.split("=")[0].split("&")[0]
    assert f"pool option {key!r} must be" in str(info.value)
    assert "got ''" in str(info.value)


def test_an_out_of_range_port_in_a_host_list_is_refused_like_a_single_hosts():
    message = error_of(f"postgres://app:{QUOTED}@h1:5432,h2:99999/shop", SPECIAL, QUOTED)
    assert message.endswith(
        ": host 'h2:99999' of the host list has port 99999; a port is 1 to 65535."
    )


def test_an_unencoded_question_mark_in_password_does_not_become_a_port():
    # 'app:12' reads as host app, port 12; 'ss@db/shop' as a query key without a value.
    message = error_of("postgres://app:12?ss@db/shop", "12?ss")
    assert message == f"database URL 'postgres://app:********@db/shop'{NOT_A_URL}"


def test_an_at_sign_in_a_query_value_is_no_cut_short_password():
    settings = dburl.parse("postgres://db/shop?application_name=me@corp&pool_size=2")
    assert (settings["HOST"], settings["OPTIONS"]) == ("db", {"application_name": "me@corp"})
    assert settings["POOL_OPTIONS"] == {"pool_size": 2}


def test_a_percent_encoded_special_password_from_a_url_is_on_no_surface(
    database_url,
    configure_alias,
    role,  # noqa: F811  (the fixture imported above)
    caplog,
):
    # End to end: the URL's password, decoded, logs in; then nothing the pool shows holds it.
    from urllib.parse import urlsplit, urlunsplit

    from tests.backend.test_secrets_sweep import SPECIAL as ROLE_PASSWORD
    from tests.backend.test_secrets_sweep import assert_hidden, surfaces

    caplog.set_level(logging.DEBUG)
    parts = urlsplit(database_url)
    netloc = f"{role}:{quote(ROLE_PASSWORD, safe='')}@{parts.hostname}:{parts.port}"
    url = urlunsplit(parts._replace(netloc=netloc, query="pool_size=2&application_name=sweep"))
    alias = configure_alias("sweep_url", dburl.parse(url))
    shown = surfaces(alias)
    assert f"{role}@" in shown["pgpool"]
    assert_hidden(ROLE_PASSWORD, log=caplog.text, **shown)
