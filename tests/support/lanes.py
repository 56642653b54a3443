"""Virtual environments for each supported Django × driver lane.

    python3 tests/support/lanes.py python LANE     # set the lane up, print its python
    python3 tests/support/lanes.py list            # the lanes CI runs
    python3 tests/support/lanes.py tool NAME REQ...  # a tool venv, .venv/NAME

A lane is ``dj<major><minor>-<driver>``, e.g. ``dj52-psycopg`` (psycopg 3) or
``dj42-psycopg2``. Each lane gets its own virtualenv under ``.venv/`` with one
driver only (Django prefers psycopg 3 when both are installed). Environments
are made with uv, itself installed into ``.venv/tools`` on first use.
"""

from __future__ import annotations

import fcntl
import glob
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
VENVS = ROOT / ".venv"

DJANGO = {"4.2": "Django>=4.2,<4.3", "5.2": "Django>=5.2,<5.3", "6.1": "Django>=6.1,<6.2"}
# Python each Django runs on here (6.1 needs >= 3.12).
PYTHON = {"4.2": "3.11", "5.2": "3.11", "6.1": "3.12"}
# Lanes on a Python of their own: the matrix then covers 3.11, 3.12 and 3.13.
# dj61-psycopg2 runs the pool's unit tests but not the servers tests with
# `make test MATRIX=1` (see the Makefile).
LANE_PYTHON = {"dj61-psycopg2": "3.13"}
DRIVERS = {"psycopg": "psycopg[binary]>=3.1.8", "psycopg2": "psycopg2-binary>=2.9"}
# Both SQLAlchemy series the backend supports, spread over the lanes.
SQLALCHEMY = {
    "4.2": "SQLAlchemy>=2.0,<2.1",
    "5.2": "SQLAlchemy>=2.1,<2.2",
    "6.1": "SQLAlchemy>=2.1,<2.2",
}
COMMON = [
    "pytest>=8",
    # A test still running after pyproject.toml's `timeout` prints every
    # thread's stack and ends its lane: a hang fails in minutes, with the
    # stacks to read, instead of running into CI's limit.
    "pytest-timeout>=2.3",
    "dj-database-url>=3.0",
    "gunicorn>=22",
    "uvicorn>=0.30",
    "gevent>=24",
    # The optional extras' libraries (metrics, the toolbar panel) and the SDK
    # the OpenTelemetry tests collect with.
    "opentelemetry-api>=1.27",
    "opentelemetry-sdk>=1.27",
    "prometheus_client>=0.20",
    "django-debug-toolbar>=4.4",
    "-e",
    str(ROOT / "packages" / "backend"),
    "-e",
    str(ROOT / "packages" / "dburl"),
    "-e",
    str(ROOT / "packages" / "south_adapter"),
]
ALL_LANES = [f"dj{d.replace('.', '')}-{drv}" for d in DJANGO for drv in ("psycopg2", "psycopg")]


def find_python(version: str) -> str:
    """Return an interpreter for ``version`` (e.g. "3.12" or "2.7"), or exit with why."""
    names = [f"python{version}"]
    found = [shutil.which(n) for n in names]
    candidates = [f for f in found if f]
    pyenv_root = os.environ.get("PYENV_ROOT") or os.path.expanduser("~/.pyenv")
    with_pyenv = shutil.which("pyenv")
    if with_pyenv:
        out = subprocess.run([with_pyenv, "root"], capture_output=True, text=True)
        if out.returncode == 0:
            pyenv_root = out.stdout.strip()
    candidates += sorted(
        glob.glob(f"{pyenv_root}/versions/{version}*/bin/python{version}"), reverse=True
    )
    for path in candidates:
        # A pyenv shim is on PATH even when that version isn't active: run it.
        probe = "import venv" if version.startswith("3") else "import sys"
        if subprocess.run([path, "-c", probe], capture_output=True).returncode == 0:
            return path
    # A newer Python 3 serves too (Django 6.1 also runs on 3.13).
    if version.startswith("3."):
        minor = int(version.split(".")[1])
        for newer in range(minor + 1, minor + 4):
            try:
                return find_python(f"3.{newer}")
            except SystemExit:
                continue
    raise SystemExit(f"no Python {version} interpreter found (looked on PATH and in pyenv)")


