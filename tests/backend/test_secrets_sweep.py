"""Secrets sweep of the backend: where a password could surface, with the passwords and the
placements test_error_report.py and test_options.py do not try.

Those tests use the suite's password in PASSWORD. These use a role of its own whose password
holds every URL delimiter, placed in PASSWORD, in OPTIONS or in a libpq service file, and read
every surface the project promises: errors, logs, pool_stats(), repr() of our objects, the
pgpool command, the system checks, the Prometheus exposition, the Debug Toolbar panel, and
our frames in Django's error reports.
"""

from __future__ import annotations

import io
import json
import logging
import pprint
import sys
import uuid
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import quote

import django_postgrespool
import pytest
from django.core import checks
from django.core.exceptions import ImproperlyConfigured
from django.core.management import call_command
from django.db import OperationalError, connections
from django.http import HttpResponse
from django.template.loader import render_to_string
from django.test import RequestFactory, override_settings
from django.utils.html import escape
from django.views.debug import ExceptionReporter
from django_postgrespool import PoolError, pool_stats, prewarm, registry
from django_postgrespool.options import resolve_pool_options

from tests.support.db import url_params
from tests.support.pgcluster import PASSWORD
from tests.support.settings import DATABASE

urlpatterns: list = []  # ROOT_URLCONF of the error reports
OUR_CODE = str(Path(django_postgrespool.__file__).parent)
SPECIAL = "p@ss:w/rd?#%&= 'x"
TEMPLATES = [{"BACKEND": "django.template.backends.django.DjangoTemplates", "APP_DIRS": True}]


def forms(password: str) -> list[str]:
    """The spellings a leak could take: as is, percent-encoded, as repr() and HTML escape it."""
    return [password, quote(password, safe=""), repr(password)[1:-1], escape(password)]


def assert_hidden(password: str, **texts: str) -> None:
    for name, text in texts.items():
        for form in forms(password):
            assert form not in text, f"{form!r} shown in {name}"


def reports(exc_info) -> tuple[str, list[str]]:
    """Return the emailed report (DEBUG off), and our frames of the DEBUG page."""
    request = RequestFactory().get("/sweep/")
    with override_settings(ROOT_URLCONF=__name__, DEBUG=False):
        emailed = ExceptionReporter(request, *exc_info, is_email=True).get_traceback_html()
    with override_settings(ROOT_URLCONF=__name__, DEBUG=True):
        page = ExceptionReporter(request, *exc_info).get_traceback_html()
    frames = page.split('<code class="fname">')[1:]
    return emailed, [f for f in frames if f.startswith(OUR_CODE)]


def raised_by(call) -> tuple[BaseException, tuple]:
    try:
        call()
    except Exception as error:
        return error, sys.exc_info()
    pytest.fail("nothing raised")


@pytest.fixture
def role(monitor):
    """A login role whose password holds : / @ ? # % & = ' and a space."""
    name = f"sweep_{uuid.uuid4().hex[:8]}"
    # Monitor.query passes parameters, so psycopg reads % as a placeholder.
    sql_password = SPECIAL.replace("'", "''").replace("%", "%%")
    monitor.query(f"CREATE ROLE {name} LOGIN PASSWORD '{sql_password}'")
    yield name
    for conn in connections.all(initialized_only=True):
        conn.close()
    django_postgrespool.close_pools()
    monitor.query(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", (name,)
    )
    monitor.query(f"DROP ROLE IF EXISTS {name}")


