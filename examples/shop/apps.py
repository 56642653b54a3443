"""The shop app."""

from __future__ import annotations

from django.apps import AppConfig


class ShopConfig(AppConfig):
    name = "shop"
    verbose_name = "Shop"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # The /pool/ page's charts: sample the pools from the first request on.
        from django.core.signals import request_started
        from django_postgrespool.metrics import sampler

        from shop import poolhistory

        sampler.subscribe(poolhistory.record)
        request_started.connect(sampler.ensure_running, dispatch_uid="postgrespool-sampler")
