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
    _no_pool_outlives_its_test()


def _no_pool_outlives_its_test(grace: float = 10.0) -> None:
    """Fail the test (in its teardown) that leaves a pool lending or waited on.

    A pool closed by close_pools() stays in the registry, and in every later
    test's pool_stats(), until its last connection is given back and nobody
    waits for one: a test that leaves a borrower behind would fail dozens of
    others. Its threads get ``grace`` seconds to finish; then the pools are
    reported with this test and dropped, so that the next tests start clean.
    """
    import threading
    import time

    from django_postgrespool import registry

    deadline = time.monotonic() + grace
    while registry.all_pools():  # all_pools() drops the drained ones
        if time.monotonic() > deadline:
            break
        time.sleep(0.01)
    else:
        return
    with registry._registry_lock():
        left = [*registry._pools.values(), *registry._retired]
        registry._pools.clear()
        registry._retired.clear()
    described = [
        {key: stats[key] for key in ("alias", "size", "checked_out", "waiting")}
        | {
            "leases": [
                (lease.state, lease.source, getattr(lease.owner, "name", None),
                 getattr(lease.owner, "is_alive", lambda: None)())
                for lease in list(pool._leases)
            ],
            "pool_closed": pool.closed,
            "threads": sorted(t.name for t in threading.enumerate()),
        }
        for pool, stats in ((pool, pool.stats()) for pool in left)
    ]
    pytest.fail(f"pools still lending or waited on {grace:.0f} s after the test: {described}")


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