def surfaces(alias: str) -> dict[str, str]:
    """Every place the project shows a pool, read for ``alias`` (checked out once first)."""
    from django_postgrespool.metrics.prometheus import PoolCollector
    from django_postgrespool.toolbar import PoolPanel
    from prometheus_client import CollectorRegistry, generate_latest

    request = RequestFactory().get("/sweep/")
    toolbar = SimpleNamespace(
        stats={},
        server_timing_stats={},
        request=request,
        request_id="sweep",
        store=SimpleNamespace(save_panel=lambda *args: None),
    )
    panel = PoolPanel(toolbar, lambda r: HttpResponse())
    panel.enable_instrumentation()
    wrapper = connections[alias]
    with wrapper.cursor() as cursor:  # the "request" of the panel
        cursor.execute("SELECT 1")
    lease = wrapper._lease
    panel.generate_stats(request, HttpResponse())
    wrapper.close()
    with override_settings(TEMPLATES=TEMPLATES):
        toolbar_html = render_to_string(panel.template, panel.get_stats())
    prometheus = CollectorRegistry()
    prometheus.register(PoolCollector())
    table, as_json = io.StringIO(), io.StringIO()
    call_command("pgpool", database=[alias], stdout=table)
    call_command("pgpool", database=[alias], json=True, stdout=as_json)
    # A limit of 1 makes E001 quote every pooled alias's server (host:port) and caps.
    with override_settings(POSTGRESPOOL_MAX_CONNECTIONS=1, POSTGRESPOOL_WORKERS=2):
        messages = checks.run_checks(tags=["postgrespool"], databases=[alias])
    (pool,) = [p for p in registry.all_pools() if p.alias == alias and not p.closed]
    return {
        "repr(pool)": repr(pool),
        "repr(lease)": repr(lease),
        "registry": pprint.pformat(registry._pools) + str(list(registry._pools)),
        "pool_stats": repr(pool_stats()),
        "pgpool": table.getvalue(),
        "pgpool --json": as_json.getvalue(),
        "checks": "\n".join(f"{m.msg} {m.hint}" for m in messages),
        "prometheus": generate_latest(prometheus).decode(),
        "toolbar": toolbar_html,
    }


@pytest.mark.parametrize("where", ["PASSWORD", "OPTIONS"])
def test_special_password_is_on_no_surface(pooled_alias, role, caplog, where):
    caplog.set_level(logging.DEBUG)
    if where == "PASSWORD":
        alias, _ = pooled_alias("sweep", USER=role, PASSWORD=SPECIAL)
    else:  # libpq takes it from OPTIONS too (Django passes OPTIONS to the driver)
        alias, _ = pooled_alias("sweep", USER=role, PASSWORD="", options={"password": SPECIAL})
    shown = surfaces(alias)
    # Each surface is about this alias: an empty or unrelated text would prove nothing.
    for name in (
        "repr(pool)",
        "pool_stats",
        "pgpool",
        "pgpool --json",
        "checks",
        "prometheus",
        "toolbar",
    ):
        assert repr(alias) in shown[name] or f'"{alias}"' in shown[name], name
    assert role in shown["pgpool"]  # logged in as the role: its password worked
    assert json.loads(shown["pgpool --json"])[0]["pools"][0]["user"] == role
    assert_hidden(SPECIAL, log=caplog.text, **shown)


def test_password_from_a_libpq_service_file_is_on_no_surface(
    pooled_alias, role, caplog, tmp_path, monkeypatch
):
    caplog.set_level(logging.DEBUG)
    p = url_params(_server_url())
    service = tmp_path / "pg_service.conf"
    service.write_text(
        f"[sweep]\nhost={p['host']}\nport={p['port']}\ndbname={DATABASE}\n"
        f"user={role}\npassword={SPECIAL}\n"
    )
    monkeypatch.setenv("PGSERVICEFILE", str(service))  # libpq reads it at each connect
    alias, _ = pooled_alias(
        "sweep", NAME="", USER="", PASSWORD="", HOST="", PORT="", options={"service": "sweep"}
    )
    shown = surfaces(alias)
    # What the pool keeps: the service's name for what it gives, no conninfo.
    (stats,) = [s for s in django_postgrespool.pool_stats() if s["alias"] == alias]
    given = "(service 'sweep')"
    assert [stats[k] for k in ("database", "host", "port", "user")] == [given] * 4
    assert_hidden(SPECIAL, log=caplog.text, **shown)


