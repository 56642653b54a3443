"""Adversarial review of the legacy backend's ping watch and _silent_since (Python 2.7 lane).

Run by tests/legacy/run.py with its other checks (``-k SUBSTRING`` to pick).
Each test runs a scenario of watch_probe.py on Django 1.6 against the
lane's own PostgreSQL. Four of them
failed on the watch as first written (6 Dec, evening): an interrupt as its
thread started, two exits (tracebacks of the watch thread at the
interpreter's exit), a connection given back by garbage collection.
"""
from __future__ import annotations

import json
import os
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tests.legacy.run import Lane

DATABASE = "postgrespool_legacy"  # run.py's, which creates it

PROBE = Path(__file__).resolve().parent / "watch_probe.py"
SHUTDOWN_NOISE = ("Exception in thread", "Traceback", "most likely raised during interpreter")


def run_probe(lane: Lane, python: Path, scenario: str, *args: str,
              **env: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [str(python), str(PROBE), str(lane.port), DATABASE, scenario, *args],
        env={**os.environ, "LEGACY_DB_PASSWORD": lane.password, "PYTHONDONTWRITEBYTECODE": "1",
             **env},
        capture_output=True, text=True, timeout=120,
    )
    lane.outputs.append(done.stdout + done.stderr)
    return done


def watch(lane: Lane, scenario: str, *args: str, **env: str) -> list[dict[str, object]]:
    """The report of watch_probe.py's ``scenario`` on Django 1.6 (in a list).

    One Django release: the watch is the pool's, below Django (the review ran
    each scenario on Django 1.4 as well, with the same results).
    """
    done = run_probe(lane, lane.python, scenario, *args, **env)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["django"] == "1.6.11", report
    return [report]


# -- idea 1: a Unix-domain socket ------------------------------------------------


def test_unix_socket_ping_to_a_stopped_backend_ends_at_the_timeout(lane: Lane) -> None:
    socket_dir = lane.socket_dir
    assert socket_dir, "no unix socket directory known (DATABASE_URL given): cannot test"
    for report in watch(lane, "unix_silent", WATCH_HOST=str(socket_dir)):
        assert report["unix"] is True, report  # really over the unix socket
        assert report["error"] is None and report["new_session"] is True, report
        assert 0.9 <= report["waited"] < 1.9, report
        assert report["checked_out"] == 0, report


# -- idea 2: KeyboardInterrupt inside the ping -----------------------------------

# A line of _legacy.py per marker, between arm and disarm or inside them.
HELD_MARKERS = [
    "self._armed[raw] = deadline",  # in arm(): being armed
    "answered = False",  # _is_alive, just after arm()
    'cursor.execute("SELECT 1")',  # the round trip itself
    "return self._armed.pop(raw, None) is not None",  # in disarm()
]
# Inside arm(), as it decides to start the watch's thread and starts it.
START_MARKERS = ["start = not self._running", "thread.start_new_thread(self._run, ())"]


def check_interrupted(report: dict[str, object]) -> None:
    assert report["interrupted"] is True, report
    assert "close_error" not in report, report
    assert report["checked_out_after"] == 0, report
    assert report["reused_half_pinged"] is False, report
    assert report["borrower_error"] is None, report  # nothing armed cut its query
    assert report["error"] is None and report["new_session"] is True, report
    assert 0.9 <= report["waited"] < 1.9, report  # the watch still works
    assert report["checked_out"] == 0, report


def interrupted_at_each(lane: Lane, markers: list[str]) -> None:
    """Run interrupt_ping at each marker, one process per marker, all at once.

    Each probe has its own pool and backends, and spends its time waiting
    (pg_sleep, the 1-s silent ping): run one after another they took ~8 s each.
    """
    with ThreadPoolExecutor(len(markers)) as pool:
        reports = list(pool.map(lambda marker: watch(lane, "interrupt_ping", marker), markers))
    for marker, runs in zip(markers, reports, strict=True):
        for report in runs:
            check_interrupted(dict(report, marker=marker))


def test_keyboardinterrupt_between_arm_and_disarm_leaves_nothing_armed_or_held(
        lane: Lane) -> None:
    interrupted_at_each(lane, HELD_MARKERS)


def test_keyboardinterrupt_as_the_watch_thread_starts_leaves_the_start_to_the_next_ping(
        lane: Lane) -> None:
    # Defect found by this review (fixed): arm() recorded its Thread inside the
    # lock and started it after; an interrupt in between left a thread that
    # never ran, recorded, and no later arm() started one: every later ping was
    # unbounded again. Now the thread records itself once it runs.
    interrupted_at_each(lane, START_MARKERS)


# -- idea 3: fork while a ping of the parent is armed ----------------------------


def test_fork_child_while_parent_ping_armed_pings_with_its_own_watch(lane: Lane) -> None:
    for report in watch(lane, "fork_armed"):
        assert report["armed_at_fork"] is True, report
        child = report["child"]
        assert "child_error" not in child, report
        assert child["error"] is None and child["new_session"] is True, report
        assert 0.9 <= child["waited"] < 1.9, report
        assert "error" not in report["parent_ping"], report  # a new session for the parent
        assert report["parent_query"] == 1, report
        assert report["checked_out"] == 0, report


# -- idea 4: answers right around the deadline -----------------------------------


