"""The sampler reads the pools in the background; POSTGRESPOOL_METRICS = False registers nothing."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest
from django_postgrespool.metrics import sampler

from tests.conftest import ROOT
from tests.support.requests import run_request


def test_sampler_passes_each_snapshot_to_its_subscribers(pooled_alias):
    alias, _ = pooled_alias("sampled")
    run_request(alias)
    seen: list[list] = []
    got = threading.Event()

    def subscriber(stats):
        seen.append([s for s in stats if s["alias"] == alias])
        got.set()

    sampler.subscribe(subscriber)
    try:
        sampler.ensure_running()
        sampler.ensure_running()  # once per process
        assert got.wait(10)
    finally:
        sampler.unsubscribe(subscriber)
    [[stats]] = seen[:1]
    assert (stats["idle"], stats["checked_out"]) == (1, 0)
    assert [t.name for t in threading.enumerate()].count("postgrespool-sampler") == 1


@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        # On (the default): both exporters, and no hook while no SDK is configured.
        (True, ["False", "True", "True"]),
        (False, ["True", "False", "True"]),
    ],
)
def test_app_registers_the_installed_exporters_unless_metrics_are_off(setting, expected):
    code = f"""
import django
from django.conf import settings
settings.configure(INSTALLED_APPS=["django_postgrespool"], POSTGRESPOOL_METRICS={setting})
django.setup()
from prometheus_client import REGISTRY
from django_postgrespool import metrics
from django_postgrespool.metrics import otel, prometheus
collectors = [type(c).__name__ for c in REGISTRY._collector_to_names]
print(otel._instruments is None, "PoolCollector" in collectors, metrics.timing_observers == ())
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=ROOT, check=False)
    assert result.stdout.split() == expected, result.stderr
