"""What a user would pick instead of django-postgrespool, as DATABASES entries.

Each alternative gets the same server, database and pool cap (10 server
connections); only how Django connects changes. Imported by ``run.py`` (for
the names) and by the benchmark project's settings (for the entries).
"""

from __future__ import annotations

from typing import Any

POOL_CAP = 10

# name -> (label, drivers it runs with)
ALTERNATIVES: dict[str, tuple[str, tuple[str, ...]]] = {
    "no_pooling": ("no pooling (CONN_MAX_AGE=0)", ("psycopg", "psycopg2")),
    "persistent": ("persistent (CONN_MAX_AGE=None)", ("psycopg", "psycopg2")),
    "native_pool": ("Django's pool (OPTIONS['pool'])", ("psycopg",)),
    "dj_db_conn_pool": ("django-db-connection-pool", ("psycopg", "psycopg2")),
    "pgbouncer": ("PgBouncer, transaction mode", ("psycopg", "psycopg2")),
    "ours": ("django-postgrespool", ("psycopg", "psycopg2")),
}


def alternatives_for(driver: str) -> list[str]:
    """Return the alternatives that run with ``driver``, in table order."""
    return [name for name, (_, drivers) in ALTERNATIVES.items() if driver in drivers]


def database_settings(alt: str, db: dict[str, Any]) -> dict[str, Any]:
    """Return the ``DATABASES['default']`` entry of alternative ``alt``."""
    if alt not in ALTERNATIVES:
        raise ValueError(f"unknown alternative {alt!r}; choose one of {', '.join(ALTERNATIVES)}")
    entry: dict[str, Any] = {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": db["database"],
        "USER": db["user"],
        "PASSWORD": db["password"],
        "HOST": db["host"],
        "PORT": str(db["port"]),
        "CONN_MAX_AGE": 0,
        # run.py counts each alternative's server sessions by this name.
        # A stuck connection attempt becomes an error, not a hung benchmark.
        "OPTIONS": {"application_name": f"bench-{alt}", "connect_timeout": 10},
    }
    if alt == "persistent":
        entry["CONN_MAX_AGE"] = None
    elif alt == "native_pool":
        entry["OPTIONS"]["pool"] = {"min_size": POOL_CAP, "max_size": POOL_CAP, "timeout": 30}
    elif alt == "dj_db_conn_pool":
        # Its defaults otherwise (pre_ping=True, reset on return), as a user gets them.
        entry["ENGINE"] = "dj_db_conn_pool.backends.postgresql"
        entry["POOL_OPTIONS"] = {"POOL_SIZE": POOL_CAP, "MAX_OVERFLOW": 0}
    elif alt == "pgbouncer":
        # No app-side pool: one client connection to PgBouncer per request.
        entry["PORT"] = str(db["pgbouncer_port"])
        entry["DISABLE_SERVER_SIDE_CURSORS"] = True
        if db.get("driver") == "psycopg":
            # PgBouncer 1.18 (Debian's) cannot route psycopg 3's prepared statements.
            entry["OPTIONS"]["prepare_threshold"] = None
    elif alt == "ours":
        # Its defaults otherwise (pre_ping='socket', reset='rollback').
        entry["ENGINE"] = "django_postgrespool"
        entry["POOL_OPTIONS"] = {"pool_size": POOL_CAP, "max_overflow": 0}
        # For experiments (profiling a change of defaults): extra POOL_OPTIONS.
        entry["POOL_OPTIONS"].update(db.get("ours_pool_options") or {})
    return entry
