"""Every check of the package, as (function, tags); one module per topic.

A topic module defines ``CHECKS: list[tuple[Callable, tuple[str, ...]]]`` and
is listed here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

# Topic modules, one import line each:
# from django_postgrespool.checks import budget, south
from django_postgrespool.checks import budget, conn_max_age, pgbouncer, south

ALL: list[tuple[Callable[..., list[Any]], tuple[str, ...]]] = [
    *budget.CHECKS,
    *conn_max_age.CHECKS,
    *pgbouncer.CHECKS,
    *south.CHECKS,
]
