"""Django settings for the in-process tests, pointed at the suite's server."""

from __future__ import annotations

import uuid
from typing import Any

import django
from django.conf import settings

from tests.support.db import connect, url_params

SERVER_URL = ""
DATABASE = "postgrespool_tests"


def configure(server_url: str) -> None:
    """Create the tests' database on ``server_url`` and configure Django."""
    global SERVER_URL
    SERVER_URL = server_url
    admin = connect(server_url)
    with admin.cursor() as cur:
        cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,))
        if not cur.fetchall():
            cur.execute(f'CREATE DATABASE "{DATABASE}"')
    admin.close()
    settings.configure(
        DEBUG=False,
        SECRET_KEY="tests",
        USE_TZ=True,
        TIME_ZONE="UTC",
        DATABASES={"default": database_settings(application_name="postgrespool-default")},
        INSTALLED_APPS=[
            "django.contrib.contenttypes",
            "django.contrib.auth",
            "django_postgrespool",
        ],
        DEFAULT_AUTO_FIELD="django.db.models.AutoField",
    )
    django.setup()


def database_settings(**options: Any) -> dict[str, Any]:
    """Return a DATABASES entry for the tests' database; ``options`` go to OPTIONS."""
    p = url_params(SERVER_URL)
    return {
        "ENGINE": "django_postgrespool",
        "NAME": DATABASE,
        "USER": p["user"],
        "PASSWORD": p["password"],
        "HOST": p["host"],
        "PORT": str(p["port"]),
        "OPTIONS": options,
    }


def unique_name(prefix: str = "pp") -> str:
    """Return an application_name unique to one test."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"
