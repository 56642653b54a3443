"""README.rst says what the code does: options, defaults, commands."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

from django_postgrespool import POOL_OPTION_NAMES, PoolOptions

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.rst").read_text()


def option_table() -> dict[str, str]:
    configuration = README.split("\nConfiguration\n=============\n", 1)[1].split("\nDjango's connection settings", 1)[0]
    rows = re.findall(r"^``([a-z_]+)``\s+``([^`]+)``\s", configuration, flags=re.MULTILINE)
    return dict(rows)


def test_readme_documents_every_pool_option_with_its_default():
    table = option_table()
    assert sorted(table) == sorted(POOL_OPTION_NAMES)
    for field in fields(PoolOptions):
        default = field.default
        shown = repr(default) if isinstance(default, str) else str(default)
        if isinstance(default, float) and default.is_integer():
            shown = str(int(default))
        assert table[field.name] == shown, field.name


def test_every_make_command_in_the_readme_is_a_makefile_target():
    targets = set(re.findall(r"^([a-z][\w-]*):", (ROOT / "Makefile").read_text(), re.MULTILINE))
    used = set(re.findall(r"^\s+(?:\$ )?make ([a-z][\w-]*)", README, flags=re.MULTILINE))
    assert {"demo", "test"} <= used
    assert used <= targets
