"""The metrics tests collect through the OpenTelemetry SDK, set once as the global provider."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def otel_reader():
    """The SDK's in-memory reader on the global meter provider (set once per process)."""
    from opentelemetry import metrics
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    reader = InMemoryMetricReader()
    # Set after django.setup(): the app's instruments were created on the
    # API's proxy provider and must now report through this SDK.
    metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
    return reader


def collected(reader) -> dict[str, list]:
    """Collect once; return the data points of each metric of django_postgrespool by name."""
    data = reader.get_metrics_data()
    out: dict[str, list] = {}
    for resource in data.resource_metrics if data else []:
        for scope in resource.scope_metrics:
            if scope.scope.name != "django_postgrespool":
                continue
            for metric in scope.metrics:
                out.setdefault(metric.name, []).append(metric)
    return out


def points_of(metrics: dict[str, list], name: str, pool: str) -> list:
    """Return the data points of metric ``name`` for pool name ``pool``."""
    return [
        p
        for m in metrics.get(name, [])
        for p in m.data.data_points
        if p.attributes.get("db.client.connection.pool.name") == pool
    ]
