"""``make bench``: django-postgrespool side by side with what users pick instead.

    python3 bench/run.py            # the full run: results in bench/results/
    python3 bench/run.py --quick    # CI's short run: a few cells, results in a temp folder

Every alternative of ``alternatives.py`` runs in the same run, alternating
(the order rotates each round), on the same Django, driver, server and
machine. Two workloads, at 1, 4, 16 and 64 concurrent clients:

A. in process (``worker.py``): Django's request cycle on N threads, with a
   one-query body (``A-one``) and a few-ORM-queries body (``A-orm``);
B. over HTTP (``B-http``): the benchmark project under gunicorn (one gthread
   worker with N threads) driven by wrk with N connections, one-query view.

And the fleet, 20 server connections in all for every alternative (psycopg 3):

F. ``F-http``: the example under gunicorn, 4 gthread workers × 8 threads,
   driven by wrk with 32 connections; ``F-one``: 4 processes × 8 threads of
   in-process ``SELECT 1`` request cycles, measured over one window.

For each cell: throughput, p50 and p99 latency, the peak of server
connections (``pg_stat_activity``, sampled every 20 ms) and errors. Run with
the system Python: it makes the virtualenvs ``.venv/bench-psycopg`` and
``.venv/bench-psycopg2`` and goes on inside the first one.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path[:0] = [str(BENCH), str(ROOT)]
EXAMPLES = ROOT / "examples"

from alternatives import (  # noqa: E402
    ALTERNATIVES,
    BOUNCED,
    FLEET_CONNS,
    FLEET_ONE_ONLY,
    FLEET_THREADS,
    FLEET_WORKERS,
    POOL_CAP,
    alternatives_for,
)

DRIVERS = ("psycopg", "psycopg2")
WORKLOADS = ("A-one", "A-orm", "B-http", "F-one", "F-http")
FLEET_DRIVER = "psycopg"  # Django's pool needs psycopg 3
LEVELS = (1, 4, 16, 64)
DATABASE = "bench"
QUICK_ALTS = ("persistent", "ours")
# The short run's fleet: the three alternatives the targets name, both layers,
# and (F-one) the ceiling of any in-process pool.
QUICK_FLEET_ALTS = ("pgbouncer_persistent", "native_pool", "ours_pgbouncer", "ours", "persistent")
COMMON = [
    "Django>=5.2,<5.3",
    "SQLAlchemy>=2.1,<2.2",
    "django-db-connection-pool>=1.2",
    "gunicorn>=22",
    "-e", str(ROOT / "packages" / "backend"),
    # The example project (workload B) reads its settings through it.
    "-e", str(ROOT / "packages" / "dburl"),
]
REQUIREMENTS = {
    # The psycopg venv also runs this script's second half: the monitor
    # connection, matplotlib and py-spy live there.
    "psycopg": ["psycopg[binary,pool]>=3.2", "matplotlib>=3.8", "py-spy>=0.3",
                "opentelemetry-sdk>=1.20", "prometheus-client>=0.17", *COMMON],
    "psycopg2": ["psycopg2-binary>=2.9", *COMMON],
}


# -- virtualenvs ----------------------------------------------------------


def venv_python(driver: str) -> Path:
    return ROOT / ".venv" / f"bench-{driver}" / "bin" / "python"


def ensure_venv(driver: str) -> Path:
    """Create or update ``.venv/bench-<driver>``; return its python."""
    from tests.support import lanes

    reqs = REQUIREMENTS[driver]
    python = venv_python(driver)
    venv = python.parent.parent
    stamp = venv / ".requirements"
    digest = hashlib.sha1("\n".join(reqs).encode()).hexdigest()
    if python.exists() and stamp.exists() and stamp.read_text() == digest:
        return python
    print(f"==> setting up {venv.relative_to(ROOT)}", flush=True)
    if not python.exists():
        interpreter = lanes.find_python("3.11")
        subprocess.run([lanes.uv(), "venv", "-q", "--python", interpreter, str(venv)], check=True)
    subprocess.run([lanes.uv(), "pip", "install", "-q", "--python", str(python), *reqs], check=True)
    stamp.write_text(digest)
    return python


def ensure_wrk() -> str:
    """Return the path of wrk, installing Debian's package when missing."""
    found = shutil.which("wrk")
    if found:
        return found
    if os.geteuid() != 0:
        raise SystemExit("wrk is missing: install Debian's package 'wrk'")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, stdout=subprocess.DEVNULL, env=env)
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", "wrk"], check=True, stdout=subprocess.DEVNULL, env=env
    )
    return shutil.which("wrk") or "/usr/bin/wrk"


# -- measuring ------------------------------------------------------------


