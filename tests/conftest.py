"""One suite for all packages: starts its own PostgreSQL unless DATABASE_URL names one."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support import settings as test_settings  # noqa: E402
from tests.support.db import DRIVER, Monitor  # noqa: E402
from tests.support.pgcluster import Cluster  # noqa: E402

_cluster: Cluster | None = None


def pytest_configure(config: pytest.Config) -> None:
    global _cluster
    url = os.environ.get("DATABASE_URL")
    if not url:
        _cluster = Cluster()
        _cluster.start()
        url = _cluster.url()
    test_settings.configure(url)


def pytest_unconfigure(config: pytest.Config) -> None:
    if _cluster is not None:
        _cluster.destroy()


def pytest_report_header(config: pytest.Config) -> list[str]:
    import django
    import sqlalchemy

    return [
        f"django-postgrespool lane: Django {django.get_version()}, {DRIVER}, "
        f"SQLAlchemy {sqlalchemy.__version__}, server "
        f"{'from DATABASE_URL' if _cluster is None else f'127.0.0.1:{_cluster.port} (started by the suite)'}"
    ]


@pytest.fixture(scope="session")
def cluster() -> Cluster:
    """The suite's own server (tests that restart it need this, not a DATABASE_URL)."""
    if _cluster is None:
        pytest.fail("this test restarts the server: run it without DATABASE_URL")
    return _cluster


@pytest.fixture(scope="session")
def server_url() -> str:
    return test_settings.SERVER_URL


@pytest.fixture
def monitor(server_url: str):
    m = Monitor(server_url)
    yield m
    m.close()


@pytest.fixture(autouse=True)
def _close_pools_after_test():
    yield
    from django.db import connections
    from django_postgrespool import close_pools

    for conn in connections.all(initialized_only=True):
        conn.close()
    close_pools()


@pytest.fixture
def pooled_alias():
    """Return a factory that registers a pooled alias; each thread gets its own wrapper."""
    from django.db import connections

    from tests.support.settings import database_settings, unique_name

    made: list[str] = []

    def make(alias: str = "pooled", *, pool_options=None, options=None, **overrides):
        app = unique_name(alias)
        entry = database_settings(application_name=app, **(options or {}))
        if pool_options is not None:
            entry["POOL_OPTIONS"] = pool_options
        entry.update(overrides)
        connections.settings[alias] = connections.configure_settings(
            {"default": connections.settings["default"], alias: entry}
        )[alias]
        with_contextlib_suppress_delete(connections, alias)
        made.append(alias)
        return alias, app

    yield make
    for alias in made:
        with_contextlib_suppress_delete(connections, alias)
        connections.settings.pop(alias, None)


def with_contextlib_suppress_delete(connections, alias: str) -> None:
    """Close and forget this thread's wrapper of ``alias``, if any."""
    try:
        wrapper = getattr(connections._connections, alias)
    except AttributeError:
        return
    wrapper.close()
    delattr(connections._connections, alias)
