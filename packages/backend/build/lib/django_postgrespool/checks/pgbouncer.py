"""A pooled alias behind PgBouncer in transaction mode needs DISABLE_SERVER_SIDE_CURSORS.

In transaction (or statement) pooling mode PgBouncer may run each transaction
on a different server session, so the server-side cursors Django uses for
``QuerySet.iterator()`` vanish between fetches. PgBouncer cannot be detected
for certain from the client, so the reliable way is to declare it::

    POSTGRESPOOL_PGBOUNCER = {"default": "transaction"}   # or "session", or None

When checks run for a database, an undeclared alias is also probed: if the
server's ``inet_server_port()`` differs from the configured PORT, something
(PgBouncer, another proxy, a container's port mapping) sits in between.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from django.conf import settings
from django.core import checks
from django.db import DatabaseError, connections

from django_postgrespool.checks._common import pooled_aliases, see

__all__ = ["CHECKS", "check_declared_pgbouncer", "check_proxy_in_between"]

SECTION = "Behind PgBouncer"
MODES = ("session", "transaction", "statement")


def _declared() -> tuple[dict[str, str | None], list[checks.CheckMessage]]:
    """Return POSTGRESPOOL_PGBOUNCER validated, and the errors found in it."""
    value = getattr(settings, "POSTGRESPOOL_PGBOUNCER", None)
    if value is None:
        return {}, []
    hint = (
        "Map each alias that connects through PgBouncer to its pool_mode, e.g. "
        "POSTGRESPOOL_PGBOUNCER = {'default': 'transaction'}; None means no PgBouncer. "
        + see(SECTION)
    )
    if not isinstance(value, Mapping):
        return {}, [
            checks.Error(
                f"POSTGRESPOOL_PGBOUNCER must be a dict of alias: pool_mode; got "
                f"{type(value).__name__}.",
                hint=hint,
                id="postgrespool.E004",
            )
        ]
    declared: dict[str, str | None] = {}
    errors: list[checks.CheckMessage] = []
    for alias, mode in value.items():
        if alias not in connections.settings:
            errors.append(
                checks.Error(
                    f"POSTGRESPOOL_PGBOUNCER names alias {alias!r}, which is not in DATABASES.",
                    hint=hint,
                    id="postgrespool.E004",
                )
            )
        elif mode is not None and mode not in MODES:
            errors.append(
                checks.Error(
                    f"POSTGRESPOOL_PGBOUNCER[{alias!r}] must be one of 'session', "
                    f"'transaction', 'statement' or None; got {mode!r}.",
                    hint=hint,
                    id="postgrespool.E004",
                )
            )
        else:
            declared[alias] = mode
    return declared, errors


def check_declared_pgbouncer(
    app_configs: Sequence[Any] | None = None, **kwargs: Any
) -> list[checks.CheckMessage]:
    """Require DISABLE_SERVER_SIDE_CURSORS behind a transaction-mode PgBouncer."""
    declared, errors = _declared()
    for alias, settings_dict in pooled_aliases():
        mode = declared.get(alias)
        if mode in ("transaction", "statement") and not settings_dict.get(
            "DISABLE_SERVER_SIDE_CURSORS"
        ):
            errors.append(
                checks.Error(
                    f"Alias {alias!r} connects through PgBouncer in {mode} mode "
                    f"(POSTGRESPOOL_PGBOUNCER) but DATABASES[{alias!r}]"
                    f"['DISABLE_SERVER_SIDE_CURSORS'] is not True: QuerySet.iterator() "
                    f"would fail with 'cursor does not exist'.",
                    hint=f"Set DATABASES[{alias!r}]['DISABLE_SERVER_SIDE_CURSORS'] = True. "
                    + see(SECTION),
                    id="postgrespool.E003",
                )
            )
    return errors


def _server_port(alias: str) -> int | None:
    with connections[alias].cursor() as cursor:
        cursor.execute("SELECT inet_server_port()")
        port = cursor.fetchone()[0]
    return None if port is None else int(port)


def check_proxy_in_between(
    app_configs: Sequence[Any] | None = None,
    databases: Sequence[str] | None = None,
    **kwargs: Any,
) -> list[checks.CheckMessage]:
    """Warn when an undeclared alias's server listens on another port than the one configured."""
    if not databases:
        return []
    declared, _ = _declared()  # errors are check_declared_pgbouncer's to report
    messages: list[checks.CheckMessage] = []
    for alias, settings_dict in pooled_aliases():
        if alias not in databases or alias in declared:
            continue
        if settings_dict.get("DISABLE_SERVER_SIDE_CURSORS"):
            continue
        host = str(settings_dict.get("HOST") or "")
        if not host or host.startswith("/"):
            continue  # a unix socket: no port to compare
        configured = str(settings_dict.get("PORT") or "5432")
        try:
            port = _server_port(alias)
        except DatabaseError:
            continue  # postgrespool.W001 reports an unreachable server
        if port is None or str(port) == configured:
            continue
        messages.append(
            checks.Warning(
                f"Alias {alias!r} connects to port {configured} but the server listens on "
                f"port {port}: a proxy sits in between. If it is PgBouncer in transaction "
                f"mode, QuerySet.iterator() will fail with 'cursor does not exist'.",
                hint=(
                    f"Behind PgBouncer in transaction mode set DATABASES[{alias!r}]"
                    f"['DISABLE_SERVER_SIDE_CURSORS'] = True; otherwise declare the proxy with "
                    f"POSTGRESPOOL_PGBOUNCER = {{{alias!r}: 'session'}} (or None). " + see(SECTION)
                ),
                id="postgrespool.W004",
            )
        )
    return messages


CHECKS = [
    (check_declared_pgbouncer, ("postgrespool",)),
    (check_proxy_in_between, (checks.Tags.database, "postgrespool")),
]
