"""``make demo``: serve the example shop with pooled connections to an embedded PostgreSQL.

Starts a PostgreSQL server whose data lives in ``.pgdata/demo`` (git-ignored,
so the second run skips initdb), unless ``DATABASE_URL`` names a server
already; then runs ``migrate``, loads the sample data and serves the site with
``runserver``. Ctrl-C stops the site, then the embedded server.

It prints the database URL (password masked) and a ``psql`` command that
connects to it (through a libpq password file next to the data).

Environment: ``DATABASE_URL`` (use this server instead), ``DEMO_ADDRPORT``
(default ``127.0.0.1:8000``), ``DEMO_DATA`` (default ``.pgdata/demo``).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType
from urllib.parse import urlsplit, urlunsplit

EXAMPLES = Path(__file__).resolve().parent
ROOT = EXAMPLES.parent
sys.path.insert(0, str(ROOT))

from tests.support.pgcluster import Cluster

DATABASE = "postgrespool_demo"


class Interrupted(Exception):
    """Ctrl-C (SIGINT) or SIGTERM arrived."""


def say(message: str) -> None:
    """Print one line of the demo's own output."""
    print(f"[demo] {message}", flush=True)


def manage(env: dict[str, str], *args: str) -> None:
    """Run one manage.py command of the example project; stop the demo if it fails."""
    say("manage.py " + " ".join(args))
    result = subprocess.run([sys.executable, "manage.py", *args], cwd=EXAMPLES, env=env, check=False)
    if result.returncode != 0:
        raise SystemExit(f"[demo] manage.py {args[0]} failed (exit status {result.returncode}).")


def show_url(url: str, pgpass: Path | None) -> None:
    """Print the database URL, password masked, and a psql command that connects with it."""
    parts = urlsplit(url)
    masked = parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":********@", 1))
    say(f"DATABASE_URL={urlunsplit(masked)}")
    if pgpass is None:
        say('psql: psql "$DATABASE_URL"')
        return
    plain = parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", "@", 1))
    say(f"psql: PGPASSFILE={pgpass} psql '{urlunsplit(plain)}'")


def write_pgpass(cluster: Cluster, folder: Path) -> Path:
    """Write a libpq password file for the embedded server (readable by this user only)."""
    pgpass = folder / "pgpass"
    secret = cluster.password.replace("\\", "\\\\").replace(":", "\\:")  # the file's escapes
    pgpass.write_text(f"{cluster.host}:*:*:{cluster.user}:{secret}\n")
    pgpass.chmod(0o600)
    return pgpass


def start_cluster(data: Path) -> Cluster:
    """Start the embedded server in ``data`` (created on the first run) and its database."""
    data.parent.mkdir(parents=True, exist_ok=True)  # the postgres user must reach it
    cluster = Cluster(data)
    first = not (cluster.data / "PG_VERSION").exists()
    if (cluster.data / "postmaster.pid").exists():  # left by a run that was killed
        cluster.stop("fast")
    say(f"{'Creating' if first else 'Starting'} the embedded PostgreSQL in {cluster.data} ...")
    cluster.start()
    cluster.create_database(DATABASE)
    say(f"PostgreSQL is serving on {cluster.host}:{cluster.port} (database {DATABASE}).")
    return cluster


def serve(env: dict[str, str], addrport: str) -> int:
    """Run runserver until it exits or the demo is interrupted; return its exit status."""
    # A session of its own: the demo decides when it stops, so that it stops
    # before the database does, whoever received the Ctrl-C.
    server = subprocess.Popen(
        [sys.executable, "manage.py", "runserver", addrport],
        cwd=EXAMPLES, env=env, start_new_session=True,
    )
    say(f"Serving http://{addrport}/ (pool statistics: http://{addrport}/pool/). Ctrl-C stops.")
    try:
        return server.wait()
    except Interrupted:
        say("Stopping the site ...")
        os.killpg(server.pid, signal.SIGINT)
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        return 0


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise Interrupted


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--addrport", default=os.environ.get("DEMO_ADDRPORT", "127.0.0.1:8000"))
    parser.add_argument(
        "--data", type=Path, default=Path(os.environ.get("DEMO_DATA", ROOT / ".pgdata" / "demo"))
    )
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cluster: Cluster | None = None
    started = time.monotonic()
    try:
        if env.get("DATABASE_URL"):
            say("Using the server of DATABASE_URL.")
            show_url(env["DATABASE_URL"], None)
        else:
            cluster = start_cluster(args.data.resolve() / "data")
            env["DATABASE_URL"] = cluster.url(DATABASE)
            show_url(env["DATABASE_URL"], write_pgpass(cluster, args.data.resolve()))
        manage(env, "migrate", "--noinput")
        manage(env, "demodata")
        manage(env, "check", "--database", "default")
        say(f"Ready in {time.monotonic() - started:.1f}s.")
        return serve(env, args.addrport)
    except Interrupted:
        return 0
    finally:
        if cluster is not None:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not orphan it
            say("Stopping the embedded PostgreSQL ...")
            cluster.stop("fast")
            say("Stopped.")


if __name__ == "__main__":
    sys.exit(main())
