"""Settings of the example shop: one database URL, served through django-postgrespool.

``DATABASE_URL`` is required (``make demo`` sets it to its embedded server).
Pool options may ride in its query string (``?pool_size=2&max_overflow=1``),
which overrides ``DATABASE_POOL_ARGS`` below.

With ``DATABASE_REPLICA_URL`` set (a streaming standby, e.g.
``postgres://USER:PASSWORD@standby:5432/NAME?target_session_attrs=prefer-standby``)
a ``replica`` alias reads from it through a pool of its own, and
``routers.PrimaryReplicaRouter`` sends reads there and writes to ``default``.
"""

from __future__ import annotations

import os
from pathlib import Path

import django_postgrespool_dburl as dburl

BASE_DIR = Path(__file__).resolve().parent.parent

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "example-only-not-secret")
DEBUG = os.environ.get("DJANGO_DEBUG", "1") == "1"
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django_postgrespool",  # system checks and `manage.py pgpool`
    "shop",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "exampleproject.urls"
WSGI_APPLICATION = "exampleproject.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# The original README's pool settings; every alias starts from these.
DATABASE_POOL_ARGS = {"pool_size": 5, "max_overflow": 10, "recycle": 300}

# CONN_MAX_AGE = 0: each request gives its connection back to the pool.
_default = dburl.config(conn_max_age=0)
_default.setdefault("OPTIONS", {}).setdefault("application_name", "exampleproject")
DATABASES = {
    "default": _default,
    # The same database through a small pool of its own, for the report page:
    # slow reports cannot starve the shop's pool.
    "reports": {
        **_default,
        "OPTIONS": {**_default["OPTIONS"], "application_name": "exampleproject-reports"},
        "POOL_OPTIONS": {**_default.get("POOL_OPTIONS", {}), "pool_size": 2, "max_overflow": 1},
        "TEST": {"MIRROR": "default"},
    },
}

# Read replica (optional): reads go to a standby, writes to the primary.
if os.environ.get("DATABASE_REPLICA_URL"):
    _replica = dburl.config("DATABASE_REPLICA_URL", conn_max_age=0)
    DATABASES["replica"] = {
        **_replica,
        "OPTIONS": {
            # A standby if one answers, else the primary (libpq >= 14); the
            # URL may list several hosts: postgres://u:p@s1:5432,s2:5432/db.
            "target_session_attrs": "prefer-standby",
            **_replica.get("OPTIONS", {}),
            "application_name": "exampleproject-replica",
        },
        "TEST": {"MIRROR": "default"},
    }
    DATABASE_ROUTERS = ["exampleproject.routers.PrimaryReplicaRouter"]

# The connection budget check (postgrespool.E001) multiplies each process's
# pools by the number of processes: POSTGRESPOOL_WORKERS, or when unset the
# WEB_CONCURRENCY environment variable, or 1. It compares the product with
# POSTGRESPOOL_MAX_CONNECTIONS (e.g. 20 on a small hosted plan), or, when
# unset, with the server's max_connections (`manage.py check --database default`).
# POSTGRESPOOL_WORKERS = 2
if os.environ.get("POSTGRESPOOL_MAX_CONNECTIONS"):
    POSTGRESPOOL_MAX_CONNECTIONS = int(os.environ["POSTGRESPOOL_MAX_CONNECTIONS"])

# Metrics (docs/observability.rst): with django_postgrespool in INSTALLED_APPS
# the pools report through OpenTelemetry and prometheus_client when they are
# installed; /metrics serves Prometheus' format. Under gunicorn set
# PROMETHEUS_MULTIPROC_DIR (see gunicorn.conf.py) so one scrape sees every
# worker; each worker's sampler refreshes its figures every interval seconds.
POSTGRESPOOL_METRICS = os.environ.get("POSTGRESPOOL_METRICS", "1") == "1"
POSTGRESPOOL_METRICS_INTERVAL = float(os.environ.get("POSTGRESPOOL_METRICS_INTERVAL", "1"))

# django-debug-toolbar with the pool's panel, when DEBUG is on and it is installed.
try:
    import debug_toolbar  # noqa: F401
except ImportError:
    DEBUG_TOOLBAR = False
else:
    DEBUG_TOOLBAR = DEBUG
if DEBUG_TOOLBAR:
    from debug_toolbar.settings import PANELS_DEFAULTS

    INSTALLED_APPS.append("debug_toolbar")
    MIDDLEWARE.insert(0, "debug_toolbar.middleware.DebugToolbarMiddleware")
    INTERNAL_IPS = ["127.0.0.1"]
    DEBUG_TOOLBAR_PANELS = [*PANELS_DEFAULTS, "django_postgrespool.toolbar.PoolPanel"]

AUTH_PASSWORD_VALIDATORS: list[dict[str, str]] = []
LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True
STATIC_URL = "static/"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    # The pool warns when it waits for a connection or discards one.
    "loggers": {"django_postgrespool": {"handlers": ["console"], "level": "WARNING"}},
}
