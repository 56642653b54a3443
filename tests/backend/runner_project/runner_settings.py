"""Settings: the database comes from RUNNER_DB_* variables set by the test that runs this project."""

import os

SECRET_KEY = "runner"
USE_TZ = True
INSTALLED_APPS = ["django.contrib.contenttypes", "django_postgrespool", "runnerapp"]
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"
_db = {
    "ENGINE": "django_postgrespool",
    "NAME": os.environ["RUNNER_DB_NAME"],
    "USER": os.environ["RUNNER_DB_USER"],
    "PASSWORD": os.environ["RUNNER_DB_PASSWORD"],
    "HOST": os.environ["RUNNER_DB_HOST"],
    "PORT": os.environ["RUNNER_DB_PORT"],
    "POOL_OPTIONS": {"pool_size": 2, "max_overflow": 2},
}
DATABASES = {"default": _db, "other": dict(_db, TEST={"NAME": "test_" + _db["NAME"] + "_other"})}
