"""CONN_MAX_AGE, CONN_HEALTH_CHECKS and close_pool() under pooling."""

from __future__ import annotations

import time

from django.db import connections
from django_postgrespool import close_pools, pool_stats

from tests.support.requests import backend_pid


def test_conn_max_age_zero_returns_the_connection_at_the_end_of_each_request(pooled_alias):
    alias, _ = pooled_alias(CONN_MAX_AGE=0)
    backend_pid(alias)
    assert connections[alias].connection is None
    (stats,) = pool_stats(alias)
    assert stats["checked_out"] == 0


def test_conn_max_age_keeps_the_connection_checked_out_by_the_thread_until_it_expires(
    pooled_alias,
):
    alias, _ = pooled_alias(CONN_MAX_AGE=1)
    first = backend_pid(alias)
    assert connections[alias].connection is not None
    assert pool_stats(alias)[0]["checked_out"] == 1
    assert backend_pid(alias) == first
    assert pool_stats(alias)[0]["checkouts"] == 1
    time.sleep(1.1)
    # request_started: older than CONN_MAX_AGE, so returned to the pool and
    # checked out again by the request's query.
    assert backend_pid(alias) == first
    (stats,) = pool_stats(alias)
    assert (stats["checkouts"], stats["checked_out"], stats["size"]) == (2, 1, 1)


def test_conn_max_age_none_keeps_it_for_the_thread_for_ever(pooled_alias):
    alias, _ = pooled_alias(CONN_MAX_AGE=None)
    first = backend_pid(alias)
    assert backend_pid(alias) == first
    assert pool_stats(alias)[0]["checked_out"] == 1
    connections[alias].close()
    assert pool_stats(alias)[0]["checked_out"] == 0


def test_conn_health_checks_pings_at_checkout(pooled_alias, monitor):
    alias, app = pooled_alias(CONN_HEALTH_CHECKS=True)
    first = backend_pid(alias)
    (stats,) = pool_stats(alias)
    assert stats["pre_ping"] is True
    monitor.terminate(app)
    monitor.settled_count(app, 0)
    # With a ping at checkout, even a connection whose socket looks fine
    # (no time to notice) is verified before use: no failed request.
    assert backend_pid(alias) != first


def test_close_pool_closes_idle_connections_and_next_checkout_builds_a_new_pool(
    pooled_alias, monitor
):
    alias, app = pooled_alias()
    first = backend_pid(alias)
    connections[alias].close_pool()
    assert pool_stats(alias) == []
    assert monitor.settled_count(app, 0) == 0
    assert backend_pid(alias) != first


def test_connection_checked_out_when_its_pool_is_closed_is_closed_at_checkin(pooled_alias, monitor):
    alias, app = pooled_alias(CONN_MAX_AGE=None)
    backend_pid(alias)
    assert close_pools(alias=alias) == 1
    assert monitor.settled_count(app, 1) == 1  # still in use by this thread
    connections[alias].close()
    assert monitor.settled_count(app, 0) == 0


def test_connection_failing_djangos_health_check_is_discarded_not_reused(pooled_alias):
    from unittest import mock

    alias, _ = pooled_alias(CONN_HEALTH_CHECKS=True, CONN_MAX_AGE=None)
    first = backend_pid(alias)
    wrapper = connections[alias]
    with mock.patch.object(wrapper, "is_usable", return_value=False):
        # request_started marks the connection for a health check, the
        # next query runs it: Django closes it, the pool must drop it.
        assert backend_pid(alias) != first
    (stats,) = pool_stats(alias)
    assert stats["invalidated"] == 1


def test_private_close_returns_the_connection_and_forgets_it(pooled_alias, monitor):
    alias, app = pooled_alias(pool_options={"pre_ping": False})
    wrapper = connections[alias]
    wrapper.ensure_connection()
    wrapper._close()
    assert wrapper.connection is None
    assert wrapper.is_usable() is False
    wrapper.close()  # must not close the physical connection now in the pool
    assert backend_pid(alias) > 0
    assert pool_stats(alias)[0]["invalidated"] == 0
    assert monitor.settled_count(app, 1) == 1
