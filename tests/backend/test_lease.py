"""How a connection is lent (pool core v2), against real PostgreSQL, in both driver lanes.

Thread affinity, the acknowledged hand-off, cursors that never outlive their
lease, connections of ended threads reclaimed without the garbage collector,
and no hang when the collector runs at every allocation.
"""

from __future__ import annotations

import gc
import threading

import pytest
from django.contrib.contenttypes.models import ContentType
from django.db import close_old_connections, connections, transaction
from django.db.backends.signals import connection_created
from django.db.utils import Error as DjangoDatabaseError
from django_postgrespool import PoolTimeout, checkout_info, pool_stats

from tests.support.requests import backend_pid, run_request


def test_a_thread_takes_back_its_own_connection_without_djangos_connect_path(
    pooled_alias, monitor
):
    # assume_role: Django runs SET ROLE when it sets a connection up; taking
    # the connection back must not run it again (the server saw nothing).
    alias, app = pooled_alias(pool_options={"pool_size": 3}, options={"assume_role": "postgres"})
    created: list[str] = []

    def on_created(sender, connection, **kwargs):
        if connection.alias == alias:
            created.append(alias)

    connection_created.connect(on_created)
    try:
        first = backend_pid(alias)
        assert checkout_info(alias)["source"] == "new"
        again = [backend_pid(alias) for _ in range(5)]
        info = checkout_info(alias)
    finally:
        connection_created.disconnect(on_created)
    assert again == [first] * 5
    assert info is not None and info["source"] == "affinity" and info["returned"]
    assert created == [alias] * 6  # connection_created: at every checkout, as Django sends it
    (stats,) = pool_stats(alias)
    assert stats["affinity_hits"] == 5
    assert stats["opened"] == 1


def test_another_thread_may_take_an_idle_connection_of_this_thread(pooled_alias):
    alias, _ = pooled_alias(pool_options={"pool_size": 3})
    mine = backend_pid(alias)
    theirs: list[int] = []
    sources: list[str] = []

    def other():
        theirs.append(backend_pid(alias))
        sources.append(checkout_info(alias)["source"])
        connections[alias].close()

    t = threading.Thread(target=other)
    t.start()
    t.join()
    assert theirs == [mine] and sources == ["idle"]
    assert pool_stats(alias)[0]["opened"] == 1


def test_affinity_path_still_finds_a_terminated_backend(pooled_alias, monitor):
    alias, app = pooled_alias(pool_options={"pool_size": 1})
    pid = backend_pid(alias)
    assert monitor.terminate(app) == 1
    assert monitor.settled_count(app, 0) == 0
    assert backend_pid(alias) != pid  # the socket check saw it: a new connection, no error
    assert pool_stats(alias)[0]["invalidated"] == 1


def test_cursor_of_a_returned_connection_cannot_run_on_the_next_borrowers_session(pooled_alias):
    # QuerySet.iterator() reads through a server-side cursor (WITH HOLD in
    # autocommit). close_old_connections() mid-loop gives the connection
    # back; the next borrower, in a transaction, must not see that cursor,
    # and the iterator must fail as with the stock engine.
    alias, _ = pooled_alias(pool_options={"pool_size": 1, "max_overflow": 0})
    conn = connections[alias]
    with conn.schema_editor() as editor:
        editor.create_model(ContentType)
    try:
        ContentType.objects.using(alias).bulk_create(
            ContentType(app_label="stale", model=f"m{n}") for n in range(50)
        )
        conn.close()
        it = ContentType.objects.using(alias).order_by("id").iterator(chunk_size=2)
        assert next(it).model == "m0"
        close_old_connections()  # as a long loop does every N rows
        assert conn.connection is None

        seen: dict[str, object] = {}
        ready, done = threading.Event(), threading.Event()

        def next_borrower():
            try:
                with transaction.atomic(using=alias):
                    with connections[alias].cursor() as cursor:
                        cursor.execute("SELECT name FROM pg_cursors")
                        seen["cursors"] = cursor.fetchall()
                        ready.set()
                        done.wait(10)
                        cursor.execute("SELECT count(*) FROM django_content_type")
                        seen["count"] = cursor.fetchone()[0]
            finally:
                connections[alias].close()

        t = threading.Thread(target=next_borrower)
        t.start()
        assert ready.wait(10)
        with pytest.raises((DjangoDatabaseError, conn.Database.Error)):
            for _ in range(3):
                next(it)
        done.set()
        t.join(10)
        assert seen == {"cursors": [], "count": 50}  # its transaction was not touched
    finally:
        conn.close()
        with connections[alias].schema_editor() as editor:
            editor.delete_model(ContentType)
        connections[alias].close()


