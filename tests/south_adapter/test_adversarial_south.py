"""Adversarial review of the South adapter's modern side (Django >= 4.2 migrations, the package).

Django's own migrations through the pooled engine where they go wrong: a
migration that fails half-way, migrating backwards, ``lease='transaction'``,
a server that refuses; then what the package and its README promise. Each
runs on a copy of tests/south_adapter/project with extra migrations, on fresh
databases of the real server.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from django.conf import settings
from django_postgrespool.checks import check_south_settings

from tests.south_adapter.conftest import PROJECT, two_databases

PACKAGE = Path(__file__).resolve().parents[2] / "packages" / "south_adapter"

# 0004 adds a column, writes a row, then fails: nothing of it may stay.
BROKEN = """
from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [("notes", "0003_fill_slugs")]

    operations = [
        migrations.AddField("note", "body", models.TextField(default="")),
        migrations.RunSQL("INSERT INTO notes_note (title, slug, body) VALUES ('x', 'x', 'x')"),
        migrations.RunSQL("SELECT no_such_column FROM notes_note"),
    ]
"""

# Run in the project (DJANGO_SETTINGS_MODULE set): migrate, then report what
# the session that ran it looks like once given back and lent again.
AFTER_MIGRATE = """
import json, sys
import django
django.setup()
from django.core.management import call_command
from django.db import connections
from django_postgrespool import pool_stats

alias, target = sys.argv[1], sys.argv[2:]
report = {}
try:
    call_command("migrate", "notes", *target, database=alias, interactive=False, verbosity=0)
    report["error"] = None
except Exception as error:
    report["error"] = type(error).__name__
connection = connections[alias]
report["in_atomic_block"] = connection.in_atomic_block
connection.close()
report["held_after_close"] = sum(s["checked_out"] for s in pool_stats(alias=alias))
with connection.cursor() as cursor:
    cursor.execute(
        "SELECT pg_backend_pid(), state, backend_xid IS NULL FROM pg_stat_activity"
        " WHERE pid = pg_backend_pid()"
    )
    pid, state, no_xid = cursor.fetchone()
    cursor.execute("SELECT to_regclass('notes_note') IS NOT NULL")
    if cursor.fetchone()[0]:
        cursor.execute("SELECT count(*) FROM notes_note")
        report["rows"] = cursor.fetchone()[0]
    else:
        report["rows"] = None
