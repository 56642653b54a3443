"""Fixtures of the example project's tests: a fresh database per test module."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.example.helpers import ExampleDatabase


@pytest.fixture(scope="session")
def example_template(server_url: str) -> Iterator[str]:
    """The example's database, migrated and loaded once: each module gets a copy."""
    db = ExampleDatabase(server_url)
    db.create()
    yield db.name
    db.drop()


@pytest.fixture(scope="module")
def example_db(server_url: str, example_template: str) -> Iterator[ExampleDatabase]:
    db = ExampleDatabase(server_url, template=example_template)
    db.create()
    yield db
    db.drop()
