"""A throwaway PostgreSQL server for the tests, the demo and the benchmarks.

Uses the machine's server binaries (``initdb``/``pg_ctl``, found with
``pg_config --bindir``, ``$PG_BINDIR`` or Debian's ``/usr/lib/postgresql``),
run as the ``postgres`` user when we are root (they refuse to run as root).
Without system binaries it falls back to the ``pgserver`` package from PyPI.

A primary with a streaming standby (physical replication, ``pg_basebackup -R``)::

    primary = Cluster(synchronous_standby=True)
    primary.start()
    standby = primary.standby()          # a Cluster: its own port and data folder
    standby.start()                      # streams from the primary, read-only
    primary.stop("immediate")
    standby.promote()                    # now read-write

Command line (used by ``make demo``)::

    python tests/support/pgcluster.py serve --data .pgdata/demo   # prints the URL, Ctrl-C stops
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import hashlib
import os
import pwd
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

SUPERUSER = "postgres"
# Distinctive on purpose: tests grep errors, logs and stats for it.
PASSWORD = "Pp-s3cret!pass"
SERVER_SETTINGS = {
    "max_connections": "300",
    "shared_buffers": "64MB",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "listen_addresses": "127.0.0.1",
}


def find_bindir() -> str | None:
    """Return the folder of the server binaries, or None."""
    candidates = []
    if os.environ.get("PG_BINDIR"):
        candidates.append(os.environ["PG_BINDIR"])
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, check=True)
        candidates.append(out.stdout.strip())
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    # No system server: the binaries shipped in the pgserver package (PyPI).
    with contextlib.suppress(ImportError):
        from pgserver._commands import POSTGRES_BIN_PATH

        candidates.append(str(POSTGRES_BIN_PATH))
    for path in candidates:
        if os.path.exists(os.path.join(path, "initdb")) and os.path.exists(
            os.path.join(path, "pg_ctl")
        ):
            return path
    return None


def server_user() -> str:
    """Return the system user that runs the server when we are root (created if needed)."""
    for name in ("postgres", "pgserver"):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return name
    subprocess.run(["useradd", "--system", "--no-create-home", "pgserver"], check=True)
    return "pgserver"


def free_port() -> int:
    """Return a free TCP port on 127.0.0.1 below 32768 (outside the ephemeral range)."""
    for _ in range(200):
        port = random.randint(15000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free TCP port found between 15000 and 32000")


def _as_root() -> bool:
    return os.geteuid() == 0


def _reachable_by_postgres(path: Path) -> bool:
    if not _as_root():
        return True
    probe = subprocess.run(
        ["runuser", "-u", server_user(), "--", "test", "-x", str(path)], capture_output=True
    )
    return probe.returncode == 0


class Cluster:
    """One PostgreSQL server in a data folder of its own."""

    def __init__(
        self,
        data: Path | None = None,
        port: int | None = None,
        *,
        ssl: bool = False,
        synchronous_standby: bool = False,
        primary: Cluster | None = None,
    ) -> None:
        self.bindir = find_bindir()
        if self.bindir is None:
            raise RuntimeError("no PostgreSQL server binaries (initdb, pg_ctl) found")
        self._tmp: str | None = None
        if data is None or not _reachable_by_postgres(data.parent):
            key = hashlib.sha1(str(data).encode()).hexdigest()[:10] if data else None
            base = Path(tempfile.gettempdir()) / (
                f"django-postgrespool-{key}" if key else f"django-postgrespool-{os.getpid()}"
            )
            if data is None:
                self._tmp = tempfile.mkdtemp(prefix="django-postgrespool-")
                base = Path(self._tmp)
            data = base / "data"
        self.data = Path(data)
        self.root = self.data.parent
        self.socket_dir = self.root / "sock"
        self.log = self.root / "server.log"
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self.user = SUPERUSER
        self.password = PASSWORD
        self.extra_settings: dict[str, str] = {}
        self.ssl = ssl
        # With ssl=True: the self-signed certificate, also the root clients trust
        # (sslrootcert=...); its subjectAltName is 127.0.0.1, so verify-full works.
        self.ssl_root_cert = self.root / "server.crt"
        # A standby is made from its primary by pg_basebackup, not initdb.
        self.primary = primary
        if synchronous_standby:
            # A commit is acknowledged once a standby has flushed it, so a
            # promoted standby has every acknowledged commit (the server-wide
            # synchronous_commit=off would acknowledge before that). With the
            # standby down, commits wait: stop the primary first.
            self.extra_settings.update(synchronous_standby_names="*", synchronous_commit="on")
        if primary is not None:
            # Settings are given on pg_ctl's command line, never copied from the
            # primary: no synchronous standby of its own, so that once promoted
            # it does not wait for one.
            self.extra_settings["hot_standby_feedback"] = "on"

    # -- running commands -------------------------------------------------

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = list(args)
        if _as_root():
            cmd = ["runuser", "-u", server_user(), "--", *cmd]
        return subprocess.run(cmd, capture_output=True, text=True, check=check)

    def _bin(self, name: str) -> str:
        assert self.bindir
        return os.path.join(self.bindir, name)

    def _chown(self, path: Path) -> None:
        if _as_root():
            pw = pwd.getpwnam(server_user())
            os.chown(path, pw.pw_uid, pw.pw_gid)

    # -- life cycle -------------------------------------------------------

    def init(self) -> None:
        """Create the data folder (once)."""
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o755)
        self._chown(self.root)
        self.socket_dir.mkdir(exist_ok=True)
        os.chmod(self.socket_dir, 0o755)
        self._chown(self.socket_dir)
        if (self.data / "PG_VERSION").exists():
            return
        if self.primary is not None:
            self._base_backup(self.primary)
            return
        pwfile = self.root / "pwfile"
        pwfile.write_text(self.password + "\n")
        self._chown(pwfile)
        self._run(
            self._bin("initdb"),
            "-D",
            str(self.data),
            "-U",
            self.user,
            f"--pwfile={pwfile}",
            "--auth-host=scram-sha-256",
            "--auth-local=trust",
            "-E",
            "UTF8",
            "--no-sync",
        )
        pwfile.unlink()

    def _base_backup(self, primary: Cluster) -> None:
        """Copy ``primary``'s data folder with pg_basebackup and make it a standby of it."""
        # Over the unix socket, where initdb's pg_hba.conf trusts replication
        # connections; -R writes primary_conninfo and standby.signal.
        self._run(
            self._bin("pg_basebackup"),
            "-D",
            str(self.data),
            "-h",
            str(primary.socket_dir),
            "-p",
            str(primary.port),
            "-U",
            primary.user,
            "-X",
            "stream",
            "-c",
            "fast",
            "-R",
            "--no-sync",
        )
        os.chmod(self.data, 0o700)

    def standby(self, port: int | None = None) -> Cluster:
        """Return a streaming standby of this (running) server, in a temp folder, not started."""
        return Cluster(port=port, primary=self)

    def promote(self, timeout: float = 60) -> None:
        """Promote this standby; return once it accepts writes."""
        self._run(
            self._bin("pg_ctl"), "-D", str(self.data), "-w", "-t", str(int(timeout)), "promote"
        )

    def in_recovery(self) -> bool:
        """Tell whether this server is a standby (in recovery)."""
        return self.psql("SELECT pg_is_in_recovery()") == "t"

    def wait_streaming(self, timeout: float = 30) -> None:
        """Return once this primary has a standby streaming from it."""
        deadline = time.monotonic() + timeout
        while self.psql("SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'") == "0":
            if time.monotonic() > deadline:
                raise RuntimeError(f"no standby streaming from 127.0.0.1:{self.port} in {timeout}s")
            time.sleep(0.05)

    def _write_certificate(self) -> None:
        """Write a self-signed server.crt/server.key (once) and turn ssl on."""
        crt, key = self.root / "server.crt", self.root / "server.key"
        if not crt.exists():
            subprocess.run(
                [
                    "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(crt),
                ],
                capture_output=True, check=True,
            )
            os.chmod(key, 0o600)
            os.chmod(crt, 0o644)
            self._chown(key)
            self._chown(crt)
        self.extra_settings.update(ssl="on", ssl_cert_file=str(crt), ssl_key_file=str(key))

    def options(self) -> str:
        settings = {
            **SERVER_SETTINGS,
            "port": str(self.port),
            "unix_socket_directories": str(self.socket_dir),
            **self.extra_settings,
        }
        return " ".join(f"-c {k}={v}" for k, v in settings.items())

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        self.init()
        if self.ssl:
            self._write_certificate()
        self._run(
            self._bin("pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.log),
            "-o",
            self.options(),
            "-w",
            "-t",
            "60",
            "start",
        )

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (mode: smart, fast or immediate)."""
        self._run(self._bin("pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop", check=False)

    def restart(self, mode: str = "fast") -> None:
        """Restart the server (mode: fast or immediate); return when it accepts connections."""
        self._run(
            self._bin("pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.log),
            "-o",
            self.options(),
            "-m",
            mode,
            "-w",
            "-t",
            "60",
            "restart",
        )

    def destroy(self) -> None:
        """Stop the server and remove a temporary data folder."""
        self.stop("immediate")
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)

    def url(self, database: str = "postgres") -> str:
        """Return a postgres:// URL for ``database``, with the password."""
        return (
            f"postgres://{self.user}:{quote(self.password, safe='')}@"
            f"{self.host}:{self.port}/{database}"
        )

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run ``sql`` as the superuser over the unix socket; return its output."""
        out = self._run(
            self._bin("psql"),
            "-X",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            str(self.socket_dir),
            "-p",
            str(self.port),
            "-U",
            self.user,
            "-d",
            database,
            "-c",
            sql,
        )
        return out.stdout.strip()

    def create_database(self, name: str) -> None:
        """Create database ``name`` unless it exists."""
        exists = self.psql(f"SELECT 1 FROM pg_database WHERE datname = '{name}'")
        if not exists:
            self.psql(f'CREATE DATABASE "{name}"')


def start_pair(synchronous_commit: str = "on") -> tuple[Cluster, Cluster]:
    """Start a primary and a standby streaming from it (synchronously); return both.

    ``synchronous_commit='remote_apply'`` also makes a commit visible on the
    standby before it is acknowledged (read-your-writes through a replica).
    Destroy the standby first: a synchronous primary waits for it.
    """
    primary = Cluster(synchronous_standby=True)
    primary.extra_settings["synchronous_commit"] = synchronous_commit
    standby = primary.standby()
    try:
        primary.start()
        standby.start()
        primary.wait_streaming()
    except BaseException:
        standby.destroy()
        primary.destroy()
        raise
    return primary, standby


def serve(data: Path, port: int | None, database: str, env_file: Path | None) -> int:
    """Start a server in ``data``, print its URL and keep it until interrupted."""
    cluster = Cluster(data, port=port)
    pidfile = cluster.data / "postmaster.pid"
    if pidfile.exists():  # left over by a run that was killed
        cluster.stop("fast")
    cluster.start()
    cluster.create_database(database)
    url = cluster.url(database)
    if env_file:
        env_file.write_text(url + "\n")
    print(
        f"PostgreSQL is serving on {cluster.host}:{cluster.port} (data: {cluster.data})", flush=True
    )
    stop = False

    def _stop(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    try:
        while not stop:
            time.sleep(0.2)
    finally:
        cluster.stop("fast")
        print("PostgreSQL stopped.", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="start a server and keep it until Ctrl-C")
    s.add_argument("--data", type=Path, required=True)
    s.add_argument("--port", type=int)
    s.add_argument("--database", default="postgrespool_demo")
    s.add_argument("--url-file", type=Path, help="write the server's URL to this file")
    args = parser.parse_args(argv)
    return serve(args.data.resolve(), args.port, args.database, args.url_file)


if __name__ == "__main__":
    sys.exit(main())
