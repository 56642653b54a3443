"""Run the example project as a subprocess against the suite's server."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from tests.support.db import connect
from tests.support.pgcluster import free_port

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"


def with_database(server_url: str, name: str, query: str = "") -> str:
    """Return ``server_url`` pointed at database ``name``, with an optional query string."""
    base = server_url.rsplit("/", 1)[0]
    return f"{base}/{name}{'?' + query if query else ''}"


def example_env(database_url: str, **extra: str) -> dict[str, str]:
    """Return the environment the example project runs in."""
    env = {k: v for k, v in os.environ.items() if k not in ("DJANGO_SETTINGS_MODULE", "WEB_CONCURRENCY")}
    env.update(DATABASE_URL=database_url, PYTHONUNBUFFERED="1", DJANGO_DEBUG="0")
    env.update(extra)
    return env


def manage(database_url: str, *args: str, **extra_env: str) -> subprocess.CompletedProcess[str]:
    """Run a manage.py command of the example project; return its completed process."""
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=EXAMPLES, env=example_env(database_url, **extra_env),
        capture_output=True, text=True, timeout=240, check=False,
    )


class ExampleDatabase:
    """A fresh database for one test module, migrated and loaded with the sample data.

    With ``template`` (such a database, made once per session), a copy of
    it: PostgreSQL copies it in a fraction of a second, where migrating and
    loading anew starts Django twice (about 8 s a module).
    """

    def __init__(self, server_url: str, template: str | None = None) -> None:
        self.server_url = server_url
        self.template = template
        self.name = f"example_{uuid.uuid4().hex[:8]}"
        self.url = with_database(server_url, self.name)

    def create(self) -> None:
        admin = connect(self.server_url)
        with admin.cursor() as cur:
            if self.template is not None:
                # Waits (up to 5 s) for the sessions of the commands that made it to end.
                cur.execute(f'CREATE DATABASE "{self.name}" TEMPLATE "{self.template}"')
            else:
                cur.execute(f'CREATE DATABASE "{self.name}"')
        admin.close()
        if self.template is not None:
            return
        for args in (("migrate", "--noinput"), ("demodata",)):
            result = manage(self.url, *args)
            assert result.returncode == 0, result.stdout + result.stderr

    def drop(self) -> None:
        admin = connect(self.server_url)
        with admin.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
        admin.close()

    def query(self, sql: str, params: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
        conn = connect(self.url.split("?")[0])
        try:
            with conn.cursor() as cur:
                cur.execute(sql, params)
                return list(cur.fetchall())
        finally:
            conn.close()

    def sessions(self) -> int:
        """Return how many sessions of the example project are open on this database."""
        return int(self.query(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE datname = %s AND application_name LIKE 'exampleproject%%'",
            (self.name,),
        )[0][0])


class Served:
    """A server process of the example project, its base URL and its output."""

    def __init__(self, process: subprocess.Popen[str], base: str, log: Path) -> None:
        self.process, self.base, self.log = process, base, log

    def output(self) -> str:
        return self.log.read_text()


def wait_for_http(url: str, process: subprocess.Popen[str], log: Path, timeout: float = 90) -> None:
    """Return once ``url`` answers; fail with the server's output if it does not."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the server exited with {process.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.2)
    pytest.fail(f"{url} did not answer within {timeout}s:\n{log.read_text()}")


def stop(process: subprocess.Popen[str], sig: int = signal.SIGTERM) -> int:
    """Stop ``process`` and its session; return its exit status."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            pass
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    return process.returncode


def start_server(
    command: list[str], env: dict[str, str], log: Path, port: int
) -> Served:
    """Start ``command`` (in a session of its own) and wait until it serves ``port``."""
    with log.open("w") as out:
        process = subprocess.Popen(
            command, cwd=EXAMPLES, env=env, stdout=out, stderr=subprocess.STDOUT,
            text=True, start_new_session=True,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(base + "/pool.json", process, log)
    except BaseException:
        stop(process)
        raise
    return Served(process, base, log)


def free_addrport() -> tuple[int, str]:
    """Return a free loopback port and its 127.0.0.1:PORT spelling."""
    port = free_port()
    return port, f"127.0.0.1:{port}"


def port_is_closed(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def load_then_default_pool(
    served: Served, paths: list[str], clients: int = 16
) -> tuple[list[int], dict[str, object]]:
    """GET ``paths`` with ``clients`` at once; return the statuses and the 'default' pool's stats."""
    import json
    import urllib.request
    from concurrent.futures import ThreadPoolExecutor

    def get(path: str) -> int:
        with urllib.request.urlopen(served.base + path, timeout=60) as response:
            response.read()
            return int(response.status)

    with ThreadPoolExecutor(clients) as pool:
        statuses = list(pool.map(get, paths))
    with urllib.request.urlopen(served.base + "/pool.json", timeout=30) as response:
        stats = json.load(response)
    (default,) = [a for a in stats["aliases"] if a["alias"] == "default"]
    (pool_stats,) = default["pools"]
    return statuses, pool_stats
