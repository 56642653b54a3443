"""The modern sample project (tests/south_adapter/project) on two fresh databases."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.db import connect, url_params
from tests.support.settings import unique_name

PROJECT = Path(__file__).resolve().parent / "project"


@contextlib.contextmanager
def two_databases(server_url: str, prefix: str, cwd: Path) -> Iterator[Any]:
    """Two fresh databases for the sample project's aliases; yield a runner of Python in ``cwd``.

    ``run(*args, **env)`` runs ``python *args`` with the project's settings pointing at them;
    ``run.query(alias, sql)`` reads one of them; ``run.password`` is the password to look for.
    """
    names = {
        alias: unique_name(f"{prefix}_{alias}").replace("-", "_") for alias in ("default", "second")
    }
    admin = connect(server_url)
    with admin.cursor() as cur:
        for name in names.values():
            cur.execute(f'CREATE DATABASE "{name}"')
    p = url_params(server_url)
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "modern_project.settings",
        "MODERN_DB_USER": p["user"],
        "MODERN_DB_PASSWORD": p["password"],
        "MODERN_DB_HOST": p["host"],
        "MODERN_DB_PORT": str(p["port"]),
        "MODERN_DB_DEFAULT": names["default"],
        "MODERN_DB_SECOND": names["second"],
        "PYTHONDONTWRITEBYTECODE": "1",
    }

    def run(*args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, *args],
            cwd=cwd,
            env={**env, **extra},
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    def query(alias: str, sql: str) -> list[tuple]:
        conn = connect(server_url, dbname=names[alias])
        try:
            with conn.cursor() as cur:
                cur.execute(sql)
                return list(cur.fetchall())
        finally:
            conn.close()

    run.query = query  # type: ignore[attr-defined]
    run.password = p["password"]  # type: ignore[attr-defined]
    try:
        yield run
    finally:
        with admin.cursor() as cur:
            for name in names.values():
                cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


@pytest.fixture
def project(server_url):
    """Two fresh databases; return a function that runs manage.py on them."""
    with two_databases(server_url, "mig", PROJECT) as run:

        def manage(*args: str, **extra: str) -> subprocess.CompletedProcess[str]:
            return run("manage.py", *args, **extra)

        manage.query = run.query  # type: ignore[attr-defined]
        manage.password = run.password  # type: ignore[attr-defined]
        yield manage
