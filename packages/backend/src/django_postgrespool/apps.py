"""Optional app: add 'django_postgrespool' to INSTALLED_APPS: checks, commands, metrics."""

from __future__ import annotations

import importlib.util

from django.apps import AppConfig


class PostgresPoolConfig(AppConfig):
    name = "django_postgrespool"
    verbose_name = "PostgreSQL connection pool"

    def ready(self) -> None:
        from django_postgrespool import checks, metrics

        checks.register_all()
        if not metrics.enabled():
            return
        # Each exporter whose extra is installed; neither builds a pool.
        if importlib.util.find_spec("opentelemetry") is not None:
            from django_postgrespool.metrics import otel

            otel.register()
        if importlib.util.find_spec("prometheus_client") is not None:
            from django_postgrespool.metrics import prometheus

            prometheus.register()
