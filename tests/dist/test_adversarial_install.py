"""Adversarial: each package built as a wheel and installed alone, as a user installs it.

The wheels are built here (into a temporary directory, not dist/) from
packages/; each virtualenv gets one package and what it declares, from the
index. The backend is also installed at the floors it declares (Python 3.10,
Django 4.2, SQLAlchemy 2.0.0, psycopg 3.1.8, dj-database-url 3.0) and with each
extra at its floor; a feature whose extra is missing must say which extra.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
import zipfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from tests.support import lanes

pytestmark = pytest.mark.dist

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = ROOT / "packages" / "backend" / "pyproject.toml"
PACKAGES = {
    "django_postgrespool": "backend",
    "django_postgrespool_dburl": "dburl",
    "django_postgrespool_south": "south_adapter",
}
PY310 = Path("/root/.pyenv/versions/3.10.13/bin/python")


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("wheelhouse")
    for package in PACKAGES.values():
        subprocess.run(
            [lanes.uv(), "build", "-q", "--wheel", "--out-dir", str(out),
             str(ROOT / "packages" / package)],
            check=True, capture_output=True,
        )
    found = {w.name.split("-", 1)[0]: w for w in out.glob("*.whl")}
    assert sorted(found) == sorted(PACKAGES)
    return found


def metadata(wheel: Path) -> str:
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        return archive.read(name).decode()


def requires(wheel: Path) -> tuple[set[str], dict[str, set[str]]]:
    """Return the names of the core requirements and, per extra, those of the extra."""
    core: set[str] = set()
    extras: dict[str, set[str]] = {}
    for line in metadata(wheel).splitlines():
        if not line.startswith("Requires-Dist: "):
            continue
        spec = line.split(": ", 1)[1]
        name = re.split(r"[\s;<>=!~\[(]", spec, maxsplit=1)[0].lower().replace("_", "-")
        extra = re.search(r"extra\s*==\s*['\"]([^'\"]+)['\"]", spec)
        if extra:
            extras.setdefault(extra.group(1), set()).add(name)
        else:
            core.add(name)
    return core, extras


def test_each_wheel_declares_only_its_real_dependencies(wheelhouse: dict[str, Path]) -> None:
    core, extras = requires(wheelhouse["django_postgrespool"])
    assert core == {"django", "sqlalchemy"}
    assert extras == {
        "psycopg": {"psycopg"}, "psycopg2": {"psycopg2-binary"}, "otel": {"opentelemetry-api"},
        "prometheus": {"prometheus-client"}, "debug-toolbar": {"django-debug-toolbar"},
    }
    assert requires(wheelhouse["django_postgrespool_dburl"]) == (
        {"django-postgrespool", "dj-database-url"}, {})
    assert requires(wheelhouse["django_postgrespool_south"]) == (set(), {})


def venv(where: Path, python: Path | str, *requirements: str, find_links: Path | None = None
         ) -> Path:
    subprocess.run([lanes.uv(), "venv", "-q", "--python", str(python), str(where)], check=True)
    bin_python = where / "bin" / "python"
    done = subprocess.run(
        [lanes.uv(), "pip", "install", "-q", "--python", str(bin_python),
         *(["--find-links", str(find_links)] if find_links else []), *requirements],
        capture_output=True, text=True, check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return bin_python


def freeze(python: Path) -> dict[str, str]:
    out = subprocess.run([lanes.uv(), "pip", "freeze", "--python", str(python)],
                         capture_output=True, text=True, check=True).stdout
    found = {}
    for line in out.splitlines():
        name, _, version = line.partition(" @ ") if " @ " in line else line.partition("==")
        found[name.strip().lower().replace("_", "-")] = version.strip()
    return found


def settings_file(directory: Path, server_url: str, apps: list[str], extra: str = "") -> None:
    server = urlsplit(server_url)
    default = {
        "ENGINE": "django_postgrespool", "NAME": "postgres",
        "USER": unquote(server.username or ""), "PASSWORD": unquote(server.password or ""),
        "HOST": server.hostname, "PORT": str(server.port),
        "POOL_OPTIONS": {"pool_size": 2, "max_overflow": 1},
    }
    (directory / "adv_settings.py").write_text(
        f"DATABASES = {{'default': {default!r}}}\nINSTALLED_APPS = {apps!r}\n"
        "SECRET_KEY = 'adv'\nUSE_TZ = True\nROOT_URLCONF = 'adv_settings'\nurlpatterns = []\n"
        + extra
    )


def run(python: Path, script: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(python), "-c", textwrap.dedent(script)], cwd=cwd, capture_output=True, text=True,
        timeout=300, env={"PATH": "/usr/bin:/bin", "DJANGO_SETTINGS_MODULE": "adv_settings"},
        check=False,
    )


def report(done: subprocess.CompletedProcess[str]) -> dict:
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


SERVE = """
    import json, django
    django.setup()
    from django.core.management import call_command
    from django.db import connection
    import django_postgrespool
    call_command("check", "--database", "default")
    pids = []
    for _ in range(3):
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_backend_pid()")
            pids.append(cursor.fetchone()[0])
        connection.close()
    [stats] = django_postgrespool.pool_stats("default")
    print(json.dumps({"pids": pids, "opened": stats["opened"],
                      "file": django_postgrespool.__file__}))
