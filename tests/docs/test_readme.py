"""README.rst and docs/ say what the code does: options, defaults, checks, commands, pages."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

from django_postgrespool import POOL_OPTION_NAMES, PoolOptions, _rules

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.rst").read_text()
DOCS = ROOT / "docs"
CHECKS = ROOT / "packages" / "backend" / "src" / "django_postgrespool" / "checks.py"


def section(text: str, title: str) -> str:
    """Return the body of the README section ``title`` (up to the next section)."""
    body = text.split(f"\n{title}\n{'=' * len(title)}\n", 1)[1]
    return re.split(r"\n[^\n]+\n=+\n", body, maxsplit=1)[0]


def option_table() -> dict[str, str]:
    rows = re.findall(r"^``([a-z_]+)``\s+``([^`]+)``\s", section(README, "Configuration"), re.M)
    return dict(rows)


def shown(default: object) -> str:
    if isinstance(default, str):
        return repr(default)
    if isinstance(default, float) and default.is_integer():
        return str(int(default))
    return str(default)


def test_readme_is_short() -> None:
    assert len(README.splitlines()) <= 300


def test_readme_documents_every_pool_option_with_its_default() -> None:
    table = option_table()
    assert sorted(table) == sorted(POOL_OPTION_NAMES)
    for field in fields(PoolOptions):
        assert table[field.name] == shown(field.default), field.name


def test_options_reference_documents_every_option_with_its_default() -> None:
    text = (DOCS / "reference" / "options.rst").read_text()
    for field in fields(PoolOptions):
        assert f"``{field.name}``\n    Default ``{shown(field.default)}``." in text, field.name


def test_every_make_command_in_the_readme_is_a_makefile_target() -> None:
    targets = set(re.findall(r"^([a-z][\w-]*):", (ROOT / "Makefile").read_text(), re.MULTILINE))
    used = set(re.findall(r"^\s+(?:\$ )?make ([a-z][\w-]*)", README, flags=re.MULTILINE))
    used |= set(re.findall(r"``make ([a-z][\w-]*)", README))
    assert {"demo", "test"} <= used
    assert used <= targets


def test_readme_links_point_at_files_that_exist() -> None:
    links = re.findall(r"<([\w./-]+\.rst)>`_", README)
    assert len(links) > 10
    missing = [link for link in links if not (ROOT / link).is_file()]
    assert missing == []


def test_every_hint_names_a_docs_page_that_exists() -> None:
    for topic, page in _rules.PAGES.items():
        assert (DOCS / f"{page}.rst").is_file(), topic
        assert _rules.see(topic) == f"See {_rules.DOCS_URL}{page}.html"


def test_every_check_id_is_in_the_checks_reference() -> None:
    ids = set(re.findall(r'id="(postgrespool\.[EW]\d{3})"', CHECKS.read_text()))
    assert len(ids) == 13
    reference = (DOCS / "reference" / "checks.rst").read_text()
    documented = set(re.findall(r"^``(postgrespool\.[EW]\d{3})``$", reference, re.M))
    assert documented == ids


def test_every_pool_stats_key_is_in_the_stats_reference() -> None:
    from django_postgrespool import PoolStats

    reference = (DOCS / "reference" / "stats.rst").read_text()
    for key in PoolStats.__annotations__:
        shown = "*_histogram" if key.endswith("_histogram") else key
        assert f"``{shown}``" in reference, key