def test_an_answer_around_the_deadline_never_lends_a_shut_down_socket(lane: Lane) -> None:
    for report in watch(lane, "deadline_race", "40"):
        assert report["errors"] == [], report
        assert report["checked_out"] == 0, report
        # Both outcomes happened, or the race was not exercised.
        assert 0 < report["discarded"] < report["iterations"], report


# -- idea 5: interpreter exit ----------------------------------------------------


def exit_runs(lane: Lane, scenario: str, runs: int, parallel: int = 16) -> list[str]:
    """Run ``scenario`` ``runs`` times (Django 1.6), ``parallel`` at once: the bad exits.

    The shutdown race needs the watch thread to run Python code while the
    interpreter tears modules down (Python 2.7's timed Condition.wait, which
    the first watch used, woke every <= 50 ms); several probes at once make
    the teardown slower.
    """
    problems = []
    jobs = [lane.python] * runs
    with ThreadPoolExecutor(parallel) as pool:
        runs_done = pool.map(lambda p: run_probe(lane, p, scenario), jobs)
        for python, done in zip(jobs, runs_done, strict=True):
            if done.returncode != 0 or any(n in done.stderr for n in SHUTDOWN_NOISE):
                problems.append(f"{python.parent.parent.name} rc={done.returncode}: "
                                f"{done.stderr.strip()[:700]}")
    return problems


def test_exit_just_after_a_ping_prints_no_watch_thread_traceback(lane: Lane) -> None:
    problems = exit_runs(lane, "exit_after_ping", 40)
    assert problems == [], f"{len(problems)} bad exits:\n" + "\n".join(problems[:3])


def test_exit_while_a_ping_is_armed_prints_no_watch_thread_traceback(lane: Lane) -> None:
    problems = exit_runs(lane, "exit_while_armed", 16)
    assert problems == [], f"{len(problems)} bad exits:\n" + "\n".join(problems[:3])


# -- idea 6: _silent_since --------------------------------------------------------


def test_silent_since_keeps_connections_opened_or_returned_after_the_silence(
        lane: Lane) -> None:
    for report in watch(lane, "healthy_after_silence"):
        after = report["after"]
        assert not set(after) & set(report["before"]), report  # the stopped ones are gone
        # Opened after the silence: none discarded, each reused (at most pool_size of them).
        assert report["healthy_invalidated"] == 0, report
        assert len(set(after)) <= 3 and len(after) - len(set(after)) >= 3, report
        # Checked out before the second silence, returned after it: kept, and no
        # new connection after the second episode.
        assert report["kept_other"] is True, report
        assert report["reused_invalidated"] == 0, report
        assert set(report["reused"]) <= {report["other"], *report["seen"]}, report
        assert report["checked_out"] == 0, report


def test_a_connection_collected_after_the_silence_is_pinged_not_discarded(
        lane: Lane) -> None:
    # Given back by garbage collection (a thread ended holding it) after the
    # silence: its _RETURNED was still from before, and checkout() closed it
    # unpinged (fixed: the reset of a collected one records it too).
    for report in watch(lane, "collected_after_silence"):
        assert report["checked_out_after_gc"] == 0, report  # it was given back
        assert report["invalidated"] == 0, report
        assert report["x"] in report["seen"], report


def test_a_signal_storm_while_the_watch_sleeps_leaves_it_watching(lane: Lane) -> None:
    # A signal the kernel hands to the watch's thread interrupts its poll();
    # Python 2.7 raises select.error (EINTR), which ended the thread for good.
    for report in watch(lane, "signal_storm"):
        assert report["sent"] > 1000, report
        assert report["error"] is None and report["new_session"] is True, report
        assert 0.9 <= report["first_waited"] < 1.9, report
        assert 0.9 <= report["waited"] < 1.9, report
        assert report["checked_out"] == 0, report


def test_threads_racing_to_the_first_ping_share_one_watch_and_leak_no_pipe(lane: Lane) -> None:
    # Each racer may make a watch; the losers' pipes leaked two descriptors
    # each (a known leftover until 6 Dec). The kept watches hold 2 each.
    for report in watch(lane, "first_pings_race"):
        assert report["watches_per_round"] == [1], report
        assert report["made"] > report["rounds"], report  # the race happened
        assert report["descriptors_added"] == 2 * report["rounds"], report


TESTS = [
    test_threads_racing_to_the_first_ping_share_one_watch_and_leak_no_pipe,
    test_unix_socket_ping_to_a_stopped_backend_ends_at_the_timeout,
    test_keyboardinterrupt_between_arm_and_disarm_leaves_nothing_armed_or_held,
    test_keyboardinterrupt_as_the_watch_thread_starts_leaves_the_start_to_the_next_ping,
    test_fork_child_while_parent_ping_armed_pings_with_its_own_watch,
    test_an_answer_around_the_deadline_never_lends_a_shut_down_socket,
    test_exit_just_after_a_ping_prints_no_watch_thread_traceback,
    test_exit_while_a_ping_is_armed_prints_no_watch_thread_traceback,
    test_silent_since_keeps_connections_opened_or_returned_after_the_silence,
    test_a_connection_collected_after_the_silence_is_pinged_not_discarded,
    test_a_signal_storm_while_the_watch_sleeps_leaves_it_watching,
]
