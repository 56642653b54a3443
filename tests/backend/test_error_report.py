"""Django's error report (technical 500 page, emailed report) shows no password from our frames."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import django_postgrespool
import pytest
from django.db import connections
from django.test import RequestFactory, override_settings
from django.views.debug import ExceptionReporter
from django_postgrespool import PoolTimeout

from tests.support.pgcluster import PASSWORD

urlpatterns: list = []
OUR_CODE = str(Path(django_postgrespool.__file__).parent)


def report_of(alias: str, expected: type[BaseException], wrapper=None) -> tuple[str, list[str]]:
    """Return the emailed report (DEBUG off), and our frames of the debug page (DEBUG on)."""
    request = RequestFactory().get("/checkout/")
    try:
        (wrapper or connections[alias]).ensure_connection()
    except expected:
        exc_info = sys.exc_info()
    else:  # pragma: no cover - the test fails below
        pytest.fail("no error raised")
    with override_settings(ROOT_URLCONF=__name__, DEBUG=False):
        emailed = ExceptionReporter(request, *exc_info, is_email=True).get_traceback_html()
    with override_settings(ROOT_URLCONF=__name__, DEBUG=True):
        page = ExceptionReporter(request, *exc_info).get_traceback_html()
    # Django shows every local of every frame on its DEBUG page (its own
    # frames included, by design); ours must hold no secret there either.
    frames = page.split('<code class="fname">')[1:]
    ours = [f for f in frames if f.startswith(OUR_CODE)]
    return emailed, ours


def test_report_of_a_refused_connection_shows_no_password(pooled_alias):
    alias, _ = pooled_alias(HOST="127.0.0.1", PORT="1")
    emailed, ours = report_of(alias, Exception)
    assert "_open_physical_connection" in emailed  # our frames are in the report
    assert "get_new_connection" in emailed and "********************" in emailed  # cleansed
    assert PASSWORD not in emailed
    assert len(ours) >= 5
    assert not [f for f in ours if PASSWORD in f]


def test_report_of_a_pool_timeout_shows_no_password(pooled_alias):
    alias, _ = pooled_alias(pool_options={"pool_size": 1, "max_overflow": 0, "timeout": 0.2})
    holding, release = threading.Event(), threading.Event()

    def hold():
        connections[alias].ensure_connection()
        holding.set()
        release.wait(10)
        connections[alias].close()

    t = threading.Thread(target=hold)
    t.start()
    assert holding.wait(10)
    try:
        emailed, ours = report_of(alias, PoolTimeout)
    finally:
        release.set()
        t.join(10)
    assert "_checkout_slow" in emailed
    assert PASSWORD not in emailed
    assert len(ours) >= 3
    assert not [f for f in ours if PASSWORD in f]


def test_report_of_invalid_pool_options_shows_no_password(pooled_alias):
    # Raised while the pool is built, under the frames that pick the pool by
    # the alias's settings (the password among them).
    from django.core.exceptions import ImproperlyConfigured

    alias, _ = pooled_alias(pool_options={"pool_size": -1})
    emailed, ours = report_of(alias, ImproperlyConfigured)
    assert "pool_size" in emailed
    assert "_current_pool" in emailed
    assert PASSWORD not in emailed
    assert len(ours) >= 3
    assert not [f for f in ours if PASSWORD in f]


def test_report_of_a_password_in_options_shows_it_nowhere(pooled_alias):
    # libpq takes the password from OPTIONS too; the pool's key holds OPTIONS.
    from django.core.exceptions import ImproperlyConfigured

    alias, _ = pooled_alias(
        pool_options={"pool_size": -1}, PASSWORD="", options={"password": PASSWORD}
    )
    emailed, ours = report_of(alias, ImproperlyConfigured)
    assert "_current_pool" in emailed
    assert PASSWORD not in emailed
    assert not [f for f in ours if PASSWORD in f]


@pytest.mark.parametrize("form", ["keywords", "uri"])
def test_a_password_in_a_connection_string_as_name_is_shown_nowhere(pooled_alias, form, caplog):
    # libpq takes a connection string (or URI) where the database name goes.
    # Django's own frames show NAME as it is (its filter hides PASSWORD only):
    # ours, the pool's stats and repr, and its log lines must not.
    from django_postgrespool import pool_stats

    name = (
        f"dbname=nosuchdb password={PASSWORD}"
        if form == "keywords"
        else f"postgresql://app:{PASSWORD}@127.0.0.1:1/nosuchdb"
    )
    alias, _ = pooled_alias(NAME=name, HOST="127.0.0.1", PORT="1")
    emailed, ours = report_of(alias, Exception)
    assert "_open_physical_connection" in emailed
    assert len(ours) >= 5
    assert not [f for f in ours if PASSWORD in f]
    assert caplog.records and PASSWORD not in caplog.text
    (stats,) = pool_stats(alias)
    assert stats["database"] == "(connection string)"
    assert PASSWORD not in repr(stats)
    assert PASSWORD not in repr(connections[alias]._pool)


def test_report_of_django_own_pool_turned_on_shows_no_password(pooled_alias):
    from django.core.exceptions import ImproperlyConfigured

    alias, _ = pooled_alias(options={"pool": True})
    emailed, ours = report_of(alias, ImproperlyConfigured)
    assert "get_connection_params" in emailed
    assert PASSWORD not in emailed
    assert len(ours) >= 3
    assert not [f for f in ours if PASSWORD in f]


def test_report_of_a_failing_connection_created_receiver_shows_no_password(pooled_alias):
    # Sent at every checkout, a connection reused included: the receiver's
    # error is raised through the frames that lend the connection.
    from django.db import connections
    from django.db.backends.signals import connection_created

    class ReceiverFailed(Exception):
        pass

    alias, _ = pooled_alias()
    connections[alias].ensure_connection()
    connections[alias].close()  # idle in the pool, set up: the next checkout reuses it

    def fail(sender, connection, **kwargs):
        if connection.alias == alias:
            raise ReceiverFailed("refused")

    connection_created.connect(fail)
    try:
        emailed, ours = report_of(alias, ReceiverFailed)
    finally:
        connection_created.disconnect(fail)
        connections[alias].close()
    assert "_borrow" in emailed
    assert PASSWORD not in emailed
    assert not [f for f in ours if PASSWORD in f]


def test_report_of_a_refused_connection_outside_the_pool_shows_no_password(pooled_alias):
    # The throwaway wrapper of _nodb_cursor() (CREATE/DROP DATABASE) opens
    # its own connection, through get_new_connection(conn_params).
    from django.db.backends.base.base import NO_DB_ALIAS

    alias, _ = pooled_alias(HOST="127.0.0.1", PORT="1")
    pooled = connections[alias]
    nodb = type(pooled)({**pooled.settings_dict, "NAME": None}, alias=NO_DB_ALIAS)
    emailed, ours = report_of(alias, Exception, wrapper=nodb)
    # Django's own connect() is on this path, its conn_params shown by design.
    assert "get_new_connection" in emailed
    assert len(ours) >= 2
    assert not [f for f in ours if PASSWORD in f]
