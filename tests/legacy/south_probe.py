"""Adversarial review of the South adapter: South 1.0.2 through the pooled engine (JSON).

    python south_probe.py PORT all        # every scenario, each in a process of its own
    python south_probe.py PORT SCENARIO   # one (password in LEGACY_DB_PASSWORD)

Two aliases, ``default`` and ``second`` (two fresh databases, created here
and dropped at the end), both on ENGINE 'django_postgrespool', with
SOUTH_DATABASE_ADAPTERS built by django_postgrespool_south. An app with
hand-written South migrations is written to a temporary folder: a table, a
column, a data migration (and, for one scenario, a migration that fails
half-way). Each scenario reports facts as JSON and the mismatches with what
EXPECTED says; "all" prints one line {"django": ..., "mismatches": {...}},
which tests/legacy/run.py checks on Django 1.6 and 1.4. Real PostgreSQL, no mocks.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile

import psycopg2
from django.conf import settings

PORT, SCENARIO = sys.argv[1:3]
PASSWORD = os.environ["LEGACY_DB_PASSWORD"]
APP = "southprobe"
DATABASE_A, DATABASE_B = "postgrespool_south_a", "postgrespool_south_b"


def plain(sql, database="postgres"):
    """Rows of ``sql``, on a psycopg2 connection of its own (outside the pools)."""
    conn = psycopg2.connect(host="127.0.0.1", port=PORT, user="postgres", password=PASSWORD,
                            dbname=database)
    conn.autocommit = True
    try:
        cursor = conn.cursor()
        cursor.execute(sql)
        return cursor.fetchall() if cursor.description else []
    finally:
        conn.close()


def fresh_databases():
    for name in (DATABASE_A, DATABASE_B, "test_" + DATABASE_A, "test_" + DATABASE_B):
        plain('DROP DATABASE IF EXISTS "%s"' % name)
    for name in (DATABASE_A, DATABASE_B):
        plain('CREATE DATABASE "%s"' % name)


def _entry(name):
    return {
        "ENGINE": "django_postgrespool",
        "NAME": name,
        "USER": "postgres",
        "PASSWORD": PASSWORD,
        "HOST": "127.0.0.1",
        "PORT": PORT,
        "OPTIONS": {"application_name": "legacy-south-probe"},
        "POOL_OPTIONS": {"pool_size": 1, "max_overflow": 0, "timeout": 5},
    }


MIGRATIONS = {
    "0001_initial": """
class Migration(SchemaMigration):
    def forwards(self, orm):
        db.create_table(u'southprobe_item', (
            (u'id', self.gf('django.db.models.fields.AutoField')(primary_key=True)),
            ('name', self.gf('django.db.models.fields.CharField')(max_length=50)),
        ))
        db.send_create_signal(u'southprobe', ['Item'])

    def backwards(self, orm):
        db.delete_table(u'southprobe_item')

    models = {MODELS_V1}
    complete_apps = ['southprobe']
""",
    "0002_item_code": """
class Migration(SchemaMigration):
    def forwards(self, orm):
        db.add_column(u'southprobe_item', 'code',
                      self.gf('django.db.models.fields.CharField')(default='', max_length=50),
                      keep_default=False)
        db.create_index(u'southprobe_item', ['code'])

    def backwards(self, orm):
        db.delete_index(u'southprobe_item', ['code'])
        db.delete_column(u'southprobe_item', 'code')

    models = {MODELS_V2}
    complete_apps = ['southprobe']
""",
    "0003_fill_codes": """
class Migration(DataMigration):
    def forwards(self, orm):
        alias = db.db_alias
        for name in ('alpha', 'beta'):
            orm.Item.objects.using(alias).create(name=name, code=name.upper())

    def backwards(self, orm):
        orm.Item.objects.using(db.db_alias).all().delete()

    models = {MODELS_V2}
    complete_apps = ['southprobe']
""",
}
BROKEN = """
class Migration(SchemaMigration):
    def forwards(self, orm):
        db.create_table(u'southprobe_half', (
            (u'id', self.gf('django.db.models.fields.AutoField')(primary_key=True)),
        ))
        db.execute('INSERT INTO southprobe_item (name, code) VALUES (%s, %s)', ['gamma', 'G'])
        db.execute('SELECT no_such_column FROM southprobe_item')

    def backwards(self, orm):
        pass

    models = {MODELS_V2}
    complete_apps = ['southprobe']
