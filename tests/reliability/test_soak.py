"""Soak: mixed reads and writes, random backend terminations and a server restart.

Runs ``RELIABILITY_SOAK_SECONDS`` (default 60) seconds.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import os
import random
import threading
import time

import pytest
from django.db import transaction
from django_postgrespool import pool_stats

from tests.reliability.figures import record
from tests.reliability.load import Load, assert_only_database_errors, failures, rss_kib, wait_until
from tests.support.db import Monitor

pytestmark = pytest.mark.reliability

SECONDS = float(os.environ.get("RELIABILITY_SOAK_SECONDS", "60"))
THREADS = 16
POOL = {"pool_size": 8, "max_overflow": 4, "timeout": 10}
MAX_WRITES = 100_000  # per thread; then it only reads
FAILED, UNKNOWN, COMMITTED = 1, 2, 3


class Killer(threading.Thread):
    """Terminate a random pooled backend every ``every`` seconds; survive restarts."""

    def __init__(self, url: str, app: str, every: float) -> None:
        super().__init__(daemon=True)
        self.url, self.app, self.every = url, app, every
        self.stop = threading.Event()
        self.killed = 0
        self.rng = random.Random(60)

    def run(self) -> None:
        monitor = None
        while not self.stop.wait(self.every):
            try:
                monitor = monitor or Monitor(self.url)
                pids = monitor.pids(self.app)
                if pids:
                    monitor.query("SELECT pg_terminate_backend(%s)", (self.rng.choice(pids),))
                    self.killed += 1
            except Exception:  # noqa: BLE001 - the server is restarting: try next round
                if monitor is not None:
                    with contextlib.suppress(Exception):
                        monitor.close()
                monitor = None
        if monitor is not None:
            monitor.close()


def test_soak_loses_nothing_and_leaks_nothing(own_alias, own_cluster):
    alias, app = own_alias("soak", pool_options=POOL)
    admin = Monitor(own_cluster.url())
    admin.query("CREATE TABLE soak_rows (thread int, seq int, PRIMARY KEY (thread, seq))")
    admin.query("CREATE TABLE soak_counters (thread int PRIMARY KEY, n int NOT NULL)")
    admin.query(f"INSERT INTO soak_counters SELECT i, 0 FROM generate_series(0, {THREADS - 1}) i")
    admin.close()

    # Outcome of write number ``seq`` of thread ``me``: status[me][seq].
    # Allocated (and touched) before the RSS baseline, so that memory
    # measures the pool, not the test's bookkeeping.
    status = [bytearray(b"\x00") * MAX_WRITES for _ in range(THREADS)]
    local = threading.local()
    thread_ids = itertools.count()

    def body(cursor):
        if not hasattr(local, "me"):
            local.me, local.seq, local.rng = next(thread_ids), 0, random.Random()
        me = local.me
        if local.rng.random() < 0.6 or local.seq >= MAX_WRITES:
            # In one snapshot, a thread's rows and its counter always agree.
            cursor.execute(
                "SELECT (SELECT count(*) FROM soak_rows WHERE thread = %s), "
                "(SELECT n FROM soak_counters WHERE thread = %s)",
                [me, me],
            )
            rows, counter = cursor.fetchone()
            assert rows == counter, (me, rows, counter)
            return
        seq = local.seq
        local.seq += 1
        status[me][seq] = FAILED
        with transaction.atomic(using=alias):
            cursor.execute("INSERT INTO soak_rows VALUES (%s, %s)", [me, seq])
            cursor.execute("UPDATE soak_counters SET n = n + 1 WHERE thread = %s", [me])
            status[me][seq] = UNKNOWN  # from here on, only COMMIT can fail
        status[me][seq] = COMMITTED

    killer = Killer(own_cluster.url(), app, every=0.5)
    restarted_at = None
    with Load(alias, THREADS, body=body, think=0.001, keep_successes=False) as load:
        time.sleep(min(5.0, SECONDS / 6))  # warm up: pool, driver, caches
        gc.collect()
        rss_before = rss_kib()
        started = time.monotonic()
        killer.start()
        try:
            while time.monotonic() - started < SECONDS:
                if restarted_at is None and time.monotonic() - started > SECONDS / 2:
                    own_cluster.restart("fast")
                    restarted_at = time.monotonic()
                time.sleep(0.2)
        finally:
            killer.stop.set()
            killer.join(10)
        time.sleep(1.0)  # a last stretch without faults
    outcomes = load.snapshot()
    gc.collect()
    rss_after = rss_kib()

    assert_only_database_errors(outcomes)
    assert restarted_at is not None
    m = Monitor(own_cluster.url())
    try:
        in_db = {tuple(r) for r in m.query("SELECT thread, seq FROM soak_rows")}
        counters = dict(m.query("SELECT thread, n FROM soak_counters"))
        (stats,) = pool_stats(alias)
        assert stats["checked_out"] == 0
        wait_until(lambda: m.count(app) <= POOL["pool_size"], 5)
        sessions = m.count(app)
    finally:
        m.close()

    # Every committed row is there; nothing else but rows whose COMMIT's
    # answer was lost; counters match rows (each transaction was atomic).
    def keys(code):
        return {(t, i) for t in range(THREADS) for i, s in enumerate(status[t]) if s == code}

    committed, uncertain = keys(COMMITTED), keys(UNKNOWN)
    attempted = len(committed) + len(uncertain) + len(keys(FAILED))
    assert committed <= in_db
    assert in_db - committed <= uncertain
    per_thread: dict[int, int] = {}
    for thread, _ in in_db:
        per_thread[thread] = per_thread.get(thread, 0) + 1
    assert all(counters[t] == per_thread.get(t, 0) for t in counters)
    assert sessions <= POOL["pool_size"]
    growth = rss_after - rss_before
    assert growth < 16 * 1024, f"RSS grew by {growth} KiB"

    case = f"soak {SECONDS:g}s, {THREADS} threads"
    record(case, "requests", load.successes + len(outcomes))
    record(case, "failed requests", len(failures(outcomes)))
    record(case, "backends terminated", killer.killed)
    record(case, "server restarts", 1)
    record(case, "writes attempted", attempted)
    record(case, "rows committed (all found)", len(committed))
    record(case, "commit outcome unknown", len(uncertain))
    record(case, "rows in db", len(in_db))
    record(case, "checked out after", stats["checked_out"])
    record(case, "server sessions after", sessions)
    record(case, "discarded", stats["invalidated"])
    record(case, "RSS before", rss_before // 1024, "MiB")
    record(case, "RSS after", rss_after // 1024, "MiB")
    record(case, "RSS growth", growth, "KiB")
