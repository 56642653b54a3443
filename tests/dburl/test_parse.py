"""parse() and config() against the real dj-database-url: engine, pool options, OPTIONS."""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

import dj_database_url
import pytest

import django_postgrespool_dburl as dburl
from django_postgrespool import POOL_OPTION_NAMES

URL = "postgres://app:s3cret@db.internal:5433/shop"
PYPROJECT = Path(__file__).resolve().parents[2] / "packages" / "dburl" / "pyproject.toml"


def declared_floor() -> tuple[int, ...]:
    match = re.search(r'"dj-database-url>=([0-9.]+)', PYPROJECT.read_text())
    assert match, "packages/dburl/pyproject.toml declares no dj-database-url floor"
    return tuple(int(p) for p in match.group(1).split("."))


def test_installed_dj_database_url_is_3x_and_not_older_than_the_declared_floor():
    installed = tuple(int(p) for p in importlib.metadata.version("dj-database-url").split(".")[:3])
    assert installed[0] == 3
    assert installed >= declared_floor()


def test_pool_args_keywords_are_exactly_the_backend_pool_options():
    assert sorted(dburl.PoolArgs.__annotations__) == sorted(POOL_OPTION_NAMES)


@pytest.mark.parametrize(
    ("scheme", "engine"),
    [
        ("postgres", "django_postgrespool"),
        ("postgresql", "django_postgrespool"),
        ("pgsql", "django_postgrespool"),
        ("postgrespool", "django_postgrespool"),
        ("postgis", "django_postgrespool.postgis"),
        ("postgrespool+postgis", "django_postgrespool.postgis"),
        ("POSTGRES", "django_postgrespool"),
    ],
)
def test_each_postgresql_scheme_selects_the_pooled_engine(scheme, engine):
    settings = dburl.parse(f"{scheme}://app:s3cret@db.internal:5433/shop")
    assert settings["ENGINE"] == engine
    assert (settings["USER"], settings["PASSWORD"], settings["HOST"], settings["PORT"]) == (
        "app", "s3cret", "db.internal", 5433,
    )
    assert settings["NAME"] == "shop"


def test_pool_keys_of_the_query_string_become_typed_pool_options_and_the_rest_stays_in_options():
    settings = dburl.parse(
        f"{URL}?pool_size=5&max_overflow=10&recycle=300&timeout=2.5&pre_ping=socket"
        "&use_lifo=true&reset=discard&sslmode=require&application_name=shop-web"
    )
    assert settings["POOL_OPTIONS"] == {
        "pool_size": 5,
        "max_overflow": 10,
        "recycle": 300.0,
        "timeout": 2.5,
        "pre_ping": "socket",
        "use_lifo": True,
        "reset": "discard",
    }
    assert settings["OPTIONS"] == {"sslmode": "require", "application_name": "shop-web"}


def test_recycle_none_in_the_url_means_never_recycle():
    assert dburl.parse(f"{URL}?recycle=none")["POOL_OPTIONS"] == {"recycle": None}


def test_keyword_arguments_win_over_the_url():
    settings = dburl.parse(f"{URL}?pool_size=5&recycle=300", pool_size="8", recycle=None)
    assert settings["POOL_OPTIONS"] == {"pool_size": 8, "recycle": None}


def test_keyword_pool_options_are_normalised_like_the_backend_does():
    settings = dburl.parse(URL, pre_ping="TRUE", use_lifo=0, max_overflow="0", timeout=3)
    assert settings["POOL_OPTIONS"] == {
        "pre_ping": True, "use_lifo": False, "max_overflow": 0, "timeout": 3.0,
    }


def test_no_pool_options_means_no_pool_options_key_so_database_pool_args_apply():
    settings = dburl.parse(URL)
    assert "POOL_OPTIONS" not in settings
    assert "OPTIONS" not in settings


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"conn_max_age": 600, "conn_health_checks": True},
        {"conn_max_age": None},
        {"disable_server_side_cursors": True},
        {"ssl_require": True},
        {"test_options": {"NAME": "shop_test"}},
        {"engine": "myproject.db.pooled"},
    ],
)
def test_dj_database_url_keywords_keep_their_meaning(kwargs):
    url = f"{URL}?sslmode=prefer&currentSchema=tenant"
    ours = dict(dburl.parse(url, **kwargs))
    theirs = dict(dj_database_url.parse(url, **kwargs))
    if "engine" not in kwargs:
        assert ours.pop("ENGINE") == "django_postgrespool"
        theirs.pop("ENGINE")
    assert ours == theirs


def test_dj_database_url_keywords_can_be_given_positionally_in_its_order():
    ours = dburl.parse(URL, None, 60, True, True, True, {"NAME": "t"})
    assert (ours["CONN_MAX_AGE"], ours["CONN_HEALTH_CHECKS"]) == (60, True)
    assert ours["DISABLE_SERVER_SIDE_CURSORS"] is True
    assert (ours["OPTIONS"], ours["TEST"]) == ({"sslmode": "require"}, {"NAME": "t"})


