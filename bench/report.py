"""The results table (Markdown), the target ratios and the chart ``bench.png``."""

from __future__ import annotations

import statistics

import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from alternatives import (
    ALTERNATIVES,
    FLEET_CONNS,
    FLEET_LABELS,
    FLEET_THREADS,
    FLEET_WORKERS,
    POOL_CAP,
)

WORKLOAD_LABELS = {
    "A-one": "A, in process, one query",
    "A-orm": "A, in process, a few ORM queries",
    "B-http": "B, HTTP: gunicorn gthread + wrk",
    "F-one": f"F, fleet in process: {FLEET_WORKERS} processes × {FLEET_THREADS} threads, SELECT 1",
    "F-http": f"F, fleet over HTTP: gunicorn {FLEET_WORKERS} workers × {FLEET_THREADS} threads + wrk",
}
# (alternative, workloads (None: every one), threads the target is read at,
# minimum ratio ours / alternative)
TARGETS = [
    ("persistent", ("A-one", "A-orm"), 1, 0.95),
    ("persistent", ("B-http",), 16, 0.95),
    ("native_pool", ("A-one", "A-orm"), 16, 1.2),
    ("native_pool", ("B-http",), 16, 1.0),
    ("dj_db_conn_pool", None, 16, 2.0),
    ("no_pooling", None, 16, 10.0),
]
# The in-process limit for 10 server connections: 10 threads on 10
# persistent connections (run.py adds this cell next to the 16-thread ones).
LIMIT_THREADS = 10
# The fleet (F-* workloads, 32 clients, FLEET_CONNS server connections in all):
# (alternative, minimum ratio ours / alternative).
FLEET_TARGETS = [("pgbouncer_persistent", 1.0), ("native_pool", 1.0)]
FLEET_CLIENTS = FLEET_WORKERS * FLEET_THREADS


def is_fleet(row: dict[str, Any]) -> bool:
    return str(row["workload"]).startswith("F-")


def display_name(alt: str, fleet: bool = False) -> str:
    """The name of ``alt`` in a table (ours in bold); ``fleet``: in the fleet's tables."""
    name = (FLEET_LABELS.get(alt) if fleet else None) or ALTERNATIVES[alt][0]
    return f"**{name}**" if alt == "ours" else name


def versions(drivers: list[str], venv_python: Callable[[str], Path]) -> dict[str, str]:
    """Return the versions of the packages that matter, per driver's virtualenv."""
    code = (
        "import importlib.metadata as m, platform\n"
        "names = ['Django', 'SQLAlchemy', 'psycopg', 'psycopg-pool', 'psycopg2-binary',\n"
        "         'django-db-connection-pool', 'gunicorn', 'django-postgrespool']\n"
        "out = ['Python ' + platform.python_version()]\n"
        "for n in names:\n"
        "    try: out.append(n + ' ' + m.version(n))\n"
        "    except m.PackageNotFoundError: pass\n"
        "print(', '.join(out))\n"
    )
    found = {}
    for driver in drivers:
        out = subprocess.run([str(venv_python(driver)), "-c", code], capture_output=True, text=True)
        found[driver] = out.stdout.strip()
    for tool, cmd in (("pgbouncer", ["pgbouncer", "--version"]), ("wrk", ["wrk", "--version"])):
        try:
            out = subprocess.run(cmd, capture_output=True, text=True)
            found[tool] = (out.stdout or out.stderr).splitlines()[0]
        except (OSError, IndexError):
            pass
    return found


def _index(rows: list[dict[str, Any]]) -> dict[tuple[str, str, str, int], dict[str, Any]]:
    return {(r["driver"], r["workload"], r["alt"], r["threads"]): r for r in rows}


def _keys(rows: list[dict[str, Any]], field: str) -> list[Any]:
    seen: list[Any] = []
    for r in rows:
        if r[field] not in seen:
            seen.append(r[field])
    return seen


