# Python 2.7 and 3 alike, so no annotations: mypy reads the type comments.
TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing on Python 2
if TYPE_CHECKING:  # pragma: no cover
    from typing import Any, Dict, Mapping, Optional  # noqa: F401, UP035 - type comments (py2)

# South 1.0 (south/db/__init__.py, ``engine_modules``) picks an adapter by the
# exact ENGINE string; an engine it does not know gets none, and South fails
# later with ``KeyError: 'default'``. It maps Django's PostGIS engine onto its
# PostgreSQL adapter, and so do we for the pooled PostGIS engine.
SOUTH_POSTGRESQL_ADAPTER = "south.db.postgresql_psycopg2"

POOLED_ENGINES = {
    "django_postgrespool": SOUTH_POSTGRESQL_ADAPTER,
    "django_postgrespool.postgis": SOUTH_POSTGRESQL_ADAPTER,
}  # type: Dict[str, str]


def south_database_adapters(databases, adapters=None):
    # type: (Mapping[str, Mapping[str, Any]], Optional[Mapping[str, str]]) -> Dict[str, str]
    """Return SOUTH_DATABASE_ADAPTERS with South's adapter for every pooled alias.

    Aliases of other engines are left to South; an alias already in
    ``adapters`` (your own SOUTH_DATABASE_ADAPTERS) keeps your choice.
    """
    result = {}  # type: Dict[str, str]
    for alias, entry in databases.items():
        adapter = POOLED_ENGINES.get(entry.get("ENGINE") or "")
        if adapter is not None:
            result[alias] = adapter
    result.update(adapters or {})
    return result
