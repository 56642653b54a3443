"""A throwaway PgBouncer in front of a ``Cluster``, for the tests and the benchmarks.

Runs Debian's ``pgbouncer`` (``apt-get install -y pgbouncer`` when it is
missing and we are root). PgBouncer refuses to run as root, so as root it runs
as the ``postgres`` user, from a folder (config, auth file, log, pid file)
that user owns. It listens on a free port of 127.0.0.1 only::

    with PgBouncer(cluster, pool_mode="transaction", pool_size=4) as bouncer:
        url = bouncer.url("mydb")          # postgres://postgres:...@127.0.0.1:PORT/mydb
        bouncer.show("POOLS")              # the admin console, as a list of dicts
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

from tests.support.pgcluster import free_port

__all__ = ["PgBouncer", "ensure_binary"]


def ensure_binary() -> str:
    """Return the path of pgbouncer, installing Debian's package when missing."""
    found = shutil.which("pgbouncer") or (
        "/usr/sbin/pgbouncer" if os.path.exists("/usr/sbin/pgbouncer") else None
    )
    if found:
        return found
    if os.geteuid() != 0:
        raise RuntimeError("pgbouncer is missing: install Debian's package 'pgbouncer'")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update"], check=True, capture_output=True, env=env)
    subprocess.run(
        ["apt-get", "install", "-y", "pgbouncer"], check=True, capture_output=True, env=env
    )
    # Debian's package starts a system service; ours runs on its own port.
    subprocess.run(["service", "pgbouncer", "stop"], capture_output=True, check=False)
    return shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"


class PgBouncer:
    """PgBouncer for every database of ``cluster``, ``pool_size`` server connections per pool."""

    def __init__(
        self,
        cluster: Any,
        *,
        pool_mode: str = "transaction",
        pool_size: int = 10,
        port: int | None = None,
        settings: dict[str, str] | None = None,
    ) -> None:
        self.cluster = cluster
        self.pool_mode, self.pool_size = pool_mode, pool_size
        self.host, self.port = "127.0.0.1", port or free_port()
        self.user, self.password = cluster.user, cluster.password
        self.settings = settings or {}
        self.dir: Path | None = None
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> PgBouncer:  # noqa: PYI034
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _config(self, folder: Path) -> str:
        c = self.cluster
        settings = {
            "listen_addr": self.host,
            "listen_port": str(self.port),
            "unix_socket_dir": "",
            "auth_type": "scram-sha-256",
            "auth_file": str(folder / "userlist.txt"),
            "admin_users": self.user,
            "pool_mode": self.pool_mode,
            "default_pool_size": str(self.pool_size),
            "min_pool_size": "0",
            "reserve_pool_size": "0",
            "max_client_conn": "1000",
            # psycopg 3 and psycopg2 send none of these, other clients do.
            "ignore_startup_parameters": "extra_float_digits,options",
            "logfile": str(folder / "pgbouncer.log"),
            "pidfile": str(folder / "pgbouncer.pid"),
            **self.settings,
        }
        return f"[databases]\n* = host={c.host} port={c.port}\n[pgbouncer]\n" + "".join(
            f"{k} = {v}\n" for k, v in settings.items()
        )

    def start(self) -> None:
        """Start pgbouncer and return once it accepts TCP connections."""
        binary = ensure_binary()
        folder = self.dir = Path(tempfile.mkdtemp(prefix="postgrespool-pgbouncer-"))
        # A plain-text password lets pgbouncer do SCRAM with clients and server.
        (folder / "userlist.txt").write_text(f'"{self.user}" "{self.password}"\n')
        (folder / "pgbouncer.ini").write_text(self._config(folder))
        # -q: log to the log file only; a stderr pipe nobody reads would fill
        # up and freeze pgbouncer after a few hundred logins.
        cmd = [binary, "-q", str(folder / "pgbouncer.ini")]
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            for path in (folder, *folder.iterdir()):
                os.chown(path, pw.pw_uid, pw.pw_gid)
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        self.process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                log = folder / "pgbouncer.log"
                err = log.read_text()[-2000:] if log.exists() else ""
                self.stop()
                raise RuntimeError(f"pgbouncer exited with {self.process.returncode}: {err}")
            with socket.socket() as s:
                if s.connect_ex((self.host, self.port)) == 0:
                    return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"pgbouncer did not listen on {self.host}:{self.port} within 15s")

    def stop(self) -> None:
        """Stop pgbouncer (immediate shutdown) and remove its folder."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            pidfile = self.dir / "pgbouncer.pid" if self.dir else None
            try:
                # pgbouncer's own pid (runuser in between may not pass signals on).
                pid = int(pidfile.read_text()) if pidfile and pidfile.exists() else None
            except ValueError:
                pid = None
            if pid is not None:
                os.kill(pid, signal.SIGTERM)
            else:
                process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                if pid is not None:
                    os.kill(pid, signal.SIGKILL)
                process.kill()
                process.wait(10)
        if process is not None and process.stderr:
            process.stderr.close()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def url(self, database: str = "postgres") -> str:
        """Return a postgres:// URL of ``database`` through pgbouncer, with the password."""
        return (
            f"postgres://{self.user}:{quote(self.password, safe='')}@"
            f"{self.host}:{self.port}/{database}"
        )

    def show(self, what: str) -> list[dict[str, str]]:
        """Run ``SHOW what`` on the admin console (with psql: it speaks the simple protocol)."""
        psql = os.path.join(self.cluster.bindir, "psql")
        out = subprocess.run(
            [
                psql,
                "-X",
                "-A",
                "-F",
                "\t",
                "-P",
                "footer=off",
                "-h",
                self.host,
                "-p",
                str(self.port),
                "-U",
                self.user,
                "-d",
                "pgbouncer",
                "-c",
                f"SHOW {what}",
            ],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PGPASSWORD": self.password, "PGCONNECT_TIMEOUT": "5"},
        )
        lines = out.stdout.splitlines()
        header = lines[0].split("\t")
        return [dict(zip(header, line.split("\t"))) for line in lines[1:]]

    def server_connections(self, database: str) -> int:
        """Return how many server connections pgbouncer holds for ``database``."""
        return sum(
            int(p["sv_active"])
            + int(p["sv_idle"])
            + int(p["sv_used"])
            + int(p["sv_tested"])
            + int(p["sv_login"])
            for p in self.show("POOLS")
            if p["database"] == database
        )
