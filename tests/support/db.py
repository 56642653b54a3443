"""Direct driver access for the tests: a monitoring connection outside any pool."""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import unquote, urlsplit

try:
    import psycopg as driver

    DRIVER = "psycopg"
except ImportError:  # the psycopg2 lanes
    import psycopg2 as driver  # type: ignore[no-redef]

    DRIVER = "psycopg2"


def url_params(url: str) -> dict[str, Any]:
    """Return the libpq parameters of a postgres:// URL."""
    parts = urlsplit(url)
    return {
        "host": parts.hostname or "",
        "port": parts.port or 5432,
        "user": unquote(parts.username or ""),
        "password": unquote(parts.password or ""),
        "dbname": parts.path.lstrip("/") or "postgres",
    }


def connect(url: str, **extra: Any) -> Any:
    """Return an autocommit driver connection to ``url``."""
    params = {**url_params(url), **extra}
    conn = driver.connect(**params)
    conn.autocommit = True
    return conn


class Monitor:
    """Asks the server about connections, from a connection of its own."""

    def __init__(self, url: str) -> None:
        self.conn = connect(url, application_name="postgrespool-monitor")

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self.conn.cursor() as cur:
            cur.execute(sql, params)
            return list(cur.fetchall()) if cur.description else []

    def count(self, application_name: str) -> int:
        """Return how many server sessions carry ``application_name``."""
        return self.query(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
            (application_name,),
        )[0][0]

    def settled_count(self, application_name: str, expected: int, timeout: float = 5.0) -> int:
        """Return the session count once it equals ``expected`` (or after ``timeout``).

        A closed connection's backend leaves pg_stat_activity a moment after
        the client hung up.
        """
        deadline = time.monotonic() + timeout
        while True:
            count = self.count(application_name)
            if count == expected or time.monotonic() > deadline:
                return count
            time.sleep(0.02)

    def pids(self, application_name: str) -> list[int]:
        return [
            r[0]
            for r in self.query(
                "SELECT pid FROM pg_stat_activity WHERE application_name = %s",
                (application_name,),
            )
        ]

    def terminate(self, application_name: str) -> int:
        """Terminate every session carrying ``application_name``; return how many."""
        rows = self.query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
            (application_name,),
        )
        return len(rows)

    def close(self) -> None:
        self.conn.close()
