"""Adversarial tests of the operational layer: exporters, sampler, registry, checks, pgpool.

Unit tests build pools on the fake DB-API of test_adversarial.py and put them
in the real registry (under an alias added to DATABASES for the test, so that
building a pool retires only its alias's others); integration tests run on
the suite's PostgreSQL. Process-global state (the sampler, signals) is tested
in subprocesses.
"""

from __future__ import annotations

import gc
import itertools
import json
import subprocess
import sys
import threading
import time
import uuid
import weakref
from collections.abc import Iterator
from io import StringIO
from typing import Any

import pytest
from django.core.management import call_command
from django.db import connections
from django_postgrespool import PoolTimeout, registry
from django_postgrespool.errors import PoolError
from django_postgrespool.options import PoolOptions
from django_postgrespool.pool import ConnectionPool

from tests.backend.test_adversarial import (  # noqa: F401 - _fake_db_reset is an autouse fixture
    TARGET,
    FakeConnection,
    _fake_db_reset,
    me,
    racy,
)
from tests.conftest import ROOT
from tests.support.requests import connection_held_elsewhere, run_request

prometheus_client = pytest.importorskip("prometheus_client")
pytest.importorskip("opentelemetry.sdk.metrics")

from django_postgrespool.metrics import otel, sampler  # noqa: E402
from django_postgrespool.metrics import prometheus as prom  # noqa: E402
from opentelemetry.sdk.metrics import MeterProvider  # noqa: E402
from opentelemetry.sdk.metrics.export import InMemoryMetricReader  # noqa: E402
from prometheus_client.registry import CollectorRegistry  # noqa: E402

ALIAS = "adv_ops"
POOL = (("pool_name", ALIAS),)
_versions = itertools.count()


