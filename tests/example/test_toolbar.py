"""The debug toolbar's pool panel, rendered for a real request of the example (DEBUG on)."""

from __future__ import annotations

import json
import re
import sys
import urllib.request
from collections.abc import Iterator

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


@pytest.fixture(scope="module")
def debug_site(example_db: ExampleDatabase, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    port, addrport = free_addrport()
    log = tmp_path_factory.mktemp("toolbar") / "runserver.log"
    served = start_server(
        [sys.executable, "manage.py", "runserver", "--noreload", addrport],
        example_env(example_db.url, DJANGO_DEBUG="1"), log, port,
    )
    yield served
    stop(served.process)


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.read().decode()


def panel(base: str, page: str) -> str:
    """Load ``page``, then the pool panel the toolbar recorded for that request."""
    html = get(base + page)
    request_id = re.search(r'data-request-id="([0-9a-f]+)"', html)
    assert request_id, "no debug toolbar on the page"
    assert 'id="djdt-PoolPanel"' in html or "PoolPanel" in html
    answer = json.loads(get(
        f"{base}/__debug__/render_panel/?request_id={request_id.group(1)}&panel_id=PoolPanel"
    ))
    return answer["content"]


def row(content: str, alias: str) -> str:
    found = re.search(rf'<tr data-alias="{alias}".*?</tr>', content, re.S)
    assert found, content
    return found.group(0)


def test_panel_shows_the_request_checkout_and_the_pool_state(debug_site: Served) -> None:
    content = panel(debug_site.base, "/")  # the product list: one query on 'default'
    default = row(content, "default")
    assert 'data-checkout="yes"' in default
    source = re.search(r'data-source="(\w+)"', default)
    assert source and source.group(1) in {"affinity", "idle", "handoff", "new"}
    assert re.search(r'class="djpp-wait">[\d.]+ ms<', default)
    assert re.search(r'class="djpp-held">[\d.]+ ms<', default)
    # Seen from the end of the view: this request's connection is still lent.
    used, idle, cap = map(int, re.search(  # type: ignore[union-attr]
        r'class="djpp-state">(\d+) / (\d+) / (\d+)', default).groups())
    assert used >= 1 and cap == 15
    # The 'reports' alias was not used by this request.
    assert "no checkout in this request" in row(content, "reports")
    assert PASSWORD not in content


def test_panel_says_a_request_without_a_query_checked_nothing_out(debug_site: Served) -> None:
    content = panel(debug_site.base, "/pool/?refresh=0")
    assert "no checkout in this request" in row(content, "default")