"""
FIELDS_V1 = ("u'id': ('django.db.models.fields.AutoField', [], {'primary_key': 'True'}), "
             "'name': ('django.db.models.fields.CharField', [], {'max_length': '50'})")
FIELDS_V2 = FIELDS_V1 + (", 'code': ('django.db.models.fields.CharField', [], "
                         "{'default': \"''\", 'max_length': '50', 'db_index': 'True'})")
HEADER = ("# -*- coding: utf-8 -*-\nfrom south.db import db\n"
          "from south.v2 import SchemaMigration, DataMigration\n")


def write_app(root, broken=False):
    """The app, its models and South migrations (0004 fails half-way if ``broken``)."""
    app = os.path.join(root, APP)
    os.makedirs(os.path.join(app, "migrations"))
    for path in (os.path.join(app, "__init__.py"), os.path.join(app, "migrations", "__init__.py")):
        open(path, "w").close()
    with open(os.path.join(app, "models.py"), "w") as f:
        f.write("from django.db import models\n\n\nclass Item(models.Model):\n"
                "    name = models.CharField(max_length=50)\n"
                "    code = models.CharField(max_length=50, default='', db_index=True)\n")
    with open(os.path.join(app, "tests.py"), "w") as f:
        f.write(TESTS)
    steps = sorted(MIGRATIONS.items()) + ([("0004_broken", BROKEN)] if broken else [])
    for name, body in steps:
        models = "{u'southprobe.item': {'Meta': {'object_name': 'Item'}, %s}}" % (
            FIELDS_V1 if name == "0001_initial" else FIELDS_V2)
        with open(os.path.join(app, "migrations", name + ".py"), "w") as f:
            f.write(HEADER + body.replace("{MODELS_V1}", models).replace("{MODELS_V2}", models))
    sys.path.insert(0, root)


# Run by Django's test runner (the ``test_runner`` scenario), on the test databases.
TESTS = """
from django.db import connections
from django.test import TestCase

from southprobe.models import Item


class MigratedTestDatabases(TestCase):
    multi_db = True

    def test_each_alias_was_migrated_by_south(self):
        for alias in ('default', 'second'):
            cursor = connections[alias].cursor()
            cursor.execute('SELECT current_database(), count(*) FROM southprobe_item')
            name, rows = cursor.fetchone()
            assert name.startswith('test_'), name
            assert rows == 2, (alias, rows)  # the data migration ran there
            assert type(connections[alias]).__module__ == 'django_postgrespool._legacy'