@pytest.fixture
def fake_alias(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """An alias in DATABASES (not pooled: the checks and pgpool ignore it) for fake pools.

    A new name for each test: pools of earlier tests still in the registry's
    retired set (kept alive by a traceback) must not count.
    """
    global ALIAS, POOL
    ALIAS = f"adv_ops_{uuid.uuid4().hex[:8]}"
    POOL = (("pool_name", ALIAS),)
    monkeypatch.setitem(connections.settings, ALIAS, {"ENGINE": "django.db.backends.dummy"})
    yield ALIAS
    registry.close_pools(alias=ALIAS)


def build(**options: object) -> ConnectionPool:
    """Build the alias's pool in the registry, as a settings change in place does: the
    previous pool of the alias is retired."""
    opts = {"pool_size": 2, "max_overflow": 0, "timeout": 5.0, **options}
    return registry.get_pool(
        (ALIAS, next(_versions)),
        lambda: ConnectionPool(
            ALIAS, PoolOptions(**opts), TARGET, connect_errors=(ConnectionRefusedError,)  # type: ignore[arg-type]
        ),
    )


def time_out_once(pool: ConnectionPool) -> None:
    """One checkout that times out (pool_size=1, max_overflow=0) and one that is used."""
    lease = pool.checkout(FakeConnection, None, me())
    with pytest.raises(PoolTimeout):
        pool.checkout(FakeConnection, None, me())
    pool.checkin(lease)


def scrape() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """One Prometheus scrape of this process's pools (single-process mode)."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in prom.PoolCollector().collect()
        for s in family.samples
    }


def otel_sdk() -> tuple[otel.Instruments, InMemoryMetricReader, MeterProvider]:
    """The pools' instruments on a private SDK provider (not the global one)."""
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    instruments = otel.Instruments(provider.get_meter("adv_ops"), sdk=True)
    return instruments, reader, provider


def otel_collect(reader: InMemoryMetricReader) -> dict[str, list[Any]]:
    """Collect once; return the data points of ALIAS by metric name."""
    data = reader.get_metrics_data()
    out: dict[str, list[Any]] = {}
    for resource in data.resource_metrics if data else []:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                for p in metric.data.data_points:
                    if p.attributes.get(otel.POOL_NAME) == ALIAS:
                        out.setdefault(metric.name, []).append(p)
    return out


# -- counters across pool retirement -----------------------------------------------


def test_prometheus_timeouts_total_never_goes_backwards_when_the_alias_pool_is_retired(
    fake_alias,
) -> None:
    old = build(pool_size=1, timeout=0.01)
    time_out_once(old)
    before = scrape()[("db_client_connection_timeouts_total", POOL)]
    assert before == 1
    build(pool_size=1, timeout=0.01)  # the alias's settings changed in place: `old` is retired
    assert old.retired and old.in_use() == 0
    after = scrape()[("db_client_connection_timeouts_total", POOL)]
    assert after >= before, f"counter went from {before} to {after}"


def test_prometheus_histograms_never_go_backwards_when_the_alias_pool_is_retired(
    fake_alias,
) -> None:
    old = build()
    for _ in range(3):
        old.checkin(old.checkout(FakeConnection, None, me()))
    name = ("db_client_connection_use_time_seconds_count", POOL)
    before = scrape()[name]
    assert before == 3
    new = build()
    new.checkin(new.checkout(FakeConnection, None, me()))
    after = scrape()[name]
    assert after >= before, f"use_time count went from {before} to {after}"


def test_prometheus_counts_of_a_retired_pool_still_lending_are_added_to_the_alias(
    fake_alias,
) -> None:
    old = build(pool_size=1, timeout=0.01)
    time_out_once(old)
    held = old.checkout(FakeConnection, None, me())
    new = build(pool_size=3, max_overflow=1)
    new.checkin(new.checkout(FakeConnection, None, me()))
    got = scrape()
    assert got[("db_client_connection_timeouts_total", POOL)] == 1
    assert got[("db_client_connection_count", (*POOL, ("state", "used")))] == 1
    assert got[("db_client_connection_count", (*POOL, ("state", "idle")))] == 1
    assert got[("db_client_connection_max", POOL)] == 4  # the current pool's limits
    assert got[("db_client_connection_use_time_seconds_count", POOL)] == 2
    old.checkin(held)


def test_otel_timeouts_counter_never_goes_backwards_when_the_alias_pool_is_retired(
    fake_alias,
) -> None:
    _, reader, provider = otel_sdk()
    try:
        old = build(pool_size=1, timeout=0.01)
        time_out_once(old)
        [before] = otel_collect(reader)["db.client.connection.timeouts"]
        assert before.value == 1
        build(pool_size=1, timeout=0.01)
        [after] = otel_collect(reader)["db.client.connection.timeouts"]
        assert after.value >= before.value, f"counter went from {before.value} to {after.value}"
    finally:
        provider.shutdown()


def test_a_retired_pool_collected_before_any_scrape_or_collection_still_counts(
    fake_alias,
) -> None:
    instruments, reader, provider = otel_sdk()
    try:
        old = build(pool_size=1, timeout=0.01)
        time_out_once(old)  # one timeout, one use
        [first] = otel_collect(reader)["db.client.connection.use_time"]
        assert first.count == 1
        old.checkin(old.checkout(FakeConnection, None, me()))  # not collected yet
        build(pool_size=1, timeout=0.01)  # retires `old`, drained
        gone = weakref.ref(old)
        del old
        registry.all_pools()  # any look at the registry lets the drained pool go
        gc.collect()
        assert gone() is None, "a drained retired pool is kept alive"
        got = scrape()
        assert got[("db_client_connection_timeouts_total", POOL)] == 1
        assert got[("db_client_connection_use_time_seconds_count", POOL)] == 2
        for _ in range(2):  # its last timings reach the SDK once, not at every collection
            collected = otel_collect(reader)
            assert [p.count for p in collected["db.client.connection.use_time"]] == [2]
            assert [p.value for p in collected["db.client.connection.timeouts"]] == [1]
        assert instruments.feed == "merge"
    finally:
        provider.shutdown()


def test_many_retirements_keep_one_departed_entry_per_alias_and_no_pool(fake_alias) -> None:
    refs = []
    for _ in range(200):
        pool = build()
        pool.checkin(pool.checkout(FakeConnection, None, me()))
        refs.append(weakref.ref(pool))
    del pool
    registry.all_pools()
    gc.collect()
    assert [r for r in refs[:-1] if r() is not None] == []
    assert [p for p in registry._retired if p.alias == ALIAS] == []
    [departed] = registry.departed_stats(ALIAS)
    assert (departed["pools"], departed["checkouts"]) == (199, 199)
    assert departed["use_time_histogram"]["count"] == 199
    assert scrape()[("db_client_connection_use_time_seconds_count", POOL)] == 200


def test_the_gauges_of_a_drained_pool_are_not_kept(fake_alias) -> None:
    old = build(pool_size=1, timeout=0.01)
    time_out_once(old)
    held = old.checkout(FakeConnection, None, me())
    new = build(pool_size=3)
    new.checkin(new.checkout(FakeConnection, None, me()))
    old.checkin(held)  # closed at its return: `old` is drained
    used, idle = (("db_client_connection_count", (*POOL, ("state", s))) for s in ("used", "idle"))
    got = scrape()
    assert (got[used], got[idle], got[("db_client_connection_max", POOL)]) == (0, 1, 3)
    assert got[("db_client_connection_timeouts_total", POOL)] == 1
    assert [s["retired"] for s in registry.pool_stats(ALIAS)] == [False]  # no phantom row
    [departed] = registry.departed_stats(ALIAS)
    assert "idle" not in departed and "checked_out" not in departed
    registry.close_pools(alias=ALIAS)  # no pool left: counters only, no gauges
    got = scrape()
    assert got[("db_client_connection_timeouts_total", POOL)] == 1
    assert got[("db_client_connection_use_time_seconds_count", POOL)] == 3
    assert not [k for k in got if k[1] in {POOL, (*POOL, ("state", "used"))}
                and k[0] in {"db_client_connection_count", "db_client_connection_max"}]


def test_departed_totals_are_forgotten_once_their_alias_left_databases(
    fake_alias, monkeypatch: pytest.MonkeyPatch
) -> None:
    gone = f"{ALIAS}_gone"
    gone_pool = (("pool_name", gone),)
    monkeypatch.setitem(connections.settings, gone, {"ENGINE": "django.db.backends.dummy"})

    def build_gone(n: int) -> ConnectionPool:
        return registry.get_pool((gone, n), lambda: ConnectionPool(gone, PoolOptions(), TARGET))

    first = build_gone(0)
    first.checkin(first.checkout(FakeConnection, None, me()))
    second = build_gone(1)  # retires `first`, which departs
    held = second.checkout(FakeConnection, None, me())
    monkeypatch.delitem(connections.settings, gone)
    build()  # retires `second` (its alias left DATABASES), still lending
    build()  # a departure: the registry forgets the aliases gone with no pool left
    assert [d["checkouts"] for d in registry.departed_stats(gone)] == [1]  # not this one yet
    assert scrape()[("db_client_connection_use_time_seconds_count", gone_pool)] == 1
    second.checkin(held)
    registry.all_pools()  # `second` departs: nothing of the alias is left
    assert registry.departed_stats(gone) == [] and registry.pool_stats(gone) == []
    assert not [k for k in scrape() if k[1][:1] == gone_pool]


def test_a_forked_child_counts_from_zero_and_the_parent_keeps_its_totals(fake_alias) -> None:
    from tests.backend.test_fork import in_child

    old = build(pool_size=1, timeout=0.01)
    time_out_once(old)
    build(pool_size=1, timeout=0.01)
    assert [d["timeouts"] for d in registry.departed_stats(ALIAS)] == [1]

    def child() -> list[Any]:
        inherited = registry.departed_stats(ALIAS)
        time_out_once(build(pool_size=1, timeout=0.01))
        return [inherited, scrape()[("db_client_connection_timeouts_total", POOL)]]

    assert in_child(child) == {"ok": [[], 1]}
    assert scrape()[("db_client_connection_timeouts_total", POOL)] == 1


def test_the_multiprocess_files_keep_a_drained_pool_s_counts(fake_alias) -> None:
    mirror = prom._Mirror(value_class=_Value)
    sampler.subscribe(mirror.write)

    def written() -> dict[str, float]:
        return {
            key[2]: value.value
            for key, value in mirror._values.items()
            if dict(key[3]).get("pool_name") == ALIAS and key[2].endswith(("_total", "_sum"))
        }

    try:
        old = build(pool_size=1, timeout=0.01)
        time_out_once(old)
        sampler.sample_now()
        before = written()
        assert before["db_client_connection_timeouts_total"] == 1
        build(pool_size=1, timeout=0.01)  # `old` retired, drained
        sampler.sample_now()
        assert written() == before
    finally:
        sampler.unsubscribe(mirror.write)


# -- close_pools() while connections are lent ---------------------------------------


def test_pool_stats_counts_connections_lent_by_a_pool_closed_with_close_pools(
    fake_alias,
) -> None:
    pool = build()
    held = pool.checkout(FakeConnection, None, me())
    try:
        assert registry.close_pools(alias=ALIAS) == 1
        assert not held.raw.closed  # still open, still in use by its borrower
        used = sum(s["checked_out"] for s in registry.pool_stats(ALIAS))
        assert used == 1, "an open, lent connection is not counted anywhere"
    finally:
        pool.checkin(held)
    assert held.raw.closed
    assert registry.pool_stats(ALIAS) == []


def test_otel_histograms_keep_the_timings_of_a_pool_closed_by_close_pools(fake_alias) -> None:
    instruments, reader, provider = otel_sdk()
    try:
        pool = build()
        pool.checkin(pool.checkout(FakeConnection, None, me()))
        [first] = otel_collect(reader)["db.client.connection.use_time"]
        assert instruments.feed == "merge"
        assert first.count == 1
        held = pool.checkout(FakeConnection, None, me())
        registry.close_pools(alias=ALIAS)  # e.g. connection.close_pool(), a test teardown
        pool.checkin(held)  # its use time is taken now
        assert pool.stats()["use_time_histogram"]["count"] == 2
        [second] = otel_collect(reader)["db.client.connection.use_time"]
        assert second.count == 2, "the second checkout's use time never reached the SDK"
    finally:
        provider.shutdown()


def test_otel_histograms_keep_the_timings_of_a_retired_pool(fake_alias) -> None:
    instruments, reader, provider = otel_sdk()
    try:
        old = build()
        old.checkin(old.checkout(FakeConnection, None, me()))
        otel_collect(reader)
        held = old.checkout(FakeConnection, None, me())
        build()  # retired while lending
        old.checkin(held)
        [point] = otel_collect(reader)["db.client.connection.use_time"]
        assert instruments.feed == "merge"
        assert point.count == 2
    finally:
        provider.shutdown()


# -- every exporter at once, while pools are built, retired and closed ---------------


class _Value:
    def __init__(self, *args: object, **kwargs: object) -> None:
        self.value = 0.0

    def set(self, value: float) -> None:
        self.value = value


def test_scrapes_collections_and_samples_from_many_threads_while_pools_churn(fake_alias) -> None:
    instruments, reader, provider = otel_sdk()
    mirror = prom._Mirror(value_class=_Value)
    stop = threading.Event()
    errors: list[BaseException] = []
    borrowed = [0]
    barrier = threading.Barrier(7)

    def run(body) -> None:
        try:
            barrier.wait(10)
            while not stop.is_set():
                body()
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)
            stop.set()

    def churn() -> None:  # build (retiring the previous pool) or close
        if next(_versions) % 3:
            build(pool_size=1, max_overflow=1, timeout=0.001)
        else:
            registry.close_pools(alias=ALIAS)

    def borrow() -> None:
        pool = build(pool_size=1, max_overflow=1, timeout=0.001) if not registry._pools else None
        pool = pool or next(
            (p for p in registry.all_pools() if p.alias == ALIAS and not p.closed), None
        )
        if pool is None:
            return
        try:
            lease = pool.checkout(FakeConnection, None, me())
        except PoolError:
            return
        time.sleep(0)
        pool.checkin(lease)
        borrowed[0] += 1

    workers = [
        churn,
        borrow,
        borrow,
        lambda: list(prom.PoolCollector().collect()),
        lambda: mirror.write(registry.pool_stats()),
        lambda: reader.get_metrics_data(),
        sampler.sample_now,
    ]
    try:
        with racy():
            threads = [threading.Thread(target=run, args=(w,)) for w in workers]
            for t in threads:
                t.start()
            time.sleep(2.0)
            stop.set()
            for t in threads:
                t.join(20)
        assert not any(t.is_alive() for t in threads), "a thread hung"
        assert errors == []
        assert borrowed[0] > 10
    finally:
        provider.shutdown()
    registry.close_pools(alias=ALIAS)
    gc.collect()
    # Every fake connection was closed: none leaked by a pool closed or retired mid-use.
    assert [c for c in FakeConnection.every if not c.closed] == []


