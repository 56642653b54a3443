"""The shop app."""

from __future__ import annotations

from django.apps import AppConfig


class ShopConfig(AppConfig):
    name = "shop"
    verbose_name = "Shop"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # The /pool/ page's charts: sample the pools from the first request on.
        from django_postgrespool.metrics import sampler

        from shop import poolhistory

        sampler.subscribe(poolhistory.record)
        sampler.start_on_first_request()
