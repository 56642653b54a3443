"""Fixtures of the dburl tests: URLs of the suite's server and aliases configured from them."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
from django.db import connections

from tests.conftest import with_contextlib_suppress_delete
from tests.support.settings import DATABASE


@pytest.fixture
def database_url(server_url: str) -> str:
    """Return a postgres:// URL of the tests' database, password included."""
    return urlunsplit(urlsplit(server_url)._replace(path=f"/{DATABASE}"))


@pytest.fixture
def configure_alias() -> Iterator[Callable[[str, dict[str, Any]], str]]:
    """Return a function that installs a DATABASES entry under an alias."""
    made: list[str] = []

    def install(alias: str, entry: dict[str, Any]) -> str:
        connections.settings[alias] = connections.configure_settings(
            {"default": connections.settings["default"], alias: dict(entry)}
        )[alias]
        with_contextlib_suppress_delete(connections, alias)
        made.append(alias)
        return alias

    yield install
    for alias in made:
        with_contextlib_suppress_delete(connections, alias)
        connections.settings.pop(alias, None)
