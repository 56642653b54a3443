"""ENGINE 'django_postgrespool.postgis': PostGIS, with connections borrowed from a pool."""

# Parseable by Python 2.7 (like ../base.py): a South project on the legacy lane
# that names this engine gets an error naming the setting, not a SyntaxError.
import sys

if sys.version_info[0] < 3:  # pragma: no cover - legacy lane
    from django.core.exceptions import ImproperlyConfigured

    raise ImproperlyConfigured(
        "ENGINE 'django_postgrespool.postgis' needs Python 3 and Django >= 4.2. On Python 2.7 "
        "with Django 1.4-1.6 the pooled engine is 'django_postgrespool' (without PostGIS)."
    )

from django.contrib.gis.db.backends.postgis.base import (  # noqa: E402
    DatabaseWrapper as PostGISDatabaseWrapper,
)

from django_postgrespool.backend import (  # noqa: E402
    DatabaseCreation,
    PooledDatabaseWrapperMixin,
)

__all__ = ["DatabaseCreation", "DatabaseWrapper"]


class DatabaseWrapper(PooledDatabaseWrapperMixin, PostGISDatabaseWrapper):  # type: ignore[misc]
    """PostGIS, with connections borrowed from a pool."""
