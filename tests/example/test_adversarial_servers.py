"""Adversarial: the pool under real application servers, as a deployment meets it.

gunicorn with --preload (the master touches the database before forking),
HUP reloads, --max-requests recycling, a worker SIGKILLed mid-request, gthread
workers with more threads than connections, a graceful SIGTERM; uvicorn with
--workers 2 and async views using the ORM.

The example project is served with a settings module of this test's own (in a
temporary directory on PYTHONPATH) that adds a few probe views: which worker
process and which server session answered.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.example.helpers import (
    EXAMPLES,
    ExampleDatabase,
    Served,
    example_env,
    free_addrport,
    start_server,
    stop,
)
from tests.reliability.load import wait_until

# Once per CI run (the default lane): what is looked at here is gunicorn's and
# uvicorn's process model around the pool, not the Django or driver version.
pytestmark = [pytest.mark.servers, pytest.mark.default_lane]

PROBES = {
    "advsettings.py": """
        from exampleproject.settings import *  # noqa: F401,F403

        import os

        ROOT_URLCONF = "advurls"
        POSTGRESPOOL_METRICS = os.environ.get("ADV_METRICS") == "1"
    """,
    "advurls.py": """
        import os
        import time

        from asgiref.sync import sync_to_async
        from django.db import connection, transaction
        from django.http import JsonResponse
        from django.urls import include, path

        from shop.models import Product


        def _backend(ms):
            # started..ended: while this request surely holds the connection
            # (it goes back to the pool at the request's end, after ended).
            with transaction.atomic(), connection.cursor() as cursor:
                started = time.time()
                cursor.execute("SELECT pg_backend_pid(), pg_sleep(%s)", [ms / 1000])
                backend = cursor.fetchone()[0]
                return backend, started, time.time()


        def whoami(request):
            ms = int(request.GET.get("ms", "0"))
            backend, started, ended = _backend(ms)
            return JsonResponse({"worker": os.getpid(), "backend": backend,
                                 "started": started, "ended": ended})


        async def awhoami(request):
            ms = int(request.GET.get("ms", "0"))
            count = await Product.objects.acount()
            first = await Product.objects.order_by("pk").afirst()
            backend = (await sync_to_async(_backend)(ms))[0]
            return JsonResponse({"worker": os.getpid(), "backend": backend,
                                 "products": count, "first": first.sku})


        urlpatterns = [
            path("adv/whoami", whoami),
            path("adv/awhoami", awhoami),
            path("", include("exampleproject.urls")),
        ]
    """,
    # --preload: the master imports this, and touches the database before it forks.
    "advwsgi.py": """
        import os

        if os.environ.get("ADV_GEVENT_EARLY") == "1":
            # gevent with --preload: patched before Django is imported (gunicorn's
            # gevent worker patches only after the fork, too late for what the
            # master imported: Django's per-thread connections would be shared).
            from gevent import monkey

            monkey.patch_all()

        os.environ["DJANGO_SETTINGS_MODULE"] = "advsettings"

        from django.core.wsgi import get_wsgi_application

        application = get_wsgi_application()

        if os.environ.get("ADV_MASTER_TOUCH") == "1":
            from django.db import connection

            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_backend_pid()")
                MASTER_BACKEND = cursor.fetchone()[0]
            if os.environ.get("ADV_MASTER_CLOSES") == "1":
                connection.close()
            with open(os.environ["ADV_MASTER_FILE"], "w") as out:
                out.write(str(MASTER_BACKEND))
    """,
    "advasgi.py": """
        import os

        os.environ["DJANGO_SETTINGS_MODULE"] = "advsettings"

        from django.core.asgi import get_asgi_application

        application = get_asgi_application()
    """,
}


def probes(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in PROBES.items():
        (directory / name).write_text(textwrap.dedent(text))
    return directory


def env_for(example_db: ExampleDatabase, tmp_path: Path, query: str, **extra: str) -> dict:
    code = probes(tmp_path / "probes")
    env = example_env(f"{example_db.url}?{query}", DJANGO_SETTINGS_MODULE="advsettings",
                      ADV_MASTER_FILE=str(tmp_path / "master_backend"), **extra)
    env["PYTHONPATH"] = os.pathsep.join([str(code), str(EXAMPLES)])
    return env


def gunicorn(example_db: ExampleDatabase, tmp_path: Path, query: str, *args: str,
             app: str = "advwsgi", **extra: str) -> Served:
    port, addrport = free_addrport()
    return start_server(
        [sys.executable, "-m", "gunicorn", "--bind", addrport, "--graceful-timeout", "5",
         *args, app],
        env_for(example_db, tmp_path, query, **extra), tmp_path / "server.log", port,
    )


@contextlib.contextmanager
def served_until_stopped(
    example_db: ExampleDatabase, tmp_path: Path, query: str, *args: str, **extra: str
) -> Iterator[Served]:
    """The example under gunicorn (see gunicorn()) for the block; then stopped, and every
    session of its pools seen gone."""
    served = gunicorn(example_db, tmp_path, query, *args, **extra)
    try:
        yield served
    finally:
        stop(served.process)
    assert wait_until(lambda: example_db.sessions() == 0), app_backends(example_db)


def get(base: str, path: str, timeout: float = 60) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(base + path, timeout=timeout) as response:
            body = response.read()
            return response.status, json.loads(body) if body.startswith(b"{") else {}
    except urllib.error.HTTPError as error:
        return error.code, {}
    except OSError as error:  # connection reset by a killed worker
        return -1, {"error": repr(error)}


def load(base: str, path: str, n: int, clients: int) -> list[tuple[int, dict]]:
    with ThreadPoolExecutor(clients) as pool:
        return list(pool.map(lambda _: get(base, path), range(n)))


def app_backends(example_db: ExampleDatabase) -> set[int]:
    return {int(r[0]) for r in example_db.query(
        "SELECT pid FROM pg_stat_activity WHERE datname = %s "
        "AND application_name LIKE 'exampleproject%%'", (example_db.name,))}


def sleeping_now(example_db: ExampleDatabase) -> int:
    """Sessions of the example running /adv/whoami's pg_sleep() now."""
    return int(example_db.query(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND state = 'active' "
        "AND query LIKE '%%pg_sleep%%' AND application_name LIKE 'exampleproject%%'",
        (example_db.name,))[0][0])