"""

POSTGIS_ERROR = (
    "ImproperlyConfigured: ENGINE 'django_postgrespool.postgis' needs Python 3 and Django >= "
    "4.2. On Python 2.7 with Django 1.4-1.6 the pooled engine is 'django_postgrespool' "
    "(without PostGIS).")

if SCENARIO == "all":  # each scenario in a process of its own, on fresh databases
    mismatches, version = {}, None
    for name in ("two_aliases", "backwards_and_fake", "failed_migration", "db_dry_run",
                 "test_runner", "plain_default", "plain_default_no_helper", "pooled_postgis"):
        fresh_databases()
        done = subprocess.Popen([sys.executable, os.path.abspath(__file__), PORT, name],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = done.communicate()
        try:
            result = json.loads(out.decode("utf-8").strip().splitlines()[-1])
            version = result["django"]
            if result["mismatches"]:
                mismatches[name] = result
        except (ValueError, IndexError, KeyError):
            last = (err.decode("utf-8").strip().splitlines() or [""])[-1]
            if name == "pooled_postgis" and last == "django.core.exceptions." + POSTGIS_ERROR:
                continue  # Django 1.4 loads the default alias's engine at `import django.db`
            mismatches[name] = {"exit": done.returncode, "stderr": err.decode("utf-8")[-3000:]}
    for name in (DATABASE_A, DATABASE_B):
        plain('DROP DATABASE IF EXISTS "%s"' % name)
    sys.stdout.write(json.dumps({"django": version, "mismatches": mismatches}) + "\n")
    sys.exit(0)

ROOT = tempfile.mkdtemp(prefix="legacy-south-probe-")
write_app(ROOT, broken=SCENARIO == "failed_migration")

from django_postgrespool_south import south_database_adapters  # noqa: E402

DATABASES = {"default": _entry(DATABASE_A), "second": _entry(DATABASE_B)}
if SCENARIO.startswith("plain_default"):  # Django's own engine on default, pooled second
    DATABASES["default"] = dict(DATABASES["default"], ENGINE="django.db.backends.postgresql_psycopg2")
    del DATABASES["default"]["POOL_OPTIONS"]
if SCENARIO == "pooled_postgis":  # the engine the README maps for PostGIS
    DATABASES["default"]["ENGINE"] = "django_postgrespool.postgis"
ADAPTERS = {} if SCENARIO.endswith("no_helper") else {
    "SOUTH_DATABASE_ADAPTERS": south_database_adapters(DATABASES)}
settings.configure(
    DEBUG=False,
    USE_TZ=True,
    TIME_ZONE="UTC",
    SECRET_KEY="south-probe",
    DATABASES=DATABASES,
    INSTALLED_APPS=["django.contrib.contenttypes", "django.contrib.auth", "south", APP],
    SOUTH_TESTS_MIGRATE=True,
    **ADAPTERS
)

import django  # noqa: E402
from django.core.management import call_command  # noqa: E402
from django.db import connections  # noqa: E402

from django_postgrespool._legacy import pool_stats  # noqa: E402


class Output(object):
    """Collects what the commands print (South prints, and writes to stderr)."""

    def __init__(self):
        self.parts = []

    def write(self, text):
        self.parts.append(text if isinstance(text, unicode) else text.decode("utf-8", "replace"))

    def flush(self):
        pass

    def text(self):
        return u"".join(self.parts)


OUT = Output()


def run(*args, **options):
    """call_command, with stdout and stderr captured; return the error's name or None."""
    saved = sys.stdout, sys.stderr
    sys.stdout = sys.stderr = OUT
    try:
        call_command(*args, **dict(dict(verbosity=1, interactive=False), **options))
        return None
    except BaseException as error:  # South raises SystemExit too
        OUT.write(u"%s: %s\n" % (type(error).__name__, error))
        return type(error).__name__
    finally:
        sys.stdout, sys.stderr = saved


def one(sql, alias="default"):
    cursor = connections[alias].cursor()
    cursor.execute(sql)
    return cursor.fetchone()[0]


def tables(alias):
    cursor = connections[alias].cursor()
    cursor.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
                   " AND (tablename LIKE 'southprobe%%' OR tablename LIKE 'ddl%%')"
                   " ORDER BY tablename")
    return [r[0] for r in cursor.fetchall()]


def history(alias):
    cursor = connections[alias].cursor()
    cursor.execute("SELECT migration FROM south_migrationhistory WHERE app_name = %s"
                   " ORDER BY migration", [APP])
    return [r[0] for r in cursor.fetchall()]


def held():
    """Connections checked out of each alias's pools."""
    return dict((alias, sum(s["checked_out"] for s in pool_stats(alias)))
                for alias in ("default", "second"))


def close_all():
    for alias in ("default", "second"):
        connections[alias].close()


def syncdb_both():
    for alias in ("default", "second"):
        assert run("syncdb", database=alias) is None, OUT.text()


# -- the scenarios ----------------------------------------------------------------


def two_aliases():
    """migrate, then migrate --database second: each alias's tables, history, session."""
    syncdb_both()
    report = {"adapters": settings.SOUTH_DATABASE_ADAPTERS}
    report["default_error"] = run("migrate", APP)
    report["second_error"] = run("migrate", APP, database="second")
    import south.db

    report["ddl_transactions"] = dict((alias, south.db.dbs[alias].has_ddl_transactions)
                                      for alias in ("default", "second"))
    for alias in ("default", "second"):
        report[alias] = {
            "database": one("SELECT current_database()", alias),
            "tables": tables(alias),
            "history": history(alias),
            "codes": one("SELECT string_agg(code, ',' ORDER BY id) FROM southprobe_item", alias),
        }
    report["held_before_close"] = held()
    close_all()
    report["held_after_close"] = held()
    report["output_has_password"] = PASSWORD in OUT.text()
    return report