# -- prometheus.register() ---------------------------------------------------------------


def _pool_collectors(reg: CollectorRegistry) -> int:
    return sum(isinstance(c, prom.PoolCollector) for c in reg._collector_to_names)


def test_register_gives_every_new_registry_the_pools_collector() -> None:
    assert not prom.multiprocess_mode()
    missing = 0
    addresses: set[int] = set()
    reused = 0  # registries made where an earlier one was (what fooled a memo by id())
    for _ in range(200):
        reg = CollectorRegistry()
        reused += id(reg) in addresses
        addresses.add(id(reg))
        prom.register(reg)
        missing += _pool_collectors(reg) == 0
        del reg
        gc.collect(0)  # a young cycle's memory freed (a full collection: 70 ms, no more reuse)
    assert reused > 100, f"only {reused} of 200 registries reused an address: nothing tested"
    assert missing == 0, f"{missing} of 200 registries got no PoolCollector"


class _SlowRegistry(CollectorRegistry):
    """A registry whose register() takes a moment (its lock contended, say)."""

    def register(self, collector: Any) -> None:
        time.sleep(0.005)
        super().register(collector)


def test_register_from_many_threads_at_once_registers_one_collector() -> None:
    duplicated = 0
    kept = []  # alive: no registry at the address of another (see the test above)
    for _ in range(5):
        reg = _SlowRegistry()
        kept.append(reg)
        barrier = threading.Barrier(4)

        def go(reg: CollectorRegistry = reg, barrier: threading.Barrier = barrier) -> None:
            barrier.wait(10)
            prom.register(reg)

        threads = [threading.Thread(target=go) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        duplicated += _pool_collectors(reg) > 1
    assert duplicated == 0, f"{duplicated} of 5 registries got the collector more than once"


# -- the sampler -----------------------------------------------------------------------


def _run_python(code: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
        timeout=timeout, check=False,
    )


def test_a_bad_metrics_interval_neither_fails_a_request_nor_leaves_a_silent_sampler() -> None:
    code = """
import threading, time
import django
from django.conf import settings
settings.configure(POSTGRESPOOL_METRICS_INTERVAL="1s")
django.setup()
from django.core.signals import request_started
from django_postgrespool.metrics import sampler
sampler.start_on_first_request()
failed = 0
for _ in range(2):
    try:
        request_started.send(sender=None)
    except Exception as error:
        failed += 1
time.sleep(0.2)
running = [t.name for t in threading.enumerate()].count("postgrespool-sampler")
print("requests_failed", failed, "samplers", running)
"""
    result = _run_python(code)
    words = result.stdout.split()
    assert words[:2] == ["requests_failed", "0"] or words[-1] == "1", result.stdout + result.stderr


def test_the_sampler_runs_again_in_a_forked_child_and_not_twice_in_the_parent() -> None:
    code = """
import os, threading, time
import django
from django.conf import settings
settings.configure(POSTGRESPOOL_METRICS_INTERVAL=0.01)
django.setup()
import django_postgrespool.registry  # as the backend has, before any fork
from django_postgrespool.metrics import sampler
ticks = []
sampler.subscribe(lambda stats: ticks.append(os.getpid()))
sampler.ensure_running()
time.sleep(0.05)
pid = os.fork()
if pid == 0:
    try:
        ticks.clear()
        sampler.ensure_running()
        sampler.ensure_running()
        time.sleep(0.2)
        n = [t.name for t in threading.enumerate()].count("postgrespool-sampler")
        os._exit(0 if n == 1 and ticks and set(ticks) == {os.getpid()} else 3)
    except BaseException:
        os._exit(4)
_, status = os.waitpid(pid, 0)
sampler.ensure_running()
n = [t.name for t in threading.enumerate()].count("postgrespool-sampler")
print("child", os.waitstatus_to_exitcode(status), "parent_samplers", n)
"""
    result = _run_python(code)
    assert result.stdout.split() == ["child", "0", "parent_samplers", "1"], (
        result.stdout + result.stderr
    )


def test_the_sampler_thread_does_not_block_interpreter_exit() -> None:
    code = """
import django
from django.conf import settings
settings.configure(POSTGRESPOOL_METRICS_INTERVAL=0.001)
django.setup()
from django_postgrespool.metrics import sampler
sampler.subscribe(lambda stats: None)
sampler.ensure_running()
print("bye")
"""
    started = time.monotonic()
    result = _run_python(code, timeout=20)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["bye"]
    assert "Traceback" not in result.stderr, result.stderr
    assert time.monotonic() - started < 15


def test_a_failing_subscriber_does_not_stop_the_others(fake_alias) -> None:
    seen: list[int] = []

    def broken(stats: object) -> None:
        raise RuntimeError("exporter down")

    def good(stats: list[Any]) -> None:
        seen.append(len(stats))

    sampler.subscribe(broken)
    sampler.subscribe(good)
    try:
        pool = build()
        pool.checkin(pool.checkout(FakeConnection, None, me()))
        sampler.sample_now()
    finally:
        sampler.unsubscribe(broken)
        sampler.unsubscribe(good)
    assert len(seen) == 1


# -- checks with odd settings ------------------------------------------------------------


def test_check_conn_max_age_reports_a_string_instead_of_raising(monkeypatch) -> None:
    from django_postgrespool import checks

    entry = {**connections.settings["default"], "ENGINE": "django_postgrespool",
             "CONN_MAX_AGE": "60"}
    monkeypatch.setitem(connections.settings, "adv_ops_age", entry)
    messages = checks.check_conn_max_age()
    assert [m.id for m in messages if "adv_ops_age" in m.msg] == ["postgrespool.E006"]


@pytest.mark.parametrize(
    ("overrides", "setting", "expected"),
    [
        ({"POOL_OPTIONS": {"pool_size": None}}, {}, "postgrespool.E005"),
        ({"POOL_OPTIONS": [("pool_size", 1)]}, {}, "postgrespool.E005"),
        ({"POOL_OPTIONS": {1: 2}}, {}, "postgrespool.E005"),
        ({"OPTIONS": "sslmode=require"}, {}, "postgrespool.E005"),
        ({"POOL_OPTIONS": {"pool_size": "9" * 5000}}, {}, "postgrespool.E005"),
        ({}, {"DATABASE_POOL_ARGS": "pool_size=1"}, "postgrespool.E005"),
        ({}, {"POSTGRESPOOL_WORKERS": "9" * 5000}, "postgrespool.E002"),
        ({}, {"POSTGRESPOOL_MAX_CONNECTIONS": 2.5}, "postgrespool.E002"),
        ({}, {"POSTGRESPOOL_PGBOUNCER": {"adv_ops_odd": ["transaction"]}}, "postgrespool.E004"),
        ({}, {"POSTGRESPOOL_PGBOUNCER": "transaction"}, "postgrespool.E004"),
        ({"PORT": 1}, {"POSTGRESPOOL_MAX_CONNECTIONS": 1}, "postgrespool.E001"),
    ],
)
def test_checks_report_odd_settings_instead_of_raising(overrides, setting, expected,
                                                      monkeypatch) -> None:
    from django.core import checks as django_checks
    from django.test import override_settings

    entry = {**connections.settings["default"], "ENGINE": "django_postgrespool", **overrides}
    monkeypatch.setitem(connections.settings, "adv_ops_odd", entry)
    with override_settings(**setting):
        messages = django_checks.run_checks(tags=["postgrespool"])
    assert expected in {m.id for m in messages}


# -- prewarm(), close_pools() and pgpool on the suite's server -------------------------------


def test_prewarm_failing_midway_leaves_nothing_lent_and_nothing_leaked(
    pooled_alias, monitor
) -> None:
    from django.db.backends.signals import connection_created
    from django_postgrespool import prewarm

    alias, app = pooled_alias("prewarm_midway", pool_options={"pool_size": 4, "max_overflow": 0})
    made = [0]

    def fail_the_third(sender: object, connection: Any, **kwargs: object) -> None:
        if connection.alias == alias:
            made[0] += 1
            if made[0] == 3:
                raise RuntimeError("session setup failed")

    connection_created.connect(fail_the_third)
    try:
        with pytest.raises(PoolError, match="session setup failed"):
            prewarm(alias)
    finally:
        connection_created.disconnect(fail_the_third)
    [stats] = registry.pool_stats(alias)
    assert stats["checked_out"] == 0
    assert stats["size"] == stats["idle"] == 2
    assert stats["opened"] - stats["closed"] == stats["size"]
    assert monitor.settled_count(app, 2) == 2
    assert prewarm(alias) == {alias: 4}  # the server is fine: a second try fills the pool
    assert monitor.settled_count(app, 4) == 4


def test_close_pools_while_threads_hold_connections_closes_each_at_its_return(
    pooled_alias, monitor
) -> None:
    from django_postgrespool import close_pools

    alias, app = pooled_alias("close_held", pool_options={"pool_size": 3, "max_overflow": 0})
    holding = threading.Barrier(4)
    release = threading.Event()
    errors: list[BaseException] = []

    def hold(cursor: Any) -> None:
        cursor.execute("SELECT 1")
        holding.wait(10)
        release.wait(10)
        cursor.execute("SELECT 2")  # still usable after close_pools()

    def request() -> None:
        try:
            run_request(alias, hold)
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=request) for _ in range(3)]
    for t in threads:
        t.start()
    holding.wait(10)
    assert close_pools(alias=alias) == 1
    assert monitor.count(app) == 3
    release.set()
    for t in threads:
        t.join(10)
    assert errors == []
    assert monitor.settled_count(app, 0) == 0
    run_request(alias)  # a new pool
    assert [s["size"] for s in registry.pool_stats(alias)] == [1]


