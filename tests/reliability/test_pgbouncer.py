"""The pooled backend through a real PgBouncer in transaction pooling mode."""

from __future__ import annotations

import threading
import time

import pytest
from django.core import checks
from django.db import DatabaseError, models, transaction
from django.test import override_settings
from django_postgrespool import pool_stats

from tests.reliability.figures import record
from tests.reliability.load import Load, assert_only_database_errors, failures
from tests.support.db import connect, driver
from tests.support.pgbouncer import PgBouncer
from tests.support.requests import run_request
from tests.support.settings import DATABASE

pytestmark = pytest.mark.reliability

BOUNCER_POOL = 4
TABLE = "reliability_bouncer"

_model = None


def bouncer_rows():
    """Return an unmanaged model on TABLE (made on first use: never at collection)."""
    global _model
    if _model is None:

        class BouncerRow(models.Model):
            k = models.IntegerField()
            v = models.IntegerField()

            class Meta:
                app_label = "django_postgrespool"
                db_table = TABLE
                managed = False

        _model = BouncerRow
    return _model


@pytest.fixture(scope="module")
def bouncer(cluster):
    with PgBouncer(cluster, pool_mode="transaction", pool_size=BOUNCER_POOL) as b:
        admin = connect(cluster.url(DATABASE))
        with admin.cursor() as cur:
            cur.execute(f"CREATE TABLE IF NOT EXISTS {TABLE} (id serial PRIMARY KEY, k int, v int)")
        try:
            yield b
        finally:
            with admin.cursor() as cur:
                cur.execute(f"DROP TABLE IF EXISTS {TABLE}")
            admin.close()


@pytest.fixture
def bouncer_alias(pooled_alias, bouncer):
    def make(name, *, disable_cursors=True, **pool_options):
        return pooled_alias(
            name,
            pool_options={"pool_size": 4, "max_overflow": 4, **pool_options},
            PORT=str(bouncer.port),
            DISABLE_SERVER_SIDE_CURSORS=disable_cursors,
        )

    return make


def test_mixed_load_through_pgbouncer_loses_nothing(bouncer_alias, bouncer):
    alias, _ = bouncer_alias("bouncer")
    run_request(alias, lambda c: c.execute(f"TRUNCATE {TABLE}"))
    committed: list[int] = []
    lock = threading.Lock()
    counter = iter(range(1, 10**9))

    def body(cursor):
        n = next(counter)
        if n % 2:
            with transaction.atomic(using=alias):
                cursor.execute(f"INSERT INTO {TABLE} (k, v) VALUES (%s, %s)", [n, n * 2])
                cursor.execute(f"UPDATE {TABLE} SET v = v + 1 WHERE k = %s", [n])
            with lock:
                committed.append(n)
        else:
            cursor.execute(f"SELECT count(*), coalesce(sum(v), 0) FROM {TABLE}")
            cursor.fetchone()
            cursor.execute("SELECT %s::int", [n])  # the same statement, many times
            assert cursor.fetchone()[0] == n

    peak_server = 0
    with Load(alias, 16, body=body) as load:
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            peak_server = max(peak_server, bouncer.server_connections(DATABASE))
            time.sleep(0.2)
    outcomes = load.snapshot()
    assert_only_database_errors(outcomes)
    assert failures(outcomes) == [], [repr(o.error) for o in failures(outcomes)[:3]]
    rows = run_request(alias, lambda c: (c.execute(f"SELECT k, v FROM {TABLE}"), c.fetchall())[1])
    assert sorted(rows) == sorted((k, 2 * k + 1) for k in committed)
    (stats,) = pool_stats(alias)
    assert stats["checked_out"] == 0
    assert stats["peak_checked_out"] <= 8
    assert peak_server <= BOUNCER_POOL
    record("PgBouncer (transaction mode)", "requests", len(outcomes))
    record("PgBouncer (transaction mode)", "failed", 0)
    record("PgBouncer (transaction mode)", "committed rows checked", len(committed))
    record(
        "PgBouncer (transaction mode)", "peak client connections (pool)", stats["peak_checked_out"]
    )
    record("PgBouncer (transaction mode)", "peak server connections (pgbouncer)", peak_server)


def _fill(alias, n):
    run_request(
        alias,
        lambda c: c.execute(
            f"TRUNCATE {TABLE}; INSERT INTO {TABLE} (k, v) SELECT i, i FROM generate_series(1, %s) i",
            [n],
        ),
    )


def test_queryset_iterator_works_through_pgbouncer_with_disable_server_side_cursors(
    bouncer_alias,
):
    alias, _ = bouncer_alias("bouncer-iter")
    _fill(alias, 5000)

    def iterate(cursor):
        return sum(1 for _ in bouncer_rows().objects.using(alias).iterator(chunk_size=500))

    # Concurrent iterators, so that transactions interleave on the server sessions.
    results: list[int] = []
    threads = [
        threading.Thread(target=lambda: results.append(run_request(alias, iterate)))
        for _ in range(6)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == [5000] * 6


def test_queryset_iterator_breaks_through_pgbouncer_without_the_setting(bouncer_alias):
    # Why the setting matters: Django declares a server-side cursor (WITH
    # HOLD, in autocommit) in one transaction; in transaction mode pgbouncer
    # runs the next FETCH on whichever server session is free.
    alias, _ = bouncer_alias("bouncer-named", disable_cursors=False)
    _fill(alias, 5000)
    declared = threading.Event()
    release = threading.Event()

    def hog(cursor):
        # Takes the server session pgbouncer just released (it reuses the
        # most recent one), so the reader's FETCH goes to another.
        declared.wait(10)
        with transaction.atomic(using=alias):
            cursor.execute("SELECT 1")
            release.wait(10)

    def reader(cursor):
        rows = bouncer_rows().objects.using(alias).iterator(chunk_size=500)
        try:
            next(rows)  # DECLARE + first FETCH
            declared.set()
            time.sleep(0.3)
            # Django's error, or the driver's own when closing the cursor fails
            # too (ProgrammingError in psycopg 3, OperationalError in psycopg2).
            with pytest.raises((DatabaseError, driver.DatabaseError)) as raised:
                for _ in rows:
                    pass
            return str(raised.value)
        finally:
            release.set()

    hog_thread = threading.Thread(target=run_request, args=(alias, hog))
    hog_thread.start()
    try:
        message = run_request(alias, reader)
    finally:
        declared.set()
        release.set()
        hog_thread.join(10)
    message = message.strip()  # psycopg2 ends it with a newline
    assert message.startswith('cursor "_django_curs_') and message.endswith('" does not exist')


def _check_ids(alias: str) -> set[str]:
    return {
        m.id
        for m in checks.run_checks(databases=[alias], include_deployment_checks=False)
        if m.id and m.id.startswith("postgrespool.") and alias in m.msg
    }


def test_system_check_catches_missing_disable_server_side_cursors(bouncer_alias):
    alias, _ = bouncer_alias("bouncer-check", disable_cursors=False)
    # Not declared: the port probe sees a proxy in between.
    assert "postgrespool.W004" in _check_ids(alias)
    with override_settings(POSTGRESPOOL_PGBOUNCER={alias: "transaction"}):
        assert "postgrespool.E003" in _check_ids(alias)
    fixed, _ = bouncer_alias("bouncer-fixed", disable_cursors=True)
    with override_settings(POSTGRESPOOL_PGBOUNCER={fixed: "transaction"}):
        assert _check_ids(fixed) & {"postgrespool.E003", "postgrespool.W004"} == set()
    assert _check_ids(fixed) & {"postgrespool.E003", "postgrespool.W004"} == set()
