"""South left in the settings of a Django >= 1.7 project.

South (the migration tool of Django <= 1.6) cannot be imported on Django >=
1.7, and Django's own migrations run through the pooled backend's schema
editor with nothing to configure. Its settings are dead weight that a reader
takes for live configuration; ``'south'`` in INSTALLED_APPS usually fails
before any check runs, but an app config or a forgotten adapter setting does not.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from django.conf import settings
from django.core import checks

from django_postgrespool.checks._common import see

__all__ = ["CHECKS", "check_south_settings"]

SECTION = "South (Django 1.6 and older)"
# Settings that only South reads (south/db/__init__.py, south/migration).
SOUTH_SETTINGS = (
    "SOUTH_DATABASE_ADAPTERS",
    "SOUTH_DATABASE_ADAPTER",
    "SOUTH_MIGRATION_MODULES",
    "SOUTH_TESTS_MIGRATE",
    "SKIP_SOUTH_TESTS",
)


def _south_apps() -> list[str]:
    return [
        app
        for app in settings.INSTALLED_APPS
        if isinstance(app, str) and (app == "south" or app.startswith("south."))
    ]


def check_south_settings(
    app_configs: Sequence[Any] | None = None, **kwargs: Any
) -> list[checks.CheckMessage]:
    """Warn when South, or a setting only South reads, is still configured."""
    messages: list[checks.CheckMessage] = []
    for app in _south_apps():
        messages.append(
            checks.Warning(
                f"INSTALLED_APPS contains {app!r}: South is the migration tool of Django 1.6 "
                f"and older and does not run on Django >= 1.7, whose own migrations run "
                f"through the pooled backend.",
                hint=(
                    f"Remove {app!r} from INSTALLED_APPS and convert each app's South "
                    f"migrations to Django migrations (makemigrations, then migrate --fake-initial "
                    f"on existing databases). " + see(SECTION)
                ),
                id="postgrespool.W010",
            )
        )
    found = [name for name in SOUTH_SETTINGS if hasattr(settings, name)]
    if found:
        messages.append(
            checks.Warning(
                f"{', '.join(found)} {'is' if len(found) == 1 else 'are'} set, but only South "
                f"reads {'it' if len(found) == 1 else 'them'}, and South does not run on "
                f"Django >= 1.7: Django's migrations need no adapter setting for "
                f"ENGINE 'django_postgrespool'.",
                hint=f"Delete {', '.join(found)} from your settings. " + see(SECTION),
                id="postgrespool.W011",
            )
        )
    return messages


CHECKS = [(check_south_settings, ("postgrespool", checks.Tags.compatibility))]
