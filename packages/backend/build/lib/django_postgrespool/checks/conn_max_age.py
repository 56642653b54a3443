"""CONN_MAX_AGE under pooling: a thread that keeps its connection keeps it from the pool.

With the pooled ENGINE, ``CONN_MAX_AGE`` keeps Django's meaning: how long a
thread keeps its checked-out connection across requests. The pool already
keeps connections open, so 0 (back to the pool at the end of every request)
is the setting that lets threads share them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from django.conf import settings
from django.core import checks
from django.core.exceptions import ImproperlyConfigured

from django_postgrespool.checks._common import pooled_aliases, see
from django_postgrespool.options import resolve_pool_options

__all__ = ["CHECKS", "check_conn_max_age"]

SECTION = "CONN_MAX_AGE"
HINT = (
    "Set CONN_MAX_AGE = 0: the pool already keeps connections open, and each request "
    "then gives its connection back to the pool. " + see(SECTION)
)


def _cap(alias: str, settings_dict: Any) -> str:
    try:
        options = resolve_pool_options(
            alias, settings_dict, getattr(settings, "DATABASE_POOL_ARGS", None)
        )
    except ImproperlyConfigured:
        return "pool_size + max_overflow"  # postgrespool.E005 tells why
    return f"pool_size + max_overflow = {options.max_connections}"


def check_conn_max_age(
    app_configs: Sequence[Any] | None = None, **kwargs: Any
) -> list[checks.CheckMessage]:
    """Warn about pooled aliases whose threads keep their connection between requests."""
    messages: list[checks.CheckMessage] = []
    for alias, settings_dict in pooled_aliases():
        age = settings_dict.get("CONN_MAX_AGE", 0)
        if age is None:
            messages.append(
                checks.Warning(
                    f"DATABASES[{alias!r}]['CONN_MAX_AGE'] is None: each thread keeps its "
                    f"pooled connection for ever, so no more than {_cap(alias, settings_dict)} "
                    f"threads can ever use alias {alias!r}; the others wait and time out.",
                    hint=HINT,
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
                    hint=HINT,
                    id="postgrespool.W003",
                )
            )
    return messages


CHECKS = [(check_conn_max_age, ("postgrespool",))]
