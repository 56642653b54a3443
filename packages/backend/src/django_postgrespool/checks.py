"""System checks of the pooled engine: ids ``postgrespool.E0xx`` and ``W0xx``.

They run when 'django_postgrespool' is in INSTALLED_APPS, and whenever the
pooled backend is loaded; those tagged ``database`` only for
``manage.py check --database ALIAS`` and ``migrate``, because they query the
server. Every check is declared with ``@_check(tags)`` below and registered by
:func:`register_all`; each hint ends with the address of the docs page about it.
The reference of every id is docs/reference/checks.rst.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from django.conf import settings
from django.core import checks
from django.core.exceptions import ImproperlyConfigured
from django.db import DatabaseError, connections

from django_postgrespool._rules import see
from django_postgrespool.options import resolve_pool_options

__all__ = [
    "POOLED_ENGINES",
    "check_budget_against_server",
    "check_budget_against_setting",
    "check_conn_max_age",
    "check_declared_pgbouncer",
    "check_proxy_in_between",
    "check_role_behind_pgbouncer",
    "check_south_settings",
    "pooled_aliases",
    "register_all",
]

POOLED_ENGINES = frozenset({"django_postgrespool", "django_postgrespool.postgis"})

_Check = Callable[..., list[checks.CheckMessage]]
_CHECKS: list[tuple[_Check, tuple[str, ...]]] = []
_registered = False


def _check(*tags: str) -> Callable[[_Check], _Check]:
    """Declare a check of this module, tagged "postgrespool" and ``tags``."""

    def declare(function: _Check) -> _Check:
        _CHECKS.append((function, ("postgrespool", *tags)))
        return function

    return declare


def register_all() -> None:
    """Register every check of this module with Django (idempotent)."""
    global _registered
    if _registered:
        return
    _registered = True
    for function, tags in _CHECKS:
        checks.register(function, *tags)


def pooled_aliases() -> Iterator[tuple[str, Mapping[str, Any]]]:
    """Yield (alias, settings dict) of every alias served by a pooled ENGINE."""
    for alias, settings_dict in connections.settings.items():
        if settings_dict.get("ENGINE") in POOLED_ENGINES:
            yield alias, settings_dict


# -- the connection budget: E001, E002, E005, W001 -----------------------------
#
# Each worker process has a pool per alias, and each pool may open up to
# pool_size + max_overflow connections. The budget of one server is the sum
# over the aliases that point at it, times the number of worker processes:
# POSTGRESPOOL_WORKERS or, when unset, the WEB_CONCURRENCY environment
# variable (gunicorn's and Heroku's), or 1. The server's limit comes from the
# POSTGRESPOOL_MAX_CONNECTIONS setting when given (no query), or else from the
# server itself, read only when checks are run for a database.

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
    # Behind PgBouncer the pools' connections are PgBouncer's clients: the
    # server only sees PgBouncer's own server pool (its max_client_conn and
    # pool sizes are the limits, set on PgBouncer).
    behind, _ = _declared()
    for alias, settings_dict in pooled_aliases():
        if behind.get(alias) is not None:
            continue
        try:
            options = resolve_pool_options(alias, settings_dict, global_args)
        except ImproperlyConfigured as error:
            errors.append(
                checks.Error(
                    str(error),
                    hint="Fix the pool options. " + see("options"),
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
            f"stays within {limit}, run fewer workers, or raise the server's limit. "
            + see("sizing")
        ),
        id="postgrespool.E001",
    )


@_check()
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
        errors.append(checks.Error(str(error), hint=see("sizing"), id="postgrespool.E002"))
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
    from django_postgrespool.backend import borrowed_cursor  # it imports this module

    with borrowed_cursor(alias) as cursor:
        cursor.execute(_LIMIT_SQL)
        max_connections, superuser_reserved, reserved, superuser = cursor.fetchone()
    if superuser:
        return max_connections, f"max_connections={max_connections}, read through alias {alias!r}"
    limit = max_connections - superuser_reserved - reserved
    return limit, (
        f"max_connections={max_connections} minus {superuser_reserved + reserved} reserved "
        f"for superusers, read through alias {alias!r}"
    )


@_check(checks.Tags.database)
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
                    hint="Set POSTGRESPOOL_MAX_CONNECTIONS to the server's limit. " + see("sizing"),
                    id="postgrespool.W001",
                )
            )
            continue
        over = _over_budget(server, pools, workers, workers_from, limit, limit_from)
        if over is not None:
            messages.append(over)
    return messages


# -- CONN_MAX_AGE: E006, W002, W003 ---------------------------------------------
#
# With the pooled ENGINE, CONN_MAX_AGE keeps Django's meaning: how long a
# thread keeps its checked-out connection across requests. The pool already
# keeps connections open, so 0 (back to the pool at the end of every request)
# is the setting that lets threads share them.

_CONN_MAX_AGE_HINT = (
    "Set CONN_MAX_AGE = 0: the pool already keeps connections open, and each request "
    "then gives its connection back to the pool. " + see("conn_max_age")
)


def _cap(alias: str, settings_dict: Any) -> str:
    try:
        options = resolve_pool_options(
            alias, settings_dict, getattr(settings, "DATABASE_POOL_ARGS", None)
        )
    except ImproperlyConfigured:
        return "pool_size + max_overflow"  # postgrespool.E005 tells why
    return f"pool_size + max_overflow = {options.max_connections}"


@_check()
def check_conn_max_age(
    app_configs: Sequence[Any] | None = None, **kwargs: Any
) -> list[checks.CheckMessage]:
    """Warn about pooled aliases whose threads keep their connection between requests.

    A CONN_MAX_AGE that is not a number of seconds (nor None) is an error (E006).
    """
    messages: list[checks.CheckMessage] = []
    for alias, settings_dict in pooled_aliases():
        age = settings_dict.get("CONN_MAX_AGE", 0)
        if age is not None and (isinstance(age, bool) or not isinstance(age, (int, float))):
            # Django would fail at the first connection (it adds it to the clock).
            messages.append(
                checks.Error(
                    f"DATABASES[{alias!r}]['CONN_MAX_AGE'] must be a number of seconds or "
                    f"None, got {type(age).__name__} {age!r}.",
                    hint=_CONN_MAX_AGE_HINT,
                    id="postgrespool.E006",
                )
            )
        elif age is None:
            messages.append(
                checks.Warning(
                    f"DATABASES[{alias!r}]['CONN_MAX_AGE'] is None: each thread keeps its "
                    f"pooled connection for ever, so no more than {_cap(alias, settings_dict)} "
                    f"threads can ever use alias {alias!r}; the others wait and time out.",
                    hint=_CONN_MAX_AGE_HINT,
                    id="postgrespool.W002",
                )
            )
        elif age > 0:
            messages.append(
                checks.Warning(
                    f"DATABASES[{alias!r}]['CONN_MAX_AGE'] is {age!r}: each thread keeps its "
                    f"pooled connection for up to {age!r} seconds between requests, and no "
                    f"other thread can borrow it meanwhile; with more threads than "
                    f"{_cap(alias, settings_dict)}, requests wait and time out.",
                    hint=_CONN_MAX_AGE_HINT,
                    id="postgrespool.W003",
                )
            )
    return messages


# -- PgBouncer: E003, E004, W004, W005 ---------------------------------------------
#
# In transaction (or statement) pooling mode PgBouncer may run each transaction
# on a different server session, so the server-side cursors Django uses for
# QuerySet.iterator() vanish between fetches. PgBouncer cannot be detected for
# certain from the client, so the reliable way is to declare it in
# POSTGRESPOOL_PGBOUNCER = {"default": "transaction"}. When checks run for a
# database, an undeclared alias is also probed: if the server's
# inet_server_port() differs from the configured PORT, something sits in between.

_PGBOUNCER_MODES = ("session", "transaction", "statement")


def _declared() -> tuple[dict[str, str | None], list[checks.CheckMessage]]:
    """Return POSTGRESPOOL_PGBOUNCER validated, and the E004 errors found in it."""
    value = getattr(settings, "POSTGRESPOOL_PGBOUNCER", None)
    problems: list[str] = []
    declared: dict[str, str | None] = {}
    if value is None:
        pass
    elif not isinstance(value, Mapping):
        problems.append(
            f"POSTGRESPOOL_PGBOUNCER must be a dict of alias: pool_mode; got "
            f"{type(value).__name__}."
        )
    else:
        for alias, mode in value.items():
            if alias not in connections.settings:
                problems.append(
                    f"POSTGRESPOOL_PGBOUNCER names alias {alias!r}, which is not in DATABASES."
                )
            elif mode is not None and mode not in _PGBOUNCER_MODES:
                problems.append(
                    f"POSTGRESPOOL_PGBOUNCER[{alias!r}] must be one of 'session', "
                    f"'transaction', 'statement' or None; got {mode!r}."
                )
            else:
                declared[alias] = mode
    hint = (
        "Map each alias that connects through PgBouncer to its pool_mode, e.g. "
        "POSTGRESPOOL_PGBOUNCER = {'default': 'transaction'}; None means no PgBouncer. "
        + see("pgbouncer")
    )
    return declared, [checks.Error(p, hint=hint, id="postgrespool.E004") for p in problems]


@_check()
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
                    + see("pgbouncer"),
                    id="postgrespool.E003",
                )
            )
    return errors


@_check()
def check_role_behind_pgbouncer(
    app_configs: Sequence[Any] | None = None, **kwargs: Any
) -> list[checks.CheckMessage]:
    """Warn about OPTIONS['assume_role'] behind a transaction-mode PgBouncer."""
    declared, _ = _declared()  # errors are check_declared_pgbouncer's to report
    messages: list[checks.CheckMessage] = []
    for alias, settings_dict in pooled_aliases():
        mode = declared.get(alias)
        options = settings_dict.get("OPTIONS")
        if mode not in ("transaction", "statement") or not isinstance(options, Mapping):
            continue
        if not options.get("assume_role"):
            continue
        messages.append(
            checks.Warning(
                f"Alias {alias!r} sets OPTIONS['assume_role'] and connects through PgBouncer "
                f"in {mode} mode (POSTGRESPOOL_PGBOUNCER): Django runs SET ROLE once per "
                f"connection, which lands on one of PgBouncer's server sessions. Other clients "
                f"of PgBouncer then run as that role, and this alias's later transactions may "
                f"run without it.",
                hint=(
                    f"Log in as the role instead (DATABASES[{alias!r}]['USER']), or connect "
                    f"in session mode. " + see("pgbouncer")
                ),
                id="postgrespool.W005",
            )
        )
    return messages


def _server_port(alias: str) -> int | None:
    from django_postgrespool.backend import borrowed_cursor  # it imports this module

    with borrowed_cursor(alias) as cursor:
        cursor.execute("SELECT inet_server_port()")
        port = cursor.fetchone()[0]
    return None if port is None else int(port)


@_check(checks.Tags.database)
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
        except ImproperlyConfigured:
            continue  # postgrespool.E005 reports the settings the pool refuses
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
                    f"POSTGRESPOOL_PGBOUNCER = {{{alias!r}: 'session'}} (or None). "
                    + see("pgbouncer")
                ),
                id="postgrespool.W004",
            )
        )
    return messages


# -- South left behind: W010, W011 -----------------------------------------------
#
# South (the migration tool of Django <= 1.6) cannot be imported on Django >=
# 1.7, and Django's own migrations run through the pooled backend with nothing
# to configure. Its settings are dead weight that a reader takes for live
# configuration; 'south' in INSTALLED_APPS usually fails before any check
# runs, but an app config or a forgotten adapter setting does not.

# Settings that only South reads (south/db/__init__.py, south/migration).
SOUTH_SETTINGS = (
    "SOUTH_DATABASE_ADAPTERS",
    "SOUTH_DATABASE_ADAPTER",
    "SOUTH_MIGRATION_MODULES",
    "SOUTH_TESTS_MIGRATE",
    "SKIP_SOUTH_TESTS",
    "SOUTH_LOGGING_ON",
    "SOUTH_LOGGING_FILE",
    "SOUTH_USE_PYC",
    "SOUTH_AUTO_FREEZE_APP",
)


def _south_apps() -> list[str]:
    return [
        app
        for app in settings.INSTALLED_APPS
        if isinstance(app, str) and (app == "south" or app.startswith("south."))
    ]


@_check(checks.Tags.compatibility)
def check_south_settings(
    app_configs: Sequence[Any] | None = None, **kwargs: Any
) -> list[checks.CheckMessage]:
    """Warn when South, or a setting only South reads, is still configured."""
    messages: list[checks.CheckMessage] = []
    for app in _south_apps():
        messages.append(
            checks.Warning(
                f"INSTALLED_APPS contains {app!r}: South is the migration tool of Django 1.6 "
                f"and older and does not run on Django >= 1.7, whose own migrations run "
                f"through the pooled backend.",
                hint=(
                    f"Remove {app!r} from INSTALLED_APPS and convert each app's South "
                    f"migrations to Django migrations (makemigrations, then migrate --fake-initial "
                    f"on existing databases). " + see("south")
                ),
                id="postgrespool.W010",
            )
        )
    found = [name for name in SOUTH_SETTINGS if hasattr(settings, name)]
    if found:
        messages.append(
            checks.Warning(
                f"{', '.join(found)} {'is' if len(found) == 1 else 'are'} set, but only South "
                f"reads {'it' if len(found) == 1 else 'them'}, and South does not run on "
                f"Django >= 1.7: Django's migrations need no adapter setting for "
                f"ENGINE 'django_postgrespool'.",
                hint=f"Delete {', '.join(found)} from your settings. " + see("south"),
                id="postgrespool.W011",
            )
        )
    return messages