def backwards_and_fake():
    """migrate to zero and back, and --fake, on the pooled alias."""
    syncdb_both()
    report = {"forwards": run("migrate", APP)}
    report["zero"] = run("migrate", APP, "zero")
    report["after_zero"] = {"tables": tables("default"), "history": history("default")}
    report["fake"] = run("migrate", APP, "0002", fake=True)
    report["after_fake"] = {"tables": tables("default"), "history": history("default")}
    report["fake_back"] = run("migrate", APP, "zero", fake=True)
    report["again"] = run("migrate", APP)
    report["after_again"] = {"tables": tables("default"), "history": history("default"),
                             "rows": one("SELECT count(*) FROM southprobe_item")}
    report["back_to_0001"] = run("migrate", APP, "0001")
    report["after_0001"] = {
        "history": history("default"),
        "columns": one("SELECT string_agg(column_name, ',' ORDER BY column_name) FROM "
                       "information_schema.columns WHERE table_name = 'southprobe_item'"),
    }
    close_all()
    report["held_after_close"] = held()
    return report


def failed_migration():
    """0004 fails half-way: South rolls back; the session lent next is clean and usable."""
    syncdb_both()
    report = {"error": run("migrate", APP)}
    output = OUT.text()
    report["said_error_in_migration"] = "Error in migration: southprobe:0004_broken" in output
    report["output_has_password"] = PASSWORD in output
    pid = one("SELECT pg_backend_pid()")  # the wrapper still holds South's session
    report["tables"] = tables("default")  # southprobe_half rolled back
    report["history"] = history("default")
    report["gamma_rows"] = one("SELECT count(*) FROM southprobe_item WHERE name = 'gamma'")
    close_all()
    report["held_after_close"] = held()
    cursor = connections["default"].cursor()
    cursor.execute("SELECT pg_backend_pid(), count(*) FROM southprobe_item")
    next_pid, report["rows_seen_next"] = cursor.fetchone()
    report["same_session_lent_again"] = next_pid == pid
    close_all()
    return report


def db_dry_run():
    """migrate --db-dry-run: South runs the migrations and rolls everything back."""
    syncdb_both()
    report = {"error": run("migrate", APP, db_dry_run=True)}
    report["tables"] = tables("default")
    report["history"] = history("default")
    report["held_before_close"] = held()
    close_all()
    report["held_after_close"] = held()
    report["then"] = run("migrate", APP)
    report["tables_then"] = tables("default")
    close_all()
    return report


def test_runner():
    """manage.py test with South's test command: both pooled test databases migrated, dropped."""
    from django.core.management import get_commands

    report = {"test_command": get_commands().get("test")}
    report["error"] = run("test", APP)
    output = OUT.text()
    report["ran"] = "Ran 1 test" in output
    report["ok"] = "\nOK" in output
    report["output_tail"] = output[-600:] if not report["ok"] else ""
    report["output_has_password"] = PASSWORD in output
    report["names_after"] = [connections[a].settings_dict["NAME"] for a in ("default", "second")]
    report["test_databases_left"] = [r[0] for r in plain(
        "SELECT datname FROM pg_database WHERE datname LIKE 'test_postgrespool_south%' ORDER BY 1")]
    return report


def plain_default():
    """Django's engine on default, the pooled one on second: migrate --database second."""
    syncdb_both()
    import south.db

    report = {"adapters": getattr(settings, "SOUTH_DATABASE_ADAPTERS", None),
              "error": run("migrate", APP, database="second"),
              "south_aliases": sorted(south.db.dbs)}
    report["second"] = {"tables": tables("second"), "history": history("second"),
                        "engine": type(connections["second"]).__module__}
    report["default_tables"] = tables("default")
    report["last_line"] = OUT.text().strip().splitlines()[-1]
    close_all()
    return report


plain_default_no_helper = plain_default


