"""A Django >= 4.2 project on the pooled engine, with two aliases (set by the tests' environment)."""

import os


def _database(name: str, application_name: str) -> dict:
    return {
        "ENGINE": "django_postgrespool",
        "NAME": name,
        "USER": os.environ["MODERN_DB_USER"],
        "PASSWORD": os.environ["MODERN_DB_PASSWORD"],
        "HOST": os.environ["MODERN_DB_HOST"],
        "PORT": os.environ["MODERN_DB_PORT"],
        "OPTIONS": {"application_name": application_name},
        "POOL_OPTIONS": {"pool_size": 2, "max_overflow": 0},
    }


SECRET_KEY = "modern-south-adapter-tests"
USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"
INSTALLED_APPS = ["django.contrib.contenttypes", "django_postgrespool", "notes"]
DATABASES = {
    "default": _database(os.environ["MODERN_DB_DEFAULT"], "modern-default"),
    "second": _database(os.environ["MODERN_DB_SECOND"], "modern-second"),
}
DATABASE_POOL_ARGS = {"max_overflow": 10, "pool_size": 5, "recycle": 300}

if os.environ.get("MODERN_SOUTH_LEFTOVER") == "1":
    # Left over from the project's South days (what postgrespool.W011 is about).
    SOUTH_DATABASE_ADAPTERS = {"default": "south.db.postgresql_psycopg2"}
