"""Under gunicorn (2 workers × 8 threads, --preload), every request succeeds within the connection cap."""

from __future__ import annotations

import json
import sys
import threading
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.example.helpers import (
    ExampleDatabase,
    Served,
    example_env,
    free_addrport,
    start_server,
    stop,
)

WORKERS, THREADS = 2, 8
# Small pools, so that 8 threads per worker must share them: the URL's query
# string sets 'default' to 2 + 1; 'reports' has 2 + 1 in the settings.
CAP_PER_WORKER = (2 + 1) + (2 + 1)
REQUESTS = 400
CLIENTS = 24


@pytest.fixture(scope="module")
def gunicorn(example_db: ExampleDatabase, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    port, addrport = free_addrport()
    log = tmp_path_factory.mktemp("gunicorn") / "gunicorn.log"
    served = start_server(
        [sys.executable, "-m", "gunicorn", "--workers", str(WORKERS), "--threads", str(THREADS),
         "--preload", "--bind", addrport, "--graceful-timeout", "5", "exampleproject.wsgi"],
        example_env(example_db.url + "?pool_size=2&max_overflow=1", WEB_CONCURRENCY=str(WORKERS)),
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