def uv() -> str:
    """Return the path of uv, installing it into .venv/tools the first time."""
    system = shutil.which("uv")
    if system:
        return system
    tools = VENVS / "tools"
    binary = tools / "bin" / "uv"
    VENVS.mkdir(parents=True, exist_ok=True)
    # Lanes are set up side by side (`make test MATRIX=1`): one installs uv,
    # the others wait for it to finish rather than run a half-written binary.
    with open(VENVS / ".tools.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not binary.exists():
            subprocess.run([sys.executable, "-m", "venv", str(tools)], check=True)
            subprocess.run([str(tools / "bin" / "pip"), "install", "-q", "uv"], check=True)
    return str(binary)


def parse(lane: str) -> tuple[str, str]:
    try:
        django_part, driver = lane.split("-", 1)
        django = f"{django_part[2]}.{django_part[3:]}"
        DJANGO[django], DRIVERS[driver]
    except (ValueError, IndexError, KeyError):
        raise SystemExit(f"unknown lane {lane!r}; lanes are: {', '.join(ALL_LANES)}") from None
    return django, driver


def requirements(lane: str, extra: list[str]) -> list[str]:
    django, driver = parse(lane)
    reqs = [DJANGO[django], DRIVERS[driver], SQLALCHEMY[django], *COMMON, *extra]
    sys.path.insert(0, str(ROOT))
    from tests.support.pgcluster import find_bindir

    if find_bindir() is None:  # no PostgreSQL on this machine: use pgserver's
        reqs.append("pgserver")
    return reqs


def ensure_venv(name: str, python_version: str, reqs: list[str]) -> Path:
    """Create or update ``.venv/NAME`` with ``reqs`` (skipped when unchanged); return its python."""
    venv = VENVS / name
    python = venv / "bin" / "python"
    stamp = venv / ".requirements"
    digest = hashlib.sha1("\n".join([f"python {python_version}", *reqs]).encode()).hexdigest()
    if python.exists() and stamp.exists() and stamp.read_text() == digest:
        return python
    interpreter = find_python(python_version)
    if python.exists() and _version(python) != _version(Path(interpreter)):
        shutil.rmtree(venv)  # made with another Python (its lane moved): made again
    if not python.exists():
        subprocess.run([uv(), "venv", "-q", "--python", interpreter, str(venv)], check=True)
    subprocess.run([uv(), "pip", "install", "-q", "--python", str(python), *reqs], check=True)
    stamp.write_text(digest)
    return python


def _version(python: Path) -> str:
    """The major.minor version of the interpreter ``python``."""
    done = subprocess.run(
        [str(python), "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
        capture_output=True, text=True,
    )
    return done.stdout.strip()


def setup(lane: str, extra: list[str] | None = None) -> Path:
    """Create or update the lane's virtualenv; return its python."""
    django, _ = parse(lane)
    version = LANE_PYTHON.get(lane, PYTHON[django])
    return ensure_venv(lane, version, requirements(lane, extra or []))


def tool(name: str, reqs: list[str]) -> Path:
    """Create or update ``.venv/NAME`` with ``reqs`` (for tools, not lanes); return its python."""
    return ensure_venv(name, "3.11", reqs)


def main(argv: list[str]) -> int:
    if argv and argv[0] == "tool":
        print(tool(argv[1], argv[2:]))
        return 0
    if not argv or argv[0] not in {"python", "list"}:
        print(__doc__, file=sys.stderr)
        return 2
    if argv[0] == "list":
        print(" ".join(ALL_LANES))
        return 0
    lane, extra = argv[1], argv[2:]
    print(setup(lane, extra))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