def table(rows: list[dict[str, Any]]) -> str:
    """Return every cell as one Markdown table per workload and driver."""
    idx = _index(rows)
    out = []
    for workload in _keys(rows, "workload"):
        for driver in _keys(rows, "driver"):
            out.append(f"\n#### {WORKLOAD_LABELS[workload]} — {driver}\n")
            out.append("| alternative | clients | req/s | p50 ms | p99 ms | server conns | errors |")
            out.append("|---|---:|---:|---:|---:|---:|---:|")
            for alt in ALTERNATIVES:
                for level in sorted(_keys(rows, "threads")):
                    r = idx.get((driver, workload, alt, level))
                    if r is None:
                        continue
                    name = display_name(alt)
                    out.append(
                        f"| {name} | {level} | {r['rps']:.0f} | {r['p50_ms']:.2f} | "
                        f"{r['p99_ms']:.2f} | {r['server_conns']} | {r['errors']} |"
                    )
    return "\n".join(out)


def ratios(rows: list[dict[str, Any]]) -> tuple[str, list[str]]:
    """Return the ratio table (ours ÷ each alternative) and the list of missed targets."""
    rows = [r for r in rows if not is_fleet(r)]
    idx = _index(rows)
    levels = sorted(_keys(rows, "threads"))
    header = " | ".join(f"{n} clients" for n in levels)
    out = [
        f"| ours ÷ | workload | driver | {header} | target | met |",
        "|---|---|---|" + "---:|" * len(levels) + "---|---|",
    ]
    missed = []
    for alt, workloads, at, minimum in TARGETS:
        for workload in _keys(rows, "workload"):
            if workloads is not None and workload not in workloads:
                continue
            for driver in _keys(rows, "driver"):
                cells = []
                for level in levels:
                    ours = idx.get((driver, workload, "ours", level))
                    other = idx.get((driver, workload, alt, level))
                    cells.append(f"{ours['rps'] / other['rps']:.2f}" if ours and other and other["rps"]
                                 else "–")
                ours = idx.get((driver, workload, "ours", at))
                other = idx.get((driver, workload, alt, at))
                if not ours or not other or not other["rps"] or not ours["rps"]:
                    verdict = "–"
                else:
                    ratio = ours["rps"] / other["rps"]
                    ok = ratio >= minimum
                    if alt == "native_pool" and ours["server_conns"] > POOL_CAP:
                        ok = False
                    verdict = "yes" if ok else "**no**"
                    if not ok:
                        missed.append(
                            f"{workload} {driver}: ours ÷ {alt} at {at} clients = {ratio:.2f}, "
                            f"target ≥ {minimum} (short by {minimum / ratio - 1:.0%})"
                        )
                out.append(
                    f"| {ALTERNATIVES[alt][0]} | {workload} | {driver} | {' | '.join(cells)} | "
                    f"≥ {minimum}× at {at}"
                    f"{f', ≤ {POOL_CAP} conns' if alt == 'native_pool' else ''} | {verdict} |"
                )
    return "\n".join(out), missed


def pool_figures(rows: list[dict[str, Any]]) -> list[str]:
    """Return the pool's own figures: its tax per request, and how near the limit it runs."""
    idx = _index(rows)
    out = []
    for workload in ("A-one", "A-orm"):
        for driver in _keys(rows, "driver"):
            ours, persistent = idx.get((driver, workload, "ours", 1)), idx.get(
                (driver, workload, "persistent", 1))
            if ours and persistent and ours["rps"] and persistent["rps"]:
                tax = 1e6 / ours["rps"] - 1e6 / persistent["rps"]
                out.append(
                    f"- {workload} {driver}, 1 client: the pool's tax is {tax:.1f} µs per request "
                    f"({1e6 / ours['rps']:.1f} µs against {1e6 / persistent['rps']:.1f} µs "
                    f"with a persistent connection)."
                )
            limit = idx.get((driver, workload, "persistent", LIMIT_THREADS))
            if limit and limit["rps"]:
                parts = [
                    f"{ALTERNATIVES[alt][0]} {r['rps'] / limit['rps']:.2f}"
                    for alt in ("ours", "native_pool")
                    if (r := idx.get((driver, workload, alt, 16))) and r["rps"]
                ]
                out.append(
                    f"- {workload} {driver}, 16 threads on {POOL_CAP} connections, as a fraction "
                    f"of the limit ({LIMIT_THREADS} threads on {LIMIT_THREADS} persistent "
                    f"connections, {limit['rps']:.0f} req/s): {', '.join(parts)}."
                )
    for driver in _keys(rows, "driver"):
        ours, metrics = idx.get((driver, "A-one", "ours", 1)), idx.get(
            (driver, "A-one", "ours_metrics", 1))
        if ours and metrics and ours["rps"] and metrics["rps"]:
            out.append(
                f"- A-one {driver}, 1 client: exporting metrics (OpenTelemetry SDK, Prometheus) "
                f"costs {1e6 / metrics['rps'] - 1e6 / ours['rps']:.1f} µs per request."
            )
    for driver in _keys(rows, "driver"):
        ours, native = idx.get((driver, "B-http", "ours", 64)), idx.get(
            (driver, "B-http", "native_pool", 64))
        if ours and native:
            verdict = "no worse" if ours["p99_ms"] <= native["p99_ms"] else "**worse**"
            out.append(
                f"- B-http {driver}, 64 clients: p99 {ours['p99_ms']:.2f} ms against Django's "
                f"pool's {native['p99_ms']:.2f} ms ({verdict})."
            )
    return out


