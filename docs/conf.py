"""Sphinx configuration of the django-postgrespool documentation (``make docs``)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import django
from django.conf import settings

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "packages" / p / "src") for p in ("backend", "dburl", "south_adapter")]

# autodoc imports the packages; the dburl helper and the checks read settings.
os.environ.pop("DJANGO_SETTINGS_MODULE", None)
settings.configure(INSTALLED_APPS=[], DATABASES={})
django.setup()

project = "django-postgrespool"
author = "the django-postgrespool authors"
copyright = "the django-postgrespool authors"
release = version = __import__("django_postgrespool").__version__

# No intersphinx: the build runs without network (CI) and with -W.
extensions = ["sphinx.ext.autodoc", "sphinx.ext.viewcode"]

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "undoc-members": False}

html_theme = "furo"
html_title = f"django-postgrespool {release}"
exclude_patterns = ["_build"]