def test_named_cursor_left_open_is_closed_on_the_server_at_checkin(pooled_alias, monitor):
    alias, app = pooled_alias(pool_options={"pool_size": 1})
    conn = connections[alias]
    cursor = conn.chunked_cursor()
    cursor.execute("SELECT generate_series(1, 100)")
    cursor.fetchmany(1)
    pid = conn.connection.info.backend_pid
    conn.close()
    assert monitor.query("SELECT count(*) FROM pg_cursors") == [(0,)]  # the monitor's own session
    open_cursors = run_request(
        alias, lambda c: (c.execute("SELECT count(*) FROM pg_cursors"), c.fetchone()[0])[1]
    )
    assert open_cursors == 0
    assert backend_pid(alias) == pid


def test_connections_of_ended_threads_are_reused_without_the_garbage_collector(pooled_alias):
    alias, _ = pooled_alias(pool_options={"pool_size": 2, "max_overflow": 0, "timeout": 5})
    errors: list[BaseException] = []

    def forget_to_close():
        try:
            with connections[alias].cursor() as cursor:
                cursor.execute("SELECT 1")
        except BaseException as error:  # noqa: BLE001
            errors.append(error)
        # ends holding the connection: Django's wrapper sits in reference cycles

    gc.disable()
    try:
        for _ in range(30):
            t = threading.Thread(target=forget_to_close)
            t.start()
            t.join()
    finally:
        gc.enable()
    assert errors == []
    (stats,) = pool_stats(alias)
    assert stats["timeouts"] == 0
    assert stats["opened"] == 1  # reclaimed before another is opened, below the cap too
    assert stats["reclaimed"] == 29


def test_no_hang_when_the_collector_runs_at_every_allocation(pooled_alias):
    # gc.set_threshold(1): a collection can start inside any allocation of the
    # pool's hot paths, while threads that die holding connections leave
    # Django wrappers in reference cycles. Nothing of ours runs at
    # collection time, so nothing can deadlock there.
    alias, _ = pooled_alias(pool_options={"pool_size": 2, "max_overflow": 1, "timeout": 20})
    old = gc.get_threshold()
    errors: list[BaseException] = []

    def polite():
        try:
            for _ in range(15):
                run_request(alias, lambda c: c.execute("SELECT 1"))
        except BaseException as error:  # noqa: BLE001
            errors.append(error)
        finally:
            connections[alias].close()

    def dies_holding():
        try:
            with connections[alias].cursor() as cursor:
                cursor.execute("SELECT 1")
        except BaseException as error:  # noqa: BLE001
            errors.append(error)

    gc.set_threshold(1)
    try:
        threads = [threading.Thread(target=polite) for _ in range(4)]
        threads += [threading.Thread(target=dies_holding) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        hung = sum(t.is_alive() for t in threads)
    finally:
        gc.set_threshold(*old)
    assert hung == 0
    assert errors == []
    run_request(alias, lambda c: c.execute("SELECT 1"))
    (stats,) = pool_stats(alias)
    assert stats["size"] <= 3


@pytest.mark.parametrize("fair_after", [0, 0.002])
def test_hand_off_race_with_timeouts_loses_no_connection(pooled_alias, monitor, fair_after):
    # fair_after=0: every checkin serves the line at once; 0.002: waiters
    # also wake up to take connections left idle, and give up meanwhile.
    alias, app = pooled_alias(
        pool_options={"pool_size": 2, "max_overflow": 0, "timeout": 0.005, "fair_after": fair_after}
    )
    barrier = threading.Barrier(6)
    outcome = {"ok": 0, "timeout": 0}
    lock = threading.Lock()

    def borrower():
        barrier.wait(10)
        for _ in range(40):
            try:
                run_request(alias, lambda c: c.execute("SELECT pg_sleep(0.002)"))
                key = "ok"
            except PoolTimeout:
                key = "timeout"
            with lock:
                outcome[key] += 1
        connections[alias].close()

    threads = [threading.Thread(target=borrower) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    (stats,) = pool_stats(alias)
    print(f"hand-off race on PostgreSQL: {outcome}, hand-offs {stats['handoffs']}")
    assert outcome["ok"] + outcome["timeout"] == 240
    assert outcome["timeout"] > 0 and stats["handoffs"] > 0
    assert stats["checked_out"] == 0 and stats["size"] == 2
    assert stats["opened"] == 2  # no connection orphaned and replaced
    assert monitor.settled_count(app, 2) == 2
