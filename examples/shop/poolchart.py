"""Server-side SVG of the /pool/ page: a gauge per alias and a chart of its last minutes."""

from __future__ import annotations

import time
from collections.abc import Sequence

from django.utils.safestring import SafeString, mark_safe

from shop.poolhistory import KEEP_SECONDS, Sample

COLOURS = {"ok": "#2e7d32", "busy": "#ef6c00", "saturated": "#c62828"}


def state(used: int, cap: int, waiting: int) -> str:
    """Return "saturated" (every connection used, or checkouts waiting), "busy" (≥ 75 %) or "ok"."""
    if waiting > 0 or (cap and used >= cap):
        return "saturated"
    if cap and used >= 0.75 * cap:
        return "busy"
    return "ok"


def gauge(used: int, idle: int, cap: int, pool_size: int, status: str) -> SafeString:
    """A horizontal bar: used, then idle, then room up to the cap; a tick at pool_size."""
    width, height = 420, 28
    scale = width / max(cap, used + idle, 1)
    used_w, idle_w = used * scale, idle * scale
    tick = pool_size * scale
    uc, ty, h2 = COLOURS[status], height + 11, height + 16
    return mark_safe(  # numbers only
        f'<svg class="gauge-bar" width="{width}" height="{h2}" viewBox="0 -2 {width} {h2}" '
        f'role="img" aria-label="{used} used, {idle} idle, cap {cap}">'
        f'<rect x="0" y="0" width="{width}" height="{height}" rx="4" fill="#eceff1"/>'
        f'<rect class="used" x="0" y="0" width="{used_w:.1f}" height="{height}" fill="{uc}"/>'
        f'<rect class="idle" x="{used_w:.1f}" y="0" width="{idle_w:.1f}" height="{height}" '
        'fill="#a5d6a7"/>'
        f'<line x1="{tick:.1f}" x2="{tick:.1f}" y1="-2" y2="{height}" stroke="#455a64" '
        'stroke-width="2"/>'
        f'<text x="{min(max(tick, 30), width - 30):.1f}" y="{ty}" font-size="10" '
        f'text-anchor="middle" fill="#455a64">pool_size {pool_size}</text></svg>'
    )


def chart(samples: Sequence[Sample], cap: int) -> SafeString:
    """Lines of used and waiting connections (left axis) and wait p95 (right axis, ms)."""
    width, height, left, right, top, bottom = 640, 200, 36, 52, 10, 24
    plot_w, plot_h = width - left - right, height - top - bottom
    now = time.time()
    # The window grows with the history, from 30 s to KEEP_SECONDS.
    span = min(max(now - samples[0].at if samples else 0, 30), KEEP_SECONDS)
    start = now - span
    y_max = max([cap, 1, *(s.used + s.waiting for s in samples), *(s.waiting for s in samples)])
    p95s = [s.wait_p95 * 1000 for s in samples if s.wait_p95 is not None]
    ms_max = _nice(max(p95s)) if p95s else 10.0

    def x(at: float) -> float:
        return left + plot_w * (at - start) / span

    def y(value: float, top_value: float) -> float:
        return top + plot_h * (1 - value / top_value)

    def line(values: list[tuple[float, float]], colour: str, name: str, dash: str = "") -> str:
        if not values:
            return ""
        path = " ".join(f"{'M' if i == 0 else 'L'}{px:.1f},{py:.1f}" for i, (px, py) in
                        enumerate(values))
        return (f'<path class="{name}" d="{path}" fill="none" stroke="{colour}" '
                f'stroke-width="2"{dash}/>')

    parts = [
        f'<svg class="chart" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        f'role="img" aria-label="the last {span:.0f} seconds">',
        f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="#fafafa" '
        'stroke="#cfd8dc"/>',
    ]
    for value in (0, y_max / 2, y_max):  # left axis: connections
        py = y(value, y_max)
        parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{py:.1f}" y2="{py:.1f}" '
                     'stroke="#eceff1"/>')
        parts.append(f'<text x="{left - 4}" y="{py + 4:.1f}" font-size="10" text-anchor="end" '
                     f'fill="#37474f">{value:g}</text>')
    for value in (0, ms_max / 2, ms_max):  # right axis: ms
        py = y(value, ms_max)
        parts.append(f'<text x="{left + plot_w + 4}" y="{py + 4:.1f}" font-size="10" '
                     f'fill="#ef6c00">{value:g} ms</text>')
    cap_y = y(cap, y_max)
    parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{cap_y:.1f}" y2="{cap_y:.1f}" '
                 'stroke="#c62828" stroke-dasharray="4 3"/>')
    parts.append(f'<text x="{left + 4}" y="{cap_y + 12:.1f}" font-size="10" fill="#c62828">'
                 f"cap {cap}</text>")
    step = 60 if span > 120 else 10
    for ago in range(0, int(span) + 1, step):  # time axis
        px = x(now - ago)
        label = "now" if ago == 0 else f"-{ago // 60} min" if step == 60 else f"-{ago} s"
        parts.append(f'<text x="{px:.1f}" y="{height - 8}" font-size="10" text-anchor="middle" '
                     f'fill="#37474f">{label}</text>')
    parts.append(line([(x(s.at), y(s.used, y_max)) for s in samples], "#1565c0", "used"))
    parts.append(line([(x(s.at), y(s.waiting, y_max)) for s in samples], "#c62828", "waiting"))
    parts.append(line([(x(s.at), y(s.wait_p95 * 1000, ms_max)) for s in samples
                       if s.wait_p95 is not None], "#ef6c00", "p95", ' stroke-dasharray="5 3"'))
    parts.append("</svg>")
    return mark_safe("".join(parts))  # every value above is a number we formatted


def _nice(value: float) -> float:
    """Round up to 1, 2 or 5 times a power of ten."""
    if value <= 0:
        return 10.0
    magnitude = 10 ** len(str(int(value))) / 10 if value >= 1 else 1.0
    for step in (1, 2, 5, 10):
        if value <= step * magnitude:
            return float(step * magnitude)
    return float(10 * magnitude)
