"""What a user would pick instead of django-postgrespool, as DATABASES entries.

Each alternative gets the same server, database and pool cap (10 server
connections); only how Django connects changes. The fleet workloads (``F-*``:
4 worker processes) give each alternative 20 server connections in all: 5 per
worker for an app-side pool, 20 in PgBouncer. Imported by ``run.py`` (for the
names) and by the benchmark project's settings (for the entries).
"""

from __future__ import annotations

from typing import Any

POOL_CAP = 10
# The fleet: FLEET_WORKERS processes of FLEET_THREADS threads, FLEET_CONNS
# server connections in all (FLEET_CONNS // FLEET_WORKERS per app-side pool).
FLEET_WORKERS = 4
FLEET_THREADS = 8
FLEET_CONNS = 20

# name -> (label, drivers it runs with)
ALTERNATIVES: dict[str, tuple[str, tuple[str, ...]]] = {
    "no_pooling": ("no pooling (CONN_MAX_AGE=0)", ("psycopg", "psycopg2")),
    "persistent": ("persistent (CONN_MAX_AGE=None)", ("psycopg", "psycopg2")),
    "native_pool": ("Django's pool (OPTIONS['pool'])", ("psycopg",)),
    "dj_db_conn_pool": ("django-db-connection-pool", ("psycopg", "psycopg2")),
    "pgbouncer": ("PgBouncer, login per request (CONN_MAX_AGE=0)", ("psycopg", "psycopg2")),
    "pgbouncer_persistent": ("PgBouncer, persistent clients", ("psycopg",)),
    "ours_pgbouncer": ("django-postgrespool behind PgBouncer", ("psycopg",)),
    "ours": ("django-postgrespool", ("psycopg", "psycopg2")),
    "ours_txn": ("django-postgrespool, lease='transaction'", ("psycopg",)),
    "ours_metrics": (
        "django-postgrespool, metrics exported (OpenTelemetry SDK, Prometheus)",
        ("psycopg",),
    ),
}
# Extra cells, next to 'ours' at one level only (run.py): the cost of metrics.
EXTRA_CELLS = ("ours_metrics",)
# Run in the fleet workloads only; the fleet runs FLEET_ALTERNATIVES (not
# no_pooling nor django-db-connection-pool, which cannot share 20 connections
# among 32 threads or are covered by the other workloads; persistent as a
# reference in F-one).
FLEET_ONLY = ("pgbouncer_persistent", "ours_pgbouncer", "ours_txn")
FLEET_ALTERNATIVES = (
    "pgbouncer_persistent", "native_pool", "ours_pgbouncer", "pgbouncer", "ours", "ours_txn",
    "persistent",
)
# In F-one only, as a reference: Django's persistent connections straight to
# PostgreSQL, one per thread (FLEET_WORKERS * FLEET_THREADS server connections,
# over the budget). No pool at all: what an in-process pool that cost nothing
# would serve, the ceiling of any.
FLEET_ONE_ONLY = ("persistent",)
# Their names in the fleet's tables, where they differ from ALTERNATIVES'.
FLEET_LABELS = {
    "persistent": (
        f"no pool: a direct connection per thread ({FLEET_WORKERS * FLEET_THREADS} server "
        f"connections, over the budget)"
    ),
}
# PgBouncer alternatives: each has a PgBouncer of its own, so that the server
# sessions it holds carry its application_name alone.
BOUNCED = ("pgbouncer", "pgbouncer_persistent", "ours_pgbouncer")


def alternatives_for(driver: str, fleet: bool = False) -> list[str]:
    """Return the alternatives that run with ``driver``, in table order."""
    return [
        name
        for name, (_, drivers) in ALTERNATIVES.items()
        if driver in drivers
        and name not in EXTRA_CELLS
        and (name in FLEET_ALTERNATIVES if fleet else name not in FLEET_ONLY)
    ]


def database_settings(alt: str, db: dict[str, Any]) -> dict[str, Any]:
    """Return the ``DATABASES['default']`` entry of alternative ``alt``.

    ``db['cap']`` is the app-side pool's size (default ``POOL_CAP``);
    ``db['pgbouncer_port']`` the port of the alternative's PgBouncer.
    """
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
        "OPTIONS": {
            "application_name": f"{db.get('app_prefix', 'bench')}-{alt}",
            "connect_timeout": 10,
        },
    }
    cap = int(db.get("cap") or POOL_CAP)
    if alt in BOUNCED:
        entry["PORT"] = str(db["pgbouncer_port"])
        # Transaction mode: a cursor cannot outlive its transaction.
        entry["DISABLE_SERVER_SIDE_CURSORS"] = True
        if db.get("driver") == "psycopg":
            # PgBouncer 1.18 (Debian's) cannot route psycopg 3's prepared statements.
            entry["OPTIONS"]["prepare_threshold"] = None
    if alt == "persistent":
        entry["CONN_MAX_AGE"] = None
    elif alt == "native_pool":
        entry["OPTIONS"]["pool"] = {"min_size": cap, "max_size": cap, "timeout": 30}
    elif alt == "dj_db_conn_pool":
        # Its defaults otherwise (pre_ping=True, reset on return), as a user gets them.
        entry["ENGINE"] = "dj_db_conn_pool.backends.postgresql"
        entry["POOL_OPTIONS"] = {"POOL_SIZE": POOL_CAP, "MAX_OVERFLOW": 0}
    elif alt == "pgbouncer":
        pass  # no app-side pool: one client login to PgBouncer per request
    elif alt == "pgbouncer_persistent":
        # Each thread keeps its client connection to PgBouncer.
        entry["CONN_MAX_AGE"] = None
    elif alt in ("ours", "ours_pgbouncer", "ours_metrics", "ours_txn"):
        # Its defaults otherwise (pre_ping='socket', reset='rollback').
        entry["ENGINE"] = "django_postgrespool"
        entry["POOL_OPTIONS"] = {"pool_size": cap, "max_overflow": 0}
        if alt == "ours_txn":
            # Given back after each statement: PgBouncer's transaction mode, in process.
            entry["POOL_OPTIONS"]["lease"] = "transaction"
        # For experiments (profiling a change of defaults): extra POOL_OPTIONS.
        entry["POOL_OPTIONS"].update(db.get("ours_pool_options") or {})
    return entry
