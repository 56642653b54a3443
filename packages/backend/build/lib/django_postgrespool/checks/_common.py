"""Helpers shared by the check topics: which aliases are pooled, and where hints point."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from django.db import connections

POOLED_ENGINES = frozenset({"django_postgrespool", "django_postgrespool.postgis"})


def pooled_aliases() -> Iterator[tuple[str, Mapping[str, Any]]]:
    """Yield (alias, settings dict) of every alias served by a pooled ENGINE."""
    for alias, settings_dict in connections.settings.items():
        if settings_dict.get("ENGINE") in POOLED_ENGINES:
            yield alias, settings_dict


def see(section: str) -> str:
    """Return the end of a hint that points at a README section."""
    return f"See README.rst, section '{section}'."