def default_sessions(example_db: ExampleDatabase) -> int:
    """Sessions of the 'default' alias ('reports' is prewarmed too: examples/gunicorn.conf.py)."""
    return int(example_db.query(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = %s "
        "AND application_name = 'exampleproject'", (example_db.name,))[0][0])


def worker_pids(master: int) -> set[int]:
    children = Path(f"/proc/{master}/task/{master}/children")
    return {int(p) for p in children.read_text().split()} if children.exists() else set()


class Peak:
    """Samples the example's server sessions in the background; keeps the highest."""

    def __init__(self, example_db: ExampleDatabase) -> None:
        self.db, self.peak, self._done = example_db, 0, threading.Event()
        self._thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        while not self._done.is_set():
            self.peak = max(self.peak, default_sessions(self.db))
            self._done.wait(0.02)

    def __enter__(self) -> Peak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()


# -- gunicorn --preload: the master touched the database before forking -------------


@pytest.mark.parametrize("worker_class, master_closes", [("sync", False), ("gthread", True)])
def test_preload_workers_never_share_a_session_with_the_master_or_each_other(
    example_db: ExampleDatabase, tmp_path: Path, worker_class: str, master_closes: bool
) -> None:
    args = ["--preload", "--workers", "2", "--worker-class", worker_class]
    if worker_class == "gthread":
        args += ["--threads", "4"]
    with served_until_stopped(
        example_db, tmp_path, "pool_size=2&max_overflow=1&timeout=30", *args,
        ADV_MASTER_TOUCH="1", ADV_MASTER_CLOSES="1" if master_closes else "0",
    ) as served:
        master_backend = int((tmp_path / "master_backend").read_text())
        results = load(served.base, "/adv/whoami?ms=20", 80, 8)
        assert [s for s, _ in results] == [200] * 80, served.output()[-3000:]
        owners: dict[int, set[int]] = {}
        for _, body in results:
            owners.setdefault(body["backend"], set()).add(body["worker"])
        assert master_backend not in owners, served.output()[-3000:]
        shared = {b: w for b, w in owners.items() if len(w) > 1}
        assert not shared, f"server sessions used by several workers: {shared}"
        # The master's own session survived its children (none closed it under it).
        assert master_backend in app_backends(example_db)
        assert len({w for _, body in results for w in [body["worker"]]}) <= 2
    out = served.output()
    assert "Traceback" not in out, out[-3000:]


# -- HUP reload --------------------------------------------------------------------


