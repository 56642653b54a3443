# A South project of the Django 1.6 era on the pooled engine. tests/legacy/run.py
# sets the LEGACY_* variables; LEGACY_SOUTH_HELPER=0 leaves the helper out.
import json
import os

from django_postgrespool_south import south_database_adapters

DEBUG = False
SECRET_KEY = "legacy-lane"
USE_TZ = True
TIME_ZONE = "UTC"
ALLOWED_HOSTS = ["*"]
ROOT_URLCONF = "sample_project.urls"
MIDDLEWARE_CLASSES = ()

DATABASES = {
    "default": {
        "ENGINE": "django_postgrespool",
        "NAME": os.environ["LEGACY_DB_NAME"],
        "USER": "postgres",
        "PASSWORD": os.environ["LEGACY_DB_PASSWORD"],
        "HOST": "127.0.0.1",
        "PORT": os.environ["LEGACY_DB_PORT"],
        "OPTIONS": {"application_name": "legacy-sample"},
        "POOL_OPTIONS": json.loads(
            os.environ.get("LEGACY_POOL_OPTIONS", '{"pool_size": 2, "max_overflow": 1, "timeout": 1}')
        ),
    },
}
DATABASE_POOL_ARGS = json.loads(
    os.environ.get("LEGACY_POOL_ARGS", '{"max_overflow": 10, "pool_size": 5, "recycle": 300}')
)

if os.environ.get("LEGACY_SOUTH_HELPER", "1") == "1":
    SOUTH_DATABASE_ADAPTERS = south_database_adapters(DATABASES)

INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "django.contrib.auth",
    "south",
    "notes",
]