def _server_url() -> str:
    from tests.support import settings as test_settings

    return test_settings.SERVER_URL


def test_wrong_special_password_fails_clearly_and_shows_it_nowhere(pooled_alias, role, caplog):
    caplog.set_level(logging.DEBUG)
    wrong = SPECIAL + "-wrong"
    alias, _ = pooled_alias("sweep", USER=role, PASSWORD=wrong)
    error, info = raised_by(connections[alias].ensure_connection)
    assert isinstance(error, OperationalError)
    assert f'password authentication failed for user "{role}"' in str(error)
    # A retry within the backoff window (0.1 s) fails at once, and says why the last one
    # failed; on a slow machine a retry may miss the window and try the server again.
    for _ in range(5):
        again, again_info = raised_by(connections[alias].ensure_connection)
        if isinstance(again, PoolError):
            break
    assert isinstance(again, PoolError)
    emailed, ours = reports(info)
    assert len(ours) >= 5  # our frames are on the page: checkout, _open, _create, ...
    assert f"Cannot connect to database alias {alias!r} at " in str(again)
    assert f'password authentication failed for user "{role}"' in str(again)
    emailed_again, ours_again = reports(again_info)
    (stats,) = pool_stats(alias)
    assert "password authentication failed" in stats["last_connect_error"]
    for password in (wrong, SPECIAL):
        assert_hidden(
            password,
            error=str(error) + repr(error) + str(error.__cause__),
            again=str(again) + repr(again),
            emailed=emailed + emailed_again,
            ours="".join(ours + ours_again),
            stats=repr(stats),
            log=caplog.text,
        )


def test_refused_connection_with_password_in_options_hides_it_in_prewarm_and_reports(
    pooled_alias, caplog
):
    caplog.set_level(logging.DEBUG)
    alias, _ = pooled_alias(
        "sweep", HOST="127.0.0.1", PORT="1", PASSWORD="", options={"password": PASSWORD}
    )
    error, info = raised_by(lambda: prewarm(alias))
    assert isinstance(error, PoolError)
    assert f"database alias {alias!r} at 127.0.0.1:1" in str(error)
    assert "Connection refused" in str(error) or "connection refused" in str(error).lower()
    # Nothing lost: the driver's own error is the cause.
    assert isinstance(error.__cause__, OperationalError)
    emailed, ours = reports(info)
    assert "prewarm" in emailed and len(ours) >= 5
    assert_hidden(
        PASSWORD,
        error=str(error) + repr(error.__cause__),
        emailed=emailed,
        ours="".join(ours),
        stats=repr(pool_stats(alias)),
        log=caplog.text,
    )


def test_a_password_that_is_part_of_the_host_name_leaves_the_host_readable(pooled_alias, monitor):
    # Nothing masks by replacing the password's text: with the password 'local' the host
    # 'localhost' is shown whole, and the password is nowhere else.
    name, password = f"sweep_{uuid.uuid4().hex[:8]}", "local"
    monitor.query(f"CREATE ROLE {name} LOGIN PASSWORD '{password}'")
    try:
        alias, _ = pooled_alias("sweep", USER=name, PASSWORD=password, HOST="localhost")
        shown = surfaces(alias)
        (stats,) = pool_stats(alias)
        assert stats["host"] == "localhost"
        assert "host='localhost'" in shown["repr(pool)"]
        assert f"{name}@localhost:" in shown["pgpool"]
        for where, text in shown.items():
            assert password not in text.replace("localhost", ""), where
    finally:
        django_postgrespool.close_pools()
        monitor.query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", (name,)
        )
        monitor.query(f"DROP ROLE IF EXISTS {name}")