"""


# -- the backend alone, at its declared floors ----------------------------------------


@pytest.fixture(scope="module")
def floor_venv(wheelhouse: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
               ) -> Iterator[Path]:
    if not PY310.exists():
        pytest.skip("no Python 3.10 (pyenv install 3.10.13)")
    python = venv(
        tmp_path_factory.mktemp("floor") / "venv", PY310,
        str(wheelhouse["django_postgrespool"]), "Django==4.2", "SQLAlchemy==2.0.0",
        "psycopg[binary]==3.1.8",
    )
    yield python


def test_backend_alone_at_its_floors_serves_requests(
    floor_venv: Path, server_url: str, tmp_path: Path
) -> None:
    installed = freeze(floor_venv)
    assert installed["django"] == "4.2" and installed["sqlalchemy"] == "2.0.0"
    # Nothing but what it declared (and their own requirements).
    assert not {"prometheus-client", "opentelemetry-api", "django-debug-toolbar",
                "dj-database-url"} & set(installed)
    settings_file(tmp_path, server_url, ["django_postgrespool"])
    out = report(run(floor_venv, SERVE, tmp_path))
    assert "site-packages" in out["file"]
    assert len(set(out["pids"])) == 1 and out["opened"] == 1, out


def test_backend_alone_every_module_without_an_extra_imports(
    floor_venv: Path, server_url: str, tmp_path: Path
) -> None:
    settings_file(tmp_path, server_url, ["django_postgrespool"])
    out = report(run(floor_venv, """
        import json, pkgutil, importlib, django
        django.setup()
        import django_postgrespool
        # The extras' modules, and the Python 2.7 backend of the legacy lane.
        extras = {"django_postgrespool.toolbar", "django_postgrespool.metrics.otel",
                  "django_postgrespool.metrics.prometheus", "django_postgrespool._legacy"}
        names = [m.name for m in pkgutil.walk_packages(django_postgrespool.__path__,
                                                       "django_postgrespool.")]
        failed = {}
        for name in names:
            if name in extras:
                continue
            try:
                importlib.import_module(name)
            except Exception as error:
                failed[name] = repr(error)
        print(json.dumps({"names": names, "failed": failed}))
    """, tmp_path))
    assert not out["failed"], out
    assert "django_postgrespool.backend" in out["names"]


@pytest.mark.parametrize("module, extra", [
    ("django_postgrespool.toolbar", "debug-toolbar"),
    ("django_postgrespool.metrics.prometheus", "prometheus"),
    ("django_postgrespool.metrics.otel", "otel"),
])
def test_a_feature_whose_extra_is_missing_names_the_extra(
    floor_venv: Path, server_url: str, tmp_path: Path, module: str, extra: str
) -> None:
    settings_file(tmp_path, server_url, ["django_postgrespool"])
    done = run(floor_venv, f"""
        import django
        django.setup()
        import {module}
    """, tmp_path)
    assert done.returncode != 0
    assert f"django-postgrespool[{extra}]" in done.stderr, done.stderr[-2000:]


def test_backend_alone_without_a_driver_fails_saying_what_to_install(
    wheelhouse: dict[str, Path], server_url: str, tmp_path: Path
) -> None:
    python = venv(tmp_path / "venv", sys.executable, str(wheelhouse["django_postgrespool"]))
    assert not {"psycopg", "psycopg2", "psycopg2-binary", "psycopg-binary"} & set(freeze(python))
    settings_file(tmp_path, server_url, ["django_postgrespool"])
    done = run(python, SERVE, tmp_path)
    assert done.returncode != 0
    # Django's own message names both drivers (the extras psycopg / psycopg2 bring them).
    assert "ImproperlyConfigured: Error loading psycopg2 or psycopg module" in done.stderr, (
        done.stderr[-2000:])


def test_an_unrelated_opentelemetry_distribution_does_not_break_startup(
    wheelhouse: dict[str, Path], server_url: str, tmp_path: Path
) -> None:
    # opentelemetry-proto (an exporter's dependency) ships the 'opentelemetry'
    # namespace without the metrics API the otel extra brings.
    python = venv(tmp_path / "venv", sys.executable, str(wheelhouse["django_postgrespool"]),
                  "psycopg[binary]>=3.1.8", "opentelemetry-proto")
    assert "opentelemetry-api" not in freeze(python)
    settings_file(tmp_path, server_url, ["django_postgrespool"])
    out = report(run(python, SERVE, tmp_path))
    assert out["opened"] == 1


# -- the extras, at their floors ----------------------------------------------------------


def test_prometheus_and_toolbar_extras_at_their_floors_serve_their_features(
    wheelhouse: dict[str, Path], server_url: str, tmp_path: Path
) -> None:
    wheel = wheelhouse["django_postgrespool"]
    python = venv(
        tmp_path / "venv", sys.executable, f"{wheel}[prometheus,debug-toolbar,psycopg]",
        "prometheus_client==0.20.0", "django-debug-toolbar==4.4.*",
    )
    installed = freeze(python)
    assert installed["prometheus-client"] == "0.20.0"
    assert installed["django-debug-toolbar"].startswith("4.4")
    assert "opentelemetry-api" not in installed
    settings_file(tmp_path, server_url, ["django.contrib.staticfiles", "debug_toolbar",
                                         "django_postgrespool"],
                  "STATIC_URL = 'static/'\n")
    out = report(run(python, """
        import json, django
        django.setup()
        from django.db import connection
        from django.test import RequestFactory
        from django_postgrespool.metrics.prometheus import metrics_view
        from django_postgrespool.toolbar import PoolPanel
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        connection.close()
        body = metrics_view(RequestFactory().get("/metrics")).content.decode()
        print(json.dumps({"metrics": body, "panel": PoolPanel.__name__}))
    """, tmp_path))
    assert 'db_client_connection_count{pool_name="default"' in out["metrics"]
    assert out["panel"] == "PoolPanel"


def test_otel_extra_at_its_floor_lets_the_project_start(
    wheelhouse: dict[str, Path], server_url: str, tmp_path: Path
) -> None:
    # The floor the extra declares (1.27 was declared once, while the
    # exporter needed 1.30's create_histogram(explicit_bucket_boundaries_advisory=)).
    floor = re.search(r'"opentelemetry-api>=([0-9.]+)"', PYPROJECT.read_text()).group(1)
    wheel = wheelhouse["django_postgrespool"]
    python = venv(tmp_path / "venv", sys.executable, f"{wheel}[otel,psycopg]",
                  f"opentelemetry-api=={floor}")
    assert freeze(python)["opentelemetry-api"] in (floor, f"{floor}.0")
    settings_file(tmp_path, server_url, ["django_postgrespool"])
    out = report(run(python, SERVE, tmp_path))
    assert out["opened"] == 1


# -- dburl and the South adapter, each alone ------------------------------------------------


def test_dburl_alone_at_its_floor_configures_the_pool(
    wheelhouse: dict[str, Path], tmp_path: Path
) -> None:
    # The backend is not on the index under this version: it comes from the wheelhouse.
    python = venv(tmp_path / "venv", sys.executable, str(wheelhouse["django_postgrespool_dburl"]),
                  "dj-database-url==3.0.0", find_links=wheelhouse["django_postgrespool"].parent)
    installed = freeze(python)
    assert installed["dj-database-url"] == "3.0.0"
    assert installed["django-postgrespool"] == "1.0.0"
    out = report(run(python, """
        import json, os
        os.environ["DATABASE_URL"] = "postgres://u:p@db.example:5433/shop?pool_size=3&max_overflow=2"
        import django_postgrespool_dburl as dburl
        config = dburl.config(conn_max_age=0)
        keys = ("ENGINE", "HOST", "PORT", "NAME", "POOL_OPTIONS")
        print(json.dumps({k: config[k] for k in keys}))
    """, tmp_path))
    assert out == {"ENGINE": "django_postgrespool", "HOST": "db.example", "PORT": 5433,
                   "NAME": "shop", "POOL_OPTIONS": {"pool_size": 3, "max_overflow": 2}}


def test_south_adapter_alone_imports_without_django(
    wheelhouse: dict[str, Path], tmp_path: Path
) -> None:
    python = venv(tmp_path / "venv", sys.executable, str(wheelhouse["django_postgrespool_south"]))
    assert set(freeze(python)) == {"django-postgrespool-south"}
    out = report(run(python, """
        import json
        from django_postgrespool_south import south_database_adapters
        print(json.dumps(south_database_adapters(
            {"default": {"ENGINE": "django_postgrespool"},
             "other": {"ENGINE": "django.db.backends.sqlite3"}})))
    """, tmp_path))
    assert out == {"default": "south.db.postgresql_psycopg2"}