METRICS_TARGET_US = 2.0


def cycle_figures(cycle: dict[str, list[float]]) -> list[str]:
    """What metrics add to the pool's checkout → checkin (bench/cycle.py), per cycle."""
    if not cycle or not cycle.get("off"):
        return []
    off = cycle["off"]
    out = [
        f"- The pool's checkout → checkin on a real connection, median of {len(off)} alternating "
        f"rounds: {statistics.median(off):.2f} µs with no exporter."
    ]
    for mode, what in (
        ("merge", "OpenTelemetry SDK, histograms fed from the pool's counts (the default)"),
        ("replay", "OpenTelemetry SDK, every timing recorded (the fallback)"),
    ):
        runs = cycle.get(mode) or []
        if runs:
            extra = statistics.median([m - o for m, o in zip(runs, off, strict=False)])
            verdict = ""
            if mode == "merge":
                verdict = (" (target ≤ 2 µs per request: met)" if extra <= METRICS_TARGET_US
                           else " (target ≤ 2 µs per request: **missed**)")
            out.append(f"  - {what}: {statistics.median(runs):.2f} µs, {extra:+.2f} µs per "
                       f"cycle with one collection included{verdict}.")
    return out


def tax_figures(tax: dict[str, list[dict[str, float]]]) -> list[str]:
    """The pool's tax inside a real request (bench/tax.py): medians of the alternating rounds."""
    base, ours = tax.get("persistent") or [], tax.get("ours") or []
    if not base or not ours:
        return []

    def median(variant: str, key: str) -> float:
        return statistics.median(r[key] for r in tax[variant])

    def cost(variant: str, label: str) -> str:
        cpu = median(variant, "cpu_us")
        return f"{cpu:.1f} µs {label} ({cpu - median('persistent', 'cpu_us'):+.1f} µs)"

    variants = [cost("ours", "with ours")]
    if tax.get("ours_no_ping"):
        variants.append(cost("ours_no_ping", "with pre_ping=False"))
    lines = [
        f"- The pool's tax inside a real request (bench/tax.py: one thread, the one-query request "
        f"through Django's request signals; process CPU time per request, median of {len(ours)} "
        f"alternating round(s)): {median('persistent', 'cpu_us'):.1f} µs with a persistent "
        f"connection, {', '.join(variants)}."
    ]
    lines.append(
        f"  - Phase by phase: borrowing (ensure_connection) {median('ours', 'borrow_us'):.1f} µs "
        f"against {median('persistent', 'borrow_us'):.1f}, the request's end (request_finished, "
        f"the connection given back) {median('ours', 'end_us'):.1f} µs against "
        f"{median('persistent', 'end_us'):.1f}."
    )
    return lines


