"""URLs of the example project."""

from __future__ import annotations

from importlib.util import find_spec

from django.conf import settings
from django.contrib import admin
from django.urls import include, path

urlpatterns = [
    path("admin/", admin.site.urls),
    path("", include("shop.urls")),
]
if find_spec("prometheus_client") is not None:
    from django_postgrespool.metrics.prometheus import metrics_view

    urlpatterns.append(path("metrics", metrics_view, name="metrics"))
if settings.DEBUG_TOOLBAR:
    urlpatterns.append(path("__debug__/", include("debug_toolbar.urls")))
