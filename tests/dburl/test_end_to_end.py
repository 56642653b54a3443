"""A Django project configured only through the helper pools connections on real PostgreSQL."""

from __future__ import annotations

from urllib.parse import quote

import dj_database_url
import django_postgrespool_dburl as dburl
from django.db import connections
from django.test import override_settings
from django_postgrespool import close_pools, pool_stats

from tests.support.pgcluster import free_port
from tests.support.requests import backend_pid, hammer, run_request
from tests.support.settings import unique_name


def run_threads(alias: str, monitor, app: str, threads: int, requests: int) -> tuple[int, list]:
    """Run ``threads`` × ``requests`` requests at once; return (peak server sessions, errors)."""
    return hammer(
        alias, threads, requests,
        lambda c: c.execute("SELECT pg_sleep(0.02)"),
        lambda: monitor.count(app),
    )


def test_project_configured_by_config_reuses_one_backend_across_requests(
    database_url, configure_alias, monitor, monkeypatch
):
    app = unique_name("dburl")
    monkeypatch.setenv("DATABASE_URL", f"{database_url}?application_name={app}&pool_size=2")
    alias = configure_alias("dburl", dburl.config(max_overflow=1, recycle=300))
    pids = {backend_pid(alias) for _ in range(5)}
    assert len(pids) == 1
    assert monitor.pids(app) == list(pids)
    (stats,) = pool_stats(alias)
    assert (stats["pool_size"], stats["max_overflow"], stats["recycle"]) == (2, 1, 300.0)
    assert "Pp-s3cret!pass" not in repr(stats)


def test_many_threads_never_open_more_than_pool_size_plus_max_overflow_from_the_url(
    database_url, configure_alias, monitor, monkeypatch
):
    app = unique_name("dburl-cap")
    monkeypatch.setenv(
        "DATABASE_URL",
        f"{database_url}?application_name={app}&pool_size=2&max_overflow=1&timeout=60",
    )
    alias = configure_alias("dburl_cap", dburl.config())
    peak, errors = run_threads(alias, monitor, app, threads=12, requests=5)
    assert errors == []
    assert 2 <= peak <= 3
    (stats,) = pool_stats(alias)
    assert stats["peak_checked_out"] == 3
    assert stats["checkouts"] == 60
    assert monitor.count(app) <= 2 + 1


def test_keyword_arguments_beat_the_url_on_the_live_pool(database_url, configure_alias):
    app = unique_name("dburl-kw")
    url = f"{database_url}?application_name={app}&pool_size=1&reset=discard"
    entry = dburl.parse(url, pool_size=3)
    alias = configure_alias("dburl_kw", entry)
    backend_pid(alias)
    (stats,) = pool_stats(alias)
    assert (stats["pool_size"], stats["reset"]) == (3, "discard")


def test_seed_way_dj_database_url_with_engine_and_global_pool_args_pools(
    database_url, configure_alias, monitor
):
    app = unique_name("dburl-seed")
    url = f"{database_url}?application_name={app}"
    entry = dj_database_url.parse(url, engine="django_postgrespool")
    with override_settings(
        DATABASE_POOL_ARGS={"max_overflow": 0, "pool_size": 1, "recycle": 300, "timeout": 60}
    ):
        alias = configure_alias("dburl_seed", entry)
        pids = {backend_pid(alias) for _ in range(3)}
        assert len(pids) == 1
        peak, errors = run_threads(alias, monitor, app, threads=4, requests=3)
        assert errors == []
        assert peak == 1
        (stats,) = pool_stats(alias)
        assert (stats["pool_size"], stats["max_overflow"], stats["recycle"]) == (1, 0, 300.0)
        assert monitor.pids(app) == list(pids)
        close_pools()


def test_plain_dj_database_url_config_with_the_postgrespool_scheme_pools(
    database_url, configure_alias, monitor, monkeypatch
):
    app = unique_name("dburl-scheme")
    url = database_url.replace("postgres://", "postgrespool://", 1)
    monkeypatch.setenv("DATABASE_URL", f"{url}?application_name={app}&pool_size=1&max_overflow=0")
    alias = configure_alias("dburl_scheme", dj_database_url.config())
    assert len({backend_pid(alias) for _ in range(3)}) == 1
    (stats,) = pool_stats(alias)
    assert (stats["pool_size"], stats["max_overflow"]) == (1, 0)
    assert monitor.count(app) == 1


def test_percent_encoded_user_and_password_log_in(database_url, configure_alias, monitor):
    user, password = f"shop@{unique_name('web')}:1", "p@ss:w/rd?#%&= x"
    sql_password = password.replace("%", "%%")  # Monitor.query formats placeholders
    monitor.query(f"CREATE ROLE \"{user}\" LOGIN PASSWORD '{sql_password}'")
    try:
        host_and_db = database_url.split("@", 1)[1]
        url = f"postgres://{quote(user, safe='')}:{quote(password, safe='')}@{host_and_db}"
        alias = configure_alias("dburl_quoted", dburl.parse(url, pool_size=1))
        row = run_request(alias, lambda c: (c.execute("SELECT current_user"), c.fetchone())[1])
        assert row == (user,)
        connections[alias].close()
    finally:
        close_pools()
        monitor.query(f'DROP ROLE "{user}"')


def test_unix_socket_directory_as_host_connects_over_the_socket(
    database_url, configure_alias, monitor
):
    (directory,) = monitor.query("SHOW unix_socket_directories")[0][0].split(",")[:1]
    port = database_url.rsplit(":", 1)[1].split("/")[0]
    credentials = database_url.split("//", 1)[1].split("@", 1)[0]
    url = f"postgres://{credentials}@{quote(directory.strip(), safe='')}:{port}/postgrespool_tests"
    entry = dburl.parse(url, pool_size=1)
    assert entry["HOST"] == directory.strip()
    alias = configure_alias("dburl_socket", entry)
    # inet_client_addr() is NULL for a unix-socket session.
    row = run_request(alias, lambda c: (c.execute("SELECT inet_client_addr()"), c.fetchone())[1])
    assert row == (None,)


def test_several_hosts_fail_over_to_the_one_that_answers(database_url, configure_alias):
    credentials, rest = database_url.split("//", 1)[1].split("@", 1)
    live = rest.split("/", 1)[0]
    url = f"postgres://{credentials}@127.0.0.1:{free_port()},{live}/postgrespool_tests"
    alias = configure_alias("dburl_hosts", dburl.parse(url, pool_size=1))
    first = backend_pid(alias)
    assert backend_pid(alias) == first