def test_mismatched_multi_host_ports_keep_the_drivers_reason(pooled_alias, caplog):
    caplog.set_level(logging.DEBUG)
    alias, _ = pooled_alias("sweep", HOST="127.0.0.1,127.0.0.1", PORT="1,2,3")
    error, info = raised_by(connections[alias].ensure_connection)
    assert isinstance(error, OperationalError)
    assert str(error).strip() == "could not match 3 port numbers to 2 hosts"  # psycopg2: + "\n"
    assert error.__cause__ is not None  # Django's wrapper keeps the driver's error
    (stats,) = pool_stats(alias)
    assert (
        stats["last_connect_error"] == "OperationalError: could not match 3 port numbers to 2 hosts"
    )
    assert "127.0.0.1,127.0.0.1:1,2,3" in caplog.text  # the log names the hosts and ports
    emailed, ours = reports(info)
    assert_hidden(PASSWORD, emailed=emailed, ours="".join(ours), log=caplog.text)


def test_registry_keys_hide_the_settings_however_they_are_formatted(pooled_alias):
    alias, _ = pooled_alias("sweep", PASSWORD=PASSWORD, options={"password": PASSWORD})
    connections[alias].ensure_connection()
    (key,) = [k for k, p in registry._pools.items() if p.alias == alias]
    settings_key = key[2]
    texts = {
        "repr": repr(key),
        "str": str(settings_key),
        "format": f"{settings_key}|{settings_key!r}|" + f"{settings_key} {settings_key!r}",
        "pformat": pprint.pformat({key: 1}),
        "checkout_info": repr(django_postgrespool.checkout_info(alias)),
    }
    assert texts["str"] == "<settings of a pooled alias>"
    assert_hidden(PASSWORD, **texts)


# -- bad pool options: the gaps of test_options.py and test_bad_config.py -----------------

SRC = "DATABASES['a']['POOL_OPTIONS']"
OFF = "must be a number of seconds > 0, or None (off)"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"lease": "always"},
            f"{SRC}: pool option 'lease' must be one of 'request' or 'transaction'; got 'always'.",
        ),
        (
            {"lease": None},
            f"{SRC}: pool option 'lease' must be one of 'request' or 'transaction'; got None.",
        ),
        (
            {"max_idle": 0},
            f"{SRC}: pool option 'max_idle' {OFF}; got 0.",
        ),
        (
            {"max_idle": True},
            f"{SRC}: pool option 'max_idle' {OFF}; got True.",
        ),
        (
            {"leak_timeout": "soon"},
            f"{SRC}: pool option 'leak_timeout' {OFF}; got 'soon'.",
        ),
        (
            {"leak_timeout": float("nan")},
            f"{SRC}: pool option 'leak_timeout' {OFF}; got nan.",
        ),
    ],
)
def test_bad_values_of_the_newer_options_name_the_setting_and_what_is_valid(options, message):
    with pytest.raises(ImproperlyConfigured) as raised:
        resolve_pool_options("a", {"POOL_OPTIONS": options}, None)
    assert str(raised.value) == message


@pytest.mark.parametrize(
    ("key", "suggestion"),
    [
        ("leak_timout", "leak_timeout"),
        ("maxidle", "max_idle"),
        ("fairafter", "fair_after"),
        ("leases", "lease"),
        ("reset_mode", "reset"),
    ],
)
def test_misspelt_newer_options_get_a_suggestion(key, suggestion):
    with pytest.raises(ImproperlyConfigured) as raised:
        resolve_pool_options("a", {"POOL_OPTIONS": {key: 1}}, None)
    assert str(raised.value).startswith(
        f"{SRC}: unknown pool option {key!r} (did you mean {suggestion!r}?). Valid options: "
    )


def test_database_pool_args_that_are_not_a_dict_name_the_setting():
    with pytest.raises(ImproperlyConfigured) as raised:
        resolve_pool_options("a", {}, [("pool_size", 2)])
    assert str(raised.value).startswith(
        "DATABASE_POOL_ARGS must be a dict of pool options, got list. Valid options: "
    )


