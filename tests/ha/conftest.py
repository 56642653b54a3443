"""Fixtures of the high-availability tests: a primary with a streaming standby of its own."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.support.pgcluster import Cluster


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


def start_pair() -> Pair:
    """Start a primary (synchronous commits) and a standby streaming from it."""
    primary = Cluster(synchronous_standby=True)
    primary.start()
    standby = primary.standby()
    try:
        standby.start()
        primary.wait_streaming()
    except BaseException:
        primary.destroy()
        standby.destroy()
        raise
    return Pair(primary, standby)


@pytest.fixture
def pair() -> Iterator[Pair]:
    """A fresh primary and standby for one test (a failover uses them up)."""
    p = start_pair()
    try:
        yield p
    finally:
        # The standby first: a synchronous primary would wait for it at shutdown.
        p.standby.destroy()
        p.primary.destroy()