def test_hup_reload_leaves_no_session_of_the_old_workers(
    example_db: ExampleDatabase, tmp_path: Path
) -> None:
    with served_until_stopped(
        example_db, tmp_path, "pool_size=2&max_overflow=1&timeout=30",
        "--workers", "2", "--worker-class", "gthread", "--threads", "4",
    ) as served:
        master = served.process.pid
        results = load(served.base, "/adv/whoami?ms=20", 60, 6)
        assert [s for s, _ in results] == [200] * 60
        old_workers = worker_pids(master)
        old_backends = app_backends(example_db)
        assert old_backends and len(old_workers) == 2
        os.kill(master, signal.SIGHUP)
        assert wait_until(lambda: len(worker_pids(master)) == 2
                          and not worker_pids(master) & old_workers, 30), served.output()
        results = load(served.base, "/adv/whoami?ms=20", 60, 6)
        assert [s for s, _ in results] == [200] * 60, served.output()[-3000:]
        assert {body["worker"] for _, body in results} <= worker_pids(master)
        assert not {body["backend"] for _, body in results} & old_backends
        # Every session of the old workers ends with them.
        assert wait_until(lambda: not app_backends(example_db) & old_backends), (
            app_backends(example_db) & old_backends)
        assert default_sessions(example_db) <= 2 * (2 + 1)


# -- --max-requests: workers recycled under load -------------------------------------


def test_max_requests_recycling_keeps_sessions_within_the_cap(
    example_db: ExampleDatabase, tmp_path: Path
) -> None:
    workers, pool_size, overflow = 2, 2, 1
    with served_until_stopped(
        example_db, tmp_path, f"pool_size={pool_size}&max_overflow={overflow}&timeout=30",
        "--workers", str(workers), "--worker-class", "gthread", "--threads", "4",
        "--max-requests", "15", "--max-requests-jitter", "0",
    ) as served:
        with Peak(example_db) as peak:
            results = load(served.base, "/adv/whoami?ms=10", 100, 6)
        statuses = [s for s, _ in results]
        recycled = len({body["worker"] for _, body in results})
        print(f"\n{recycled} worker processes served 100 requests; peak sessions {peak.peak}")
        assert statuses.count(200) == len(statuses), (statuses, served.output()[-3000:])
        assert recycled > workers  # they were recycled
        # A recycled worker's sessions can stay in pg_stat_activity a moment
        # after it closed them (its backends exit on their own time) while its
        # successor opens its own: one worker's worth of room for that.
        assert peak.peak <= (workers + 1) * (pool_size + overflow)
        assert wait_until(lambda: default_sessions(example_db) <= workers * pool_size), (
            default_sessions(example_db))


# -- a worker SIGKILLed mid-request ----------------------------------------------------


def test_sigkilled_worker_sessions_end_and_the_others_keep_serving(
    example_db: ExampleDatabase, tmp_path: Path
) -> None:
    with served_until_stopped(
        example_db, tmp_path, "pool_size=2&max_overflow=1&timeout=30",
        "--workers", "2", "--worker-class", "gthread", "--threads", "4",
    ) as served:
        master = served.process.pid
        owners: dict[int, set[int]] = {}
        for _, body in load(served.base, "/adv/whoami?ms=10", 40, 6):
            owners.setdefault(body["worker"], set()).add(body["backend"])
        victim = next(iter(worker_pids(master)))
        with ThreadPoolExecutor(8) as clients:
            slow = [clients.submit(get, served.base, "/adv/whoami?ms=1500") for _ in range(8)]
            time.sleep(0.6)
            # Its sessions, busy in pg_sleep right now, and those it made before.
            busy = {int(r[0]) for r in example_db.query(
                "SELECT pid FROM pg_stat_activity WHERE datname = %s "
                "AND query LIKE '%%pg_sleep%%' AND application_name LIKE 'exampleproject%%'",
                (example_db.name,))}
            os.kill(victim, signal.SIGKILL)
            outcomes = [f.result() for f in slow]
        victim_backends = owners.get(victim, set())
        assert all(body.get("worker") != victim for _, body in outcomes)
        # The killed worker's sessions end with it (the server sees the socket close).
        survivors = worker_pids(master)
        assert wait_until(lambda: not app_backends(example_db) & victim_backends), (
            victim_backends)
        results = load(served.base, "/adv/whoami?ms=10", 40, 6)
        assert [s for s, _ in results] == [200] * 40, served.output()[-3000:]
        assert busy
        assert victim not in worker_pids(master) and survivors
        assert default_sessions(example_db) <= 2 * (2 + 1)


# -- gthread: more threads than connections -------------------------------------------