def fleet_cpu(rows: list[dict[str, Any]], wake: dict[str, float]) -> list[str]:
    """Where an F-one request's CPU time goes, per alternative (run.py's accounting)."""
    idx = _index([r for r in rows if r["workload"] == "F-one" and "client_cpu_us" in r])
    cells = [(alt, idx.get(("psycopg", "F-one", alt, FLEET_CLIENTS))) for alt in ALTERNATIVES]
    cells = [(alt, r) for alt, r in cells if r is not None]
    if not cells:
        return []
    out = [
        "### Where a request's CPU time goes (F-one)",
        "",
        "CPU time over the whole run of each cell (warm-up included) ÷ the requests served: the "
        "Django processes (user + system), every PostgreSQL process, every PgBouncer process; "
        "context switches of the Django processes (in brackets those where the CPU was taken "
        "from them, the others are waits); the machine's CPU time left idle. Means of the rounds.",
        "",
        "| alternative | Django processes µs | PostgreSQL µs | PgBouncer µs | total µs "
        "| context switches | machine idle |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for alt, r in cells:
        name = display_name(alt, fleet=True)
        bouncer = r.get("bouncer_cpu_us", 0.0)
        idle = f"{r['idle_share']:.1%}" if "idle_share" in r else ""
        switches = f"{r['switches']:.2f}"
        if "preempted" in r:
            switches += f" ({r['preempted']:.2f})"
        out.append(
            f"| {name} | {r['client_cpu_us']:.0f} | {r['server_cpu_us'] - bouncer:.0f} "
            f"| {bouncer:.0f} | {r['client_cpu_us'] + r['server_cpu_us']:.0f} "
            f"| {switches} | {idle} |"
        )
    ours = dict(cells).get("ours")
    if ours is not None and "pool_waits" in ours:
        out += [
            "",
            f"Our pools' checkouts: {ours['pool_affinity_hits']:.1%} took the thread's own "
            f"last connection, {ours['pool_waits']:.1%} waited at the cap, "
            f"{ours['pool_handoffs']:.1%} were handed a connection given back.",
        ]
    if wake:
        out += [
            "",
            f"Waking a sleeping thread costs {wake['thread_us']:.1f} µs of CPU on this machine, "
            f"a process {wake['process_us']:.1f} µs (bench/wake.py, median of 3).",
        ]
    return ["", *out]


def _paired(ours: dict[str, Any] | None, other: dict[str, Any]) -> str:
    """Ours ÷ ``other`` round by round (each round runs both, back to back): median (least–most).

    The machine's load moves between rounds more than between two cells of
    one round: the spread of these ratios says how far one run's ratio can be trusted.
    """
    if ours is None:
        return ""
    pairs = [a / b for a, b in zip(ours.get("round_rps", ()), other.get("round_rps", ())) if a and b]
    if len(pairs) < 2:
        return ""
    return f"{statistics.median(pairs):.2f} ({min(pairs):.2f}–{max(pairs):.2f})"


def fleet_ratios(rows: list[dict[str, Any]]) -> tuple[str, list[str]]:
    """Return the fleet's table (every alternative, ours ÷ it) and the missed targets."""
    rows = [r for r in rows if is_fleet(r)]
    if not rows:
        return "", []
    idx = _index(rows)
    out = [
        "| alternative | workload | req/s | p50 ms | p99 ms | peak server conns | errors "
        "| ours ÷ it | per round | target | met |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|---|---|",
    ]
    missed = []
    targets = dict(FLEET_TARGETS)
    for workload in _keys(rows, "workload"):
        for alt in ALTERNATIVES:
            r = idx.get(("psycopg", workload, alt, FLEET_CLIENTS))
            if r is None:
                continue
            ours = idx.get(("psycopg", workload, "ours", FLEET_CLIENTS))
            ratio = ours["rps"] / r["rps"] if ours and r["rps"] and alt != "ours" else None
            target, verdict = "", ""
            if alt in targets and ratio is not None:
                minimum = targets[alt]
                ok = ratio >= minimum and ours is not None and ours["server_conns"] <= FLEET_CONNS
                target, verdict = f"≥ {minimum}×", "yes" if ok else "**no**"
                if not ok:
                    missed.append(
                        f"{workload}: ours ÷ {alt} = {ratio:.2f}, target ≥ {minimum} "
                        f"(short by {minimum / ratio - 1:.0%})"
                    )
            name = display_name(alt, fleet=True)
            per_round = _paired(ours, r) if ratio is not None else ""
            out.append(
                f"| {name} | {workload} | {r['rps']:.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} "
                f"| {r['server_conns']} | {r['errors']} | "
                f"{'' if ratio is None else f'{ratio:.2f}'} | {per_round} | {target} | {verdict} |"
            )
    txn = []
    for workload in _keys(rows, "workload"):
        mine = idx.get(("psycopg", workload, "ours_txn", FLEET_CLIENTS))
        parts = [
            f"{ALTERNATIVES[alt][0]} {mine['rps'] / r['rps']:.2f}"
            for alt in ("pgbouncer_persistent", "native_pool", "ours")
            if mine and (r := idx.get(("psycopg", workload, alt, FLEET_CLIENTS))) and r["rps"]
        ]
        if parts:
            txn.append(f"- {workload}: ours with lease='transaction' ÷ {', ÷ '.join(parts)}.")
    if txn:
        out += ["", *txn]
    out += ceiling(idx)
    return "\n".join(out), missed


def ceiling(idx: dict[tuple[str, str, str, int], dict[str, Any]]) -> list[str]:
    """F-one's reference row read against PgBouncer's clients: what no pool at all serves.

    One persistent direct connection per thread is what an in-process pool
    that cost nothing would be: it ÷ PgBouncer's clients bounds what any
    in-process pool can reach against them on this machine.
    """
    direct, bouncer = (idx.get(("psycopg", "F-one", alt, FLEET_CLIENTS))
                       for alt in ("persistent", "pgbouncer_persistent"))
    if not (direct and bouncer and direct["rps"] and bouncer["rps"]):
        return []
    per_round = _paired(direct, bouncer)
    return [
        "",
        f"- F-one, the ceiling of any in-process pool: no pool at all (a direct persistent "
        f"connection per thread, {direct['server_conns']} server connections) served "
        f"{direct['rps'] / bouncer['rps']:.2f}× PgBouncer's clients"
        + (f" (per round {per_round})" if per_round else "")
        + "; ours ÷ it is in the table.",
    ]


def rst(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """Return the README's results: req/s (peak server connections) per alternative and level."""
    fleet = [r for r in rows if is_fleet(r)]
    rows = [r for r in rows if not is_fleet(r)]
    idx = _index(rows)
    levels = sorted(_keys(rows, "threads"))
    out = []
    for workload in _keys(rows, "workload"):
        for driver in _keys(rows, "driver"):
            title = f"{WORKLOAD_LABELS[workload]} — {driver}"
            out += [f".. list-table:: {title}: requests/s (peak server connections)",
                    "   :header-rows: 1", "",
                    "   * - alternative", *[f"     - {n} clients" for n in levels]]
            for alt in ALTERNATIVES:
                cells = [idx.get((driver, workload, alt, n)) for n in levels]
                if not any(cells):
                    continue
                name = display_name(alt)
                out.append(f"   * - {name}")
                for c in cells:
                    text = f"{c['rps']:.0f} ({c['server_conns']})" if c else "–"
                    if c and c["errors"]:
                        text += f", {c['errors']} errors"
                    out.append(f"     - {text}")
            out.append("")
    if fleet:
        fidx = _index(fleet)
        workloads = _keys(fleet, "workload")
        out += [
            f".. list-table:: The fleet, {FLEET_CONNS} server connections in all: requests/s, "
            "p50 / p99 ms (peak server connections)",
            "   :header-rows: 1", "",
            "   * - alternative", *[f"     - {WORKLOAD_LABELS[w]}" for w in workloads],
        ]
        for alt in ALTERNATIVES:
            cells = [fidx.get(("psycopg", w, alt, FLEET_CLIENTS)) for w in workloads]
            if not any(cells):
                continue
            out.append(f"   * - {display_name(alt, fleet=True)}")
            for c in cells:
                text = (f"{c['rps']:.0f}, {c['p50_ms']:.1f} / {c['p99_ms']:.1f} "
                        f"({c['server_conns']})") if c else "–"
                if c and c["errors"]:
                    text += f", {c['errors']} errors"
                out.append(f"     - {text}")
        out.append("")
    return "\n".join(out)


def chart(path: Path, rows: list[dict[str, Any]]) -> None:
    """Draw throughput against clients, one panel per workload × driver."""
    rows = [r for r in rows if not is_fleet(r)]
    if not rows:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    idx = _index(rows)
    workloads, drivers = _keys(rows, "workload"), _keys(rows, "driver")
    levels = sorted(_keys(rows, "threads"))
    fig, axes = plt.subplots(
        len(workloads), len(drivers), figsize=(5.5 * len(drivers), 3.6 * len(workloads)),
        squeeze=False, sharex=True,
    )
    for i, workload in enumerate(workloads):
        for j, driver in enumerate(drivers):
            ax = axes[i][j]
            for alt in ALTERNATIVES:
                points = [(n, idx[(driver, workload, alt, n)]["rps"]) for n in levels
                          if (driver, workload, alt, n) in idx]
                if not points:
                    continue
                xs, ys = zip(*points)
                # One colour per alternative in every panel (psycopg2 has no native pool).
                ax.plot(xs, ys, marker="o", label=ALTERNATIVES[alt][0],
                        linewidth=2.6 if alt == "ours" else 1.3,
                        color="black" if alt == "ours" else f"C{list(ALTERNATIVES).index(alt)}")
            ax.set_xscale("log", base=2)
            ax.set_xticks(levels)
            ax.set_xticklabels([str(n) for n in levels])
            ax.set_ylim(bottom=0)
            ax.set_title(f"{WORKLOAD_LABELS[workload]} — {driver}", fontsize=9)
            ax.set_ylabel("requests/s")
            ax.grid(alpha=0.3)
            if i == len(workloads) - 1:
                ax.set_xlabel("concurrent clients (threads / connections)")
    seen: dict[str, Any] = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(label, handle)
    labels = [ALTERNATIVES[a][0] for a in ALTERNATIVES if ALTERNATIVES[a][0] in seen]
    handles = [seen[label] for label in labels]
    # Two columns: the longest labels do not fit three to a row at this width.
    legend_rows = -(-len(labels) // 2)
    fig.legend(handles, labels, loc="upper center", ncol=2, fontsize=9, frameon=False)
    height = fig.get_size_inches()[1]
    fig.tight_layout(rect=(0, 0, 1, 1 - (0.2 * legend_rows + 0.15) / height))
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def write(out: Path, meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """Write ``results.md`` and ``bench.png`` into ``out``; return the Markdown."""
    ratio_table, missed = ratios(rows)
    fleet_table, fleet_missed = fleet_ratios(rows)
    missed += fleet_missed
    ab = [r for r in rows if not is_fleet(r)]
    fleet_rounds = meta.get("fleet_rounds", meta["rounds"])
    lines = [
        "# make bench: results",
        "",
        *([
            f"Pool cap {meta['pool_cap']} server connections for every pooled alternative; "
            f"{meta['rounds']} round(s) of {meta['duration_s']} s per cell after "
            f"{meta['warmup_s']} s warm-up, alternatives alternating.",
            f"Workload B serves {meta['http_target']}.",
        ] if ab else []),
        *([
            f"The fleet: {FLEET_CONNS} server connections in all for every alternative; "
            f"{fleet_rounds} round(s) of {meta['duration_s']} s per cell (F-http: "
            f"{max(2, round(meta['duration_s']))} s) after {meta['warmup_s']} s warm-up "
            f"(F-http: 1 s), alternatives alternating; F-http serves {meta['http_target']} "
            "with a new connection per request.",
            *([
                "With --split-cpus: PostgreSQL and PgBouncer on one CPU, the Django processes "
                "and wrk on the others, as if they were two machines.",
            ] if meta.get("split_cpus") else []),
        ] if len(ab) < len(rows) else []),
        f"{meta['elapsed_s']} s in all. Machine load at the end: `{meta['uptime']}`.",
        "",
        "Versions: " + "; ".join(f"{k}: {v}" for k, v in meta["versions"].items()),
        "",
        *([
            "## Ratios (throughput of ours ÷ the alternative's)",
            "",
            ratio_table,
            "",
            "## The pool's own figures",
            "",
            *pool_figures(rows),
            *cycle_figures(meta.get("cycle") or {}),
            *tax_figures(meta.get("tax") or {}),
            "",
        ] if ab else []),
        *([
            f"## The fleet: {FLEET_WORKERS} processes × {FLEET_THREADS} threads, "
            f"{FLEET_CONNS} server connections in all (psycopg 3)",
            "",
            fleet_table,
            *fleet_cpu(rows, meta.get("wake") or {}),
            "",
        ] if fleet_table else []),
        "## Every cell",
        table(rows),
        "",
    ]
    if missed:
        lines[lines.index("## Every cell"):lines.index("## Every cell")] = [
            "Targets missed:", "", *[f"- {m}" for m in missed], "",
        ]
    text = "\n".join(lines)
    (out / "results.md").write_text(text)
    (out / "results.rst").write_text(rst(meta, rows))
    chart(out / "bench.png", rows)
    return text
