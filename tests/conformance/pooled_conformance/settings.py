"""Django's own test settings (``tests/test_sqlite.py``), pointed at PostgreSQL.

``run.py`` passes the engine and the server in the environment:
``CONFORMANCE_ENGINE`` is ``django_postgrespool`` or
``django.db.backends.postgresql``, so that both engines run the same suite with
otherwise identical settings.
"""

import json
import os

# The version-specific defaults Django's suite expects (SECRET_KEY,
# PASSWORD_HASHERS, USE_TZ, DEFAULT_AUTO_FIELD where it still matters). The
# suite's own folder is sys.path[0] when runtests.py runs.
from test_sqlite import *  # noqa: F401,F403

_server = {
    "ENGINE": os.environ["CONFORMANCE_ENGINE"],
    "HOST": os.environ["CONFORMANCE_HOST"],
    "PORT": os.environ["CONFORMANCE_PORT"],
    "USER": os.environ["CONFORMANCE_USER"],
    "PASSWORD": os.environ["CONFORMANCE_PASSWORD"],
}

DATABASES = {
    "default": {**_server, "NAME": "conformance"},
    "other": {**_server, "NAME": "conformance_other"},
}

# run.py --pool-options '{"reset": "discard"}' runs the pooled engine with
# other options than the defaults (the stock engine ignores the setting).
if os.environ.get("CONFORMANCE_POOL_OPTIONS"):
    DATABASE_POOL_ARGS = json.loads(os.environ["CONFORMANCE_POOL_OPTIONS"])

TEST_RUNNER = "pooled_conformance.runner.RecordingRunner"
