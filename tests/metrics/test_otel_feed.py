"""The OpenTelemetry histograms' two feeds give the same figures.

The *merge* feed adds the pool's own bucket counts to the SDK's aggregations
at each collection (nothing per checkout); the *replay* feed records every
timing through the API. Here both run on their own SDK providers over the same
timings, taken by the pool's real histograms, and what each exports is
compared, collection after collection, in cumulative and delta temporality.
"""

from __future__ import annotations

import math
import random
import threading

import pytest
from django_postgrespool import metrics
from django_postgrespool.metrics import otel
from django_postgrespool.pool import TIME_BUCKETS, _Histogram
from opentelemetry.sdk.metrics import Histogram as SdkHistogram
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import AggregationTemporality, InMemoryMetricReader
from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View

from tests.metrics.conftest import collected, points_of

NAMES = {
    "wait": "db.client.connection.wait_time",
    "use": "db.client.connection.use_time",
    "create": "db.client.connection.create_time",
}


class FakePool:
    """What the feed reads of a pool: its alias, its histograms, whether it is done."""

    def __init__(self, alias: str) -> None:
        self.alias = alias
        self.closed = False
        self._histograms = {kind: _Histogram(alias, kind) for kind in NAMES}

    def histograms(self) -> dict[str, _Histogram]:
        return self._histograms

    def in_use(self) -> int:
        return 0


def provider(temporality: AggregationTemporality, views: tuple = ()) -> tuple:
    reader = InMemoryMetricReader(preferred_temporality={SdkHistogram: temporality})
    return MeterProvider(metric_readers=[reader], views=list(views)), reader


def feeds(pools: list[FakePool], temporality: AggregationTemporality, views: tuple = ()):
    merged_provider, merged = provider(temporality, views)
    replayed_provider, replayed = provider(temporality, views)
    a = otel.Instruments(merged_provider.get_meter("django_postgrespool"), sdk=True,
                         pools=lambda: pools)
    b = otel.Instruments(replayed_provider.get_meter("django_postgrespool"), sdk=True,
                         pools=lambda: pools, merge=False)
    return (a, merged), (b, replayed)


def summary(reader, alias: str) -> dict:
    out = {}
    got = collected(reader)
    for kind, name in NAMES.items():
        for p in points_of(got, name, alias):
            out[kind] = (p.count, list(p.bucket_counts), round(p.sum, 9), p.min, p.max)
    return out


@pytest.mark.parametrize("temporality", [AggregationTemporality.CUMULATIVE,
                                         AggregationTemporality.DELTA])
def test_merged_and_replayed_feeds_export_the_same_histograms(temporality):
    pools = [FakePool("feed_a"), FakePool("feed_b")]
    (a, merged), (b, replayed) = feeds(pools, temporality)
    try:
        assert (a.feed, b.feed) == ("merge", "replay")
        rng = random.Random(7)
        for _ in range(6):
            for pool in pools:
                for kind in NAMES:
                    for _ in range(rng.choice((0, 1, 5, 40))):
                        # Every bucket, the bounds themselves included.
                        pool.histograms()[kind].observe(
                            rng.choice((rng.uniform(0, 12), rng.choice(TIME_BUCKETS))))
            for pool in pools:
                # Merged first: it takes the interval's min/max off the histograms.
                got, want = summary(merged, pool.alias), summary(replayed, pool.alias)
                assert got == want
    finally:
        b.unhook()
    assert metrics.timing_observers == ()


def test_a_view_with_other_bounds_gets_the_replayed_feed():
    pools = [FakePool("feed_view")]
    views = (View(instrument_name="db.client.connection.*",
                  aggregation=ExplicitBucketHistogramAggregation((0.5, 2.0))),)
    (a, merged), (b, replayed) = feeds(pools, AggregationTemporality.CUMULATIVE, views)
    try:
        assert (a.feed, b.feed) == ("replay", "replay")
        for seconds in (0.1, 0.7, 3.0, 3.0):
            pools[0].histograms()["use"].observe(seconds)
        got = summary(merged, "feed_view")["use"]
        assert got == (4, [1, 1, 2], 6.8, 0.1, 3.0)
        assert got == summary(replayed, "feed_view")["use"]
    finally:
        a.unhook()
        b.unhook()


def test_no_timing_is_lost_while_checkouts_time_during_collections():
    pools = [FakePool("feed_race")]
    merged_provider, merged = provider(AggregationTemporality.DELTA)
    otel.Instruments(merged_provider.get_meter("django_postgrespool"), sdk=True,
                     pools=lambda: pools)
    histogram = pools[0].histograms()["wait"]
    stop = threading.Event()
    counted = []

    def time_checkouts() -> None:
        rng = random.Random()
        n = 0
        while not stop.is_set():
            histogram.observe(rng.uniform(0, 0.02))
            n += 1
        counted.append(n)

    threads = [threading.Thread(target=time_checkouts) for _ in range(3)]
    for t in threads:
        t.start()
    exported = 0
    total = 0.0
    for _ in range(300):
        point = summary(merged, "feed_race").get("wait")
        if point:
            exported += point[0]
            total += point[2]
    stop.set()
    for t in threads:
        t.join()
    last = summary(merged, "feed_race").get("wait")
    if last:
        exported += last[0]
        total += last[2]
    print(f"{sum(counted)} timings taken during 300 collections, "
          f"{sum(histogram.counts)} counted, {exported} exported")
    assert exported == sum(counted) == sum(histogram.counts)
    assert math.isclose(total, histogram.total, rel_tol=1e-9)


class RacingHistogram(_Histogram):
    """A histogram whose take() lets a checkout time itself between reading the counts and the sum.

    take() reads them with no lock (the checkout path takes none): with
    threads, a timing can land there. Here it lands there when asked.
    """

    __slots__ = ("between",)

    def take(self):
        low, high = self.low, self.high
        self.low, self.high = float("inf"), float("-inf")
        counts = list(self.counts)
        between, self.between = getattr(self, "between", None), None
        if between is not None:
            between()
        return counts, self.total, low, high


@pytest.mark.parametrize("temporality", [AggregationTemporality.DELTA,
                                         AggregationTemporality.CUMULATIVE],
                         ids=["delta", "cumulative"])
@pytest.mark.parametrize("first", [True, False], ids=["first-collection", "later-collection"])
def test_a_timing_taken_between_the_counts_and_the_sum_keeps_its_seconds(temporality, first):
    pool = FakePool("feed_between")
    histogram = pool._histograms["wait"] = RacingHistogram("feed_between", "wait")
    merged_provider, merged = provider(temporality)
    otel.Instruments(merged_provider.get_meter("django_postgrespool"), sdk=True,
                     pools=lambda: [pool])
    exported = []

    def collect():
        point = summary(merged, "feed_between").get("wait")
        if point:
            exported.append(point)

    histogram.observe(0.5)
    if not first:
        collect()
    # The first collection has the 0.5 s timing's count (the SDK's aggregation
    # is seeded with it), the 2.0 s one's sum only; or, later, no new count
    # and the 2.0 s one's sum only.
    histogram.between = lambda: histogram.observe(2.0)
    collect()
    # Its count, with one more timing's: more than the one timing with which
    # the SDK's aggregation may be seeded again (delta temporality).
    histogram.observe(1.0)
    collect()
    if temporality is AggregationTemporality.DELTA:
        count, total = sum(p[0] for p in exported), sum(p[2] for p in exported)
    else:
        count, total = exported[-1][0], exported[-1][2]
    assert (count, total) == (3, pytest.approx(3.5))
