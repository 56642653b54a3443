"""The example with a read replica: reads on the standby, writes on the primary, one pool each."""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from tests.example.helpers import (
    ExampleDatabase,
    Served,
    example_env,
    free_addrport,
    start_server,
    stop,
    with_database,
)
from tests.support.db import connect
from tests.support.pgcluster import Cluster, start_pair


@pytest.fixture(scope="module")
def replicated() -> Iterator[tuple[Cluster, Cluster]]:
    # remote_apply: a commit is visible on the standby once acknowledged, so
    # a read right after a write sees it.
    primary, standby = start_pair(synchronous_commit="remote_apply")
    try:
        yield primary, standby
    finally:
        standby.destroy()
        primary.destroy()


@pytest.fixture(scope="module")
def site(
    replicated: tuple[Cluster, Cluster], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Served, ExampleDatabase]]:
    primary, standby = replicated
    db = ExampleDatabase(primary.url())
    db.create()  # on the primary; the standby gets it by replication
    replica_url = with_database(standby.url(), db.name, "target_session_attrs=standby")
    port, addrport = free_addrport()
    log = tmp_path_factory.mktemp("replica") / "runserver.log"
    served = start_server(
        [sys.executable, "manage.py", "runserver", "--noreload", addrport],
        example_env(db.url, DATABASE_REPLICA_URL=replica_url), log, port,
    )
    yield served, db
    stop(served.process)


def _last_queries(server: Cluster, database: str, application_name: str) -> list[str]:
    """Return the last statement of each session of ``application_name`` on ``server``."""
    conn = connect(with_database(server.url(), database))
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT query FROM pg_stat_activity WHERE datname = %s AND application_name = %s",
                (database, application_name),
            )
            return [row[0] for row in cur.fetchall()]
    finally:
        conn.close()


def _sessions(server: Cluster, application_name: str) -> int:
    return int(server.psql(
        f"SELECT count(*) FROM pg_stat_activity WHERE application_name = '{application_name}'"
    ))


def _json(base: str, path: str, body: dict[str, object] | None = None) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(base + path, data=data, method="POST" if data else "GET")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_reads_land_on_the_standby_and_writes_on_the_primary(
    site: tuple[Served, ExampleDatabase], replicated: tuple[Cluster, Cluster]
) -> None:
    served, db = site
    primary, standby = replicated
    # pg_stat_activity.query is each session's last statement (set when it
    # starts): the replica's sessions read the products, the primary's did not.
    for _ in range(5):
        status, body = _json(served.base, "/api/products/")
        assert status == 200
    product = body["products"][0]
    read = _last_queries(standby, db.name, "exampleproject-replica")
    assert read and all('FROM "shop_product"' in q for q in read), read
    assert not any(
        "shop_product" in q for q in _last_queries(primary, db.name, "exampleproject")
    )

    # The order's transaction (select_for_update, then writes) runs on the
    # primary: on the standby it would fail as read-only.
    status, order = _json(served.base, "/api/orders/", {"sku": product["sku"], "quantity": 1})
    assert status == 201, order
    # Read back through the replica (remote_apply: already there).
    status, body = _json(served.base, "/api/products/")
    (after,) = [p for p in body["products"] if p["sku"] == product["sku"]]
    assert after["stock"] == product["stock"] - 1

    # One pool per alias, each on its own server.
    assert _sessions(standby, "exampleproject-replica") >= 1
    assert _sessions(primary, "exampleproject-replica") == 0
    assert _sessions(standby, "exampleproject") == 0
    status, pools = _json(served.base, "/pool.json")
    assert status == 200
    ports = {a["alias"]: {p["port"] for p in a["pools"]} for a in pools["aliases"]}
    assert ports["default"] == {str(primary.port)}, pools
    assert ports["replica"] == {str(standby.port)}, pools
