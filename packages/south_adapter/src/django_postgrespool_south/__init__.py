# South's database adapters for the pooled engines (Django <= 1.6, South 1.0).
#
# This package stays importable by Python 2.7 (the settings of a South project
# import it) and needs neither South nor Django to be installed: it only reads
# the DATABASES dict it is given. Documentation: docs/guide/south.rst.
from django_postgrespool_south._adapters import (
    POOLED_ENGINES,
    SOUTH_POSTGRESQL_ADAPTER,
    south_database_adapters,
)

__version__ = "1.0.0"

__all__ = ["POOLED_ENGINES", "SOUTH_POSTGRESQL_ADAPTER", "south_database_adapters"]
