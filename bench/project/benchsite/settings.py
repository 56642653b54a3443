"""Settings of the benchmark's Django project: one alternative per process.

``BENCH_ALT`` picks how the ``default`` database connects (see ``ALTERNATIVES``
in ``bench/alternatives.py``); ``BENCH_DB`` is a JSON object with the server's
host, port, user, password, database and the PgBouncer port.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from alternatives import database_settings  # noqa: E402

SECRET_KEY = "bench"
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
USE_TZ = True
TIME_ZONE = "UTC"
ROOT_URLCONF = "benchsite.urls"
WSGI_APPLICATION = "benchsite.wsgi.application"
INSTALLED_APPS = ["benchapp"]
MIDDLEWARE: list[str] = []
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"
DATABASES = {"default": database_settings(os.environ["BENCH_ALT"], json.loads(os.environ["BENCH_DB"]))}
# Metrics exported (OpenTelemetry SDK with a periodic reader, Prometheus) for
# 'ours_metrics' only; every other alternative runs with them off.
POSTGRESPOOL_METRICS = os.environ["BENCH_ALT"] == "ours_metrics"
if POSTGRESPOOL_METRICS:
    from opentelemetry import metrics as _otel_metrics
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import ConsoleMetricExporter, PeriodicExportingMetricReader

    _otel_metrics.set_meter_provider(MeterProvider(metric_readers=[PeriodicExportingMetricReader(
        ConsoleMetricExporter(out=open(os.devnull, "w")), export_interval_millis=1000)]))
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"stderr": {"class": "logging.StreamHandler"}},
    # The pool's "waiting" warnings are expected at 16 and 64 threads.
    "loggers": {"django_postgrespool": {"handlers": ["stderr"], "level": "ERROR"}},
}
