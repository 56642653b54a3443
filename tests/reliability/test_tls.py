"""TLS: sslmode=require and verify-ca through the pool work, and still pool."""

from __future__ import annotations

import subprocess

import pytest
from django.db import OperationalError, connections
from django_postgrespool import pool_stats

from tests.reliability.figures import record
from tests.support.db import Monitor
from tests.support.pgcluster import PASSWORD, Cluster
from tests.support.requests import run_request

pytestmark = pytest.mark.reliability


@pytest.fixture(scope="module")
def tls_cluster():
    cluster = Cluster(ssl=True)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture
def tls_alias(pooled_alias, tls_cluster):
    def make(name, **options):
        return pooled_alias(name, options=options, NAME="postgres", PORT=str(tls_cluster.port))

    return make


def _pid_and_ssl(cursor):
    cursor.execute("SELECT pid, ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
    return cursor.fetchone()


@pytest.mark.parametrize(
    ("sslmode", "with_root"),
    [("require", False), ("verify-ca", True), ("verify-full", True), ("disable", False)],
)
def test_tls_connections_work_and_are_pooled(tls_alias, tls_cluster, sslmode, with_root):
    options = {"sslmode": sslmode}
    if with_root:
        options["sslrootcert"] = str(tls_cluster.ssl_root_cert)
    alias, app = tls_alias(f"tls-{sslmode}", **options)
    rows = [run_request(alias, _pid_and_ssl) for _ in range(5)]
    pids = {pid for pid, _, _ in rows}
    assert len(pids) == 1  # the same backend across requests: pooled
    encrypted = {ssl for _, ssl, _ in rows}
    assert encrypted == {sslmode != "disable"}
    (stats,) = pool_stats(alias)
    assert (stats["opened"], stats["checkouts"], stats["checked_out"]) == (1, 5, 0)
    m = Monitor(tls_cluster.url())
    try:
        assert m.pids(app) == list(pids)
    finally:
        m.close()
    record(
        "TLS",
        f"sslmode={sslmode}",
        f"{len(pids)} backend/5 requests, ssl={rows[0][1]} {rows[0][2] or ''}".strip(),
    )


def test_verify_ca_with_the_wrong_root_fails_clearly(tls_alias, tmp_path, caplog):
    other = tmp_path / "other.crt"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=someone-else",
            "-keyout",
            str(tmp_path / "other.key"),
            "-out",
            str(other),
        ],
        capture_output=True,
        check=True,
    )
    alias, _ = tls_alias("tls-wrong-root", sslmode="verify-ca", sslrootcert=str(other))
    with pytest.raises(OperationalError) as raised:
        connections[alias].ensure_connection()
    assert "certificate verify failed" in str(raised.value)
    for text in (str(raised.value), repr(raised.value), caplog.text, repr(pool_stats())):
        assert PASSWORD not in text
    (stats,) = pool_stats(alias)
    assert (stats["checked_out"], stats["size"]) == (0, 0)
