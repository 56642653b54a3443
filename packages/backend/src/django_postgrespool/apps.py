"""Optional app: add 'django_postgrespool' to INSTALLED_APPS: checks, commands, metrics."""

from __future__ import annotations

from django.apps import AppConfig


class PostgresPoolConfig(AppConfig):
    name = "django_postgrespool"
    verbose_name = "PostgreSQL connection pool"

    def ready(self) -> None:
        from django_postgrespool import checks, metrics

        checks.register_all()
        metrics.register_exporters()
