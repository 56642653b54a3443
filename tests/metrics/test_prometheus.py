"""Prometheus: the same metrics in Prometheus naming, for one process and summed over workers."""

from __future__ import annotations


from django.test import RequestFactory
from django_postgrespool.metrics import points
from django_postgrespool.metrics import prometheus as prom
from prometheus_client import values
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry

from tests.support.requests import connection_held_elsewhere

BUCKETS = [0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10]


def histogram(counts: list[int], total: float) -> dict:
    return {"buckets": BUCKETS, "counts": counts, "sum": total, "count": sum(counts)}


def stats(alias: str, *, idle: int, used: int, waiting: int = 0, timeouts: int = 0,
          wait: list[int] | None = None) -> dict:
    """A pool_stats() entry with the keys the metrics read."""
    wait = wait or [0] * 10
    return {
        "alias": alias, "pool_size": 2, "max_overflow": 1, "idle": idle, "checked_out": used,
        "waiting": waiting, "timeouts": timeouts, "retired": False,
        "wait_time_histogram": histogram(wait, 0.5 * sum(wait)),
        "use_time_histogram": histogram([0] * 10, 0.0),
        "create_time_histogram": histogram([0] * 10, 0.0),
    }


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Parse an exposition into {(sample name, sorted labels): value}."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_view_serves_this_process_pools_in_prometheus_naming(pooled_alias):
    alias, _ = pooled_alias("prom_live", pool_options={"pool_size": 2, "max_overflow": 1})
    with connection_held_elsewhere(alias):
        response = prom.metrics_view(RequestFactory().get("/metrics"))
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/plain; version=")
    got = samples(response.content.decode())
    pool = (("pool_name", alias),)
    assert got[("db_client_connection_count", (("pool_name", alias), ("state", "used")))] == 1
    assert got[("db_client_connection_count", (("pool_name", alias), ("state", "idle")))] == 0
    assert got[("db_client_connection_max", pool)] == 3
    assert got[("db_client_connection_idle_max", pool)] == 2
    assert got[("db_client_connection_idle_min", pool)] == 0
    assert got[("db_client_connection_pending_requests", pool)] == 0
    assert got[("db_client_connection_timeouts_total", pool)] == 0


def test_histograms_are_exposed_cumulative_with_the_pool_buckets():
    registry = CollectorRegistry()
    for family in prom.families(points([stats("h", idle=1, used=0, wait=[5, 0, 0, 2, 0, 0, 0, 0, 0, 1])])):
        registry.register(_Fixed(family))
    from prometheus_client import generate_latest

    got = samples(generate_latest(registry).decode())
    bucket = "db_client_connection_wait_time_seconds_bucket"
    assert [got[(bucket, (("le", le), ("pool_name", "h")))] for le in
            ("0.001", "0.005", "0.01", "0.05", "0.1", "0.5", "1.0", "5.0", "10.0", "+Inf")] == [
        5, 5, 5, 7, 7, 7, 7, 7, 7, 8]
    assert got[("db_client_connection_wait_time_seconds_count", (("pool_name", "h"),))] == 8
    assert got[("db_client_connection_wait_time_seconds_sum", (("pool_name", "h"),))] == 4.0


class _Fixed:
    def __init__(self, family):
        self.family = family

    def collect(self):
        return [self.family]


def test_workers_files_add_up_and_a_dead_worker_keeps_only_its_totals(tmp_path, monkeypatch):
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    worker_a = prom._Mirror(values.MultiProcessValue(lambda: 101))
    worker_b = prom._Mirror(values.MultiProcessValue(lambda: 102))
    worker_a.write([stats("default", idle=2, used=1, waiting=3, timeouts=1,
                          wait=[4, 0, 0, 0, 0, 0, 0, 0, 0, 0])])
    worker_b.write([stats("default", idle=1, used=0, timeouts=2,
                          wait=[1, 0, 0, 1, 0, 0, 0, 0, 0, 0])])

    def scrape() -> dict:
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(tmp_path))
        from prometheus_client import generate_latest

        return samples(generate_latest(registry).decode())

    pool = (("pool_name", "default"),)
    got = scrape()
    assert got[("db_client_connection_count", pool + (("state", "idle"),))] == 3
    assert got[("db_client_connection_count", pool + (("state", "used"),))] == 1
    assert got[("db_client_connection_pending_requests", pool)] == 3
    assert got[("db_client_connection_max", pool)] == 6  # each worker's cap, summed
    assert got[("db_client_connection_timeouts_total", pool)] == 3
    assert got[("db_client_connection_wait_time_seconds_bucket", (("le", "0.001"),) + pool)] == 5
    assert got[("db_client_connection_wait_time_seconds_bucket", (("le", "+Inf"),) + pool)] == 6
    assert got[("db_client_connection_wait_time_seconds_count", pool)] == 6

    prom.multiprocess.mark_process_dead(101, str(tmp_path))
    got = scrape()
    assert got[("db_client_connection_count", pool + (("state", "idle"),))] == 1
    assert got[("db_client_connection_timeouts_total", pool)] == 3  # never goes backwards
    assert got[("db_client_connection_wait_time_seconds_count", pool)] == 6


def test_a_pool_gone_from_a_worker_drops_its_gauges_to_zero(tmp_path, monkeypatch):
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    worker = prom._Mirror(values.MultiProcessValue(lambda: 201))
    worker.write([stats("reports", idle=2, used=1)])
    worker.write([])
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(tmp_path))
    from prometheus_client import generate_latest

    got = samples(generate_latest(registry).decode())
    assert got[("db_client_connection_count", (("pool_name", "reports"), ("state", "idle")))] == 0
