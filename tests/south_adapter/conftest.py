"""The modern sample project (tests/south_adapter/project) on two fresh databases."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.db import connect, url_params
from tests.support.settings import unique_name

PROJECT = Path(__file__).resolve().parent / "project"


@pytest.fixture
def project(server_url):
    """Two fresh databases; return a function that runs manage.py on them."""
    names = {
        alias: unique_name(f"mig_{alias}").replace("-", "_") for alias in ("default", "second")
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

    def manage(*args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "manage.py", *args],
            cwd=PROJECT,
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

    manage.query = query  # type: ignore[attr-defined]
    manage.password = p["password"]  # type: ignore[attr-defined]
    yield manage
    with admin.cursor() as cur:
        for name in names.values():
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.close()
