"""postgrespool.W010/W011: South, or a setting only South reads, left in a Django >= 1.7 project."""

from __future__ import annotations

import pytest
from django.conf import settings
from django.core import checks
from django_postgrespool._rules import DOCS_URL
from django_postgrespool.checks import check_south_settings

HINT_END = f"See {DOCS_URL}guide/south.html"


def test_no_south_no_warning():
    assert check_south_settings() == []


def test_south_database_adapters_left_in_settings_warns_w011(monkeypatch):
    monkeypatch.setattr(
        settings,
        "SOUTH_DATABASE_ADAPTERS",
        {"default": "south.db.postgresql_psycopg2"},
        raising=False,
    )
    (warning,) = check_south_settings()
    assert warning.id == "postgrespool.W011"
    assert warning.level == checks.WARNING
    assert warning.msg == (
        "SOUTH_DATABASE_ADAPTERS is set, but only South reads it, and South does not run on "
        "Django >= 1.7: Django's migrations need no adapter setting for ENGINE "
        "'django_postgrespool'."
    )
    assert warning.hint == "Delete SOUTH_DATABASE_ADAPTERS from your settings. " + HINT_END


def test_several_south_settings_are_named_in_one_warning(monkeypatch):
    monkeypatch.setattr(settings, "SOUTH_DATABASE_ADAPTERS", {}, raising=False)
    monkeypatch.setattr(settings, "SOUTH_TESTS_MIGRATE", False, raising=False)
    (warning,) = check_south_settings()
    assert warning.msg.startswith(
        "SOUTH_DATABASE_ADAPTERS, SOUTH_TESTS_MIGRATE are set, but only South reads them,"
    )
    assert warning.hint == (
        "Delete SOUTH_DATABASE_ADAPTERS, SOUTH_TESTS_MIGRATE from your settings. " + HINT_END
    )


def test_south_in_installed_apps_warns_w010(monkeypatch):
    # Set on the settings object directly: the app registry would try to
    # import South, which does not run here (that is the point).
    monkeypatch.setattr(settings, "INSTALLED_APPS", [*settings.INSTALLED_APPS, "south"])
    (warning,) = check_south_settings()
    assert warning.id == "postgrespool.W010"
    assert warning.msg == (
        "INSTALLED_APPS contains 'south': South is the migration tool of Django 1.6 and older "
        "and does not run on Django >= 1.7, whose own migrations run through the pooled backend."
    )
    assert warning.hint == (
        "Remove 'south' from INSTALLED_APPS and convert each app's South migrations to Django "
        "migrations (makemigrations, then migrate --fake-initial on existing databases). "
        + HINT_END
    )


def test_check_is_registered_with_the_backend(monkeypatch):
    monkeypatch.setattr(
        settings, "SOUTH_DATABASE_ADAPTER", "south.db.postgresql_psycopg2", raising=False
    )
    ids = [m.id for m in checks.run_checks(tags=["postgrespool"])]
    assert "postgrespool.W011" in ids


@pytest.mark.parametrize("leftover", ["1", "0"])
def test_manage_check_reports_south_leftover(project, leftover):
    done = project("check", MODERN_SOUTH_LEFTOVER=leftover)
    assert done.returncode == 0, done.stderr
    line = (
        "?: (postgrespool.W011) SOUTH_DATABASE_ADAPTERS is set, but only South reads it, and "
        "South does not run on Django >= 1.7: Django's migrations need no adapter setting for "
        "ENGINE 'django_postgrespool'."
    )
    if leftover == "1":
        assert line in done.stderr, done.stderr
    else:
        assert "postgrespool.W011" not in done.stdout + done.stderr
        assert "System check identified no issues" in done.stdout
