"""``pg_terminate_backend`` of random pooled connections under load."""

from __future__ import annotations

import random
import time
from collections import Counter

import pytest
from django_postgrespool import pool_stats

from tests.reliability.figures import record
from tests.reliability.load import Load, assert_only_database_errors, failures, wait_until

pytestmark = pytest.mark.reliability

POOL = {"pool_size": 8, "max_overflow": 0, "timeout": 10}
TERMINATED = "terminating connection due to administrator command"
HUNG_UP = "server closed the connection unexpectedly"


@pytest.mark.parametrize("pre_ping", [False, "socket", True], ids=["no-ping", "socket", "ping"])
@pytest.mark.parametrize(
    ("threads", "think"), [(24, 0.0), (4, 0.01)], ids=["busy-pool", "idle-connections"]
)
def test_each_terminated_backend_fails_at_most_one_request_and_is_replaced(
    pooled_alias, monitor, pre_ping, threads, think
):
    # busy-pool: 24 threads on 8 connections, kills hit requests in flight;
    # idle-connections: 4 threads, most kills hit connections idle in the pool.
    alias, app = pooled_alias("terminate", pool_options={**POOL, "pre_ping": pre_ping})
    rng = random.Random(6)
    killed: dict[int, float] = {}
    # Warm up: open all the pool's connections.
    with Load(alias, POOL["pool_size"], sql="SELECT pg_sleep(0.02)") as warm:
        assert wait_until(lambda: monitor.count(app) == POOL["pool_size"], 20)
    assert failures(warm.snapshot()) == []
    with Load(alias, threads, sql="SELECT pg_backend_pid(), pg_sleep(0.005)", think=think) as load:
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline and len(killed) < 40:
            alive = [p for p in monitor.pids(app) if p not in killed]
            if alive:
                pid = rng.choice(alive)
                monitor.query("SELECT pg_terminate_backend(%s)", (pid,))
                # pg_terminate_backend only signals: wait until the backend is gone.
                assert wait_until(lambda pid=pid: pid not in monitor.pids(app), 5)
                killed[pid] = time.monotonic()
            time.sleep(0.1)
        time.sleep(0.5)
    outcomes = load.snapshot()
    assert_only_database_errors(outcomes)
    failed = failures(outcomes)
    # A request whose connection was terminated while Django set it up (a
    # new one: the kills pick any session of the pool) failed before it
    # knew the backend's pid. libpq says why: the server's own message, or,
    # when the server had hung up before libpq read that message, its own
    # (seen once in CI, psycopg2, idle connections).
    unnamed = [o for o in failed if o.pid is None]
    assert all(
        TERMINATED in str(o.error) or HUNG_UP in str(o.error) for o in unnamed
    ), [repr(o.error) for o in unnamed][:3]
    failed = [o for o in failed if o.pid is not None]
    per_backend = Counter(o.pid for o in failed)
    # A failure always happened on a connection that was terminated, and
    # each terminated connection failed at most one request.
    assert set(per_backend) <= set(killed)
    assert len(per_backend) + len(unnamed) <= len(killed)
    assert max(per_backend.values(), default=0) <= 1
    # A request that began after its backend was already gone failed on a
    # stale connection: the health check (socket or ping) must prevent that.
    stale = [o for o in failed if o.start > killed[o.pid]]
    if pre_ping is not False:
        assert stale == [], [repr(o.error) for o in stale[:3]]
    # No request succeeded on a backend after it was terminated.
    late = [o for o in outcomes if o.ok and o.pid in killed and o.start > killed[o.pid]]
    assert late == []
    (stats,) = pool_stats(alias)
    assert stats["checked_out"] == 0
    # Replaced: the pool still serves 8 concurrent requests, on live backends.
    with Load(alias, 8, sql="SELECT pg_sleep(0.01)") as again:
        assert wait_until(lambda: sum(o.ok for o in again.snapshot()) >= 80, 10)
    assert failures(again.snapshot()) == []
    (stats,) = pool_stats(alias)
    assert stats["checked_out"] == 0
    sessions = monitor.settled_count(app, POOL["pool_size"])
    assert sessions <= POOL["pool_size"]
    assert not set(monitor.pids(app)) & set(killed)
    case = f"pg_terminate_backend, {threads} threads, pre_ping={pre_ping}"
    record(case, "requests", len(outcomes))
    record(case, "terminated", len(killed))
    record(case, "failed requests", len(failed) + len(unnamed))
    record(case, "failed during Django's connection setup", len(unnamed))
    record(case, "failed on an already-dead connection", len(stale))
    record(case, "max failures per dead backend", max(per_backend.values(), default=0))
    record(case, "discarded", stats["invalidated"])
    record(case, "checked out after", stats["checked_out"])