def pooled_postgis():
    """ENGINE 'django_postgrespool.postgis', which the helper maps to South's adapter.

    That engine is Python 3 only: on Python 2.7 it must say so, naming the
    engine to use instead (it raised a SyntaxError before 6 Dec 2026).
    """
    report = {"adapters": settings.SOUTH_DATABASE_ADAPTERS, "error": run("syncdb")}
    report["last_line"] = OUT.text().strip().splitlines()[-1]
    return report

SCENARIOS = dict((f.__name__, f) for f in (
    two_aliases, backwards_and_fake, failed_migration, db_dry_run, test_runner, plain_default))
SCENARIOS["plain_default_no_helper"] = plain_default
SCENARIOS["pooled_postgis"] = pooled_postgis

HISTORY = ["0001_initial", "0002_item_code", "0003_fill_codes"]
MIGRATED = {"tables": ["southprobe_item"], "history": HISTORY}
NOTHING = {"tables": [], "history": []}
POOLED = "south.db.postgresql_psycopg2"
# What each scenario must report (a subset of its facts); errors are
# ProgrammingError on Django 1.6 and DatabaseError on 1.4.
EXPECTED = {
    "two_aliases": {
        "adapters": {"default": POOLED, "second": POOLED},
        "default_error": None, "second_error": None,
        "ddl_transactions": {"default": True, "second": True},  # so no dry run before each
        "default": dict(MIGRATED, database=DATABASE_A, codes="ALPHA,BETA"),
        "second": dict(MIGRATED, database=DATABASE_B, codes="ALPHA,BETA"),
        "held_before_close": {"default": 1, "second": 1},
        "held_after_close": {"default": 0, "second": 0},
        "output_has_password": False,
    },
    "backwards_and_fake": {
        "forwards": None, "zero": None, "fake": None, "fake_back": None, "again": None,
        "back_to_0001": None,
        "after_zero": NOTHING,
        "after_fake": {"tables": [], "history": HISTORY[:2]},
        "after_again": dict(MIGRATED, rows=2),
        "after_0001": {"history": HISTORY[:1], "columns": "id,name"},
        "held_after_close": {"default": 0, "second": 0},
    },
    "failed_migration": {
        "error": ("ProgrammingError", "DatabaseError"),
        "said_error_in_migration": True,
        "output_has_password": False,
        "tables": ["southprobe_item"],  # southprobe_half rolled back
        "history": HISTORY,
        "gamma_rows": 0,
        "held_after_close": {"default": 0, "second": 0},
        "same_session_lent_again": True, "rows_seen_next": 2,
    },
    "db_dry_run": {
        "error": None, "tables": [], "history": [],
        "held_after_close": {"default": 0, "second": 0},
        "then": None, "tables_then": ["southprobe_item"],
    },
    "test_runner": {
        "test_command": "south", "error": None, "ran": True, "ok": True,
        "output_has_password": False, "test_databases_left": [],
    },
    "plain_default": {
        "adapters": {"second": POOLED}, "error": None, "south_aliases": ["default", "second"],
        "second": dict(MIGRATED, engine="django_postgrespool._legacy"), "default_tables": [],
    },
    # The pooled PostGIS engine is Python 3 only: a clear error naming the engine to use.
    "pooled_postgis": {
        "adapters": {"default": POOLED, "second": POOLED}, "error": "ImproperlyConfigured",
        "last_line": POSTGIS_ERROR,
    },
    # What the README says happens without the helper, on a pooled alias not 'default'.
    "plain_default_no_helper": {
        "adapters": None, "error": "KeyError", "last_line": "KeyError: 'second'",
        "south_aliases": ["default"],
    },
}


def mismatches(expected, report):
    wrong = []
    for key, value in sorted(expected.items()):
        got = report.get(key, "(missing)")
        if not (got in value if isinstance(value, tuple) else got == value):
            wrong.append("%s: expected %r, got %r" % (key, value, got))
    return wrong


if __name__ == "__main__":
    try:
        result = SCENARIOS[SCENARIO]()
    finally:
        shutil.rmtree(ROOT, ignore_errors=True)
    result["django"] = django.get_version()
    result["mismatches"] = mismatches(EXPECTED.get(SCENARIO, {}), result)
    if os.environ.get("SOUTH_PROBE_DEBUG"):
        sys.stderr.write(OUT.text())
    sys.stdout.write(json.dumps(result, sort_keys=True) + "\n")
