"""Under gunicorn (2 workers × 8 threads, --preload), every request succeeds within the connection cap.

One scrape of /metrics reports both workers' pools (prometheus_client's
multiprocess mode, examples/gunicorn.conf.py).
"""

from __future__ import annotations

import json
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.example.helpers import (
    ExampleDatabase,
    Served,
    example_env,
    free_addrport,
    start_server,
    stop,
)

# Served by real servers: in CI, in one lane per Django release and driver (Makefile).
pytestmark = pytest.mark.servers

WORKERS, THREADS = 2, 8
# Small pools, so that 8 threads per worker must share them: the URL's query
# string sets 'default' to 2 + 1; 'reports' has 2 + 1 in the settings.
CAP_PER_WORKER = (2 + 1) + (2 + 1)
REQUESTS = 400
CLIENTS = 24


@pytest.fixture(scope="module")
def gunicorn(example_db: ExampleDatabase, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    port, addrport = free_addrport()
    run = tmp_path_factory.mktemp("gunicorn")
    log = run / "gunicorn.log"
    served = start_server(
        [sys.executable, "-m", "gunicorn", "--workers", str(WORKERS), "--threads", str(THREADS),
         "--preload", "--bind", addrport, "--graceful-timeout", "5", "exampleproject.wsgi"],
        example_env(example_db.url + "?pool_size=2&max_overflow=1", WEB_CONCURRENCY=str(WORKERS),
                    PROMETHEUS_MULTIPROC_DIR=str(run / "metrics"),
                    POSTGRESPOOL_METRICS_INTERVAL="0.5"),
        log, port,
    )
    yield served
    stop(served.process)


def request(base: str, n: int) -> tuple[str, int]:
    kind = ("slow", "order", "list", "report", "stats")[n % 5]
    if kind == "order":
        body = json.dumps({"sku": "paper-filters", "quantity": 1, "customer": f"load-{n}"}).encode()
        req = urllib.request.Request(base + "/api/orders/", data=body, method="POST")
    else:
        path = {"slow": "/api/slow-query/?ms=30", "list": "/", "report": "/report/",
                "stats": "/pool.json"}[kind]
        req = urllib.request.Request(base + path)
    try:
        with urllib.request.urlopen(req, timeout=60) as response:
            response.read()
            return kind, response.status
    except urllib.error.HTTPError as error:
        return kind, error.code


def test_every_request_succeeds_and_sessions_stay_within_workers_times_cap(
    gunicorn: Served, example_db: ExampleDatabase
) -> None:
    peak, samples, done = 0, 0, threading.Event()

    def sample() -> None:
        nonlocal peak, samples
        while not done.is_set():
            peak = max(peak, example_db.sessions())
            samples += 1
            done.wait(0.01)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        with ThreadPoolExecutor(CLIENTS) as clients:
            results = list(clients.map(lambda n: request(gunicorn.base, n), range(REQUESTS)))
    finally:
        done.set()
        sampler.join()
    statuses = Counter(results)
    expected = {("slow", 200): 80, ("order", 201): 80, ("list", 200): 80, ("report", 200): 80,
                ("stats", 200): 80}
    assert statuses == expected, gunicorn.output()[-3000:]
    print(f"\npeak server sessions {peak} (cap {WORKERS} × {CAP_PER_WORKER}), {samples} samples")
    assert 2 <= peak <= WORKERS * CAP_PER_WORKER
    assert example_db.sessions() <= WORKERS * CAP_PER_WORKER
    # Every order was one committed transaction: 80 orders, 80 filters out of stock.
    assert example_db.query(
        "SELECT count(*) FROM shop_order WHERE customer LIKE 'load-%%'"
    ) == [(80,)]
    assert example_db.query("SELECT stock FROM shop_product WHERE sku = 'paper-filters'") == [(920,)]
    assert "PoolTimeout" not in gunicorn.output()


def test_each_worker_reports_its_own_pool_within_its_cap(gunicorn: Served) -> None:
    seen = {}
    for _ in range(40):
        with urllib.request.urlopen(gunicorn.base + "/pool.json", timeout=30) as response:
            stats = json.load(response)
        seen[stats["pid"]] = stats
        if len(seen) == WORKERS:
            break
    assert 1 <= len(seen) <= WORKERS
    for stats in seen.values():
        for entry in stats["aliases"]:
            for pool in entry["pools"]:
                assert pool["pid"] == stats["pid"]
                assert pool["peak_checked_out"] <= pool["pool_size"] + pool["max_overflow"] == 3
                assert pool["timeouts"] == 0


METRICS = [
    "db_client_connection_count", "db_client_connection_idle_max", "db_client_connection_idle_min",
    "db_client_connection_max", "db_client_connection_pending_requests",
    "db_client_connection_timeouts", "db_client_connection_create_time_seconds",
    "db_client_connection_wait_time_seconds", "db_client_connection_use_time_seconds",
]


def scrape(base: str) -> dict[str, dict[tuple[str, ...], float]]:
    """Return {family: {label values...: value}} of one scrape of /metrics."""
    with urllib.request.urlopen(base + "/metrics", timeout=30) as response:
        text = response.read().decode()
    out: dict[str, dict[tuple[str, ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = tuple(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out.setdefault(family.name, {})[(s.name, *key)] = s.value
    return out


def each_worker_pools(base: str) -> dict[int, list[dict]]:
    """Ask /pool.json until both workers have answered; return each one's pools."""
    seen: dict[int, list[dict]] = {}
    for _ in range(200):
        with urllib.request.urlopen(base + "/pool.json", timeout=30) as response:
            stats = json.load(response)
        seen[stats["pid"]] = [p for entry in stats["aliases"] for p in entry["pools"]]
        if len(seen) == WORKERS:
            break
    assert len(seen) == WORKERS, "one worker answered every request"
    return seen


def test_one_scrape_reports_every_worker_pools(gunicorn: Served) -> None:
    # Load both workers: each builds its pools; a scrape in the middle of it
    # has every metric.
    with ThreadPoolExecutor(CLIENTS) as clients:
        pending = [clients.submit(request, gunicorn.base, n) for n in range(60)]
        during = scrape(gunicorn.base)
        for future in pending:
            future.result()
    # At rest, each worker's pools hold still: the scrape, made of what every
    # worker's sampler last wrote (every 0.5 s) and the scraped worker's own
    # figures, must add up to what each worker says of itself.
    time.sleep(1)
    workers = each_worker_pools(gunicorn.base)
    expected: dict[tuple[str, str], float] = Counter()
    for pools in workers.values():
        for p in pools:
            expected[(p["alias"], "idle")] += p["idle"]
            expected[(p["alias"], "used")] += p["checked_out"]
    assert expected[("default", "idle")] >= 2  # both workers have idle connections
    deadline = time.monotonic() + 10
    while True:
        counts = scrape(gunicorn.base)["db_client_connection_count"]
        got = {
            (key[1].split("=", 1)[1], key[2].split("=", 1)[1]): value
            for key, value in counts.items()
        }
        if got == expected or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert got == expected
    limits = scrape(gunicorn.base)["db_client_connection_max"]
    assert limits[("db_client_connection_max", "pool_name=default")] == WORKERS * 3
    missing = [name for name in METRICS if name not in during]
    assert not missing, f"metrics absent from a scrape under load: {missing}"
