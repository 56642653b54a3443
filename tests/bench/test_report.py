"""The benchmark harness's arithmetic: merging rounds, ratios against the targets.

The benchmark itself runs with ``make bench`` (CI runs ``make bench QUICK=1``);
these tests only pin how its numbers are turned into the table.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import report  # noqa: E402
from alternatives import (  # noqa: E402
    ALTERNATIVES,
    FLEET_CONNS,
    FLEET_THREADS,
    FLEET_WORKERS,
    POOL_CAP,
    alternatives_for,
    database_settings,
)
from run import aggregate  # noqa: E402

DB = {
    "host": "127.0.0.1", "port": 5432, "user": "u", "password": "p", "database": "bench",
    "pgbouncer_port": 6432, "driver": "psycopg",
}


def row(alt: str, threads: int, rps: float, conns: int = 4) -> dict[str, object]:
    return {
        "driver": "psycopg", "workload": "A-one", "alt": alt, "threads": threads, "rps": rps,
        "p50_ms": 1.0, "p99_ms": 2.0, "server_conns": conns, "errors": 0,
    }


def test_rounds_are_merged_into_one_row_per_cell() -> None:
    cell = {"driver": "psycopg", "workload": "A-one", "alt": "ours", "threads": 4,
            "seconds": 2.0, "server_conns": 3, "errors": 0, "first_error": None}
    rows = aggregate([
        {**cell, "requests": 1000, "p50_ms": 1.0, "p99_ms": 3.0},
        {**cell, "requests": 3000, "p50_ms": 2.0, "p99_ms": 5.0, "server_conns": 4, "errors": 1},
    ])
    assert len(rows) == 1
    r = rows[0]
    assert (r["rounds"], r["rps"], r["p50_ms"], r["p99_ms"]) == (2, 1000.0, 1.5, 4.0)
    assert (r["server_conns"], r["errors"]) == (4, 1)


def test_a_missed_target_says_by_how_much() -> None:
    _, missed = report.ratios([row("ours", 1, 800), row("persistent", 1, 1000)])
    assert missed == [
        "A-one psycopg: ours ÷ persistent at 1 clients = 0.80, target ≥ 0.95 (short by 19%)"
    ]


def test_native_pool_target_needs_no_more_server_connections_than_the_cap() -> None:
    rows = [row("ours", 16, 2000, conns=POOL_CAP + 1), row("native_pool", 16, 1000)]
    _, missed = report.ratios(rows)
    assert len(missed) == 1 and "native_pool at 16 clients = 2.00" in missed[0]
    _, missed = report.ratios([row("ours", 16, 2000, conns=POOL_CAP), row("native_pool", 16, 1000)])
    assert missed == []


@pytest.mark.parametrize("driver", ["psycopg", "psycopg2"])
def test_every_alternative_of_a_driver_has_a_databases_entry(driver: str) -> None:
    names = alternatives_for(driver)
    assert ("native_pool" in names) == (driver == "psycopg")
    for name in names:
        entry = database_settings(name, {**DB, "driver": driver})
        assert entry["OPTIONS"]["application_name"] == f"bench-{name}"
    assert set(ALTERNATIVES) >= set(names)
    assert database_settings("ours", DB)["POOL_OPTIONS"] == {"pool_size": POOL_CAP, "max_overflow": 0}
    assert database_settings("pgbouncer", DB)["PORT"] == "6432"


def test_fleet_alternatives_get_5_connections_per_worker_or_20_in_pgbouncer() -> None:
    fleet = {**DB, "cap": FLEET_CONNS // FLEET_WORKERS, "pgbouncer_port": 6433}
    assert alternatives_for("psycopg", fleet=True) == [
        "persistent", "native_pool", "pgbouncer", "pgbouncer_persistent", "ours_pgbouncer", "ours",
        "ours_txn",
    ]
    # The ceiling's reference: one direct connection per thread, no pool.
    direct = database_settings("persistent", fleet)
    assert (direct["PORT"], direct["CONN_MAX_AGE"]) == ("5432", None)
    assert direct["ENGINE"] == "django.db.backends.postgresql" and "POOL_OPTIONS" not in direct
    assert "pgbouncer_persistent" not in alternatives_for("psycopg")
    assert "ours_txn" not in alternatives_for("psycopg")
    assert database_settings("ours_txn", fleet)["POOL_OPTIONS"] == {
        "pool_size": 5, "max_overflow": 0, "lease": "transaction"}
    ours = database_settings("ours", fleet)
    assert (ours["PORT"], ours["POOL_OPTIONS"]) == ("5432", {"pool_size": 5, "max_overflow": 0})
    assert database_settings("native_pool", fleet)["OPTIONS"]["pool"]["max_size"] == 5
    bounced = database_settings("pgbouncer_persistent", fleet)
    assert bounced["PORT"] == "6433" and bounced["CONN_MAX_AGE"] is None
    assert bounced["DISABLE_SERVER_SIDE_CURSORS"] is True
    assert bounced["OPTIONS"]["prepare_threshold"] is None
    both = database_settings("ours_pgbouncer", fleet)
    assert both["PORT"] == "6433" and both["POOL_OPTIONS"]["pool_size"] == 5
    assert both["DISABLE_SERVER_SIDE_CURSORS"] is True


def test_fleet_ratios_compare_ours_with_pgbouncer_and_djangos_pool() -> None:
    def fleet(alt: str, rps: float, workload: str = "F-http") -> dict[str, object]:
        return {**row(alt, FLEET_WORKERS * FLEET_THREADS, rps, conns=FLEET_CONNS),
                "workload": workload}

    rows = [fleet("ours", 900), fleet("pgbouncer_persistent", 1000), fleet("native_pool", 600)]
    table, missed = report.fleet_ratios(rows + [row("ours", 4, 1.0)])
    assert missed == ["F-http: ours ÷ pgbouncer_persistent = 0.90, target ≥ 1.0 (short by 11%)"]
    assert "| Django's pool (OPTIONS['pool']) | F-http | 600 |" in table
    # The fleet's rows stay out of the per-level ratio table.
    assert "F-http" not in report.ratios(rows)[0]


def test_fleet_ratios_pair_the_rounds_ours_against_each_alternative() -> None:
    cell = {"driver": "psycopg", "workload": "F-one", "threads": FLEET_WORKERS * FLEET_THREADS,
            "seconds": 2.0, "server_conns": FLEET_CONNS, "errors": 0, "first_error": None,
            "p50_ms": 1.0, "p99_ms": 2.0}
    ours = [2000, 1800, 2400]  # req/s of each round
    bouncer = [2000, 2000, 2000]
    cells = [
        {**cell, "alt": alt, "requests": rps * 2}
        for round_ in range(3)
        for alt, rps in (("ours", ours[round_]), ("pgbouncer_persistent", bouncer[round_]))
    ]
    # A round whose cell could not be measured (0 requests) pairs with nothing.
    cells.append({**cell, "alt": "ours", "requests": 0})
    cells.append({**cell, "alt": "pgbouncer_persistent", "requests": 5000})
    rows = aggregate(cells)
    assert next(r for r in rows if r["alt"] == "ours")["round_rps"] == [2000, 1800, 2400, 0]
    table, _ = report.fleet_ratios(rows)
    # ours ÷ it over all rounds 1550 ÷ 2125, round by round 1.0, 0.9, 1.2: median (least–most).
    assert "| 0.73 | 1.00 (0.90–1.20) | ≥ 1.0× | **no** |" in table


def test_the_fleet_reads_no_pool_at_all_as_the_ceiling_of_an_in_process_pool() -> None:
    clients = FLEET_WORKERS * FLEET_THREADS
    cell = {"driver": "psycopg", "workload": "F-one", "threads": clients, "seconds": 2.0,
            "errors": 0, "first_error": None, "p50_ms": 1.0, "p99_ms": 2.0}
    rounds = {
        "ours": [1800, 1900], "pgbouncer_persistent": [2000, 2000], "persistent": [2100, 1900],
    }
    rows = aggregate([
        {**cell, "alt": alt, "requests": rps * 2,
         "server_conns": clients if alt == "persistent" else FLEET_CONNS}
        for alt, each in rounds.items() for rps in each
    ])
    table, missed = report.fleet_ratios(rows)
    # Over the budget, it is a reference: its row says so, and no target is read against it.
    assert (f"| no pool: a direct connection per thread ({clients} server connections, over the "
            f"budget) | F-one | 2000 | 1.00 | 2.00 | {clients} | 0 | 0.93 | 0.93 (0.86–1.00) "
            f"|  |  |" in table)
    assert [m.split(" ÷ ")[1].split(" ")[0] for m in missed] == ["pgbouncer_persistent"]
    # 2000 ÷ 2000 over the run; round by round 2100 ÷ 2000 and 1900 ÷ 2000.
    assert table.endswith(
        f"- F-one, the ceiling of any in-process pool: no pool at all (a direct persistent "
        f"connection per thread, {clients} server connections) served 1.00× PgBouncer's "
        f"clients (per round 1.00 (0.95–1.05)); ours ÷ it is in the table."
    )
    # Without both cells, no line.
    assert "ceiling" not in report.fleet_ratios([r for r in rows if r["alt"] != "persistent"])[0]


def test_cycle_figures_give_what_metrics_add_per_request_against_the_target() -> None:
    cycle = {"off": [2.0, 2.2, 2.1], "merge": [2.1, 2.3, 2.2], "replay": [15.0, 16.0, 15.5]}
    text = "\n".join(report.cycle_figures(cycle))
    assert "median of 3 alternating rounds: 2.10 µs with no exporter" in text
    assert "2.20 µs, +0.10 µs per cycle with one collection included (target ≤ 2 µs per request: met)" in text
    assert "15.50 µs, +13.40 µs per cycle" in text
    slow = {"off": [2.0], "merge": [5.0]}
    assert "**missed**" in "\n".join(report.cycle_figures(slow))
    assert report.cycle_figures({}) == []


def test_tax_figures_give_the_medians_against_a_persistent_connection() -> None:
    def run(cpu: float, borrow: float, end: float) -> dict[str, float]:
        return {"cpu_us": cpu, "borrow_us": borrow, "end_us": end}

    tax = {
        "persistent": [run(120, 0.5, 20), run(118, 0.4, 21), run(125, 0.6, 22)],
        "ours": [run(141, 14, 30), run(150, 15, 31), run(139, 13, 29)],
        "ours_no_ping": [run(133, 9, 30), run(130, 8, 30), run(136, 10, 31)],
    }
    text = "\n".join(report.tax_figures(tax))
    assert "median of 3 alternating round(s)): 120.0 µs with a persistent connection" in text
    assert "141.0 µs with ours (+21.0 µs), 133.0 µs with pre_ping=False (+13.0 µs)." in text
    assert "borrowing (ensure_connection) 14.0 µs against 0.5" in text
    assert "the connection given back) 30.0 µs against 21.0." in text
    assert report.tax_figures({}) == []


def test_the_fleets_cpu_per_request_is_averaged_over_rounds_and_tabled() -> None:
    cell = {"driver": "psycopg", "workload": "F-one", "alt": "ours",
            "threads": FLEET_WORKERS * FLEET_THREADS, "seconds": 3.0, "server_conns": 20,
            "errors": 0, "first_error": None, "requests": 3000, "p50_ms": 1.0, "p99_ms": 2.0}
    rows = aggregate([
        {**cell, "client_cpu_us": 200.0, "server_cpu_us": 50.0, "bouncer_cpu_us": 0.0,
         "switches": 2.5, "preempted": 0.5, "idle_share": 0.01, "pool_waits": 0.05, "pool_handoffs": 0.04,
         "pool_affinity_hits": 0.9},
        {**cell, "client_cpu_us": 220.0, "server_cpu_us": 70.0, "bouncer_cpu_us": 0.0,
         "switches": 2.7, "preempted": 0.7, "idle_share": 0.03, "pool_waits": 0.07, "pool_handoffs": 0.06,
         "pool_affinity_hits": 0.92},
        {**cell, "alt": "pgbouncer_persistent", "client_cpu_us": 150.0, "server_cpu_us": 80.0,
         "bouncer_cpu_us": 30.0, "switches": 1.6},
        {**cell, "workload": "F-http"},  # over HTTP: no CPU figures
    ])
    ours = next(r for r in rows if r["alt"] == "ours")
    assert (ours["client_cpu_us"], ours["server_cpu_us"]) == (210.0, 60.0)
    assert ours["switches"] == pytest.approx(2.6)
    assert "client_cpu_us" not in next(r for r in rows if r["workload"] == "F-http")
    text = "\n".join(report.fleet_cpu(rows, {"thread_us": 19.6, "process_us": 24.9}))
    assert "| **django-postgrespool** | 210 | 60 | 0 | 270 | 2.60 (0.60) | 2.0% |" in text
    # PostgreSQL's share and PgBouncer's, apart; the total has both. An
    # older run's cell, without the machine's idle time (nor the preemptions), leaves it blank.
    assert "| PgBouncer, persistent clients | 150 | 50 | 30 | 230 | 1.60 |  |" in text
    assert ("Our pools' checkouts: 91.0% took the thread's own last connection, 6.0% waited "
            "at the cap, 5.0% were handed a connection given back.") in text
    assert "Waking a sleeping thread costs 19.6 µs of CPU" in text
    assert report.fleet_cpu([r for r in rows if r["workload"] == "F-http"], {}) == []


def test_wake_measures_a_thread_and_a_process_wake_up() -> None:
    import wake

    us, switches = wake.thread_wakes(200)
    assert us > 0 and switches > 0
    us, switches = wake.process_wakes(200)
    assert us > 0 and switches > 0


def test_server_cpu_counts_postgresql_and_pgbouncer_processes_only() -> None:
    from run import server_cpu, server_processes

    # A process the kernel names "postgres" (PR_SET_NAME: its comm) is found and
    # counted with all of its CPU time. The machine-wide sum is read from one
    # snapshot: other lanes' servers start and end meanwhile (an ending process
    # takes its time with it), so two readings' difference proves nothing here.
    # This process (a Python one, as the child) is not counted.
    burner = textwrap.dedent("""
        import ctypes, sys, time
        ctypes.CDLL(None).prctl(15, b"postgres", 0, 0, 0)
        deadline = time.process_time() + 0.3
        while time.process_time() < deadline:
            pass
        print("burnt", flush=True)
        time.sleep(60)
    """)
    child = subprocess.Popen([sys.executable, "-c", burner], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "burnt"
        processes = server_processes()
    finally:
        child.kill()
        child.wait()
    name, fields = processes[child.pid]
    assert name == "postgres"
    tick = os.sysconf("SC_CLK_TCK")
    assert (int(fields[11]) + int(fields[12])) / tick >= 0.3 - 0.02  # the clock's ticks
    assert os.getpid() not in processes
    assert {name for name, _ in processes.values()} <= {"postgres", "pgbouncer"}
    cpu = server_cpu(processes)
    assert set(cpu) == {"postgres", "pgbouncer"}
    assert cpu["postgres"] == pytest.approx(sum(
        int(f[11]) + int(f[12]) for n, f in processes.values() if n == "postgres") / tick)
    assert cpu["postgres"] >= 0.3 - 0.02
    assert set(server_cpu()) == {"postgres", "pgbouncer"}  # a reading of its own


def test_machine_ticks_count_idle_time_within_all_time() -> None:
    from run import machine_ticks

    idle0, total0 = machine_ticks()
    time.sleep(0.1)  # this process sleeps: the machine's clock ticks on
    idle1, total1 = machine_ticks()
    assert 0 < idle0 <= total0
    assert total1 > total0 and 0 <= idle1 - idle0 <= total1 - total0


def test_split_cpus_needs_two_cpus_and_gives_the_first_to_the_servers(monkeypatch) -> None:
    import run

    monkeypatch.setattr(run.os, "sched_getaffinity", lambda pid: {3, 1, 2})
    assert run.split_cpus() == ({1}, {2, 3})
    monkeypatch.setattr(run.os, "sched_getaffinity", lambda pid: {0})
    with pytest.raises(run.HarnessError, match="--split-cpus needs two CPUs"):
        run.split_cpus()


def test_pin_servers_moves_a_server_and_its_children_only(tmp_path) -> None:
    import run

    cpus = sorted(os.sched_getaffinity(0))
    # Processes named "postgres" (what /proc says): a "postmaster" and its
    # child; and a third one, named so too, that is not theirs.
    fake = tmp_path / "postgres"
    shutil.copy(shutil.which("sh"), fake)
    server = subprocess.Popen([str(fake), "-c", f"{fake} -c 'sleep 30; :' & wait"])
    stranger = subprocess.Popen([str(fake), "-c", "sleep 30; :"])
    try:
        deadline = time.monotonic() + 5
        child = None
        while child is None and time.monotonic() < deadline:
            child = next((
                pid for pid, (_, fields) in run.server_processes().items()
                if fields[1] == str(server.pid)
            ), None)
            time.sleep(0.02)
        assert child is not None, "the fake server's child did not start"
        pidfile = tmp_path / "postmaster.pid"
        pidfile.write_text(f"{server.pid}\n/data\n")
        run.pin_servers({cpus[0]}, [pidfile])
        assert os.sched_getaffinity(server.pid) == {cpus[0]}
        assert os.sched_getaffinity(child) == {cpus[0]}
        assert os.sched_getaffinity(stranger.pid) == set(cpus)
        with pytest.raises(run.HarnessError, match="no pid in"):
            run.pin_servers({cpus[0]}, [tmp_path / "missing.pid"])
    finally:
        for p in (server, stranger):
            p.kill()
            p.wait()
        subprocess.run(["pkill", "-f", f"{fake} -c sleep"], check=False)
