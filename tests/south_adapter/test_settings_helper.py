"""django_postgrespool_south.south_database_adapters: SOUTH_DATABASE_ADAPTERS for pooled aliases."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

from django_postgrespool_south import (
    POOLED_ENGINES,
    SOUTH_POSTGRESQL_ADAPTER,
    south_database_adapters,
)


def test_pooled_alias_gets_south_postgresql_adapter():
    adapters = south_database_adapters({"default": {"ENGINE": "django_postgrespool"}})
    assert adapters == {"default": "south.db.postgresql_psycopg2"}


def test_pooled_postgis_alias_gets_the_adapter_south_gives_postgis():
    # South 1.0.2 maps 'django.contrib.gis.db.backends.postgis' onto postgresql_psycopg2.
    adapters = south_database_adapters({"gis": {"ENGINE": "django_postgrespool.postgis"}})
    assert adapters == {"gis": SOUTH_POSTGRESQL_ADAPTER}


def test_other_engines_are_left_to_south():
    databases = {
        "default": {"ENGINE": "django_postgrespool"},
        "plain": {"ENGINE": "django.db.backends.postgresql_psycopg2"},
        "lite": {"ENGINE": "django.db.backends.sqlite3"},
        "empty": {},
    }
    assert south_database_adapters(databases) == {"default": SOUTH_POSTGRESQL_ADAPTER}


def test_explicit_user_entries_win_and_are_kept():
    databases = {
        "default": {"ENGINE": "django_postgrespool"},
        "reports": {"ENGINE": "django_postgrespool"},
        "legacy": {"ENGINE": "custom.engine"},
    }
    mine = {"reports": "myproject.south_adapter", "legacy": "south.db.mysql"}
    assert south_database_adapters(databases, mine) == {
        "default": SOUTH_POSTGRESQL_ADAPTER,
        "reports": "myproject.south_adapter",
        "legacy": "south.db.mysql",
    }
    assert mine == {"reports": "myproject.south_adapter", "legacy": "south.db.mysql"}


def test_no_pooled_alias_gives_an_empty_mapping():
    assert south_database_adapters({"default": {"ENGINE": "django.db.backends.sqlite3"}}) == {}


def test_engines_match_the_backends_check_list():
    from django_postgrespool.checks import POOLED_ENGINES as backend_engines

    assert set(POOLED_ENGINES) == set(backend_engines)


def test_importable_without_south_or_django():
    assert importlib.util.find_spec("south") is None  # not installed in the modern lanes
    code = (
        "import sys\n"
        "sys.modules['django'] = None  # importing Django would now fail\n"
        "import django_postgrespool_south as s\n"
        "assert 'south' not in sys.modules\n"
        "print(s.south_database_adapters({'default': {'ENGINE': 'django_postgrespool'}}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "{'default': 'south.db.postgresql_psycopg2'}"
