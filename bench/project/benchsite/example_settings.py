"""The example project's settings (``examples/exampleproject``), with one alternative's database.

Workload B serves the example shop under gunicorn; only ``DATABASES`` (and the
pool's log level) change, so every alternative runs the same project.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(BENCH))
# Read by the example's settings; every alias is replaced below.
os.environ.setdefault("DATABASE_URL", "postgres://bench@127.0.0.1:1/bench")

from alternatives import database_settings  # noqa: E402
from exampleproject.settings import *  # noqa: E402,F403
from exampleproject.settings import LOGGING  # noqa: E402

DEBUG = False
_entry = database_settings(os.environ["BENCH_ALT"], json.loads(os.environ["BENCH_DB"]))
DATABASES = {"default": _entry, "reports": {**_entry, "TEST": {"MIRROR": "default"}}}
# The pool's "waiting" warnings are expected at 16 and 64 clients.
LOGGING["loggers"]["django_postgrespool"]["level"] = "ERROR"
