"""A django-debug-toolbar panel: this request's checkout of each pooled alias, and the pool.

Install ``django-postgrespool[debug-toolbar]``, keep ``django_postgrespool``
in ``INSTALLED_APPS`` (for the panel's template) and add the panel::

    from debug_toolbar.settings import PANELS_DEFAULTS

    DEBUG_TOOLBAR_PANELS = [*PANELS_DEFAULTS, "django_postgrespool.toolbar.PoolPanel"]

For each pooled alias the panel shows how long the request waited for its
connection, how long it has held it, where the connection came from (this
thread's last connection, an idle one, a hand-off from a returning request, a
new physical connection) and the pool's state at the end of the view.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from django_postgrespool.errors import missing_extra

try:
    from debug_toolbar.panels import Panel
except ImportError as error:  # the extra is not installed
    raise missing_extra(
        "The Debug Toolbar panel (django_postgrespool.toolbar)", "debug-toolbar", error
    ) from error
from django.http import HttpRequest, HttpResponse

__all__ = ["PoolPanel"]

SOURCES = {
    "affinity": "this thread's last connection",
    "idle": "an idle connection",
    "handoff": "handed over by a returning request",
    "new": "a new physical connection",
    "reclaimed": "reclaimed from a thread that ended without giving it back",
}

CheckoutInfo = Callable[[str], Mapping[str, Any] | None]


def _checkout_info() -> CheckoutInfo:
    import django_postgrespool

    found: CheckoutInfo | None = getattr(django_postgrespool, "checkout_info", None)
    return found if found is not None else (lambda alias: None)


def _aliases() -> list[str]:
    from django_postgrespool.checks import pooled_aliases

    return [alias for alias, _ in pooled_aliases()]


def _this_request(
    before: Mapping[str, Any] | None, now: Mapping[str, Any] | None, started: float
) -> str:
    """Tell whether ``now`` is a checkout of this request: "yes", "no" or "kept" (from before)."""
    if now is None:
        return "no"
    if "started" in now:  # when the core says when the checkout began
        return "yes" if float(now["started"]) >= started else "kept"
    if before is None:
        return "yes"
    same = before.get("source") == now.get("source") and before.get("wait") == now.get("wait")
    if same and before.get("returned") and now.get("returned") and before == now:
        return "no"
    if same and not before.get("returned") and not now.get("returned"):
        return "kept"  # still the connection an earlier request checked out (CONN_MAX_AGE)
    return "yes"


class PoolPanel(Panel):  # type: ignore[misc]
    """Each pooled alias: this request's checkout (wait, hold, source) and its pool's state."""

    title = "Connection pools"
    template = "django_postgrespool/toolbar/pool.html"

    def enable_instrumentation(self) -> None:
        info = _checkout_info()
        self._started = time.monotonic()
        self._before = {alias: _copy(info(alias)) for alias in _aliases()}

    def generate_stats(self, request: HttpRequest, response: HttpResponse) -> None:
        from django_postgrespool.registry import pool_stats

        info = _checkout_info()
        before: dict[str, dict[str, Any] | None] = getattr(self, "_before", {})
        started: float = getattr(self, "_started", float("-inf"))
        rows = []
        for alias in _aliases():
            now = _copy(info(alias))
            here = _this_request(before.get(alias), now, started)
            pools: list[dict[str, Any]] = [dict(p) for p in pool_stats(alias)]
            current = next((p for p in pools if not p.get("retired")), pools[0] if pools else None)
            row: dict[str, Any] = {"alias": alias, "checkout": here, "pool": None}
            if now is not None and here != "no":
                source = str(now.get("source", ""))
                row.update(
                    source=source,
                    source_text=SOURCES.get(source, source or "unknown"),
                    wait_ms=round(float(now.get("wait", 0.0)) * 1000, 3),
                    held_ms=round(float(now.get("held", 0.0)) * 1000, 3),
                    returned=bool(now.get("returned")),
                )
            if current is not None:
                cap = int(current["pool_size"]) + int(current["max_overflow"])
                row["pool"] = {
                    "used": int(current["checked_out"]),
                    "idle": int(current["idle"]),
                    "cap": cap,
                    "waiting": int(current.get("waiting") or 0),
                    "peak": int(current["peak_checked_out"]),
                    "checkouts": int(current["checkouts"]),
                    "waits": int(current["waits"]),
                    "timeouts": int(current["timeouts"]),
                    "opened": int(current["opened"]),
                    "pid": int(current["pid"]),
                    "retired_pools": sum(1 for p in pools if p.get("retired")),
                }
            rows.append(row)
        record: Callable[[dict[str, Any]], None] = self.record_stats
        record({"aliases": rows})

    @property
    def nav_subtitle(self) -> str:
        stats: Callable[[], dict[str, Any]] = self.get_stats
        rows = stats().get("aliases", [])
        used = [r for r in rows if r.get("checkout") in ("yes", "kept") and "wait_ms" in r]
        if not used:
            return "no checkout"
        return ", ".join(f"{r['alias']}: {r['source']} {r['wait_ms']:.1f} ms wait" for r in used)


def _copy(info: Mapping[str, Any] | None) -> dict[str, Any] | None:
    return None if info is None else dict(info)
