"""The one mapping from pool_stats() to metric points, and quantiles from the pool's histograms."""

from __future__ import annotations

import pytest
from django_postgrespool.metrics import Histogram, Point, points, quantile
from django_postgrespool.toolbar import _this_request

BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10)


def pool(alias: str, **values) -> dict:
    base = {"alias": alias, "pool_size": 5, "max_overflow": 10, "idle": 0, "checked_out": 0,
            "waiting": 0, "timeouts": 0, "retired": False}
    return {**base, **values}


def test_a_retired_pool_adds_its_counts_to_its_alias_and_the_limits_are_the_current_pool():
    retired = pool("default", pool_size=2, max_overflow=0, checked_out=2, timeouts=1,
                   retired=True)
    current = pool("default", idle=3, checked_out=1, waiting=4)
    got = {(p.name, p.state): p.value for p in points([retired, current])}
    assert got == {
        ("db.client.connection.count", "idle"): 3,
        ("db.client.connection.count", "used"): 3,
        ("db.client.connection.idle.max", None): 5,
        ("db.client.connection.idle.min", None): 0,
        ("db.client.connection.max", None): 15,
        ("db.client.connection.pending_requests", None): 4,
        ("db.client.connection.timeouts", None): 1,
    }


def test_a_departed_entry_adds_its_counts_and_no_gauges():
    departed = {"alias": "default", "departed": True, "pools": 3, "timeouts": 2}
    current = pool("default", idle=1, timeouts=1)
    got = {(p.name, p.state): p.value for p in points([current, departed])}
    assert got[("db.client.connection.timeouts", None)] == 3
    assert got[("db.client.connection.count", "idle")] == 1
    assert got[("db.client.connection.max", None)] == 15
    only = {(p.name, p.state): p.value for p in points([{**departed, "alias": "gone"}])}
    assert only == {("db.client.connection.timeouts", None): 2}


def test_histograms_of_one_alias_are_merged_bucket_by_bucket():
    def h(counts, total):
        return {"buckets": list(BUCKETS), "counts": counts, "sum": total, "count": sum(counts)}

    a = pool("x", wait_time_histogram=h([1, 0, 0, 0, 0, 0, 0, 0, 0, 2], 20.0))
    b = pool("x", wait_time_histogram=h([3, 1, 0, 0, 0, 0, 0, 0, 0, 0], 0.004), retired=True)
    [wait] = [p for p in points([a, b]) if p.name == "db.client.connection.wait_time"]
    assert wait == Point("db.client.connection.wait_time", "x", None,
                         Histogram(BUCKETS, (4, 1, 0, 0, 0, 0, 0, 0, 0, 2), 20.004))


@pytest.mark.parametrize(
    ("counts", "before", "expected"),
    [
        ([0] * 10, None, None),
        ([100] + [0] * 9, None, 0.00095),  # all under 1 ms: interpolated in the first bucket
        ([90, 0, 0, 10, 0, 0, 0, 0, 0, 0], None, 0.03),  # rank 95 is half-way in (10, 50] ms
        ([0] * 9 + [5], None, 10),  # above the last bound: the last bound
        ([90, 0, 0, 10, 0, 0, 0, 0, 0, 0], [90] + [0] * 9, 0.048),  # only what happened since
    ],
)
def test_quantile_is_estimated_like_promql(counts, before, expected):
    old = None if before is None else Histogram(BUCKETS, tuple(before), 0.0)
    got = quantile(0.95, Histogram(BUCKETS, tuple(counts), 0.0), old)
    assert got == (None if expected is None else pytest.approx(expected))


@pytest.mark.parametrize(
    ("before", "now", "expected"),
    [
        (None, None, "no"),
        (None, {"source": "new", "wait": 0.0, "held": 0.1, "returned": False}, "yes"),
        # The thread's previous request: given back, unchanged since.
        ({"source": "idle", "wait": 0.0, "held": 0.2, "returned": True},
         {"source": "idle", "wait": 0.0, "held": 0.2, "returned": True}, "no"),
        # CONN_MAX_AGE: the same checkout, still held since an earlier request.
        ({"source": "idle", "wait": 0.001, "held": 0.2, "returned": False},
         {"source": "idle", "wait": 0.001, "held": 5.0, "returned": False}, "kept"),
        ({"source": "idle", "wait": 0.0, "held": 0.2, "returned": True},
         {"source": "affinity", "wait": 0.0, "held": 0.01, "returned": False}, "yes"),
        # With the checkout's start time, no guessing.
        (None, {"source": "idle", "wait": 0.0, "held": 9.0, "returned": False, "started": 1.0},
         "kept"),
    ],
)
def test_the_panel_tells_this_request_checkout_from_an_earlier_one(before, now, expected):
    assert _this_request(before, now, started=2.0) == expected