@pytest.mark.parametrize(
    ("settings_dict", "global_args", "source"),
    [
        ({"POOL_OPTIONS": {"password": PASSWORD}}, None, SRC),
        ({"POOL_OPTIONS": {"pasword": PASSWORD}}, None, SRC),
        ({}, {"password": PASSWORD}, "DATABASE_POOL_ARGS"),
    ],
    ids=["pool-options", "pool-options-typo", "database-pool-args"],
)
def test_a_password_put_among_the_pool_options_is_refused_without_its_value(
    settings_dict, global_args, source
):
    with pytest.raises(ImproperlyConfigured) as raised:
        resolve_pool_options("a", settings_dict, global_args)
    assert str(raised.value).startswith(f"{source}: unknown pool option ")
    assert_hidden(PASSWORD, message=str(raised.value), context=repr(raised.value.__context__))


def test_check_e005_with_a_password_in_options_names_the_option_not_the_password(pooled_alias):
    alias, _ = pooled_alias(
        "sweep", pool_options={"lease": "always"}, options={"password": PASSWORD}
    )
    errors = [m for m in checks.run_checks(tags=["postgrespool"]) if m.id == "postgrespool.E005"]
    (e005,) = [m for m in errors if f"DATABASES[{alias!r}]" in m.msg]
    assert e005.msg == (
        f"DATABASES[{alias!r}]['POOL_OPTIONS']: pool option 'lease' must be one of 'request' "
        "or 'transaction'; got 'always'."
    )
    assert_hidden(PASSWORD, message=e005.msg, hint=e005.hint)


# -- OPTIONS that is not a dict ------------------------------------------------------------


@pytest.mark.parametrize("options", [None, "sslmode=require"], ids=["None", "str"])
def test_options_that_are_not_a_dict_fail_clearly_without_the_password(pooled_alias, options):
    alias, _ = pooled_alias("sweep", OPTIONS=options)
    error, info = raised_by(connections[alias].ensure_connection)
    emailed, ours = reports(info)
    assert_hidden(PASSWORD, emailed=emailed, ours="".join(ours))
    assert isinstance(error, ImproperlyConfigured)
    assert str(error) == (
        f"DATABASES[{alias!r}]['OPTIONS'] must be a dict of connection options, "
        f"got {type(options).__name__}."
    )


def test_check_e005_names_options_that_are_not_a_dict_without_quoting_them(pooled_alias):
    # A conninfo string given as OPTIONS may hold the password: its type is named, not it.
    alias, _ = pooled_alias("sweep", OPTIONS=f"sslmode=disable password={PASSWORD}")
    errors = [m for m in checks.run_checks(tags=["postgrespool"]) if m.id == "postgrespool.E005"]
    (e005,) = [m for m in errors if f"DATABASES[{alias!r}]" in m.msg]
    assert e005.msg == (
        f"DATABASES[{alias!r}]['OPTIONS'] must be a dict of connection options, got str."
    )
    assert_hidden(PASSWORD, message=e005.msg, hint=e005.hint)


@pytest.mark.parametrize(
    ("overrides", "start"),
    [
        ({"pool_options": {"pool_size": 0}}, "['POOL_OPTIONS']: pool option 'pool_size' must be"),
        ({"OPTIONS": None}, "['OPTIONS'] must be a dict of connection options, got NoneType."),
    ],
    ids=["bad pool option", "OPTIONS None"],
)
def test_check_database_reports_bad_settings_as_e005_not_a_traceback(
    pooled_alias, overrides, start
):
    # `manage.py check --database ALIAS` runs the checks that connect: with settings the
    # pool refuses, they must leave the report to E005 rather than raise from the run.
    alias, _ = pooled_alias("sweep", **overrides)
    messages = checks.run_checks(tags=["postgrespool"], databases=[alias])
    mine = [m for m in messages if f"DATABASES[{alias!r}]" in m.msg]
    assert [(m.id, m.msg.startswith(f"DATABASES[{alias!r}]{start}")) for m in mine] == [
        ("postgrespool.E005", True)
    ]
