"""OpenTelemetry: the pool reports under the semantic conventions' names, through the global provider."""

from __future__ import annotations

import threading

from django.db import connections
from django_postgrespool import metrics

from tests.metrics.conftest import collected, points_of
from tests.support.requests import run_request

POOL_NAME = "db.client.connection.pool.name"
STATE = "db.client.connection.state"


def test_pool_state_is_observed_under_the_semantic_convention_names(otel_reader, pooled_alias):
    alias, _ = pooled_alias("otel_state", pool_options={"pool_size": 2, "max_overflow": 1})
    holding, release = threading.Event(), threading.Event()

    def hold(cursor):
        cursor.execute("SELECT 1")
        holding.set()
        release.wait(10)

    holder = threading.Thread(target=run_request, args=(alias, hold))
    holder.start()
    try:
        assert holding.wait(10)
        run_request(alias)  # a second connection, given back: idle
        got = collected(otel_reader)
    finally:
        release.set()
        holder.join()
    count = {p.attributes[STATE]: p.value for p in points_of(got, "db.client.connection.count", alias)}
    assert count == {"used": 1, "idle": 1}
    single = {
        name: [p.value for p in points_of(got, name, alias)]
        for name in (
            "db.client.connection.idle.max",
            "db.client.connection.idle.min",
            "db.client.connection.max",
            "db.client.connection.pending_requests",
            "db.client.connection.timeouts",
        )
    }
    assert single == {
        "db.client.connection.idle.max": [2],
        "db.client.connection.idle.min": [0],
        "db.client.connection.max": [3],
        "db.client.connection.pending_requests": [0],
        "db.client.connection.timeouts": [0],
    }
    kinds = {name: type(ms[0].data).__name__ for name, ms in got.items()}
    units = {name: ms[0].unit for name, ms in got.items()}
    assert kinds["db.client.connection.count"] == "Sum"
    assert not got["db.client.connection.count"][0].data.is_monotonic
    assert got["db.client.connection.timeouts"][0].data.is_monotonic
    assert units["db.client.connection.count"] == "{connection}"
    assert units["db.client.connection.pending_requests"] == "{request}"
    assert units["db.client.connection.timeouts"] == "{timeout}"


def test_a_timing_passed_to_the_hook_lands_in_the_bucket_the_conventions_advise(otel_reader):
    collected(otel_reader)  # an SDK has collected: the histograms are fed from now on
    assert metrics.timing_observers, "the OpenTelemetry histograms did not attach to the hook"
    metrics.notify_timing("otel_hook", "wait", 0.02)
    metrics.notify_timing("otel_hook", "wait", 12.0)
    [wait] = points_of(collected(otel_reader), "db.client.connection.wait_time", "otel_hook")
    assert list(wait.explicit_bounds) == [0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10]
    assert list(wait.bucket_counts) == [0, 0, 0, 1, 0, 0, 0, 0, 0, 1]
    assert (wait.count, wait.sum) == (2, 12.02)


def test_checkout_wait_use_and_create_times_are_recorded_by_the_pool(otel_reader, pooled_alias):
    # Needs the core's timing hook (django_postgrespool.metrics.notify_timing).
    alias, _ = pooled_alias("otel_times")
    collected(otel_reader)
    run_request(alias)
    connections[alias].close()
    got = collected(otel_reader)
    counts = {
        name: sum(p.count for p in points_of(got, name, alias))
        for name in (
            "db.client.connection.create_time",
            "db.client.connection.wait_time",
            "db.client.connection.use_time",
        )
    }
    assert counts == {
        "db.client.connection.create_time": 1,
        "db.client.connection.wait_time": 1,
        "db.client.connection.use_time": 1,
    }
    [use] = points_of(got, "db.client.connection.use_time", alias)
    assert use.sum > 0