def test_gthread_with_more_threads_than_connections_waits_and_never_fails(
    example_db: ExampleDatabase, tmp_path: Path
) -> None:
    served = gunicorn(example_db, tmp_path, "pool_size=1&max_overflow=1&timeout=30",
                      "--workers", "1", "--worker-class", "gthread", "--threads", "8")
    try:
        with Peak(example_db) as peak:
            results = load(served.base, "/adv/whoami?ms=40", 96, 16)
        assert [s for s, _ in results] == [200] * 96, served.output()[-3000:]
        assert len({body["backend"] for _, body in results}) <= 2 + 2  # overflow may reopen
        assert peak.peak <= 2
        pool: dict = {}

        def returned() -> bool:
            # The last responses' connections go back once gunicorn has closed them.
            _, stats = get(served.base, "/pool.json")
            (default,) = [a for a in stats["aliases"] if a["alias"] == "default"]
            pool.update(default["pools"][0])
            return pool["checked_out"] == 0

        assert wait_until(returned, 10), pool
        assert pool["timeouts"] == 0 and pool["waits"] > 0
        assert "PoolTimeout" not in served.output()
    finally:
        stop(served.process)


# -- graceful SIGTERM --------------------------------------------------------------------


@pytest.mark.parametrize("preload", [True])
def test_graceful_sigterm_closes_every_session_without_noise(
    example_db: ExampleDatabase, tmp_path: Path, preload: bool
) -> None:
    served = gunicorn(example_db, tmp_path, "pool_size=2&max_overflow=1&timeout=30",
                      "--workers", "2", "--worker-class", "gthread", "--threads", "4",
                      *(["--preload"] if preload else []), ADV_MASTER_TOUCH="1" if preload else "0",
                      ADV_MASTER_CLOSES="1")
    results = load(served.base, "/adv/whoami?ms=10", 40, 6)
    assert [s for s, _ in results] == [200] * 40
    assert example_db.sessions() >= 1
    # A request in flight when SIGTERM arrives finishes (graceful), then all ends.
    with ThreadPoolExecutor(1) as client:
        inflight = client.submit(get, served.base, "/adv/whoami?ms=3000")
        # In its query (not only sent: a loaded machine may not have accepted it yet).
        assert wait_until(lambda: sleeping_now(example_db) > 0, 2.5, interval=0.02)
        status = stop(served.process)
        assert inflight.result()[0] == 200
    assert status == 0, served.output()[-3000:]
    assert wait_until(lambda: example_db.sessions() == 0, 10), app_backends(example_db)
    out = served.output()
    for noise in ("terminating connection", "Traceback", "Exception ignored", "PoolError"):
        assert noise not in out, out[-3000:]


# -- uvicorn --workers 2, async views with the ORM ----------------------------------------


def test_uvicorn_two_workers_async_orm_views_stay_within_the_cap(
    example_db: ExampleDatabase, tmp_path: Path
) -> None:
    port, _ = free_addrport()
    served = start_server(
        [sys.executable, "-m", "uvicorn", "advasgi:application", "--host", "127.0.0.1",
         "--port", str(port), "--workers", "2", "--no-access-log"],
        env_for(example_db, tmp_path, "pool_size=2&max_overflow=1&timeout=30"),
        tmp_path / "uvicorn.log", port,
    )
    try:
        with Peak(example_db) as peak:
            results = load(served.base, "/adv/awhoami?ms=20", 120, 12)
        statuses = [s for s, _ in results]
        assert statuses == [200] * 120, served.output()[-3000:]
        assert all(body["products"] > 0 for _, body in results)
        workers = {body["worker"] for _, body in results}
        print(f"\nuvicorn: {len(workers)} workers, peak sessions {peak.peak}")
        assert peak.peak <= 2 * (2 + 1)
        # Each request gave its connection back: at rest within pool_size per worker.
        assert wait_until(lambda: default_sessions(example_db) <= 2 * 2), (
            default_sessions(example_db))
    finally:
        stop(served.process)
    out = served.output()
    assert "SynchronousOnlyOperation" not in out, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    assert wait_until(lambda: example_db.sessions() == 0), app_backends(example_db)


# -- gevent worker with --preload: the app was imported before gevent patched ----------


def overlapping(results: list[tuple[int, dict]]) -> list[tuple[int, int]]:
    """Pairs of requests of one worker that held the same server session at once."""
    spans: dict[tuple[int, int], list[tuple[float, float]]] = {}
    for _, body in results:
        spans.setdefault((body["worker"], body["backend"]), []).append(
            (body["started"], body["ended"]))
    clashes = []
    for key, runs in spans.items():
        runs.sort()
        pairs = zip(runs, runs[1:], strict=False)
        clashes += [key for (_, end), (start, _) in pairs if start < end]
    return clashes


