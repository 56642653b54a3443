# The module Django loads for ENGINE 'django_postgrespool'. It stays parseable
# by Python 2.7 so that the legacy lane (Django 1.4-1.6) can load its own,
# separate implementation; the modern code never imports the legacy one.
import sys

if sys.version_info[0] < 3:  # pragma: no cover - legacy lane
    from django_postgrespool._legacy import *  # noqa: F401,F403
else:
    from django_postgrespool.backend import (  # noqa: F401
        DatabaseCreation,
        DatabaseWrapper,
    )
