# PostgreSQL connection pooling for Django, on SQLAlchemy's pool.
#
# This file stays parseable by Python 2.7 (the legacy lane imports the
# package); the public API below is loaded on first use, so importing the
# package (as an app in INSTALLED_APPS, say) costs nothing.
__version__ = "1.0.0"

__all__ = [
    "POOL_OPTION_NAMES",
    "PoolError",
    "PoolOptions",
    "PoolStats",
    "PoolTimeout",
    "checkout_info",
    "close_pools",
    "normalize_pool_options",
    "pool_stats",
    "prewarm",
]

_LAZY = {
    "POOL_OPTION_NAMES": "django_postgrespool.options",
    "PoolOptions": "django_postgrespool.options",
    "normalize_pool_options": "django_postgrespool.options",
    "PoolError": "django_postgrespool.errors",
    "PoolTimeout": "django_postgrespool.errors",
    "PoolStats": "django_postgrespool.pool",
    "close_pools": "django_postgrespool.registry",
    "pool_stats": "django_postgrespool.registry",
    "checkout_info": "django_postgrespool.backend",
    "prewarm": "django_postgrespool.backend",
}


def __getattr__(name):
    # type: (str) -> object
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError("module 'django_postgrespool' has no attribute %r" % (name,))
    import importlib

    return getattr(importlib.import_module(module), name)


def __dir__():
    # type: () -> list[str]
    return sorted(list(globals()) + list(_LAZY))
