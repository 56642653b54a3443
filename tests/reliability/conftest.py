"""Fixtures of the reliability suite: servers of its own, and the figures report."""

from __future__ import annotations

import pytest

from tests.reliability import figures
from tests.support.db import Monitor
from tests.support.pgcluster import Cluster


@pytest.fixture(scope="module")
def own_cluster():
    """A PostgreSQL server for this module alone: tests here stop and restart it."""
    cluster = Cluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture
def own_monitor(own_cluster):
    m = Monitor(own_cluster.url())
    yield m
    m.close()


@pytest.fixture
def own_alias(pooled_alias, own_cluster):
    """Return a factory like ``pooled_alias`` whose aliases connect to ``own_cluster``."""

    def make(name: str, **kwargs):
        return pooled_alias(name, NAME="postgres", PORT=str(own_cluster.port), **kwargs)

    return make


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not figures.has_figures():
        return
    tr = terminalreporter
    tr.section("reliability figures")
    for line in figures.report_lines():
        tr.write_line(line)
    path = figures.report_path()
    if path:
        figures.write_json(path)
        tr.write_line(f"(written to {path})")
