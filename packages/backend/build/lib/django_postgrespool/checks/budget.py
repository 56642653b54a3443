"""The connection budget: every worker's pools against the server's connection limit.

Each worker process has a pool per alias, and each pool may open up to
``pool_size + max_overflow`` connections. The budget of one server is the sum
over the aliases that point at it, times the number of worker processes:
``POSTGRESPOOL_WORKERS`` or, when unset, the ``WEB_CONCURRENCY`` environment
variable (gunicorn's and Heroku's), or 1. The server's limit comes from the
``POSTGRESPOOL_MAX_CONNECTIONS`` setting when given (no query), or else from
the server itself, read only when checks are run for a database
(``manage.py check --database default``, ``migrate``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from django.conf import settings
from django.core import checks
from django.core.exceptions import ImproperlyConfigured
from django.db import DatabaseError, connections

from django_postgrespool.checks._common import pooled_aliases, see
from django_postgrespool.options import resolve_pool_options

__all__ = ["CHECKS", "check_budget_against_server", "check_budget_against_setting"]

SIZING = "Sizing the pool"

_Server = tuple[str, str]


class _BadSetting(ValueError):
    pass


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _BadSetting(f"{name} must be a positive integer; got {value!r}.")
    return value


def _workers() -> tuple[int, str]:
    """Return the number of worker processes and where it came from."""
    value = getattr(settings, "POSTGRESPOOL_WORKERS", None)
    if value is not None:
        return _positive_int("POSTGRESPOOL_WORKERS", value), "POSTGRESPOOL_WORKERS"
    env = os.environ.get("WEB_CONCURRENCY")
    if env:
        return _positive_int("The WEB_CONCURRENCY environment variable", env), "WEB_CONCURRENCY"
    return 1, "one process: neither POSTGRESPOOL_WORKERS nor WEB_CONCURRENCY is set"


def _server(settings_dict: Any) -> _Server:
    return (str(settings_dict.get("HOST") or "localhost"), str(settings_dict.get("PORT") or "5432"))


def _budgets(errors: list[checks.CheckMessage]) -> dict[_Server, list[tuple[str, int]]]:
    """Return, per server, the (alias, cap) of each pooled alias; add E005 for bad options."""
    servers: dict[_Server, list[tuple[str, int]]] = {}
    global_args = getattr(settings, "DATABASE_POOL_ARGS", None)
    for alias, settings_dict in pooled_aliases():
        try:
            options = resolve_pool_options(alias, settings_dict, global_args)
        except ImproperlyConfigured as error:
            errors.append(
                checks.Error(
                    str(error),
                    hint="Fix the pool options. " + see("Pool options"),
                    id="postgrespool.E005",
                )
            )
            continue
        servers.setdefault(_server(settings_dict), []).append((alias, options.max_connections))
    return servers


def _over_budget(
    server: _Server,
    pools: list[tuple[str, int]],
    workers: int,
    workers_from: str,
    limit: int,
    limit_from: str,
) -> checks.CheckMessage | None:
    per_process = sum(cap for _, cap in pools)
    budget = workers * per_process
    if budget <= limit:
        return None
    names = ", ".join(repr(alias) for alias, _ in pools)
    caps = " + ".join(str(cap) for _, cap in pools)
    return checks.Error(
        f"The pools of {'alias' if len(pools) == 1 else 'aliases'} {names} may open "
        f"{workers} × ({caps}) = {budget} connections to {server[0]}:{server[1]} "
        f"(workers: {workers_from}), more than the {limit} it accepts ({limit_from}).",
        hint=(
            f"Lower pool_size + max_overflow so that workers × (pool_size + max_overflow) "
            f"stays within {limit}, run fewer workers, or raise the server's limit. " + see(SIZING)
        ),
        id="postgrespool.E001",
    )


def check_budget_against_setting(
    app_configs: Sequence[Any] | None = None, **kwargs: Any
) -> list[checks.CheckMessage]:
    """Compare the connection budget with POSTGRESPOOL_MAX_CONNECTIONS, without a query."""
    errors: list[checks.CheckMessage] = []
    servers = _budgets(errors)
    try:
        workers, workers_from = _workers()
        raw_limit = getattr(settings, "POSTGRESPOOL_MAX_CONNECTIONS", None)
        limit = (
            None if raw_limit is None else _positive_int("POSTGRESPOOL_MAX_CONNECTIONS", raw_limit)
        )
    except _BadSetting as error:
        errors.append(checks.Error(str(error), hint=see(SIZING), id="postgrespool.E002"))
        return errors
    if limit is None:
        return errors
    for server, pools in servers.items():
        over = _over_budget(
            server, pools, workers, workers_from, limit, "POSTGRESPOOL_MAX_CONNECTIONS"
        )
        if over is not None:
            errors.append(over)
    return errors


_LIMIT_SQL = """
SELECT current_setting('max_connections')::int,
       current_setting('superuser_reserved_connections')::int,
       coalesce(current_setting('reserved_connections', true)::int, 0),
       (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)
"""


def _server_limit(alias: str) -> tuple[int, str]:
    """Ask the server of ``alias`` how many connections this role may open."""
    with connections[alias].cursor() as cursor:
        cursor.execute(_LIMIT_SQL)
        max_connections, superuser_reserved, reserved, superuser = cursor.fetchone()
    if superuser:
        return max_connections, f"max_connections={max_connections}, read through alias {alias!r}"
    limit = max_connections - superuser_reserved - reserved
    return limit, (
        f"max_connections={max_connections} minus {superuser_reserved + reserved} reserved "
        f"for superusers, read through alias {alias!r}"
    )


def check_budget_against_server(
    app_configs: Sequence[Any] | None = None,
    databases: Sequence[str] | None = None,
    **kwargs: Any,
) -> list[checks.CheckMessage]:
    """Compare the connection budget with the server's own limit (queries ``databases``)."""
    if not databases or getattr(settings, "POSTGRESPOOL_MAX_CONNECTIONS", None) is not None:
        return []
    ignored: list[checks.CheckMessage] = []  # E005 is the other check's to report
    servers = _budgets(ignored)
    try:
        workers, workers_from = _workers()
    except _BadSetting:
        return []  # E002, reported by check_budget_against_setting
    messages: list[checks.CheckMessage] = []
    for server, pools in servers.items():
        asked = [alias for alias, _ in pools if alias in databases]
        if not asked:
            continue
        try:
            limit, limit_from = _server_limit(asked[0])
        except DatabaseError as error:
            messages.append(
                checks.Warning(
                    f"Could not read the connection limit of {server[0]}:{server[1]} through "
                    f"alias {asked[0]!r} ({type(error).__name__}); the connection budget "
                    f"was not checked.",
                    hint="Set POSTGRESPOOL_MAX_CONNECTIONS to the server's limit. " + see(SIZING),
                    id="postgrespool.W001",
                )
            )
            continue
        over = _over_budget(server, pools, workers, workers_from, limit, limit_from)
        if over is not None:
            messages.append(over)
    return messages


CHECKS = [
    (check_budget_against_setting, ("postgrespool",)),
    (check_budget_against_server, (checks.Tags.database, "postgrespool")),
]
