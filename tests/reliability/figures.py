"""The figures the reliability suite measures, and the report that ends its run.

Each test calls :func:`record` with what it measured; ``conftest.py`` prints
every recorded figure in one screen at the end of the session (and writes
them as JSON to ``$RELIABILITY_REPORT`` when that is set, for CI).
"""

from __future__ import annotations

import json
import os
from typing import Any

# {section: {name: (value, unit)}}, in the order recorded.
_figures: dict[str, dict[str, tuple[Any, str]]] = {}


def record(section: str, name: str, value: Any, unit: str = "") -> None:
    """Keep one figure for the report, and print it (visible with ``-s``)."""
    _figures.setdefault(section, {})[name] = (value, unit)
    print(f"[figure] {section}: {name} = {_fmt(value)}{unit and ' ' + unit}")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def report_lines() -> list[str]:
    """Return the report, one line per section."""
    lines = []
    width = max((len(s) for s in _figures), default=0)
    for section, figures in _figures.items():
        parts = [f"{name}={_fmt(v)}{u}" for name, (v, u) in figures.items()]
        lines.append(f"{section:<{width}}  " + ", ".join(parts))
    return lines


def write_json(path: str) -> None:
    data = {s: {n: {"value": v, "unit": u} for n, (v, u) in f.items()} for s, f in _figures.items()}
    with open(path, "w") as fh:
        json.dump(data, fh, indent=2, default=str)


def has_figures() -> bool:
    return bool(_figures)


def report_path() -> str | None:
    return os.environ.get("RELIABILITY_REPORT") or None
