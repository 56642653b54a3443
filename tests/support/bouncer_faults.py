"""Faults of a running ``PgBouncer`` (tests/support/pgbouncer.py), from its admin console.

``admin(bouncer, "KILL db")`` runs one admin command (PAUSE, RESUME, KILL,
RECONNECT, ...) with psql, as ``PgBouncer.show()`` runs SHOW; ``clients()``
counts the client connections PgBouncer holds for one ``application_name``.
"""

from __future__ import annotations

import os
import subprocess
import time
from typing import Any

__all__ = ["admin", "clients", "restart", "wait_for"]


def admin(bouncer: Any, command: str) -> str:
    """Run ``command`` on the admin console of ``bouncer``; return psql's output."""
    psql = os.path.join(bouncer.cluster.bindir, "psql")
    out = subprocess.run(
        [
            psql,
            "-X",
            "-A",
            "-h",
            bouncer.host,
            "-p",
            str(bouncer.port),
            "-U",
            bouncer.user,
            "-d",
            "pgbouncer",
            "-c",
            command,
        ],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PGPASSWORD": bouncer.password, "PGCONNECT_TIMEOUT": "5"},
    )
    return out.stdout


def clients(bouncer: Any, application_name: str) -> int:
    """Return how many client connections ``bouncer`` holds for ``application_name``."""
    return sum(1 for c in bouncer.show("CLIENTS") if c.get("application_name") == application_name)


def restart(bouncer: Any) -> None:
    """Stop ``bouncer`` (its client connections are cut) and start it again on its port."""
    bouncer.stop()
    bouncer.start()


def wait_for(predicate: Any, timeout: float, interval: float = 0.05) -> bool:
    """Return True as soon as ``predicate()`` is true, False after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
