"""``manage.py pgpool``: open each pooled alias through its pool and show the pool's statistics.

Pools live in each process, so this command can only show its own: it checks
out one connection per alias (which also proves the pool can connect), asks
the server how many sessions the alias's database has and how many it
accepts, gives the connection back, and prints a table per alias. The
statistics of a running site are on its own pages (see the example project).
"""

from __future__ import annotations

import json
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import DatabaseError

from django_postgrespool.backend import borrowed_cursor
from django_postgrespool.checks import pooled_aliases
from django_postgrespool.registry import pool_stats

_SERVER_SQL = """
SELECT current_setting('max_connections')::int,
       (SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()),
       (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend')
"""


def collect(alias: str) -> dict[str, Any]:
    """Check out one connection of ``alias``, query the server, return pool and server figures."""
    with borrowed_cursor(alias) as cursor:
        cursor.execute(_SERVER_SQL)
        max_connections, on_database, clients = cursor.fetchone()
    return {
        "alias": alias,
        "pools": pool_stats(alias),
        "server": {
            "max_connections": max_connections,
            "sessions_on_database": on_database,
            "client_sessions": clients,
        },
    }


def _table(rows: list[tuple[str, object]]) -> list[str]:
    width = max(len(name) for name, _ in rows)
    lines = [f"  {'statistic'.ljust(width)}  value", f"  {'-' * width}  -----"]
    lines += [f"  {name.ljust(width)}  {_show(value)}" for name, value in rows]
    return lines


def _show(value: object) -> str:
    if value is None:
        return "never"
    if isinstance(value, float) and value.is_integer():
        return f"{value:g}"
    return str(value)


_SHOWN = (
    "pool_size",
    "max_overflow",
    "timeout",
    "recycle",
    "pre_ping",
    "reset",
    "size",
    "idle",
    "checked_out",
    "overflow",
    "peak_checked_out",
    "checkouts",
    "waits",
    "timeouts",
    "opened",
    "recycled",
    "invalidated",
    "closed",
)


class Command(BaseCommand):
    help = (
        "Check out one connection of each pooled database alias and print its pool's "
        "statistics (a table per alias, or JSON with --json)."
    )
    requires_system_checks: list[str] = []

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--database",
            action="append",
            dest="aliases",
            metavar="ALIAS",
            help="Only this alias (repeatable). Default: every alias with a pooled ENGINE.",
        )
        parser.add_argument("--json", action="store_true", help="Print JSON instead of tables.")

    def handle(self, *args: Any, **options: Any) -> None:
        pooled = [alias for alias, _ in pooled_aliases()]
        aliases = options["aliases"] or pooled
        unknown = [a for a in aliases if a not in pooled]
        if unknown:
            raise CommandError(
                f"{', '.join(repr(a) for a in unknown)} is not a pooled alias; pooled aliases: "
                f"{', '.join(repr(a) for a in pooled) or 'none'} (ENGINE 'django_postgrespool')."
            )
        report = []
        for alias in aliases:
            try:
                report.append(collect(alias))
            except DatabaseError as error:
                raise CommandError(
                    f"Could not check out a connection of alias {alias!r}: "
                    f"{type(error).__name__}: {error}"
                ) from None
        if options["json"]:
            self.stdout.write(json.dumps(report, indent=2))
            return
        for n, entry in enumerate(report):
            if n:
                self.stdout.write("")
            self._write_alias(entry)

    def _write_alias(self, entry: dict[str, Any]) -> None:
        server = entry["server"]
        for pool in entry["pools"]:
            self.stdout.write(
                self.style.MIGRATE_HEADING(
                    f"Pool of alias {entry['alias']!r}: {pool['user']}@{pool['host']}:"
                    f"{pool['port']}/{pool['database']} (process {pool['pid']})"
                )
            )
            rows: list[tuple[str, object]] = [(name, pool[name]) for name in _SHOWN]  # type: ignore[literal-required]
            rows += [
                ("server max_connections", server["max_connections"]),
                ("server sessions on database", server["sessions_on_database"]),
                ("server client sessions", server["client_sessions"]),
            ]
            self.stdout.write("\n".join(_table(rows)))