def test_pgpool_json_shows_the_retired_pool_still_lending(pooled_alias) -> None:
    alias, _ = pooled_alias("pgpool_retired", pool_options={"pool_size": 2, "max_overflow": 0})
    with connection_held_elsewhere(alias):
        connections.settings[alias]["POOL_OPTIONS"] = {"pool_size": 3, "max_overflow": 1}
        out = StringIO()
        call_command("pgpool", "--database", alias, "--json", stdout=out)
        table = StringIO()
        call_command("pgpool", "--database", alias, stdout=table)
    [entry] = json.loads(out.getvalue())
    pools = sorted(entry["pools"], key=lambda p: p["retired"])
    assert [(p["retired"], p["pool_size"], p["checked_out"]) for p in pools] == [
        (False, 3, 0),
        (True, 2, 1),
    ]
    assert table.getvalue().count(f"Pool of alias {alias!r}") == 2
    assert registry.pool_stats(alias)[0]["retired"] is False  # drained: only the current one


def test_toolbar_panel_with_the_current_pool_closed_and_a_retired_one_lending(fake_alias) -> None:
    pytest.importorskip("debug_toolbar")
    from django_postgrespool import toolbar

    old = build()
    held = old.checkout(FakeConnection, None, me())
    build()  # retires `old`
    registry.close_pools(alias=ALIAS)  # and closes the current one
    recorded: dict[str, Any] = {}
    panel = toolbar.PoolPanel.__new__(toolbar.PoolPanel)
    panel.record_stats = recorded.update
    original = toolbar._aliases
    toolbar._aliases = lambda: [ALIAS]
    try:
        panel.enable_instrumentation()
        panel.generate_stats(None, None)
    finally:
        toolbar._aliases = original
        old.checkin(held)
    [row] = recorded["aliases"]
    assert row["pool"]["used"] == 1 and row["pool"]["retired_pools"] == 1