class Sampler:
    """Sample, every 20 ms, how many server sessions carry ``application_name``."""

    def __init__(self, monitor: Any, application_name: str) -> None:
        self.monitor, self.name = monitor, application_name
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def count(self) -> int:
        with self.monitor.cursor() as cur:
            cur.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", (self.name,)
            )
            return int(cur.fetchone()[0])

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.count())
            self._stop.wait(0.02)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def percentile(sorted_values: list[float], fraction: float) -> float:
    """Return the value below which ``fraction`` of ``sorted_values`` lie (nearest rank)."""
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, int(round(fraction * len(sorted_values))) - 1))
    return sorted_values[index]


def read_line(proc: subprocess.Popen[str], wanted: Any) -> str:
    """Return ``proc``'s output up to and including the first line ``wanted`` accepts
    (all of it if none does: it ended)."""
    assert proc.stdout is not None
    seen = []
    for line in iter(proc.stdout.readline, ""):
        seen.append(line)
        if wanted(line):
            break
    return "".join(seen)


def server_processes() -> dict[int, tuple[str, list[str]]]:
    """Return the pid → (name, the ``/proc/PID/stat`` fields after it) of every
    PostgreSQL and PgBouncer process (fields[1] is the parent's pid)."""
    found = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                stat = f.read()
        except OSError:  # it ended
            continue
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        if name in ("postgres", "pgbouncer"):
            found[int(entry.name)] = (name, stat[stat.rindex(")") + 2:].split())
    return found


def server_cpu(processes: dict[int, tuple[str, list[str]]] | None = None) -> dict[str, float]:
    """Return the CPU seconds so far of the PostgreSQL and of the PgBouncer processes
    (of ``processes``, a server_processes() snapshot, when given).

    A process that ends between two readings takes its time with it: the
    difference is a lower bound for the processes that live through both
    (the fleet's server sessions live through a cell).
    """
    tick = os.sysconf("SC_CLK_TCK")
    total = {"postgres": 0, "pgbouncer": 0}
    for name, fields in (server_processes() if processes is None else processes).values():
        total[name] += int(fields[11]) + int(fields[12])  # utime, stime
    return {name: ticks / tick for name, ticks in total.items()}


