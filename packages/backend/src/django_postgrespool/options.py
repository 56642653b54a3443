"""Pool options: one place that validates and normalises them.

The backend and the dburl helper both call :func:`normalize_pool_options`, so a
value is spelled, checked and explained the same way wherever it comes from
(``DATABASE_POOL_ARGS``, ``DATABASES[alias]['POOL_OPTIONS']``, ``OPTIONS`` or a
database URL's query string).
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any, Literal

from django.core.exceptions import ImproperlyConfigured

__all__ = [
    "POOL_OPTION_NAMES",
    "PoolOptions",
    "PrePing",
    "normalize_pool_options",
    "resolve_pool_options",
]

PrePing = bool | Literal["socket"]
ResetMode = Literal["rollback", "discard"]

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}
_NEVER = {"none", "never", "-1"}


@dataclass(frozen=True)
class PoolOptions:
    """The validated options of one pool; see README.rst, "Pool options"."""

    pool_size: int = 5
    max_overflow: int = 10
    recycle: float | None = 3600.0
    timeout: float = 30.0
    pre_ping: PrePing = "socket"
    use_lifo: bool = False
    reset: ResetMode = "rollback"
    max_idle: float | None = None
    leak_timeout: float | None = None

    @property
    def max_connections(self) -> int:
        """Return the hard cap of simultaneous connections of this pool."""
        return self.pool_size + self.max_overflow


POOL_OPTION_NAMES: tuple[str, ...] = tuple(sorted(f.name for f in fields(PoolOptions)))


class _Invalid(ValueError):
    def __init__(self, expected: str) -> None:
        super().__init__(expected)
        self.expected = expected


def _int(value: object, minimum: int) -> int:
    if isinstance(value, bool):
        raise _Invalid(f"an integer >= {minimum}")
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise _Invalid(f"an integer >= {minimum}") from None
    if not isinstance(value, int) or value < minimum:
        raise _Invalid(f"an integer >= {minimum}")
    return value


def _seconds(value: object) -> float:
    expected = "a number of seconds > 0"
    if isinstance(value, bool):
        raise _Invalid(expected)
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise _Invalid(expected) from None
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise _Invalid(expected)
    return float(value)


def _recycle(value: object) -> float | None:
    expected = "a number of seconds > 0, or None (never recycle)"
    if value is None or (isinstance(value, str) and value.strip().lower() in _NEVER):
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value == -1:
        return None  # SQLAlchemy's own spelling of "never"
    try:
        return _seconds(value)
    except _Invalid:
        raise _Invalid(expected) from None


def _optional_seconds(value: object) -> float | None:
    expected = "a number of seconds > 0, or None (off)"
    if value is None or (isinstance(value, str) and value.strip().lower() in _NEVER | {"off"}):
        return None
    try:
        return _seconds(value)
    except _Invalid:
        raise _Invalid(expected) from None


def _bool(value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        word = value.strip().lower()
        if word in _TRUE:
            return True
        if word in _FALSE:
            return False
    raise _Invalid("a boolean (True/False, 'true'/'false', 1/0)")


def _pre_ping(value: object) -> PrePing:
    if isinstance(value, str) and value.strip().lower() == "socket":
        return "socket"
    try:
        return _bool(value)
    except _Invalid:
        raise _Invalid("one of True, False or 'socket'") from None


def _reset(value: object) -> ResetMode:
    if isinstance(value, str):
        word = value.strip().lower()
        if word == "rollback":
            return "rollback"
        if word == "discard":
            return "discard"
    raise _Invalid("one of 'rollback' or 'discard'")


_NORMALIZERS: dict[str, Any] = {
    "pool_size": lambda v: _int(v, 1),
    "max_overflow": lambda v: _int(v, 0),
    "recycle": _recycle,
    "timeout": _seconds,
    "pre_ping": _pre_ping,
    "use_lifo": _bool,
    "reset": _reset,
    "max_idle": _optional_seconds,
    "leak_timeout": _optional_seconds,
}
assert set(_NORMALIZERS) == set(POOL_OPTION_NAMES)


def normalize_pool_options(options: Mapping[str, object], *, source: str) -> dict[str, Any]:
    """Validate pool options and return them in their canonical types.

    ``source`` names where the options were written (for example
    ``"DATABASES['default']['POOL_OPTIONS']"``); every error message starts
    with it. It must never contain a password.
    """
    if not isinstance(options, Mapping):
        raise ImproperlyConfigured(
            f"{source} must be a dict of pool options, got {type(options).__name__}. "
            f"Valid options: {', '.join(POOL_OPTION_NAMES)}."
        )
    normalized: dict[str, Any] = {}
    for key, value in options.items():
        normalizer = _NORMALIZERS.get(key) if isinstance(key, str) else None
        if normalizer is None:
            close = difflib.get_close_matches(str(key), POOL_OPTION_NAMES, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ImproperlyConfigured(
                f"{source}: unknown pool option {key!r}{hint}. "
                f"Valid options: {', '.join(POOL_OPTION_NAMES)}."
            )
        try:
            normalized[key] = normalizer(value)
        except _Invalid as error:
            raise ImproperlyConfigured(
                f"{source}: pool option {key!r} must be {error.expected}; got {value!r}."
            ) from None
    return normalized


def split_pool_options(options: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split a mapping into (pool options, everything else)."""
    pool = {k: v for k, v in options.items() if k in _NORMALIZERS}
    rest = {k: v for k, v in options.items() if k not in _NORMALIZERS}
    return pool, rest


def resolve_pool_options(
    alias: str,
    settings_dict: Mapping[str, Any],
    global_args: Mapping[str, object] | None,
) -> PoolOptions:
    """Merge and validate the options of one alias, lowest precedence first.

    ``DATABASE_POOL_ARGS`` (every alias) < pool keys in ``OPTIONS`` (where
    dj-database-url puts a URL's query string) < ``POOL_OPTIONS``.
    """
    merged: dict[str, Any] = {}
    if global_args is not None:
        merged.update(normalize_pool_options(global_args, source="DATABASE_POOL_ARGS"))
    in_options, _ = split_pool_options(settings_dict.get("OPTIONS") or {})
    per_alias = settings_dict.get("POOL_OPTIONS")
    merged.update(normalize_pool_options(in_options, source=f"DATABASES[{alias!r}]['OPTIONS']"))
    merged.update(
        normalize_pool_options(
            {} if per_alias is None else per_alias,
            source=f"DATABASES[{alias!r}]['POOL_OPTIONS']",
        )
    )
    conn_health_checks = settings_dict.get("CONN_HEALTH_CHECKS")
    if conn_health_checks and "pre_ping" not in merged:
        # CONN_HEALTH_CHECKS asks for a verified connection at the start of
        # each request; under pooling that is a ping at checkout.
        merged["pre_ping"] = True
    return replace(PoolOptions(), **merged)