# -- the timing hook and OpenTelemetry collections from several threads -----------------------


def test_timing_observers_added_and_removed_from_many_threads_are_none_lost() -> None:
    from django_postgrespool import metrics

    lost = 0
    with racy():
        for _ in range(50):
            mine = [lambda a, k, s, n=n: None for n in range(6)]
            barrier = threading.Barrier(len(mine))

            def add(o: Any, barrier: threading.Barrier = barrier) -> None:
                barrier.wait(10)
                metrics.add_timing_observer(o)

            threads = [threading.Thread(target=add, args=(o,)) for o in mine]
            for t in threads:
                t.start()
            for t in threads:
                t.join(10)
            lost += sum(o not in metrics.timing_observers for o in mine)
            for o in mine:
                metrics.remove_timing_observer(o)
    assert lost == 0, f"{lost} observers lost by concurrent add_timing_observer()"


def test_otel_collections_from_several_threads_feed_each_timing_exactly_once(fake_alias) -> None:
    instruments, reader, provider = otel_sdk()
    stop = threading.Event()
    done = [0] * 3
    errors: list[BaseException] = []
    barrier = threading.Barrier(5)
    pool = build(pool_size=3, max_overflow=0)

    def borrow(n: int) -> None:
        try:
            barrier.wait(10)
            while not stop.is_set():
                pool.checkin(pool.checkout(FakeConnection, None, me()))
                done[n] += 1
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    def collect() -> None:
        try:
            barrier.wait(10)
            while not stop.is_set():
                reader.get_metrics_data()
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    try:
        with racy():
            threads = [threading.Thread(target=borrow, args=(n,)) for n in range(3)]
            threads += [threading.Thread(target=collect) for _ in range(2)]
            for t in threads:
                t.start()
            time.sleep(1.5)
            stop.set()
            for t in threads:
                t.join(20)
        assert errors == []
        assert instruments.feed == "merge"
        metrics = otel_collect(reader)
        [use] = metrics["db.client.connection.use_time"]
        [wait] = metrics["db.client.connection.wait_time"]
        assert use.count == wait.count == sum(done) > 100
        assert sum(use.bucket_counts) == use.count
        assert use.sum == pytest.approx(pool.stats()["use_time"], rel=1e-6, abs=1e-9)
    finally:
        provider.shutdown()


