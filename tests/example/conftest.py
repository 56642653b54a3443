"""Fixtures of the example project's tests: a fresh database per test module."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.example.helpers import ExampleDatabase


@pytest.fixture(scope="module")
def example_db(server_url: str) -> Iterator[ExampleDatabase]:
    db = ExampleDatabase(server_url)
    db.create()
    yield db
    db.drop()
