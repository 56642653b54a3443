"""The /pool/ page in a real headless Chromium: gauges that match /pool.json, under load and at rest.

The screenshot of the saturated pool is kept as .cache/pool-page.png (CI's
artifact; docs/_static/pool-page.png is a copy of one).
"""

from __future__ import annotations

import json
import re
import shutil
import struct
import subprocess
import sys
import threading
import time
import urllib.request
import zlib
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

import pytest

from tests.example.helpers import (
    ROOT,
    ExampleDatabase,
    Served,
    example_env,
    free_addrport,
    start_server,
    stop,
)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SCREENSHOT = ROOT / ".cache" / "pool-page.png"
WIDTH = 1280
# 'default' gets 2 + 1 connections from the URL; 'reports' has 2 + 1 in the settings.
CAP = 3

# Served by real servers: in CI, in one lane per Django release and driver (Makefile).
pytestmark = pytest.mark.servers


@pytest.fixture(scope="module")
def site(example_db: ExampleDatabase, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    port, addrport = free_addrport()
    log = tmp_path_factory.mktemp("pool-page") / "runserver.log"
    served = start_server(
        [sys.executable, "manage.py", "runserver", "--noreload", addrport],
        example_env(example_db.url + "?pool_size=2&max_overflow=1",
                    POSTGRESPOOL_METRICS_INTERVAL="0.5"),
        log, port,
    )
    yield served
    stop(served.process)


def chromium(*args: str) -> str:
    """Run headless Chromium at 1280 px wide; return its standard output."""
    assert CHROMIUM is not None
    result = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         "--no-first-run", "--disable-dev-shm-usage", f"--window-size={WIDTH},820", *args],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


class Cards(HTMLParser):
    """The data-* attributes of each alias's card in a DOM."""

    def __init__(self) -> None:
        super().__init__()
        self.cards: dict[str, dict[str, str]] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "section" and "card" in a.get("class", "") and "data-used" in a:
            self.cards[a["data-alias"]] = a


def cards(dom: str) -> dict[str, dict[str, int | str]]:
    parser = Cards()
    parser.feed(dom)
    return {
        alias: {"used": int(a["data-used"]), "idle": int(a["data-idle"]),
                "cap": int(a["data-cap"]), "waiting": int(a["data-waiting"]),
                "status": a["data-status"]}
        for alias, a in parser.cards.items()
    }


def pool_json(base: str) -> dict[str, dict[str, int]]:
    with urllib.request.urlopen(base + "/pool.json", timeout=30) as response:
        stats = json.load(response)
    out = {}
    for entry in stats["aliases"]:
        pools = entry["pools"]
        if pools:
            out[entry["alias"]] = {
                "used": sum(p["checked_out"] for p in pools),
                "idle": sum(p["idle"] for p in pools),
                "cap": pools[0]["pool_size"] + pools[0]["max_overflow"],
                "waiting": sum(p["waiting"] for p in pools),
            }
    return out


def get(base: str, path: str) -> None:
    with urllib.request.urlopen(base + path, timeout=60) as response:
        response.read()


def png_rows(path: Path) -> tuple[int, int, list[bytes]]:
    """Decode an 8-bit RGB(A), non-interlaced PNG (Chromium's): width, height, pixel rows."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, header = 8, b"", b""
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            header = body
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", header)
    assert (depth, interlace) == (8, 0) and colour in (2, 6)
    bpp = 4 if colour == 6 else 3
    raw, stride, rows, previous = zlib.decompress(idat), width * bpp, [], bytearray(width * bpp)
    for y in range(height):
        kind, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            left = line[i - bpp] if i >= bpp else 0
            up, corner = previous[i], previous[i - bpp] if i >= bpp else 0
            if kind == 1:
                line[i] = (line[i] + left) & 0xFF
            elif kind == 2:
                line[i] = (line[i] + up) & 0xFF
            elif kind == 3:
                line[i] = (line[i] + (left + up) // 2) & 0xFF
            elif kind == 4:
                p = left + up - corner
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - corner)
                pred = left if pa <= pb and pa <= pc else up if pb <= pc else corner
                line[i] = (line[i] + pred) & 0xFF
        rows.append(bytes(line[j] for j in range(stride) if j % bpp < 3))
        previous = line
    return width, height, rows


def test_saturated_pool_is_shown_in_red_with_its_waiters_and_fits_1280px(site: Served) -> None:
    get(site.base, "/report/")  # the 'reports' alias builds its pool
    stop_load = threading.Event()
    errors: list[BaseException] = []

    def client() -> None:
        try:
            for _ in range(60):  # bounded: at most 60 × 0.4 s of holding per client
                if stop_load.is_set():
                    return
                get(site.base, "/api/slow-query/?ms=400")
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    clients = [threading.Thread(target=client) for _ in range(8)]
    for c in clients:
        c.start()
    try:
        # 8 clients on 3 connections: let the sampler draw some seconds of it.
        deadline = time.monotonic() + 20
        while pool_json(site.base)["default"]["waiting"] < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(5)
        SCREENSHOT.parent.mkdir(exist_ok=True)
        chromium(f"--screenshot={SCREENSHOT}", site.base + "/pool/?refresh=0")
        loaded = cards(chromium("--dump-dom", site.base + "/pool/?refresh=0"))
        stats = pool_json(site.base)
    finally:
        stop_load.set()
        for c in clients:
            c.join()
    assert not errors, errors
    busy = loaded["default"]
    # Every connection is lent and checkouts queue: what the page and the
    # JSON agree on while requests keep coming (the waiting count moves).
    assert (busy["used"], busy["idle"], busy["cap"]) == (CAP, 0, CAP)
    assert (stats["default"]["used"], stats["default"]["cap"]) == (CAP, CAP)
    assert busy["waiting"] >= 1 and busy["status"] == "saturated"
    width, height, rows = png_rows(SCREENSHOT)
    assert width == WIDTH
    white = b"\xff\xff\xff"
    touching = [y for y, row in enumerate(rows) if row[-3 * 12:] != white * 12]
    assert not touching, f"the page runs into the right edge at 1280 px (rows {touching[:5]}...)"


def test_at_rest_the_gauges_equal_pool_json(site: Served) -> None:
    get(site.base, "/api/slow-query/?ms=1")
    deadline = time.monotonic() + 10
    while True:  # a request gives its connection back after its response is sent
        stats = pool_json(site.base)
        if all(s["used"] == 0 for s in stats.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    dom = chromium("--dump-dom", site.base + "/pool/?refresh=0")
    shown = {alias: {k: v for k, v in c.items() if k != "status"} for alias, c in cards(dom).items()}
    assert shown == stats
    assert re.search(r'<svg class="chart"[^>]*>.*<path class="used"', dom, re.S)
    assert "<script" not in dom.split("<body", 1)[1]  # no JavaScript: server-side SVG only