def machine_ticks() -> tuple[int, int]:
    """Return the machine's idle and total CPU ticks so far (/proc/stat; zeros elsewhere)."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(x) for x in stat.readline().split()[1:]]
    except OSError:
        return 0, 0
    # user nice system idle iowait irq softirq steal (guest time is in user already)
    return fields[3] + fields[4], sum(fields[:8])


def split_cpus() -> tuple[set[int], set[int]]:
    """The CPUs of the server side (PostgreSQL, PgBouncer) and of the application side.

    ``--split-cpus``: the first CPU this process may use for the servers,
    the others for Django and wrk, as if they were two machines.
    """
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise HarnessError(f"--split-cpus needs two CPUs at least; this process may use {cpus}")
    return {cpus[0]}, set(cpus[1:])


def pin_servers(cpus: set[int], pidfiles: list[Path]) -> None:
    """Move the servers of ``pidfiles`` and their children to ``cpus``.

    The postmaster's new backends inherit it; the backends it already has
    are moved too.
    """
    roots = set()
    for pidfile in pidfiles:
        try:
            roots.add(int(pidfile.read_text().split()[0]))
        except (OSError, ValueError, IndexError) as error:
            raise HarnessError(f"--split-cpus: no pid in {pidfile}: {error}") from None
    for pid, (_, fields) in server_processes().items():
        if pid in roots or int(fields[1]) in roots:
            try:
                os.sched_setaffinity(pid, cpus)
            except ProcessLookupError:  # it ended
                pass


class HarnessError(RuntimeError):
    """The benchmark itself broke (not an alternative's error count)."""


# tests/support/pgbouncer.py never reads pgbouncer's stderr: with a log line
# per login the pipe fills after a few hundred requests and pgbouncer blocks,
# so keep the per-connection lines out of it.
QUIET = {"log_connections": "0", "log_disconnections": "0", "log_stats": "0"}


def is_fleet(workload: str) -> bool:
    return workload.startswith("F-")


class Bench:
    def __init__(
        self,
        args: argparse.Namespace,
        db: dict[str, Any],
        monitor: Any,
        project: HttpProject,
        fleet_bouncer_ports: dict[str, int] | None = None,
        server_pidfiles: list[Path] | None = None,
    ) -> None:
        self.args, self.db, self.monitor, self.project = args, db, monitor, project
        self.fleet_bouncer_ports = fleet_bouncer_ports or {}
        self.server_pidfiles = server_pidfiles or []
        # --split-cpus: (the servers' CPUs, the application's), else None.
        self.split = split_cpus() if args.split_cpus else None
        self.wrk = ensure_wrk() if {"B-http", "F-http"} & set(args.workloads) else ""

    def env(self, alt: str, driver: str, fleet: bool = False) -> dict[str, str]:
        db = {**self.db, "driver": driver}
        if fleet:
            # 20 server connections in all: 5 per worker, or 20 in PgBouncer.
            db["cap"] = FLEET_CONNS // FLEET_WORKERS
            db["app_prefix"] = "fleet"
            db["pgbouncer_port"] = self.fleet_bouncer_ports.get(alt, 0)
        # Experiments (a change of defaults, profiled): BENCH_OURS_POOL_OPTIONS='{"pre_ping": false}'.
        db["ours_pool_options"] = json.loads(os.environ.get("BENCH_OURS_POOL_OPTIONS") or "{}")
        return {
            **os.environ,
            "BENCH_ALT": alt,
            "BENCH_DB": json.dumps(db),
            "PYTHONDONTWRITEBYTECODE": "1",
        }

    def settle(self, name: str, alt: str) -> None:
        """Wait until the previous cell's server sessions named ``name`` are gone."""
        if alt in BOUNCED:  # PgBouncer's server connections outlive the clients, by design
            return
        sampler = Sampler(self.monitor, name)
        deadline = time.monotonic() + 5
        while sampler.count() and time.monotonic() < deadline:
            time.sleep(0.02)

    def cell(self, driver: str, workload: str, alt: str, level: int) -> dict[str, Any]:
        name = f"{'fleet' if is_fleet(workload) else 'bench'}-{alt}"
        self.settle(name, alt)
        if self.split and is_fleet(workload):
            pin_servers(self.split[0], self.server_pidfiles)
        with Sampler(self.monitor, name) as sampler:
            if workload == "F-one":
                result = self.in_process_fleet(driver, alt)
            elif workload == "F-http":
                result = self.over_http(driver, alt, FLEET_THREADS, workers=FLEET_WORKERS)
            elif workload.startswith("A-"):
                result = self.in_process(driver, workload[2:], alt, level)
            else:
                result = self.over_http(driver, alt, level)
        result["server_conns"] = sampler.peak
        if result["requests"] == 0:
            raise HarnessError(
                f"{driver} {workload} {alt} x{level}: no request completed "
                f"({result.get('first_error')})"
            )
        return result

    def app_side(self, cmd: list[str]) -> list[str]:
        """``cmd``, run on the application's CPUs with --split-cpus."""
        if self.split is None:
            return cmd
        return ["taskset", "-c", ",".join(map(str, sorted(self.split[1]))), *cmd]

    def in_process(self, driver: str, body: str, alt: str, level: int) -> dict[str, Any]:
        a = self.args
        cmd = [
            str(venv_python(driver)), str(BENCH / "worker.py"), "--threads", str(level),
            "--body", body, "--warmup", str(a.warmup), "--duration", str(a.duration),
        ]
        if a.profile:
            # py-spy's collapsed stacks, one file per cell (see bench/profile.py).
            a.out.mkdir(parents=True, exist_ok=True)
            name = f"profile-{driver}-{body}-{alt}-{level}.txt"
            spy = str(venv_python("psycopg").parent / "py-spy")
            cmd = [spy, "record", "--format", "raw", "--rate", "250", "--gil", "--nonblocking",
                   "-o", str(a.out / name), "--", *cmd]
        limit = a.warmup + a.duration + 90
        try:
            out = subprocess.run(
                cmd, env=self.env(alt, driver), capture_output=True, text=True, timeout=limit
            )
        except subprocess.TimeoutExpired as timeout:
            err = (timeout.stderr or b"")[-3000:]
            raise HarnessError(f"{driver} {alt} x{level}: worker still running after {limit:.0f}s:"
                               f"\n{err.decode(errors='replace') if isinstance(err, bytes) else err}"
                               ) from None
        lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
        if out.returncode != 0 or not lines:
            raise HarnessError(
                f"{driver} {alt} x{level}: worker exited with {out.returncode}:\n{out.stderr[-3000:]}"
            )
        result: dict[str, Any] = json.loads(lines[-1])
        return result

    def in_process_fleet(self, driver: str, alt: str) -> dict[str, Any]:
        """Run FLEET_WORKERS worker processes of FLEET_THREADS threads over one window."""
        a = self.args
        cmd = [
            str(venv_python(driver)), str(BENCH / "worker.py"), "--threads", str(FLEET_THREADS),
            "--body", "one", "--warmup", str(a.warmup), "--duration", str(a.duration),
            "--sync", "--raw",
        ]
        env = self.env(alt, driver, fleet=True)
        cmds = [self.app_side(cmd)] * FLEET_WORKERS
        if a.pin_workers:  # each process on one CPU: its threads never pass the GIL between CPUs
            cpus = sorted(self.split[1] if self.split else os.sched_getaffinity(0))
            cmds = [["taskset", "-c", str(cpus[i % len(cpus)]), *cmd] for i in range(FLEET_WORKERS)]
        if a.profile:
            # py-spy's collapsed stacks of the first process (see bench/profile.py).
            a.out.mkdir(parents=True, exist_ok=True)
            spy = str(venv_python("psycopg").parent / "py-spy")
            cmds[0] = self.app_side([
                spy, "record", "--format", "raw", "--rate", "250", "--gil", "--nonblocking",
                "-o", str(a.out / f"profile-{driver}-fleet-one-{alt}.txt"), "--", *cmd,
            ])
        server_before = {"postgres": 0.0, "pgbouncer": 0.0}
        procs = [
            subprocess.Popen(c, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
            for c in cmds
        ]
        try:
            for proc in procs:  # each has set Django up and served its first request
                assert proc.stdout is not None
                line = proc.stdout.readline()
                # py-spy's banner and a blank line come first with --profile.
                while line.startswith("py-spy>") or line == "\n":
                    line = proc.stdout.readline()
                if line.strip() != "ready":
                    raise HarnessError(f"{driver} F-one {alt}: a worker did not start: "
                                       f"{line}{proc.communicate(timeout=30)[1][-3000:]}")
            server_before = server_cpu()
            ticks_before = machine_ticks()
            for proc in procs:
                assert proc.stdin is not None
                proc.stdin.write("go\n")
                proc.stdin.flush()
            # Each prints its JSON line, then waits to close its pool. A worker
            # still silent after the limit is killed: its exit code tells below.
            limit = a.warmup + a.duration + 90
            watchdog = threading.Timer(limit, lambda: [p.kill() for p in procs if p.poll() is None])
            watchdog.start()
            try:
                reports = [read_line(proc, lambda line: line.startswith("{")) for proc in procs]
            finally:
                watchdog.cancel()
            server_after = server_cpu()
            ticks_after = machine_ticks()
            for proc in procs:
                assert proc.stdin is not None
                try:
                    proc.stdin.write("close\n")
                    proc.stdin.flush()
                except BrokenPipeError:  # it ended: its exit code tells why, below
                    pass
            outputs = [proc.communicate(timeout=30) for proc in procs]
            outputs = [(report + out, err) for report, (out, err) in zip(reports, outputs)]
        except subprocess.TimeoutExpired:
            raise HarnessError(f"{driver} F-one {alt}: a worker still running") from None
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        results = []
        for proc, (out, err) in zip(procs, outputs):
            lines = [line for line in out.splitlines() if line.startswith("{")]
            if proc.returncode != 0 or not lines:
                raise HarnessError(
                    f"{driver} F-one {alt}: worker exited with {proc.returncode}:\n{err[-3000:]}"
                )
            results.append(json.loads(lines[-1]))
        merged = sorted(x for r in results for x in r["latencies"])
        served = sum(r["served"] for r in results) or 1
        used = {name: server_after[name] - server_before[name] for name in server_after}
        return {
            "requests": len(merged),
            "errors": sum(r["errors"] for r in results),
            "seconds": a.duration,
            "p50_ms": percentile(merged, 0.50) * 1000,
            "p99_ms": percentile(merged, 0.99) * 1000,
            "first_error": next((r["first_error"] for r in results if r["first_error"]), None),
            # Where the machine's time went, per request: the Django processes,
            # and PostgreSQL with PgBouncer (the monitor's session included).
            "client_cpu_us": sum(r["cpu_s"] for r in results) / served * 1e6,
            "server_cpu_us": sum(used.values()) / served * 1e6,
            "bouncer_cpu_us": used["pgbouncer"] / served * 1e6,
            "switches": sum(r["switches"] for r in results) / served,
            "preempted": sum(r.get("preempted", 0) for r in results) / served,
            # The machine's CPUs left idle over the cell (any process's work counts as
            # busy); none where /proc/stat cannot be read.
            **({"idle_share": (ticks_after[0] - ticks_before[0])
                / (ticks_after[1] - ticks_before[1])}
               if ticks_after[1] > ticks_before[1] else {}),
            # Ours: the share of checkouts that waited, and that were handed over.
            **({
                f"pool_{k}": sum(r["pool"][k] for r in results)
                / (sum(r["pool"]["checkouts"] for r in results) or 1)
                for k in ("waits", "handoffs", "affinity_hits")
            } if all("pool" in r for r in results) else {}),
        }

    def over_http(self, driver: str, alt: str, level: int, workers: int = 1) -> dict[str, Any]:
        """Serve the project with ``workers`` × ``level`` threads; load it with as many conns."""
        from tests.support.pgcluster import free_port

        a = self.args
        port = free_port()
        p = self.project
        clients = workers * level
        cmd = [
            str(venv_python(driver)), "-m", "gunicorn", "--chdir", str(p.chdir),
            "--pythonpath", str(BENCH / "project"),
            "--worker-class", "gthread", "--workers", str(workers), "--threads", str(level),
            "--bind", f"127.0.0.1:{port}", "--backlog", "2048", "--keep-alive", "30",
            "--log-level", "warning", p.wsgi,
        ]
        log = tempfile.TemporaryFile()
        env = {
            **self.env(alt, driver, fleet=workers > 1),
            "DJANGO_SETTINGS_MODULE": p.settings,
            # The budget check (postgrespool.E001) counts the workers.
            "WEB_CONCURRENCY": str(workers),
        }
        if workers > 1:  # the fleet: on the application's CPUs with --split-cpus
            cmd = self.app_side(cmd)
        server = subprocess.Popen(cmd, env=env, stdout=log, stderr=log, start_new_session=True)
        url = f"http://127.0.0.1:{port}{p.path}"
        try:
            self._wait_http(url, server, log)
            wrk = [self.wrk, "-t", str(min(2, clients)), "-c", str(clients), "--timeout", "10s"]
            if workers > 1:
                wrk = self.app_side(wrk)
                # A keep-alive connection stays with the worker that accepted it,
                # and one worker often accepts most of wrk's 32 at once: each
                # request on a new connection goes to a worker with a free
                # thread, as behind a load balancer.
                wrk += ["-H", "Connection: close"]
            script = ["-s", str(BENCH / "wrk_report.lua")]
            # A fleet always warms up: every worker builds its pool first.
            if a.warmup >= 0.5 or workers > 1:
                subprocess.run(
                    [*wrk, "-d", f"{max(1, round(a.warmup))}s", url],
                    capture_output=True, check=True, timeout=60,
                )
            # A fleet measures 2 s at least: under load a request may take one.
            seconds = max(2 if workers > 1 else 1, round(a.duration))
            out = subprocess.run(
                [*wrk, *script, "-d", f"{seconds}s", url],
                capture_output=True, text=True, timeout=seconds + 60,
            )
            if out.returncode != 0:
                raise HarnessError(f"wrk failed ({out.returncode}): {out.stderr}")
            w = json.loads(out.stdout.strip().splitlines()[-1])
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()
        log.seek(0)
        errors = w["connect"] + w["read"] + w["write"] + w["status"] + w["timeout"]
        first_error = None
        if errors:
            first_error = log.read().decode(errors="replace")[-1000:] or "see wrk"
        return {
            "requests": w["requests"] - w["status"],
            "errors": errors,
            "seconds": w["duration_us"] / 1e6,
            "p50_ms": w["p50_us"] / 1000,
            "p99_ms": w["p99_us"] / 1000,
            "first_error": first_error,
        }

    @staticmethod
    def _wait_http(url: str, server: subprocess.Popen[bytes], log: Any) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if server.poll() is not None:
                log.seek(0)
                raise HarnessError(f"gunicorn exited: {log.read().decode()[-3000:]}")
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.05)
        raise HarnessError(f"gunicorn did not answer {url} within 30s")


class HttpProject:
    """What workload B serves: the example project, or the benchmark's own without it."""

    def __init__(self) -> None:
        self.example = (EXAMPLES / "exampleproject" / "settings.py").exists()
        if self.example:
            self.chdir, self.settings = EXAMPLES, "benchsite.example_settings"
            self.wsgi, self.path = "exampleproject.wsgi:application", "/api/products/"
            self.label = "examples/ shop, GET /api/products/"
        else:
            self.chdir, self.settings = BENCH / "project", "benchsite.settings"
            self.wsgi, self.path = "benchsite.wsgi:application", "/one"
            self.label = "bench project, GET /one"

    def prepare(self, db: dict[str, Any]) -> None:
        """Create the example's tables and sample data (once per run)."""
        if not self.example:
            return
        env = {
            **os.environ, "BENCH_ALT": "persistent", "BENCH_DB": json.dumps(db),
            "DJANGO_SETTINGS_MODULE": self.settings,
            "PYTHONPATH": os.pathsep.join([str(BENCH / "project"), str(EXAMPLES)]),
        }
        for command in (["migrate", "-v", "0"], ["demodata"]):
            out = subprocess.run(
                [str(venv_python("psycopg")), "-m", "django", *command],
                cwd=EXAMPLES, env=env, capture_output=True, text=True,
            )
            if out.returncode != 0:
                raise HarnessError(f"example project: manage.py {command[0]} failed:\n{out.stderr}")


def aggregate(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Merge the rounds of each (driver, workload, alternative, level)."""
    groups: dict[tuple[str, str, str, int], list[dict[str, Any]]] = {}
    for c in cells:
        groups.setdefault((c["driver"], c["workload"], c["alt"], c["threads"]), []).append(c)
    rows = []
    for (driver, workload, alt, level), runs in groups.items():
        requests = sum(r["requests"] for r in runs)
        seconds = sum(r["seconds"] for r in runs)
        rows.append({
            "driver": driver, "workload": workload, "alt": alt, "threads": level,
            "rounds": len(runs),
            # Each round's req/s, in the order of the rounds: the fleet pairs them.
            "round_rps": [r["requests"] / r["seconds"] for r in runs],
            "rps": requests / seconds,
            "p50_ms": sum(r["p50_ms"] for r in runs) / len(runs),
            "p99_ms": sum(r["p99_ms"] for r in runs) / len(runs),
            "server_conns": max(r["server_conns"] for r in runs),
            "errors": sum(r["errors"] for r in runs),
            "first_error": next((r["first_error"] for r in runs if r.get("first_error")), None),
        })
        for key in ("client_cpu_us", "server_cpu_us", "bouncer_cpu_us", "switches", "preempted",
                    "idle_share",
                    "pool_waits", "pool_handoffs", "pool_affinity_hits"):
            if all(key in r for r in runs):
                rows[-1][key] = sum(r[key] for r in runs) / len(runs)
    return rows


# -- the run --------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="CI's short run (a few cells, no files)")
    p.add_argument("--drivers", nargs="+", choices=DRIVERS, default=list(DRIVERS))
    p.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    p.add_argument("--alts", nargs="+", choices=list(ALTERNATIVES), default=list(ALTERNATIVES))
    p.add_argument("--threads", nargs="+", type=int, default=list(LEVELS))
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--fleet-rounds", type=int, default=3, help="rounds of the F workloads")
    p.add_argument("--warmup", type=float, default=0.5, help="seconds before measuring")
    p.add_argument("--duration", type=float, default=2.0, help="seconds measured per cell")
    p.add_argument("--out", type=Path, help="results folder (default bench/results)")
    p.add_argument("--split-cpus", action="store_true",
                   help="the fleet with PostgreSQL and PgBouncer on one CPU, Django and wrk on the others")
    p.add_argument("--pin-workers", action="store_true",
                   help="F-one: each worker process on one CPU (round robin), every alternative alike")
    p.add_argument("--profile", action="store_true",
                   help="record each in-process cell with py-spy into the results folder")
    p.add_argument("--in-venv", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.threads, args.rounds, args.warmup, args.duration = [4], 1, 0.2, 0.5
        args.fleet_rounds = 1
        args.out = args.out or Path(tempfile.mkdtemp(prefix="bench-quick-"))
    args.out = args.out or BENCH / "results"
    return args


CYCLE_MODES = ("off", "merge", "replay")


def measure_cycle(db: dict[str, Any], rounds: int, cycles: int = 20_000) -> dict[str, list[float]]:
    """µs per checkout → checkin with metrics off, merged, replayed (cycle.py), alternating."""
    out: dict[str, list[float]] = {mode: [] for mode in CYCLE_MODES}
    env = {**os.environ, "BENCH_DB": json.dumps(db)}
    for round_ in range(rounds):
        shift = round_ % len(CYCLE_MODES)
        for mode in CYCLE_MODES[shift:] + CYCLE_MODES[:shift]:
            done = subprocess.run(
                [sys.executable, str(BENCH / "cycle.py"), mode, str(cycles)],
                env=env, capture_output=True, text=True, timeout=300,
            )
            if done.returncode:
                raise HarnessError(f"cycle.py {mode} failed: {done.stderr[-2000:]}")
            out[mode].append(json.loads(done.stdout.strip().splitlines()[-1])["us"])
        print(f"  pool cycle round {round_ + 1}: " + ", ".join(
            f"{mode} {out[mode][-1]:.2f} µs" for mode in CYCLE_MODES), flush=True)
    return out


TAX_VARIANTS = ("persistent", "ours", "ours_no_ping")


def measure_tax(
    db: dict[str, Any], rounds: int, requests: int, app_side: Callable[[list[str]], list[str]]
) -> dict[str, list[dict[str, float]]]:
    """The pool's tax inside a real request (tax.py), the variants alternating round by round."""
    out: dict[str, list[dict[str, float]]] = {v: [] for v in TAX_VARIANTS}
    env = {**os.environ, "BENCH_DB": json.dumps({**db, "driver": "psycopg"}),
           "PYTHONDONTWRITEBYTECODE": "1"}
    for round_ in range(rounds):
        shift = round_ % len(TAX_VARIANTS)
        for variant in TAX_VARIANTS[shift:] + TAX_VARIANTS[:shift]:
            done = subprocess.run(
                app_side([sys.executable, str(BENCH / "tax.py"), variant, str(requests)]),
                env=env, capture_output=True, text=True, timeout=600,
            )
            if done.returncode:
                raise HarnessError(f"tax.py {variant} failed: {done.stderr[-2000:]}")
            out[variant].append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"  tax round {round_ + 1}: " + ", ".join(
            f"{v} {out[v][-1]['cpu_us']:.1f} µs" for v in TAX_VARIANTS), flush=True)
    return out


def measure_wake(rounds: int) -> dict[str, float]:
    """The CPU cost of waking a thread, and a process (wake.py): the median of ``rounds``."""
    runs = []
    for _ in range(rounds):
        done = subprocess.run([sys.executable, str(BENCH / "wake.py")],
                              capture_output=True, text=True, timeout=300)
        if done.returncode:
            raise HarnessError(f"wake.py failed: {done.stderr[-2000:]}")
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    out = {key: sorted(r[key] for r in runs)[len(runs) // 2] for key in runs[0]}
    print(f"  wake-ups: a thread {out['thread_us']:.1f} µs, a process {out['process_us']:.1f} µs "
          "of CPU each", flush=True)
    return out


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if not args.in_venv:
        for driver in args.drivers:
            ensure_venv(driver)
        python = str(ensure_venv("psycopg"))
        os.execv(python, [python, str(Path(__file__)), *argv, "--in-venv"])
    return measure(args)


def _interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def measure(args: argparse.Namespace) -> int:
    # Stop the server, PgBouncer and gunicorn on SIGTERM and Ctrl-C alike
    # (a background job starts with SIGINT ignored).
    signal.signal(signal.SIGTERM, _interrupted)
    signal.signal(signal.SIGINT, _interrupted)
    import psycopg
    from tests.support.pgbouncer import PgBouncer
    from tests.support.pgcluster import Cluster

    import report

    started = time.time()
    cluster = Cluster()
    bouncer = None
    fleet_bouncers: dict[str, PgBouncer] = {}
    monitor = None
    cells: list[dict[str, Any]] = []
    cycle: dict[str, list[float]] = {}
    tax: dict[str, list[dict[str, float]]] = {}
    wake: dict[str, float] = {}
    http_project = HttpProject()
    broken: list[str] = []
    try:
        cluster.start()
        cluster.create_database(DATABASE)
        sys.path.insert(0, str(BENCH / "project"))
        from benchapp.schema import CREATE_TABLE

        cluster.psql(CREATE_TABLE, database=DATABASE)
        db = {
            "host": cluster.host, "port": cluster.port, "user": cluster.user,
            "password": cluster.password, "database": DATABASE, "pgbouncer_port": 0,
        }
        if {"B-http", "F-http"} & set(args.workloads):
            http_project.prepare(db)
        if "pgbouncer" in args.alts and not all(is_fleet(w) for w in args.workloads):
            bouncer = PgBouncer(
                cluster, pool_mode="transaction", pool_size=POOL_CAP, settings=QUIET
            )
            bouncer.start()
            db["pgbouncer_port"] = bouncer.port
        monitor = psycopg.connect(
            host=cluster.host, port=cluster.port, user=cluster.user, password=cluster.password,
            dbname="postgres", application_name="bench-monitor", autocommit=True,
        )
        fleet_alts = [
            a for a in alternatives_for(FLEET_DRIVER, fleet=True) if a in args.alts
            and (not args.quick or a in QUICK_FLEET_ALTS)
        ] if any(is_fleet(w) for w in args.workloads) else []
        for alt in fleet_alts:
            if alt in BOUNCED:
                # One PgBouncer per alternative: its server sessions carry that
                # alternative's application_name only (see Sampler).
                fleet_bouncers[alt] = PgBouncer(
                    cluster, pool_mode="transaction", pool_size=FLEET_CONNS, settings=QUIET
                )
                fleet_bouncers[alt].start()
        monitor = psycopg.connect(
            host=cluster.host, port=cluster.port, user=cluster.user, password=cluster.password,
            dbname="postgres", application_name="bench-monitor", autocommit=True,
        )
        bench = Bench(
            args, db, monitor, http_project, {a: b.port for a, b in fleet_bouncers.items()},
            [cluster.data / "postmaster.pid", *(b.dir / "pgbouncer.pid" for b in fleet_bouncers.values() if b.dir)],
        )
        print(f"==> load before: {os.getloadavg()[0]:.2f}; results in {args.out}", flush=True)
        # (driver, workload, the (alternative, clients) cells of a round, rounds)
        plans: list[tuple[str, str, list[tuple[str, int]], int]] = []
        for driver in args.drivers:
            every = [a for a in alternatives_for(driver) if a in args.alts]
            for workload in args.workloads:
                if is_fleet(workload):
                    continue
                # The short run covers every alternative once per driver (A-one)
                # and the other workloads with two of them.
                alts = every if not args.quick or workload == "A-one" else [
                    a for a in every if a in QUICK_ALTS
                ]
                for level in args.threads:
                    pairs = [(alt, level) for alt in alts]
                    if workload.startswith("A-") and level == 16 and "persistent" in alts:
                        # The limit for the pool's 10 connections, alternating with the rest.
                        pairs.append(("persistent", report.LIMIT_THREADS))
                    if (workload == "A-one" and level == 1 and "ours" in alts and "ours_metrics" in args.alts
                            and driver in ALTERNATIVES["ours_metrics"][1]):
                        # What exporting metrics costs a request, next to 'ours'.
                        pairs.append(("ours_metrics", 1))
                    plans.append((driver, workload, pairs, args.rounds))
        for workload in args.workloads:
            if is_fleet(workload) and fleet_alts:
                clients = FLEET_WORKERS * FLEET_THREADS
                pairs = [(alt, clients) for alt in fleet_alts
                         if workload == "F-one" or alt not in FLEET_ONE_ONLY]
                plans.append((FLEET_DRIVER, workload, pairs, args.fleet_rounds))
        for driver, workload, pairs, rounds in plans:
            for round_ in range(rounds):
                shift = round_ % len(pairs)
                for alt, threads in pairs[shift:] + pairs[:shift]:
                    try:
                        result = bench.cell(driver, workload, alt, threads)
                    except HarnessError as error:
                        if args.quick:
                            raise
                        # A long run goes on; the cell shows as failed.
                        print(f"!! {error}", file=sys.stderr, flush=True)
                        broken.append(str(error))
                        result = {"requests": 0, "errors": 1, "seconds": args.duration,
                                  "p50_ms": float("nan"), "p99_ms": float("nan"),
                                  "server_conns": 0, "first_error": str(error)[:500]}
                    result.update(driver=driver, workload=workload, alt=alt, threads=threads)
                    cells.append(result)
                    print(
                        f"  {driver:8} {workload:6} x{threads:<3} {alt:20} "
                        f"{result['requests'] / result['seconds']:8.0f} req/s "
                        f"p50 {result['p50_ms']:7.2f} ms p99 {result['p99_ms']:7.2f} ms "
                        f"conns {result['server_conns']:3} errors {result['errors']}",
                        flush=True,
                    )
        if "A-one" in args.workloads and {"ours", "ours_metrics"} <= set(args.alts):
            cycle = measure_cycle(db, rounds=3 if args.quick else 15)
        if "A-one" in args.workloads and {"ours", "persistent"} <= set(args.alts):
            tax = measure_tax(db, rounds=1 if args.quick else 5,
                              requests=1_000 if args.quick else 4_000, app_side=bench.app_side)
        if "F-one" in args.workloads and not args.quick:
            wake = measure_wake(rounds=3)
    finally:
        if monitor is not None:
            monitor.close()
        if bouncer is not None:
            bouncer.stop()
        for b in fleet_bouncers.values():
            b.stop()
        cluster.destroy()
    rows = aggregate(cells)
    meta = {
        "quick": args.quick,
        "rounds": args.rounds,
        "fleet_rounds": args.fleet_rounds,
        "split_cpus": args.split_cpus,
        "pin_workers": args.pin_workers,
        "warmup_s": args.warmup,
        "duration_s": args.duration,
        "pool_cap": POOL_CAP,
        "http_target": http_project.label,
        "elapsed_s": round(time.time() - started),
        "load_after": [round(x, 2) for x in os.getloadavg()],
        "uptime": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
        "versions": report.versions(args.drivers, venv_python),
        "cycle": cycle,
        "tax": tax,
        "wake": wake,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    text = report.write(args.out, meta, rows)
    print(text, flush=True)
    failures = [r for r in rows if r["errors"]]
    for r in failures:
        print(f"!! {r['driver']} {r['workload']} {r['alt']} x{r['threads']}: {r['errors']} errors: "
              f"{r['first_error']}", file=sys.stderr)
    if broken:
        print(f"bench: {len(broken)} cell(s) could not be measured", file=sys.stderr)
        return 2
    if args.quick and failures:
        return 1
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except HarnessError as error:
        print(f"bench: the harness broke: {error}", file=sys.stderr)
        sys.exit(2)