connection.close()
stats = [s for s in pool_stats(alias=alias)]
report.update(
    state=state,
    no_xid=no_xid,
    opened=sum(s["opened"] for s in stats),
    held_at_end=sum(s["checked_out"] for s in stats),
)
print(json.dumps(report))
"""


@pytest.fixture
def copied(server_url, tmp_path):
    """A copy of the sample project on two fresh databases; returns its runner."""
    root = tmp_path / "project"
    shutil.copytree(PROJECT, root, ignore=shutil.ignore_patterns("__pycache__"))
    with two_databases(server_url, "adv", root) as run:

        def after_migrate(alias: str, *target: str, **extra: str) -> dict:
            done = run("-c", AFTER_MIGRATE, alias, *target, **extra)
            assert done.returncode == 0, done.stdout + done.stderr
            return json.loads(done.stdout.strip().splitlines()[-1])

        run.root = root  # type: ignore[attr-defined]
        run.after_migrate = after_migrate  # type: ignore[attr-defined]
        yield run


def _columns(project, alias: str) -> list[str]:
    rows = project.query(
        alias,
        "SELECT column_name FROM information_schema.columns WHERE table_name = 'notes_note'"
        " ORDER BY column_name",
    )
    return [r[0] for r in rows]


def _applied(project, alias: str) -> list[str]:
    rows = project.query(
        alias, "SELECT name FROM django_migrations WHERE app = 'notes' ORDER BY id"
    )
    return [r[0] for r in rows]


def _lease_transaction(project) -> None:
    with open(project.root / "modern_project" / "settings.py", "a") as f:
        f.write(
            "\nfor _entry in DATABASES.values():\n"
            "    _entry['POOL_OPTIONS'] = {**_entry['POOL_OPTIONS'], 'lease': 'transaction'}\n"
        )


# -- Django's migrations through the pooled engine, where they go wrong ---------------


@pytest.mark.parametrize("alias", ["default", "second"])
def test_a_migration_failing_half_way_leaves_nothing_and_a_clean_session(copied, alias):
    (copied.root / "notes" / "migrations" / "0004_broken.py").write_text(BROKEN)
    report = copied.after_migrate(alias)
    assert report["error"] == "ProgrammingError", report
    # 0001-0003 applied (each in its own transaction), 0004 rolled back whole.
    assert _applied(copied, alias) == ["0001_initial", "0002_note_slug", "0003_fill_slugs"]
    assert "body" not in _columns(copied, alias)
    assert report["rows"] == 3, report  # 0004's INSERT rolled back
    assert report["in_atomic_block"] is False, report
    # The session that failed went back and was lent again, idle and usable.
    assert (report["held_after_close"], report["held_at_end"]) == (0, 0), report
    assert report["opened"] == 1, report
    assert (report["state"], report["no_xid"]) == ("active", True), report


def test_manage_migrate_failure_shows_the_error_but_not_the_password(copied):
    (copied.root / "notes" / "migrations" / "0004_broken.py").write_text(BROKEN)
    done = copied("manage.py", "migrate", "--traceback", "--noinput")
    assert done.returncode != 0
    assert 'column "no_such_column" does not exist' in done.stderr, done.stderr
    assert copied.password not in done.stdout + done.stderr


def test_migrating_backwards_to_zero_and_forwards_again(copied):
    assert copied.after_migrate("default")["error"] is None
    report = copied.after_migrate("default", "0001")
    assert report["error"] is None, report
    assert _applied(copied, "default") == ["0001_initial"]
    assert _columns(copied, "default") == ["id", "title"]
    report = copied.after_migrate("default", "zero")
    assert (report["error"], report["rows"]) == (None, None), report  # notes_note is gone
    assert _applied(copied, "default") == []
    assert (report["held_after_close"], report["held_at_end"]) == (0, 0), report
    assert copied.after_migrate("default")["rows"] == 3


@pytest.mark.parametrize("alias", ["default", "second"])
def test_migrate_with_transaction_leases(copied, alias):
    _lease_transaction(copied)
    report = copied.after_migrate(alias)
    assert report["error"] is None, report
    assert _applied(copied, alias) == ["0001_initial", "0002_note_slug", "0003_fill_slugs"]
    assert report["rows"] == 3, report
    assert report["held_at_end"] == 0, report


def test_a_failing_migration_with_transaction_leases_rolls_back_whole(copied):
    _lease_transaction(copied)
    (copied.root / "notes" / "migrations" / "0004_broken.py").write_text(BROKEN)
    report = copied.after_migrate("default")
    assert report["error"] == "ProgrammingError", report
    assert "body" not in _columns(copied, "default")
    assert report["rows"] == 3, report
    assert report["held_at_end"] == 0, report


def test_migrate_on_a_refusing_server_names_no_password(copied):
    done = copied("manage.py", "migrate", "--traceback", "--noinput", MODERN_DB_PORT="1")
    assert done.returncode != 0
    assert "OperationalError" in done.stderr, done.stderr
    assert copied.password not in done.stdout + done.stderr


# -- what the package and its README promise ----------------------------------------


def _readme() -> str:
    return " ".join((PACKAGE / "README.rst").read_text().split())


def test_readme_says_the_keyerror_names_the_alias_not_always_default():
    # South 1.0.2 fails with KeyError: 'second' for `migrate --database second`
    # on a pooled alias it has no adapter for (tests/legacy/south_probe.py,
    # scenario plain_default_no_helper); the README said KeyError: 'default'.
    readme = _readme()
    assert "otherwise fails with ``KeyError: 'default'``" not in readme
    assert "fails with a ``KeyError`` naming the alias" in readme


def test_readme_says_the_pooled_postgis_engine_does_not_load_where_south_runs():
    # ENGINE 'django_postgrespool.postgis' on Python 2.7 raises ImproperlyConfigured
    # (south_probe.py pooled_postgis, in the legacy lane); the README offered it to
    # South projects without a word.
    assert "``'django_postgrespool.postgis'``, runs on Python 3 only" in _readme()


def test_package_metadata_and_module_agree_on_the_version_and_engines():
    pyproject = (PACKAGE / "pyproject.toml").read_text()
    assert 'version = {attr = "django_postgrespool_south.__version__"}' in pyproject
    code = textwrap.dedent(
        """
        import django_postgrespool_south as s
        print(s.__version__, sorted(s.POOLED_ENGINES), s.__all__)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split(" ", 1)
    assert re.fullmatch(r"\d+\.\d+\.\d+", out[0]), out
    assert "'django_postgrespool', 'django_postgrespool.postgis'" in out[1]


@pytest.mark.parametrize(
    "name", ["SOUTH_LOGGING_ON", "SOUTH_LOGGING_FILE", "SOUTH_USE_PYC", "SOUTH_AUTO_FREEZE_APP"]
)
def test_w011_names_every_setting_only_south_reads(monkeypatch, name):
    monkeypatch.setattr(settings, name, True, raising=False)
    ids = [m.id for m in check_south_settings()]
    assert ids == ["postgrespool.W011"], ids
