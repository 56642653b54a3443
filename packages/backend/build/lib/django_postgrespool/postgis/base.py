"""ENGINE 'django_postgrespool.postgis': PostGIS, with connections borrowed from a pool."""

from __future__ import annotations

from django.contrib.gis.db.backends.postgis.base import DatabaseWrapper as PostGISDatabaseWrapper

from django_postgrespool.backend import DatabaseCreation, PooledDatabaseWrapperMixin

__all__ = ["DatabaseCreation", "DatabaseWrapper"]


class DatabaseWrapper(PooledDatabaseWrapperMixin, PostGISDatabaseWrapper):  # type: ignore[misc]
    """PostGIS, with connections borrowed from a pool."""
