"""Django's own migrations (Django >= 4.2) run through the pooled engine, on each alias."""

from __future__ import annotations

import json

import pytest


def _tables(project, alias: str) -> set[str]:
    rows = project.query(alias, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    return {r[0] for r in rows}


def test_migrate_applies_schema_and_data_migrations_through_the_pooled_engine(project):
    done = project("migrate", "--noinput")
    assert done.returncode == 0, done.stdout + done.stderr
    for name in ("0001_initial", "0002_note_slug", "0003_fill_slugs"):
        assert f"Applying notes.{name}... OK" in done.stdout
    applied = project.query(
        "default", "SELECT name FROM django_migrations WHERE app = 'notes' ORDER BY id"
    )
    assert applied == [("0001_initial",), ("0002_note_slug",), ("0003_fill_slugs",)]
    slugs = project.query("default", "SELECT title, slug FROM notes_note ORDER BY id")
    assert slugs == [
        ("First Note", "first-note"),
        ("Second note", "second-note"),
        ("A third one", "a-third-one"),
    ]
    (run,) = project.query(
        "default", "SELECT alias, engine, pool_checkouts FROM notes_migrationrun"
    )
    alias, engine, checkouts = run
    assert (alias, engine) == ("default", "django_postgrespool.backend")
    assert checkouts >= 1
    assert project.password not in done.stdout + done.stderr


def test_migrate_database_option_migrates_only_the_second_alias(project):
    done = project("migrate", "--database", "second", "--noinput")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "notes_note" in _tables(project, "second")
    assert _tables(project, "default") == set()
    (run,) = project.query("second", "SELECT alias, engine FROM notes_migrationrun")
    assert run == ("second", "django_postgrespool.backend")
    assert project.query("second", "SELECT count(*) FROM notes_note WHERE slug <> ''") == [(3,)]


@pytest.mark.parametrize("alias", ["default", "second"])
def test_session_of_migrate_goes_back_to_the_pool_and_is_borrowed_again(project, alias):
    done = project("migrate_then_borrow", "--database", alias)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    ((migration_pid,),) = project.query(alias, "SELECT backend_pid FROM notes_migrationrun")
    assert report == {"pid": migration_pid, "opened": 1}
