"""ENGINE 'django_postgrespool.postgis': PostGIS with the same pool."""

from __future__ import annotations

import os

import pytest

from tests.support.db import connect
from tests.support.requests import run_request


def _postgis_missing(server_url: str) -> str | None:
    try:
        from django.contrib.gis.gdal import GDAL_VERSION  # noqa: F401
        from django.contrib.gis.geos import GEOSGeometry  # noqa: F401
    except Exception as error:  # ImproperlyConfigured or OSError from ctypes
        return f"GEOS/GDAL libraries: {error}"
    conn = connect(server_url)
    with conn.cursor() as cur:
        cur.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'postgis'")
        found = cur.fetchall()
    conn.close()
    return None if found else "the server has no postgis extension"


@pytest.fixture
def postgis_alias(server_url, pooled_alias):
    missing = _postgis_missing(server_url)
    if missing:
        if os.environ.get("CI"):
            pytest.fail(
                f"PostGIS is required under CI (apt-get install postgresql-15-postgis-3): {missing}"
            )
        pytest.skip(f"PostGIS not installed on this machine: {missing}")
    admin = connect(server_url)
    with admin.cursor() as cur:
        cur.execute("SELECT 1 FROM pg_database WHERE datname = 'postgrespool_gis'")
        if not cur.fetchall():
            cur.execute("CREATE DATABASE postgrespool_gis")
    admin.close()
    gis = connect(server_url.rsplit("/", 1)[0] + "/postgrespool_gis")
    with gis.cursor() as cur:
        cur.execute("CREATE EXTENSION IF NOT EXISTS postgis")
    gis.close()
    return pooled_alias("gis", ENGINE="django_postgrespool.postgis", NAME="postgrespool_gis")


def test_postgis_engine_pools_and_adapts_geometries(postgis_alias, monitor):
    from django.contrib.gis.geos import Point
    from django.db import connections
    from django_postgrespool import pool_stats

    alias, app = postgis_alias

    def body(cursor):
        point = connections[alias].ops.Adapter(Point(1, 2, srid=4326))
        cursor.execute("SELECT ST_AsText(%s), pg_backend_pid()", [point])
        return cursor.fetchone()

    (text, first), (_, second) = run_request(alias, body), run_request(alias, body)
    assert text == "POINT(1 2)"
    assert first == second
    assert connections[alias].ops.spatial_version >= (3, 0)
    (stats,) = pool_stats(alias)
    assert stats["opened"] == 1 and stats["checkouts"] >= 2
