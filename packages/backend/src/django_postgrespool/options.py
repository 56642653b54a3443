"""Pool options: the typed record of one pool's options, and how they are read.

The backend and the dburl helper both call :func:`normalize_pool_options`, so a
value is spelled, checked and explained the same way wherever it comes from
(``DATABASE_POOL_ARGS``, ``DATABASES[alias]['POOL_OPTIONS']``, ``OPTIONS`` or a
database URL's query string). The rules themselves live in ``_rules.py``,
which the Python 2.7 legacy backend shares.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any, Literal

from django_postgrespool import _rules

__all__ = [
    "POOL_OPTION_NAMES",
    "PoolOptions",
    "PrePing",
    "normalize_pool_options",
    "resolve_pool_options",
]

PrePing = bool | Literal["socket"]
ResetMode = Literal["rollback", "discard"]
LeaseMode = Literal["request", "transaction"]
_D = _rules.DEFAULTS


@dataclass(frozen=True)
class PoolOptions:
    """The validated options of one pool; the defaults are ``_rules.DEFAULTS``."""

    pool_size: int = _D["pool_size"]
    max_overflow: int = _D["max_overflow"]
    recycle: float | None = _D["recycle"]
    timeout: float = _D["timeout"]
    pre_ping: PrePing = _D["pre_ping"]
    use_lifo: bool = _D["use_lifo"]
    reset: ResetMode = _D["reset"]
    max_idle: float | None = _D["max_idle"]
    leak_timeout: float | None = _D["leak_timeout"]
    lease: LeaseMode = _D["lease"]
    fair_after: float = _D["fair_after"]

    @property
    def max_connections(self) -> int:
        """Return the hard cap of simultaneous connections of this pool."""
        return self.pool_size + self.max_overflow


POOL_OPTION_NAMES: tuple[str, ...] = _rules.NAMES
assert tuple(sorted(f.name for f in fields(PoolOptions))) == POOL_OPTION_NAMES


def normalize_pool_options(options: Mapping[str, object], *, source: str) -> dict[str, Any]:
    """Validate pool options and return them in their canonical types.

    ``source`` names where the options were written (for example
    ``"DATABASES['default']['POOL_OPTIONS']"``); every error message starts
    with it. It must never contain a password.
    """
    return _rules.normalize(options, source)


def split_pool_options(options: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split a mapping into (pool options, everything else)."""
    return _rules.split(options)


def resolve_pool_options(
    alias: str,
    settings_dict: Mapping[str, Any],
    global_args: Mapping[str, object] | None,
) -> PoolOptions:
    """Merge and validate the options of one alias, lowest precedence first.

    ``DATABASE_POOL_ARGS`` (every alias) < pool keys in ``OPTIONS`` (where
    dj-database-url puts a URL's query string) < ``POOL_OPTIONS``.
    """
    return replace(PoolOptions(), **_rules.merge(alias, settings_dict, global_args))
