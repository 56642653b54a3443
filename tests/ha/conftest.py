"""Fixtures of the high-availability tests: a primary with a streaming standby of its own."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.support.pgcluster import Cluster, start_pair


@dataclass
class Pair:
    """A primary and its synchronous streaming standby, on two loopback ports."""

    primary: Cluster
    standby: Cluster

    @property
    def hosts(self) -> str:
        return f"{self.primary.host},{self.standby.host}"

    @property
    def ports(self) -> str:
        return f"{self.primary.port},{self.standby.port}"


@pytest.fixture
def pair() -> Iterator[Pair]:
    """A fresh primary and standby for one test (a failover uses them up)."""
    p = Pair(*start_pair())
    try:
        yield p
    finally:
        # The standby first: a synchronous primary would wait for it at shutdown.
        p.standby.destroy()
        p.primary.destroy()
