"""A server restart under 32-thread load: what fails, and how fast the pool recovers."""

from __future__ import annotations

import time

import pytest
from django_postgrespool import PoolError, pool_stats

from tests.reliability.figures import record
from tests.reliability.load import Load, assert_only_database_errors, failures, wait_until
from tests.support.db import Monitor

pytestmark = pytest.mark.reliability

THREADS = 32
POOL = {"pool_size": 8, "max_overflow": 4, "timeout": 10}
SQL = "SELECT pg_backend_pid(), pg_sleep(0.002)"


def _refused_by_backoff(error: BaseException | None) -> bool:
    return isinstance(error, PoolError) and "Not trying again yet" in str(error)


def _settled(alias: str, own_cluster, app: str) -> int:
    """Check no checkout leaked; return the server's session count of ``app``."""
    (stats,) = pool_stats(alias)
    assert stats["checked_out"] == 0, stats
    m = Monitor(own_cluster.url())
    try:
        wait_until(lambda: m.count(app) <= POOL["pool_size"], 5)
        count = m.count(app)
    finally:
        m.close()
    assert count <= POOL["pool_size"]
    return count


@pytest.mark.parametrize("mode", ["fast", "immediate"])
@pytest.mark.parametrize("pre_ping", [False, "socket", True], ids=["no-ping", "socket", "ping"])
def test_restart_under_load_recovers_within_1s_and_leaks_nothing(
    own_alias, own_cluster, mode, pre_ping
):
    alias, app = own_alias("restart", pool_options={**POOL, "pre_ping": pre_ping})
    with Load(alias, THREADS, sql=SQL) as load:
        assert wait_until(lambda: sum(o.ok for o in load.snapshot()) >= 200, 20)
        went_down = time.monotonic()
        own_cluster.restart(mode)
        accepting = time.monotonic()  # pg_ctl -w saw the server accept connections
        assert wait_until(
            lambda: any(o.ok and o.start >= accepting for o in load.snapshot()), 5, 0.005
        )
        time.sleep(1.0)  # keep the load up after recovery
    outcomes = load.snapshot()
    assert_only_database_errors(outcomes)
    before = [o for o in outcomes if o.start < went_down]
    during = [o for o in outcomes if went_down <= o.start < accepting]
    after = [o for o in outcomes if o.start >= accepting]
    # Recovery: the first request that started after the server accepted
    # connections again and succeeded, measured from that moment.
    first_ok = min(o.end for o in after if o.ok)
    recovery = first_ok - accepting
    # After the server is back, checkouts that need a new connection fail at
    # once until the reconnect backoff lets the next attempt through (by
    # design: no herd of connection attempts). Any other failure after the
    # server was back was handed a connection that died in the restart: the
    # health check's job.
    refused = [o for o in failures(after) if _refused_by_backoff(o.error)]
    stale = [o for o in failures(after) if not _refused_by_backoff(o.error)]
    case = f"restart -m {mode}, pre_ping={pre_ping}"
    record(case, "requests", len(outcomes))
    record(case, "failed in flight at shutdown", len(failures(before)))
    record(case, "failed while down", len(failures(during)))
    record(case, "failed after back up (stale connection)", len(stale))
    record(case, "refused after back up (reconnect backoff)", len(refused))
    record(case, "downtime", accepting - went_down, "s")
    record(case, "recovery", max(recovery, 0.0), "s")
    assert recovery < 1.0
    if pre_ping is False:
        assert len(stale) <= POOL["pool_size"]
    else:
        assert stale == [], [repr(o.error) for o in stale[:3]]
    record(case, "server sessions after", _settled(alias, own_cluster, app))


@pytest.mark.parametrize("mode", ["fast", "immediate"])
@pytest.mark.parametrize("pre_ping", [False, "socket", True], ids=["no-ping", "socket", "ping"])
def test_idle_pool_across_restart_fails_at_most_pool_size_requests(
    own_alias, own_cluster, mode, pre_ping
):
    # The worst case for stale connections: the whole pool sits idle while
    # the server restarts, then 32 threads ask for connections at once.
    alias, app = own_alias("idle-restart", pool_options={**POOL, "pre_ping": pre_ping})
    with Load(alias, THREADS, sql=SQL) as load:
        assert wait_until(lambda: sum(o.ok for o in load.snapshot()) >= 200, 20)
        load.pause()
        (stats,) = pool_stats(alias)
        idle = stats["idle"]
        assert idle == POOL["pool_size"]
        own_cluster.restart(mode)
        resumed = time.monotonic()
        load.resume()
        assert wait_until(lambda: sum(o.start >= resumed for o in load.snapshot()) >= 300, 20)
    outcomes = [o for o in load.snapshot() if o.start >= resumed]
    assert_only_database_errors(outcomes)
    failed = failures(outcomes)
    case = f"idle pool across restart -m {mode}, pre_ping={pre_ping}"
    record(case, "stale idle connections", idle)
    record(case, "requests after", len(outcomes))
    record(case, "failed", len(failed))
    if pre_ping is False:
        assert 1 <= len(failed) <= POOL["pool_size"]
    else:
        assert failed == [], [repr(o.error) for o in failed[:3]]
    (stats,) = pool_stats(alias)
    record(case, "discarded", stats["invalidated"])
    assert stats["invalidated"] >= idle
    record(case, "server sessions after", _settled(alias, own_cluster, app))