def test_current_schema_becomes_a_search_path_as_in_dj_database_url():
    for scheme in ("postgres", "postgrespool"):
        settings = dburl.parse(f"{scheme}://u:p@h/db?currentSchema=tenant&pool_size=2")
        assert settings["OPTIONS"] == {"options": "-c search_path=tenant"}
        assert settings["POOL_OPTIONS"] == {"pool_size": 2}


def test_config_reads_the_environment_variable(monkeypatch):
    monkeypatch.setenv("DATABASE_URL", f"{URL}?pool_size=3")
    assert dburl.config(max_overflow=1)["POOL_OPTIONS"] == {"pool_size": 3, "max_overflow": 1}


def test_config_reads_another_variable_when_env_is_given(monkeypatch):
    monkeypatch.setenv("REPLICA_URL", "postgres://ro:pw@replica/shop")
    monkeypatch.delenv("DATABASE_URL", raising=False)
    assert dburl.config("REPLICA_URL")["HOST"] == "replica"


def test_config_uses_the_default_when_the_variable_is_unset_or_empty(monkeypatch):
    monkeypatch.delenv("DATABASE_URL", raising=False)
    assert dburl.config(default=URL)["HOST"] == "db.internal"
    monkeypatch.setenv("DATABASE_URL", "")
    assert dburl.config(default=URL)["HOST"] == "db.internal"


def test_the_variable_wins_over_the_default(monkeypatch):
    monkeypatch.setenv("DATABASE_URL", "postgres://u:p@from-env/db")
    assert dburl.config(default=URL)["HOST"] == "from-env"


def test_plain_dj_database_url_understands_the_postgrespool_schemes():
    settings = dj_database_url.parse(
        "postgrespool://app:s3cret@db.internal/shop?pool_size=4&pre_ping=true&sslmode=require"
    )
    assert settings["ENGINE"] == "django_postgrespool"
    assert settings["POOL_OPTIONS"] == {"pool_size": 4, "pre_ping": True}  # type: ignore
    assert settings["OPTIONS"] == {"sslmode": "require"}
    gis = dj_database_url.parse("postgrespool+postgis://app:s3cret@db.internal/shop")
    assert gis["ENGINE"] == "django_postgrespool.postgis"


def test_plain_dj_database_url_config_reads_a_postgrespool_url_from_the_environment(monkeypatch):
    monkeypatch.setenv("DATABASE_URL", "postgrespool://app:s3cret@db.internal/shop?recycle=60")
    settings = dj_database_url.config(conn_max_age=0)
    assert settings["ENGINE"] == "django_postgrespool"
    assert settings["POOL_OPTIONS"] == {"recycle": 60.0}  # type: ignore[typeddict-item]


def test_the_registered_schemes_leave_other_schemes_of_dj_database_url_alone():
    assert dj_database_url.parse("postgres://u:p@h/db?pool_size=3")["OPTIONS"] == {"pool_size": 3}
    assert dj_database_url.parse("sqlite://")["NAME"] == ":memory:"


def test_ipv6_host_is_parsed_without_brackets():
    settings = dburl.parse("postgres://u:p@[2001:db8::7]:6432/db")
    assert (settings["HOST"], settings["PORT"]) == ("2001:db8::7", 6432)


def test_unix_socket_directory_as_host_keeps_its_case():
    settings = dburl.parse("postgres://%2FVar%2FRun%2FPostgreSQL/db")
    assert (settings["HOST"], settings["PORT"], settings["USER"]) == ("/Var/Run/PostgreSQL", "", "")
    assert settings["NAME"] == "db"


def test_percent_encoded_user_and_password_are_decoded():
    settings = dburl.parse("postgres://us%40er:p%40ss%3Aw%2Frd%3F%23%25@h/db")
    assert (settings["USER"], settings["PASSWORD"]) == ("us@er", "p@ss:w/rd?#%")


def test_several_hosts_become_libpq_host_and_port_lists():
    settings = dburl.parse("postgres://u:p@a.example:5432,b.example,[::1]:5434/db?pool_size=2")
    assert (settings["HOST"], settings["PORT"]) == ("a.example,b.example,::1", "5432,,5434")
    assert (settings["USER"], settings["PASSWORD"], settings["NAME"]) == ("u", "p", "db")
    assert settings["POOL_OPTIONS"] == {"pool_size": 2}


def test_several_hosts_without_ports_leave_the_port_empty():
    assert dburl.parse("postgres://h1,h2/db")["PORT"] == ""


def test_a_very_long_url_parses_in_full():
    long_name = "x" * 60_000
    settings = dburl.parse(f"{URL}?application_name={long_name}&pool_size=2")
    assert settings["OPTIONS"] == {"application_name": long_name}
    assert settings["POOL_OPTIONS"] == {"pool_size": 2}


def test_surrounding_whitespace_from_an_env_file_is_ignored():
    assert dburl.parse(f"  {URL}\n")["NAME"] == "shop"
