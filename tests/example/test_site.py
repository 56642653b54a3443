"""The example shop, served by runserver over pooled connections, end to end over HTTP."""

from __future__ import annotations

import http.cookiejar
import json
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator

import django
import pytest

from tests.example.helpers import (
    ExampleDatabase,
    Served,
    example_env,
    free_addrport,
    start_server,
    stop,
)
from tests.support.pgcluster import PASSWORD

# Served by real servers: in CI, in one lane per Django release and driver (Makefile).
pytestmark = pytest.mark.servers

# Django 4.2's runserver keeps the connection its migration check opened in
# its main thread (later versions close it, see "Close all connections opened
# during migration checking" in runserver.py): one pooled connection stays
# checked out for the server's life.
HELD_BY_RUNSERVER = 1 if django.VERSION < (5, 0) else 0


@pytest.fixture(scope="module")
def site(example_db: ExampleDatabase, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    port, addrport = free_addrport()
    log = tmp_path_factory.mktemp("runserver") / "runserver.log"
    served = start_server(
        [sys.executable, "manage.py", "runserver", "--noreload", addrport],
        example_env(example_db.url), log, port,
    )
    yield served
    stop(served.process)


class Browser:
    """A client with cookies, as a browser keeps the CSRF cookie."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.opener = urllib.request.build_opener(
            urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar())
        )

    def get(self, path: str) -> tuple[int, str, str]:
        return self._open(urllib.request.Request(self.base + path))

    def post(self, path: str, data: dict[str, str] | None = None, *, body: bytes | None = None,
             referer: str | None = None) -> tuple[int, str, str]:
        payload = body if body is not None else urllib.parse.urlencode(data or {}).encode()
        request = urllib.request.Request(self.base + path, data=payload, method="POST")
        if referer:
            request.add_header("Referer", self.base + referer)
        return self._open(request)

    def _open(self, request: urllib.request.Request) -> tuple[int, str, str]:
        try:
            with self.opener.open(request, timeout=30) as response:
                return response.status, response.geturl(), response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.geturl(), error.read().decode()


def stock(db: ExampleDatabase, sku: str) -> int:
    return int(db.query("SELECT stock FROM shop_product WHERE sku = %s", (sku,))[0][0])


def test_pages_render_from_pooled_connections(site: Served) -> None:
    browser = Browser(site.base)
    for path, expected in [
        ("/", "Espresso cup"),
        ("/products/hand-grinder/", "Hand grinder"),
        ("/report/", "Sales report"),
        ("/admin/login/", "Django administration"),
    ]:
        status, _, html = browser.get(path)
        assert (status, expected in html) == (200, True), (path, html[:500])


def test_order_form_takes_stock_and_records_order_in_one_transaction(
    site: Served, example_db: ExampleDatabase
) -> None:
    browser = Browser(site.base)
    before = stock(example_db, "pour-over-kettle")
    status, _, form = browser.get("/products/pour-over-kettle/")
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', form)
    assert status == 200 and token
    status, url, html = browser.post(
        "/products/pour-over-kettle/order/",
        {"csrfmiddlewaretoken": token.group(1), "customer": "Ada", "quantity": "3"},
        referer="/products/pour-over-kettle/",
    )
    order_id = int(re.search(r"/orders/(\d+)/$", url).group(1))  # type: ignore[union-attr]
    assert status == 200
    assert "3</td>" in html and "Ada" in html and "117.00" in html
    assert stock(example_db, "pour-over-kettle") == before - 3
    assert example_db.query(
        "SELECT customer, total FROM shop_order WHERE id = %s", (order_id,)
    ) == [("Ada", pytest.approx(117))]


def test_out_of_stock_order_is_refused_and_leaves_nothing_behind(
    site: Served, example_db: ExampleDatabase
) -> None:
    browser = Browser(site.base)
    orders = example_db.query("SELECT count(*) FROM shop_order")[0][0]
    status, _, body = browser.post(
        "/api/orders/", body=json.dumps({"sku": "last-one", "quantity": 2}).encode()
    )
    assert (status, json.loads(body)) == (
        409, {"error": "out of stock: Signed barista apron (last one): 1 in stock, 2 asked for"}
    )
    assert stock(example_db, "last-one") == 1
    assert example_db.query("SELECT count(*) FROM shop_order")[0][0] == orders


def test_pool_page_shows_every_alias_and_its_counters(site: Served) -> None:
    browser = Browser(site.base)
    assert browser.get("/report/")[0] == 200  # the 'reports' alias builds its pool
    for _ in range(3):
        assert browser.get("/api/slow-query/?ms=10")[0] == 200
    # A request gives its connection back at request_finished, which runs once
    # the response has been sent: the client may already be reading this page.
    deadline = time.monotonic() + 10
    while True:
        status, _, body = browser.get("/pool.json")
        assert status == 200
        stats = json.loads(body)
        busy = sum(p["checked_out"] for a in stats["aliases"] for p in a["pools"])
        if busy == HELD_BY_RUNSERVER or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    by_alias = {entry["alias"]: entry for entry in stats["aliases"]}
    assert sorted(by_alias) == ["default", "reports"]
    [default] = by_alias["default"]["pools"]
    [reports] = by_alias["reports"]["pools"]
    assert (default["pool_size"], default["max_overflow"]) == (5, 10)  # DATABASE_POOL_ARGS
    assert (reports["pool_size"], reports["max_overflow"]) == (2, 1)  # its POOL_OPTIONS
    assert default["checkouts"] >= 3
    assert default["checked_out"] == HELD_BY_RUNSERVER
    assert reports["checked_out"] == 0 and reports["idle"] == reports["size"] == 1
    assert default["idle"] == default["size"] - HELD_BY_RUNSERVER >= 1
    assert default["opened"] == default["size"] + default["closed"]
    assert {"waits", "timeouts", "recycled", "invalidated", "overflow"} <= set(default)
    assert stats["pid"] == default["pid"] == reports["pid"]
    status, _, html = browser.get("/pool/")
    assert status == 200
    assert f"Connection pools of process {stats['pid']}" in html
    assert re.search(r'<section class="card ok" id="pool-reports" data-alias="reports"\s+'
                     r'data-used="0" data-idle="1" data-cap="3"', html)
    assert re.search(r'<div class="target">postgres@127\.0\.0\.1:\d+/example_\w+', html)
    assert "pool_size=2 max_overflow=1 timeout=30.0s recycle=300.0" in html


def test_password_appears_in_no_page_and_no_server_output(site: Served) -> None:
    browser = Browser(site.base)
    pages = [browser.get(path)[2] for path in ("/pool/", "/pool.json", "/", "/report/")]
    for text in [*pages, site.output()]:
        assert PASSWORD not in text
        assert "s3cret" not in text


def test_report_lists_products_by_sales_with_unsold_ones_last(site: Served) -> None:
    browser = Browser(site.base)
    status, _, _ = browser.post(
        "/api/orders/", body=json.dumps({"sku": "espresso-cup", "quantity": 1}).encode()
    )
    assert status == 201
    status, _, html = browser.get("/report/")
    assert status == 200
    rows = re.findall(r"<tr><td>([^<]+)</td><td class=\"num\">(\d+)</td>", html)
    sold = [int(n) for _, n in rows]
    names = [name for name, _ in rows]
    assert "Espresso cup" in names and "Paper filters (100)" in names
    assert sold[0] > 0 and sold[-1] == 0  # sold products first, unsold (NULL sum) last
    assert sold == sorted(sold, reverse=True), rows
