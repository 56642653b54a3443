"""OpenTelemetry: the pool reports under the semantic conventions' names, through the global provider."""

from __future__ import annotations


from django.db import connections
from django_postgrespool import metrics

from tests.metrics.conftest import collected, points_of
from tests.support.requests import connection_held_elsewhere, run_request

POOL_NAME = "db.client.connection.pool.name"
STATE = "db.client.connection.state"


def test_pool_state_is_observed_under_the_semantic_convention_names(otel_reader, pooled_alias):
    alias, _ = pooled_alias("otel_state", pool_options={"pool_size": 2, "max_overflow": 1})
    with connection_held_elsewhere(alias):
        run_request(alias)  # a second connection, given back: idle
        got = collected(otel_reader)
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


def test_the_histograms_are_fed_from_the_pools_counts_with_nothing_on_the_checkout_path(otel_reader):
    from django_postgrespool.metrics import otel

    collected(otel_reader)  # an SDK has collected
    assert otel.register().feed == "merge"
    assert metrics.timing_observers == (), "a checkout would call an observer"


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