@pytest.mark.parametrize("preload", ["no", "patched early", "patched late"])
def test_gevent_worker_with_max_idle_serves_and_never_lends_one_session_twice(
    example_db: ExampleDatabase, tmp_path: Path, preload: str
) -> None:
    # max_idle, as tests/example/test_gevent.py advises for greenlets; the
    # worker prewarms its pools (examples/gunicorn.conf.py, post_worker_init).
    # "patched late": --preload, gevent patching only in the worker (after the
    # fork, after Django was imported). Django's per-thread connections are
    # then one for all greenlets (DatabaseError "created in a thread can only
    # be used in that same thread", with the stock engine too: patch before
    # Django is imported, docs/guide/lending). The worker must still answer,
    # not freeze on the pool's locks.
    port, addrport = free_addrport()
    extra = {"ADV_GEVENT_EARLY": "1"} if preload == "patched early" else {}
    log = tmp_path / "server.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "--bind", addrport, "--graceful-timeout", "5",
             "--workers", "1", "--worker-class", "gevent", "--worker-connections", "64",
             *(["--preload"] if preload != "no" else []), "advwsgi"],
            cwd=EXAMPLES, stdout=out, stderr=subprocess.STDOUT, text=True,
            start_new_session=True,
            env=env_for(example_db, tmp_path,
                        "pool_size=2&max_overflow=1&timeout=30&max_idle=30", **extra),
        )
    base = f"http://127.0.0.1:{port}"
    answered = False
    try:
        # Generous: a worker boots in a few seconds.
        if preload == "patched late":
            # Answered at all (a 500: Django's thread-sharing check), and again.
            answered = wait_until(lambda: get(base, "/adv/whoami", timeout=3)[0] > 0, 15)
            assert answered, f"the worker froze:\n{log.read_text()[-3000:]}"
            assert get(base, "/pool.json", timeout=5)[0] == 200
            return
        answered = wait_until(lambda: get(base, "/adv/whoami", timeout=3)[0] == 200, 15)
        assert answered, f"the worker never answered:\n{log.read_text()[-3000:]}"
        with Peak(example_db) as peak:
            results = load(base, "/adv/whoami?ms=30", 90, 12)
        assert [s for s, _ in results] == [200] * 90, log.read_text()[-3000:]
        assert not overlapping(results)
        assert peak.peak <= 3
        _, stats = get(base, "/pool.json")
        (default,) = [a for a in stats["aliases"] if a["alias"] == "default"]
        (pool,) = default["pools"]
        assert pool["timeouts"] == 0 and pool["reclaimed"] == 0, pool
    finally:
        # A frozen worker would not heed SIGTERM: do not wait for it.
        stop(process, signal.SIGTERM if answered else signal.SIGKILL)
    assert "Reclaiming a connection" not in log.read_text()


# -- prometheus multiprocess mode while --max-requests recycles the workers ---------------


def test_metrics_of_recycled_workers_leave_the_live_gauges(
    example_db: ExampleDatabase, tmp_path: Path
) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    served = gunicorn(example_db, tmp_path, "pool_size=2&max_overflow=1&timeout=30",
                      "-c", "gunicorn.conf.py", "--workers", "2", "--threads", "4",
                      "--max-requests", "15", "--max-requests-jitter", "0",
                      ADV_METRICS="1", PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "metrics"),
                      POSTGRESPOOL_METRICS_INTERVAL="0.2")

    def scrape() -> dict[tuple[str, ...], float]:
        with urllib.request.urlopen(served.base + "/metrics", timeout=30) as response:
            text = response.read().decode()
        return {
            (s.name, *(f"{k}={v}" for k, v in sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples
        }

    try:
        results = load(served.base, "/adv/whoami?ms=5", 90, 4)
        assert [s for s, _ in results] == [200] * 90, served.output()[-3000:]
        assert len({body["worker"] for _, body in results}) > 2  # recycled
        time.sleep(1)
        figures: dict = {}

        def settled() -> bool:
            figures.update(scrape())
            limit = figures.get(("db_client_connection_max", "pool_name=default"))
            counts = sum(v for k, v in figures.items()
                         if k[0] == "db_client_connection_count" and "pool_name=default" in k)
            figures["_counts"] = counts
            # Only the live workers' pools: 2 x (2 + 1) at most; the 6 or
            # more workers that served the load and exited (each with a
            # limit of 3) are gone. A scrape is a request too, and recycles
            # a worker every 15: between the old one's exit and its
            # successor's prewarm only one live worker's pool is counted.
            return limit is not None and 3 <= limit <= 2 * 3 and counts <= 2 * 3
        assert wait_until(settled, 20, interval=0.25), {
            k: v for k, v in figures.items() if k[0] == "db_client_connection_max" or k == "_counts"}
    finally:
        stop(served.process)