def _borrow_and_end_thread(alias: str) -> None:
    def body() -> None:
        connections[alias].cursor().execute("SELECT 1")  # never closed: the thread just ends

    t = threading.Thread(target=body)
    t.start()
    t.join(10)


def test_close_pools_after_a_thread_ended_holding_a_connection_closes_it(
    pooled_alias, monitor
) -> None:
    from django_postgrespool import close_pools

    alias, app = pooled_alias("dead_holder", pool_options={"pool_size": 2, "max_overflow": 0})
    _borrow_and_end_thread(alias)
    assert monitor.count(app) == 1
    close_pools(alias=alias)
    gc.collect()  # the ended thread's wrapper, if anything still holds it
    assert monitor.settled_count(app, 0, timeout=3) == 0, "the connection outlives its pool"


@pytest.mark.parametrize("closer", ["close_pools", "settings switch"])
def test_a_borrower_that_ends_after_its_pool_closed_has_its_connection_closed(
    pooled_alias, monitor, caplog, closer: str
) -> None:
    # close() closes the connections of borrowers that ended already. One
    # still running at close() that then ended without giving its connection
    # back left the closed pool lending for good: its session open until the
    # process exits, the pool in pool_stats() (a closed pool has no next
    # checkout to reclaim it). Found 7 Dec: the likely cause of a CI run where
    # two such pools made 60 later tests fail.
    from django_postgrespool import close_pools

    alias, app = pooled_alias("late_dead_holder", pool_options={"pool_size": 2, "max_overflow": 0})
    borrowed, closed = threading.Event(), threading.Event()

    def body() -> None:
        connections[alias].cursor().execute("SELECT 1")  # never given back: the thread just ends
        borrowed.set()
        closed.wait(10)

    holder = threading.Thread(target=body, name="late-dead-holder")
    holder.start()
    assert borrowed.wait(10)
    (pool,) = [p for p in registry.all_pools() if p.alias == alias]
    if closer == "close_pools":
        assert close_pools(alias=alias) == 1
    else:  # the alias's settings change: the next checkout retires the pool
        connections.settings[alias]["OPTIONS"]["application_name"] = app + "_2"
        run_request(alias)
    assert pool.closed and pool.in_use() == 1
    with caplog.at_level("WARNING", logger="django_postgrespool"):
        closed.set()
        holder.join(10)
        assert not holder.is_alive()
        assert monitor.settled_count(app, 0) == 0, "the ended borrower's session outlives its pool"
        deadline = time.monotonic() + 5
        while pool in registry.all_pools() and time.monotonic() < deadline:
            time.sleep(0.02)
    assert pool not in registry.all_pools(), "the drained pool is still listed"
    assert pool.in_use() == 0 and pool.stats()["size"] == 0
    assert "late-dead-holder" in caplog.text  # the reclaim names the thread
