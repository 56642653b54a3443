"""Optional app: add 'django_postgrespool' to INSTALLED_APPS for its system checks and commands."""

from __future__ import annotations

from django.apps import AppConfig


class PostgresPoolConfig(AppConfig):
    name = "django_postgrespool"
    verbose_name = "PostgreSQL connection pool"

    def ready(self) -> None:
        from django_postgrespool import checks

        checks.register_all()
