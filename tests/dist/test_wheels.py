"""The built wheels (``make dist``), installed in a fresh virtualenv, run the README's quickstart.

``make dist`` builds ``dist/`` first and then runs this module (marker ``dist``; ``make test``
leaves it out). The virtualenv gets the wheels and their dependencies from the index, never the
source tree, and the README's settings run against the suite's server.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
import tomllib
import zipfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from tests.support import lanes
from tests.support.db import DRIVER

pytestmark = pytest.mark.dist

ROOT = Path(__file__).resolve().parents[2]
DIST = ROOT / "dist"
PACKAGES = {
    "django_postgrespool": "backend",
    "django_postgrespool_dburl": "dburl",
    "django_postgrespool_south": "south_adapter",
}


def wheels() -> dict[str, Path]:
    found = {w.name.split("-", 1)[0]: w for w in DIST.glob("*.whl")}
    if sorted(found) != sorted(PACKAGES):
        pytest.fail(f"dist/ should hold one wheel per package, has {sorted(found)}: run make dist")
    return found


def version_of(module: str) -> str:
    init = ROOT / "packages" / PACKAGES[module] / "src" / module / "__init__.py"
    return re.search(r'^__version__ = "([^"]+)"', init.read_text(), re.M).group(1)  # type: ignore[union-attr]


def readme_quickstart() -> dict[str, object]:
    """Return DATABASES as the README's quickstart writes it."""
    text = (ROOT / "README.rst").read_text()
    title = "Quickstart: the ENGINE"
    section = text.split(f"{title}\n{'=' * len(title)}\n", 1)[1]
    code = textwrap.dedent(section.split(".. code-block:: python\n\n", 1)[1].split("\n\n", 1)[0])
    namespace: dict[str, object] = {}
    exec(code, namespace)
    return namespace["DATABASES"]  # type: ignore[return-value]


@pytest.mark.parametrize("module", sorted(PACKAGES))
def test_wheel_carries_version_license_and_type_marker(module: str) -> None:
    wheel = wheels()[module]
    meta = tomllib.loads((ROOT / "packages" / PACKAGES[module] / "pyproject.toml").read_text())
    assert wheel.name.startswith(f"{module}-{version_of(module)}-py3-none-any")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA")))
    text = metadata.decode()
    assert f"Version: {version_of(module)}\n" in text
    assert "License-Expression: MIT\n" in text
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert f"{module}/py.typed" in names
    assert "Project-URL: Documentation, https://" in text
    assert not [n for n in names if n.startswith("tests/")]
    assert (ROOT / "packages" / PACKAGES[module] / "LICENSE").read_text() == (
        ROOT / "LICENSE"
    ).read_text()
    assert meta["project"]["license"] == "MIT"


def test_sdists_are_built_for_every_package() -> None:
    names = sorted(p.name for p in DIST.glob("*.tar.gz"))
    assert names == sorted(f"{m}-{version_of(m)}.tar.gz" for m in PACKAGES)


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    venv = tmp_path_factory.mktemp("wheels") / "venv"
    driver = "psycopg[binary]>=3.1.8" if DRIVER == "psycopg" else "psycopg2-binary>=2.9"
    subprocess.run([lanes.uv(), "venv", "-q", "--python", sys.executable, str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run(
        [lanes.uv(), "pip", "install", "-q", "--python", str(python),
         *map(str, wheels().values()), driver],
        check=True,
    )
    yield python


def run(python: Path, script: str, cwd: Path) -> dict[str, object]:
    done = subprocess.run(
        [str(python), "-c", script], cwd=cwd, capture_output=True, text=True, timeout=300,
        env={"PATH": "/usr/bin:/bin", "DJANGO_SETTINGS_MODULE": "quickstart_settings"},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_installed_wheels_serve_the_readme_quickstart(
    fresh_venv: Path, server_url: str, tmp_path: Path
) -> None:
    databases = readme_quickstart()
    default = dict(databases["default"])  # type: ignore[call-overload]
    server = urlsplit(server_url)
    default.update(
        NAME="postgres", USER=unquote(server.username or ""), PASSWORD=unquote(server.password or ""),
        HOST=server.hostname, PORT=str(server.port),
    )
    (tmp_path / "quickstart_settings.py").write_text(
        f"DATABASES = {{'default': {default!r}}}\n"
        "INSTALLED_APPS = ['django_postgrespool']\n"
        "SECRET_KEY = 'wheel-test'\nUSE_TZ = True\n"
    )
    report = run(fresh_venv, textwrap.dedent("""
        import json, django
        django.setup()
        from django.core.management import call_command
        from django.db import connection
        import django_postgrespool, django_postgrespool_dburl, django_postgrespool_south
        call_command("check", "--database", "default")
        pids = []
        for _ in range(3):
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_backend_pid()")
                pids.append(cursor.fetchone()[0])
            connection.close()
        [stats] = django_postgrespool.pool_stats("default")
        parsed = django_postgrespool_dburl.parse("postgres://u:p@h/db?pool_size=2")
        print(json.dumps({
            "files": [m.__file__ for m in (django_postgrespool, django_postgrespool_dburl,
                                           django_postgrespool_south)],
            "engine": connection.vendor, "pids": pids, "opened": stats["opened"],
            "pool_size": stats["pool_size"], "dburl": parsed["POOL_OPTIONS"],
        }))
    """), tmp_path)
    site = str(fresh_venv.parent.parent)
    assert all(f.startswith(site) and "site-packages" in f for f in report["files"]), report
    assert not any(str(ROOT / "packages") in f for f in report["files"])  # type: ignore[union-attr]
    assert len(set(report["pids"])) == 1 and report["opened"] == 1, report  # type: ignore[arg-type]
    assert report["pool_size"] == default["POOL_OPTIONS"]["pool_size"]
    assert report["dburl"] == {"pool_size": 2}
