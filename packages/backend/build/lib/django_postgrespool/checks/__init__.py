"""System checks (ids ``postgrespool.E0xx`` / ``W0xx``); see README.rst, "System checks".

Each topic has a module of its own; :func:`register_all` registers them once.
They run when 'django_postgrespool' is in INSTALLED_APPS, and whenever the
pooled backend is loaded.
"""

from __future__ import annotations

from django.core import checks

_registered = False


def register_all() -> None:
    """Register every check of this package (idempotent)."""
    global _registered
    if _registered:
        return
    _registered = True
    from django_postgrespool.checks import topics

    for check, tags in topics.ALL:
        checks.register(check, *tags)
