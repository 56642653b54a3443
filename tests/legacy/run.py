"""The legacy lane: Python 2.7 + Django 1.6 + South 1.0.2 on the pooled engine.

    python3 tests/legacy/run.py            # what `make test-legacy` runs
    python3 tests/legacy/run.py -k pool    # only the checks whose name contains "pool"

Builds ``.venv/legacy-py27`` (virtualenv < 20.22 from ``.venv/legacy-tools``,
since neither venv nor uv makes Python 2 environments), puts the backend and
the South adapter on its path, starts a throwaway PostgreSQL (or uses
DATABASE_URL), copies ``tests/legacy/sample`` to a temporary folder and drives
it through South: syncdb, schemamigration --initial, migrate, a second schema
migration, a data migration, requests through Django's WSGI handler, and
Django's test runner; then the scenarios of review_probe.py (threads, cursors,
session state, fork, interrupts, passwords) on Django 1.6 and 1.4. Ends with a
pytest-like line, "N passed, N failed".

Without a Python 2.7 interpreter the lane is skipped, loudly; with CI=true in
the environment that is a failure instead.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from urllib.parse import unquote, urlsplit

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.support.lanes import find_python  # noqa: E402
from tests.support.pgcluster import PASSWORD, Cluster  # noqa: E402

VENV = ROOT / ".venv" / "legacy-py27"
# Django 1.4 opens connections in _cursor, not get_new_connection: its own lane.
VENV_DJ14 = ROOT / ".venv" / "legacy-py27-dj14"
TOOLS = ROOT / ".venv" / "legacy-tools"
SAMPLE = Path(__file__).resolve().parent / "sample"
REQUIREMENTS = [
    "Django==1.6.11",
    "South==1.0.2",
    # psycopg2-binary 2.8.6 is the last release with cp27 manylinux wheels.
    "psycopg2-binary>=2.8,<2.9",
    # The last SQLAlchemy series that runs on Python 2.7.
    "SQLAlchemy>=1.4,<1.5",
]
REQUIREMENTS_DJ14 = ["Django==1.4.22", *REQUIREMENTS[1:]]  # South too: south_probe.py
PATHS = [ROOT / "packages" / "backend" / "src", ROOT / "packages" / "south_adapter" / "src"]
DATABASE = "postgrespool_legacy"
VALID = "fair_after, leak_timeout, lease, max_idle, max_overflow, pool_size, pre_ping, recycle, reset, timeout, use_lifo"
DOCS = "https://django-postgrespool.readthedocs.io/en/latest/"


def say(message: str) -> None:
    print(message, flush=True)


def python27() -> str | None:
    """Return the real path of a working Python 2.7, or None."""
    candidates = []
    try:
        candidates.append(find_python("2.7"))
    except SystemExit:
        pass
    # find_python may return pyenv's shim, which fails unless 2.7 is an active
    # pyenv version: try the interpreters behind it too.
    root = subprocess.run(["pyenv", "root"], capture_output=True, text=True, check=False) \
        if shutil.which("pyenv") else None
    pyenv_root = root.stdout.strip() if root and root.returncode == 0 else os.environ.get(
        "PYENV_ROOT", os.path.expanduser("~/.pyenv"))
    candidates += sorted(glob.glob(f"{pyenv_root}/versions/2.7*/bin/python2.7"), reverse=True)
    for path in candidates:
        probe = subprocess.run(
            [path, "-c", "import sys; print(sys.executable)"],
            capture_output=True, text=True, check=False,
        )
        if probe.returncode == 0 and probe.stdout.strip():
            return probe.stdout.strip()
    return None


def setup_venv(interpreter: str, venv: Path, requirements: list[str]) -> Path:
    """Create or update a Python 2.7 virtualenv; return its python."""
    python = venv / "bin" / "python"
    stamp = venv / ".requirements"
    digest = hashlib.sha1("\n".join([interpreter, *requirements]).encode()).hexdigest()
    if not (python.exists() and stamp.exists() and stamp.read_text() == digest):
        if not (TOOLS / "bin" / "virtualenv").exists():
            subprocess.run([sys.executable, "-m", "venv", str(TOOLS)], check=True)
            subprocess.run(
                [str(TOOLS / "bin" / "pip"), "install", "-q", "virtualenv<20.22"], check=True
            )
        if not python.exists():
            subprocess.run(
                [str(TOOLS / "bin" / "virtualenv"), "-q", "-p", interpreter, str(venv)], check=True
            )
        say(f"==> installing {' '.join(requirements)} into {venv.relative_to(ROOT)}")
        pip = subprocess.run(
            [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
             "--no-python-version-warning", *requirements],
            capture_output=True, text=True, check=False,
        )
        if pip.returncode != 0:
            raise SystemExit(f"pip install failed in {venv}:\n{pip.stdout}{pip.stderr}")
        stamp.write_text(digest)
    # The packages' pyproject.toml files want Python 3: their sources go on the path.
    site = subprocess.run(
        [str(python), "-c", "import distutils.sysconfig as s; print(s.get_python_lib())"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()
    Path(site, "django_postgrespool_src.pth").write_text("".join(f"{p}\n" for p in PATHS))
    return python


class Lane:
    """The sample project in a temporary folder, and the commands run on it."""

    def __init__(self, python: Path, python_dj14: Path, host: str, port: int, password: str) -> None:
        self.python = python
        self.python_dj14 = python_dj14
        self.password = password
        self.host, self.port = host, port
        self.tmp = Path(tempfile.mkdtemp(prefix="postgrespool-legacy-"))
        self.project = self.tmp / "sample"
        shutil.copytree(SAMPLE, self.project)
        self.outputs: list[str] = []
        self._probe: dict[str, object] | None = None
        self.socket_dir: Path | None = None  # the server's unix socket, when the lane started it

    def probe(self) -> dict[str, object]:
        """Return the report of the sample's pool_probe command (run once)."""
        if self._probe is None:
            self._probe = json.loads(self.manage("pool_probe").stdout)
        return self._probe

    def manage(self, *args: str, ok: bool = True, **env: str) -> subprocess.CompletedProcess[str]:
        environ = {
            **os.environ,
            "LEGACY_DB_NAME": DATABASE,
            "LEGACY_DB_PASSWORD": self.password,
            "LEGACY_DB_PORT": str(self.port),
            "PYTHONDONTWRITEBYTECODE": "1",
            **env,
        }
        environ.pop("DJANGO_SETTINGS_MODULE", None)
        done = subprocess.run(
            [str(self.python), "manage.py", *args], cwd=self.project, env=environ,
            capture_output=True, text=True, timeout=120,
        )
        self.outputs.append(done.stdout + done.stderr)
        if ok and done.returncode != 0:
            raise AssertionError(
                f"manage.py {' '.join(args)} exited {done.returncode}:\n{done.stdout}{done.stderr}"
            )
        return done

    def sql(self, query: str, database: str = DATABASE) -> list[list[object]]:
        """Run ``query`` with a plain psycopg2 connection (outside the pool)."""
        script = (
            "import json, sys, psycopg2\n"
            "c = psycopg2.connect(host=sys.argv[1], port=sys.argv[2], user='postgres',"
            " password=sys.argv[3], dbname=sys.argv[4])\n"
            "c.autocommit = True\n"
            "cur = c.cursor(); cur.execute(sys.argv[5])\n"
            "print(json.dumps([list(r) for r in cur.fetchall()] if cur.description else []))\n"
        )
        out = subprocess.run(
            [str(self.python), "-c", script, self.host, str(self.port), self.password, database,
             query],
            capture_output=True, text=True, check=True,
        )
        return json.loads(out.stdout)

    def migrations(self) -> list[str]:
        return sorted(p.name for p in (self.project / "notes" / "migrations").glob("0*.py"))

    def cleanup(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


# -- the checks, in order (each builds on the previous ones) --------------------


def test_south_without_adapter_setting_fails_with_keyerror(lane: Lane) -> None:
    done = lane.manage("migrate", "--list", ok=False, LEGACY_SOUTH_HELPER="0")
    assert done.returncode != 0, done.stdout
    assert "KeyError: 'default'" in done.stderr, done.stderr


def test_helper_maps_pooled_alias_to_south_postgresql_adapter(lane: Lane) -> None:
    out = subprocess.run(
        [str(lane.python), "-c",
         "from django_postgrespool_south import south_database_adapters as s\n"
         "print(sorted(s({'default': {'ENGINE': 'django_postgrespool'},"
         " 'gis': {'ENGINE': 'django_postgrespool.postgis'},"
         " 'lite': {'ENGINE': 'django.db.backends.sqlite3'},"
         " 'mine': {'ENGINE': 'django_postgrespool'}}, {'mine': 'my.adapter'}).items()))"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()
    assert out == (
        "[('default', 'south.db.postgresql_psycopg2'), ('gis', 'south.db.postgresql_psycopg2'),"
        " ('mine', 'my.adapter')]"
    ), out


def test_schemamigration_initial_writes_0001(lane: Lane) -> None:
    done = lane.manage("schemamigration", "notes", "--initial")
    assert "Created 0001_initial.py" in done.stdout + done.stderr, done.stdout + done.stderr
    assert lane.migrations() == ["0001_initial.py"], lane.migrations()


def test_syncdb_creates_django_and_south_tables_but_not_the_migrated_app(lane: Lane) -> None:
    done = lane.manage("syncdb", "--noinput")
    assert "Not synced (use migrations):\n - notes" in done.stdout, done.stdout
    tables = {r[0] for r in lane.sql("SELECT tablename FROM pg_tables WHERE schemaname='public'")}
    assert {"auth_user", "django_content_type", "south_migrationhistory"} <= tables, tables
    assert "notes_note" not in tables, tables


def test_migrate_applies_initial_migration_through_pooled_engine(lane: Lane) -> None:
    done = lane.manage("migrate", "notes")
    assert " > notes:0001_initial" in done.stdout, done.stdout
    assert lane.sql("SELECT count(*) FROM notes_note") == [[0]]
    lane.manage("seed_notes")
    assert lane.sql("SELECT count(*) FROM notes_note") == [[3]]


def test_second_schema_migration_adds_a_column(lane: Lane) -> None:
    models = lane.project / "notes" / "models.py"
    models.write_text((lane.project / "notes" / "models_v2.py.txt").read_text())
    done = lane.manage("schemamigration", "notes", "--auto")
    assert "Added field slug on notes.Note" in done.stdout + done.stderr, done.stderr
    assert lane.migrations() == ["0001_initial.py", "0002_auto__add_field_note_slug.py"]
    lane.manage("migrate", "notes")
    columns = lane.sql(
        "SELECT column_name FROM information_schema.columns WHERE table_name='notes_note'"
        " ORDER BY column_name"
    )
    assert columns == [["id"], ["slug"], ["title"]], columns


def test_data_migration_fills_the_new_column_on_a_pooled_connection(lane: Lane) -> None:
    lane.manage("datamigration", "notes", "fill_slugs")
    (path,) = (lane.project / "notes" / "migrations").glob("0003_fill_slugs.py")
    source = path.read_text()
    body = (
        "        from django.db import connections\n"
        "        from django.template.defaultfilters import slugify\n"
        "        for note in orm.Note.objects.all():\n"
        "            note.slug = slugify(note.title)\n"
        "            note.save()\n"
        "        print('data migration ran on %s.%s' % (type(connections['default']).__module__,"
        " type(connections['default']).__name__))\n"
    )
    patched, n = re.subn(r"(    def forwards\(self, orm\):\n(?:        [\"#].*\n)*)", r"\1" + body,
                         source, count=1)
    assert n == 1, source
    path.write_text(patched)
    done = lane.manage("migrate", "notes")
    assert "data migration ran on django_postgrespool._legacy.DatabaseWrapper" in done.stdout, (
        done.stdout + done.stderr
    )
    slugs = lane.sql("SELECT slug FROM notes_note ORDER BY id")
    assert slugs == [["first-note"], ["second-note"], ["a-third-one"]], slugs
    listed = lane.manage("migrate", "--list").stdout
    for name in ("0001_initial", "0002_auto__add_field_note_slug", "0003_fill_slugs"):
        assert f"(*) {name}" in listed, listed


def test_requests_reuse_one_backend_pid_and_roll_back_what_they_left_open(lane: Lane) -> None:
    report = lane.probe()
    assert report["engine"] == "django_postgrespool._legacy.DatabaseWrapper", report
    assert len(set(report["pids"])) == 1, report["pids"]
    assert report["open_pid"] == report["pids"][0], report
    assert report["left_over"] == 0, report  # the open transaction was rolled back
    assert report["sessions"] == 1, report
    (stats,) = [{k: v for k, v in s.items() if k not in ("pid", "port")} for s in report["stats"]]
    # One connection for all the requests; the cap test then holds it and 2 more.
    assert (stats["opened"], stats["invalidated"], stats["timeouts"]) == (3, 0, 1), stats
    assert stats["database"] == DATABASE and stats["user"] == "postgres", stats


def test_a_session_the_server_ended_after_a_result_is_not_lent_again(lane: Lane) -> None:
    # The sample's farewell command: the backend's FATAL message read with a
    # result, the socket still open (see its docstring).
    report = json.loads(lane.manage("farewell").stdout)
    assert report["answer"] == 42, report
    assert report["error"] is None, report
    assert report["second"] != report["first"], report
    assert report["invalidated"] == 1, report


def test_pool_cap_raises_pool_timeout_naming_alias_and_sizes(lane: Lane) -> None:
    report = lane.probe()
    assert report["timeout_error"] == (
        "django_postgrespool._legacy.PoolTimeout: Connection pool of database alias "
        "'default' is exhausted: 3 of 3 connections (pool_size=2 + max_overflow=1) are "
        "checked out and none was returned within timeout=1s. Hint: look for requests or "
        "threads that hold a connection (long transactions, CONN_MAX_AGE > 0 with more "
        "threads than connections), or raise pool_size/max_overflow if the server's "
        f"max_connections allows it. See {DOCS}guide/sizing.html"
    ), report["timeout_error"]


def test_unknown_pool_option_is_improperly_configured(lane: Lane) -> None:
    done = lane.manage("pool_probe", ok=False, LEGACY_POOL_OPTIONS='{"pool_sise": 3}')
    assert done.returncode != 0
    assert (
        "ImproperlyConfigured: DATABASES['default']['POOL_OPTIONS']: unknown pool option "
        f"'pool_sise' (did you mean 'pool_size'?). Valid options: {VALID}."
    ) in done.stderr, done.stderr


def test_invalid_database_pool_args_is_improperly_configured(lane: Lane) -> None:
    done = lane.manage("pool_probe", ok=False, LEGACY_POOL_ARGS='{"max_overflow": -1}')
    assert (
        "ImproperlyConfigured: DATABASE_POOL_ARGS: pool option 'max_overflow' must be an "
        "integer >= 0; got -1."
    ) in done.stderr, done.stderr
    done = lane.manage("pool_probe", ok=False, LEGACY_POOL_OPTIONS='{"pre_ping": "always"}')
    assert (
        "ImproperlyConfigured: DATABASES['default']['POOL_OPTIONS']: pool option 'pre_ping' "
        "must be one of True, False or 'socket'; got 'always'."
    ) in done.stderr, done.stderr


def test_options_the_legacy_backend_lacks_are_refused_unless_none(lane: Lane) -> None:
    for option in ("max_idle", "leak_timeout"):
        done = lane.manage("pool_probe", ok=False, LEGACY_POOL_OPTIONS=f'{{"{option}": 30}}')
        assert (
            f"ImproperlyConfigured: DATABASES['default']['POOL_OPTIONS']: pool option '{option}' "
            "is not available on Python 2.7 with Django 1.4-1.6 (the legacy backend); remove "
            f"it, or set it to None. See {DOCS}guide/south.html"
        ) in done.stderr, done.stderr
    done = lane.manage("pool_probe", ok=False, LEGACY_POOL_ARGS='{"max_idle": "soon"}')
    assert (
        "ImproperlyConfigured: DATABASE_POOL_ARGS: pool option 'max_idle' must be a number of "
        "seconds > 0, or None (off); got 'soon'."
    ) in done.stderr, done.stderr
    done = lane.manage("pool_probe", ok=False, LEGACY_POOL_OPTIONS='{"lease": "transaction"}')
    assert (
        "ImproperlyConfigured: DATABASES['default']['POOL_OPTIONS']: pool option 'lease' "
        "is not available on Python 2.7 with Django 1.4-1.6 (the legacy backend); remove "
        f"it, or set it to 'request'. See {DOCS}guide/south.html"
    ) in done.stderr, done.stderr
    done = lane.manage("pool_probe", ok=False, LEGACY_POOL_OPTIONS='{"fair_after": 0}')
    assert (
        "ImproperlyConfigured: DATABASES['default']['POOL_OPTIONS']: pool option 'fair_after' "
        "is not available on Python 2.7 with Django 1.4-1.6 (the legacy backend); remove "
        f"it, or set it to 0.03. See {DOCS}guide/south.html"
    ) in done.stderr, done.stderr
    off = ('{"pool_size": 2, "max_overflow": 1, "timeout": 1, "max_idle": null, '
           '"leak_timeout": null, "lease": "request", "fair_after": 0.03}')
    assert lane.manage("pool_probe", LEGACY_POOL_OPTIONS=off).returncode == 0


def test_django_test_runner_migrates_and_drops_a_pooled_test_database(lane: Lane) -> None:
    done = lane.manage("test", "notes", "--noinput")
    assert "Ran 1 test" in done.stderr and "\nOK" in done.stderr, done.stderr
    left = lane.sql(f"SELECT datname FROM pg_database WHERE datname = 'test_{DATABASE}'")
    assert left == [], left


def test_django_14_requests_reuse_one_backend_pid_and_roll_back(lane: Lane) -> None:
    done = subprocess.run(
        [str(lane.python_dj14), str(Path(__file__).resolve().parent / "old_django_probe.py"),
         str(lane.port), DATABASE],
        env={**os.environ, "LEGACY_DB_PASSWORD": lane.password}, capture_output=True, text=True,
        timeout=120,
    )
    lane.outputs.append(done.stdout + done.stderr)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert report["django"] == "1.4.22", report
    assert report["engine"] == "django_postgrespool._legacy.DatabaseWrapper", report
    assert len(set(report["pids"])) == 1 and report["pids"][0].isdigit(), report
    assert report["left_over"] == 0, report  # the uncommitted CREATE TABLE was rolled back
    assert (report["opened"], report["checkouts"]) == (1, 5), report
    assert_error_page_clean(report["error_page"])  # Django 1.4's page, Database.connect's path


def assert_error_page_clean(report: dict[str, dict[str, object]]) -> None:
    """What ``error_report`` found on Django's DEBUG page: our frames, none with the password."""
    assert set(report) == {"bad_options", "options_password", "refused"}, report
    for scenario, entry in report.items():
        assert entry["ours"] >= 3, (scenario, entry)  # the page shows frames of ours
        assert entry["leaks"] == [], (scenario, entry)
    assert report["refused"]["error"] == "OperationalError", report
    assert report["bad_options"]["error"] == "ImproperlyConfigured", report


def test_no_frame_of_ours_on_django_error_page_shows_the_password(lane: Lane) -> None:
    assert_error_page_clean(json.loads(lane.manage("error_report").stdout))


# -- adversarial review of _legacy.py (tests/legacy/review_probe.py) -----------
# Each scenario runs in both legacy virtualenvs (Django 1.6 and 1.4), a process
# of its own, and reports facts as JSON; every one of them failed before its fix.


def review(lane: Lane, scenario: str) -> list[dict[str, object]]:
    """The reports of review_probe.py's ``scenario`` on Django 1.6, then 1.4."""
    reports = []
    for python in (lane.python, lane.python_dj14):
        done = subprocess.run(
            [str(python), str(Path(__file__).resolve().parent / "review_probe.py"),
             str(lane.port), DATABASE, scenario],
            env={**os.environ, "LEGACY_DB_PASSWORD": lane.password, "PYTHONDONTWRITEBYTECODE": "1"},
            capture_output=True, text=True, timeout=120,
        )
        lane.outputs.append(done.stdout + done.stderr)
        assert done.returncode == 0, done.stdout + done.stderr
        reports.append(json.loads(done.stdout.strip().splitlines()[-1]))
    assert [r["django"] for r in reports] == ["1.6.11", "1.4.22"], reports
    return reports


def test_review_a_thread_that_ends_holding_a_connection_gives_it_back_rolled_back(
        lane: Lane) -> None:
    # Garbage collection off: the wrapper's reference cycles kept it until one ran.
    for report in review(lane, "thread_end"):
        assert report["errors"] == [], report  # a PoolTimeout in the second thread before
        assert len(set(report["pids"])) == 1, report  # one connection, reused
        assert report["clean"] is True, report  # its transaction rolled back


def test_review_a_thread_whose_locals_are_freed_late_gives_its_connection_to_a_waiting_checkout(
        lane: Lane) -> None:
    # Failed in a CI run of 7 Dec (the lane beside Django's suite): the next
    # checkout waited out its timeout, since a thread's locals are freed a
    # moment after join() returns and a waiting checkout never looked again.
    for report in review(lane, "late_thread_end"):
        assert report["error"] is None, report
        assert 0.5 <= report["waited"] < 1.5, report  # served a slice after the locals went
        assert report["checked_out"] == 0, report


def test_review_a_wrapper_dropped_holding_a_connection_is_reset_when_collected(
        lane: Lane) -> None:
    # Garbage collection returned it as it was (reset_on_return=None): with
    # reset='discard', the next borrower saw its temporary table.
    for report in review(lane, "dropped_wrapper"):
        assert report["held_after_gc"] == 0, report
        assert "error" not in report, report
        assert (report["same_session"], report["clean"]) == (True, True), report


def test_review_a_cursor_kept_past_close_cannot_run_on_the_next_borrowers_session(
        lane: Lane) -> None:
    for report in review(lane, "stale_cursor"):
        assert report["same_session"] is True, report  # the borrower got that connection
        assert (report["ran_on"], report["error"]) == (None, "InterfaceError"), report


def test_review_driver_state_read_only_cursor_factory_notifies_reset_at_checkin(
        lane: Lane) -> None:
    for report in review(lane, "session_state"):
        assert report["same_session"] is True and report["pending_before"] == 1, report
        assert report["row_type"] == "tuple", report  # not the RealDictCursor left behind
        assert report["notifies_after"] == 0, report
        assert report["write"] == "ok", report  # not read-only (Django 1.4 was)


def test_review_a_failing_connection_created_receiver_gives_the_connection_back(
        lane: Lane) -> None:
    for report in review(lane, "receiver_error"):
        assert report["first"] == "receiver failed", report
        assert report["held_after_error"] == 0, report
        assert report["calls"] == 2, report  # the next connect ran the receivers again
        assert report["application_name"] == "legacy-receiver-ran", report
        assert report["held_at_end"] == 0, report


def test_review_a_fork_child_neither_uses_nor_ends_its_parents_sessions(lane: Lane) -> None:
    # The child queries, closes and calls close_pools() while the parent is in
    # a transaction on one connection and has another idle in a pool.
    for report in review(lane, "fork"):
        assert report["child"] == "a session of its own", report
        assert "parent_error" not in report, report
        assert report["parent_session_kept"] is True, report
        assert report["committed_rows"] == 1, report  # the child did not roll it back
        assert (report["idle_session_kept"], report["idle_invalidated"]) == (True, 0), report
    # A child that closed the inherited socket and reused its number for a file.
    for report in review(lane, "fork_reused_descriptor"):
        assert report == {**report, "file": "intact", "parent_session_kept": True}, report


def test_review_keyboardinterrupt_in_checkin_or_checkout_leaves_nothing_dirty_or_held(
        lane: Lane) -> None:
    # A line tracer raises KeyboardInterrupt between ROLLBACK and DISCARD ALL
    # at a checkin, and after the health check at a checkout.
    for report in review(lane, "interrupt"):
        assert (report["checkin"], report["checkout"]) == ("interrupted", "interrupted"), report
        assert report["held_while_unwinding"] == 0, report
        assert report["next_borrower_clean"] is True, report  # no temporary table left over
        assert report["held_after_checkout_interrupt"] == 0, report
        assert (report["held_by_next"], report["held_at_end"]) == (1, 0), report


def test_review_a_health_check_to_a_server_that_stops_answering_ends_at_the_timeout(
        lane: Lane) -> None:
    # The backends of three idle connections are stopped (SIGSTOP): pre_ping's
    # round trip waited for ever. The first one's socket is shut down at the
    # pool's timeout (1 s), the two others (idle since before) are closed
    # unpinged (they cost a timeout each before), and the checkout opens a new one.
    for report in review(lane, "silent_server"):
        assert report["error"] is None, report
        assert (report["idle"], report["new_session"]) == (3, True), report
        assert 0.9 <= report["waited"] < 1.9, report
        assert report["checked_out"] == 0, report


def test_review_a_transaction_begun_by_hand_is_rolled_back_at_checkin(lane: Lane) -> None:
    # psycopg2's rollback() does nothing in autocommit mode (Django 1.6's):
    # the next borrower ran inside the transaction, its writes never committed.
    for report in review(lane, "hand_begin"):
        assert report == {**report, "same_session": True, "no_transaction_left": True}, report


def test_review_a_password_in_name_or_dsn_is_in_no_stats_repr_or_frame_of_ours(
        lane: Lane) -> None:
    for report in review(lane, "password_in_name"):
        for alias in ("conninfo", "dsn", "uri"):
            assert report[alias]["our_frames"] >= 3, report
            assert report[alias]["leaks"] == 0, (alias, report)


def test_review_pool_options_not_a_dict_is_improperly_configured(lane: Lane) -> None:
    # An AttributeError ('list' object has no attribute 'items') before.
    for value, kind in (("[1]", "list"), ('"pool_size=3"', "unicode")):  # json gives unicode
        done = lane.manage("pool_probe", ok=False, LEGACY_POOL_OPTIONS=value)
        assert (
            f"ImproperlyConfigured: DATABASES['default']['POOL_OPTIONS'] must be a dict of pool "
            f"options, got {kind}. Valid options: {VALID}."
        ) in done.stderr, done.stderr


def test_south_probe_migrate_backwards_fake_failure_dry_run_test_runner_two_aliases(
        lane: Lane) -> None:
    # tests/legacy/south_probe.py: each scenario's facts against its EXPECTED, on 1.6 and 1.4.
    for python, version in ((lane.python, "1.6.11"), (lane.python_dj14, "1.4.22")):
        done = subprocess.run(
            [str(python), str(Path(__file__).resolve().parent / "south_probe.py"), str(lane.port),
             "all"], env={**os.environ, "LEGACY_DB_PASSWORD": lane.password},
            capture_output=True, text=True, timeout=300)
        lane.outputs.append(done.stdout + done.stderr)
        assert done.returncode == 0 and done.stdout.strip(), done.stdout + done.stderr
        assert json.loads(done.stdout) == {"django": version, "mismatches": {}}, done.stdout


def test_password_never_appears_in_any_output(lane: Lane) -> None:
    leaks = [out for out in lane.outputs if lane.password in out]
    assert not leaks, f"{len(leaks)} outputs show the password"


TESTS: list[Callable[[Lane], None]] = [
    test_south_without_adapter_setting_fails_with_keyerror,
    test_helper_maps_pooled_alias_to_south_postgresql_adapter,
    test_schemamigration_initial_writes_0001,
    test_syncdb_creates_django_and_south_tables_but_not_the_migrated_app,
    test_migrate_applies_initial_migration_through_pooled_engine,
    test_second_schema_migration_adds_a_column,
    test_data_migration_fills_the_new_column_on_a_pooled_connection,
    test_requests_reuse_one_backend_pid_and_roll_back_what_they_left_open,
    test_pool_cap_raises_pool_timeout_naming_alias_and_sizes,
    test_a_session_the_server_ended_after_a_result_is_not_lent_again,
    test_unknown_pool_option_is_improperly_configured,
    test_invalid_database_pool_args_is_improperly_configured,
    test_options_the_legacy_backend_lacks_are_refused_unless_none,
    test_django_test_runner_migrates_and_drops_a_pooled_test_database,
    test_django_14_requests_reuse_one_backend_pid_and_roll_back,
    test_no_frame_of_ours_on_django_error_page_shows_the_password,
    test_review_a_thread_that_ends_holding_a_connection_gives_it_back_rolled_back,
    test_review_a_thread_whose_locals_are_freed_late_gives_its_connection_to_a_waiting_checkout,
    test_review_a_wrapper_dropped_holding_a_connection_is_reset_when_collected,
    test_review_a_cursor_kept_past_close_cannot_run_on_the_next_borrowers_session,
    test_review_driver_state_read_only_cursor_factory_notifies_reset_at_checkin,
    test_review_a_failing_connection_created_receiver_gives_the_connection_back,
    test_review_a_fork_child_neither_uses_nor_ends_its_parents_sessions,
    test_review_keyboardinterrupt_in_checkin_or_checkout_leaves_nothing_dirty_or_held,
    test_review_a_transaction_begun_by_hand_is_rolled_back_at_checkin,
    test_review_a_health_check_to_a_server_that_stops_answering_ends_at_the_timeout,
    test_review_a_password_in_name_or_dsn_is_in_no_stats_repr_or_frame_of_ours,
    test_review_pool_options_not_a_dict_is_improperly_configured,
    test_south_probe_migrate_backwards_fake_failure_dry_run_test_runner_two_aliases,
    test_password_never_appears_in_any_output,
]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-k", default="", help="run only the checks whose name contains this")
    args = parser.parse_args(argv)
    # `make test` runs this lane in the background and, when it is itself
    # ended early, ends the lane with SIGTERM: exit through the `finally`
    # below, which removes the lane's PostgreSQL (as a Ctrl-C does).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.monotonic()
    interpreter = python27()
    if interpreter is None:
        why = "no Python 2.7 interpreter (looked on PATH for python2.7 and in pyenv's versions)"
        if os.environ.get("CI", "").lower() == "true":
            say(f"\nLEGACY LANE FAILED: {why}; CI must run it (install 2.7.18 with pyenv).")
            return 1
        bar = "!" * 78
        say(f"\n{bar}\n!! LEGACY LANE SKIPPED: {why}.\n!! Python 2.7 + Django 1.6 + South "
            f"were NOT tested. Install it (pyenv install 2.7.18) to run them.\n{bar}")
        say("legacy: 0 passed, 0 failed, 1 skipped")
        return 0
    say(f"==> legacy lane: {interpreter}, {', '.join(REQUIREMENTS)}")
    python = setup_venv(interpreter, VENV, REQUIREMENTS)
    python_dj14 = setup_venv(interpreter, VENV_DJ14, REQUIREMENTS_DJ14)
    cluster = None
    url = os.environ.get("DATABASE_URL")
    if url:
        parts = urlsplit(url)
        host, port, password = parts.hostname or "127.0.0.1", parts.port or 5432, unquote(
            parts.password or "")
    else:
        cluster = Cluster()
        cluster.start()
        host, port, password = cluster.host, cluster.port, PASSWORD
    lane = Lane(python, python_dj14, host, port, password)
    lane.socket_dir = cluster.socket_dir if cluster is not None else None
    passed = failed = 0
    try:
        lane.sql(f'DROP DATABASE IF EXISTS "{DATABASE}"', database="postgres")
        lane.sql(f'CREATE DATABASE "{DATABASE}"', database="postgres")
        # The review of the ping watch (tests/legacy/watch_review.py).
        from tests.legacy.watch_review import TESTS as WATCH_TESTS

        for test in TESTS + WATCH_TESTS:
            if args.k not in test.__name__:
                continue
            began = time.monotonic()
            try:
                test(lane)
            except Exception:
                failed += 1
                say(f"FAILED {test.__name__}\n{traceback.format_exc()}")
            else:
                passed += 1
                say(f"PASSED {test.__name__} ({time.monotonic() - began:.1f}s)")
    finally:
        lane.cleanup()
        if cluster is not None:
            cluster.destroy()
    say(f"legacy: {passed} passed, {failed} failed in {time.monotonic() - started:.1f}s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
