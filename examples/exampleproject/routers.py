"""Reads to the ``replica`` alias (a streaming standby), writes to ``default`` (the primary).

Active only when settings.py defines a ``replica`` alias (``DATABASE_REPLICA_URL``).
Each alias has its own pool, so a slow replica never holds the primary's
connections, and the other way round.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.db import connections
from django.db.models import Model

REPLICA = "replica"


class PrimaryReplicaRouter:
    """Send reads to the replica, except inside a transaction on the primary."""

    def db_for_read(self, model: type[Model], **hints: Any) -> str | None:
        if REPLICA not in settings.DATABASES:
            return None
        # Inside atomic() the transaction reads its own writes and takes row
        # locks (select_for_update): that has to happen on the primary.
        if connections["default"].in_atomic_block:
            return "default"
        return REPLICA

    def db_for_write(self, model: type[Model], **hints: Any) -> str | None:
        return "default"

    def allow_relation(self, obj1: Model, obj2: Model, **hints: Any) -> bool | None:
        # Both aliases hold the same data.
        return True

    def allow_migrate(self, db: str, app_label: str, **hints: Any) -> bool | None:
        # A standby is read-only: it gets the schema by replication.
        return False if db == REPLICA else None
