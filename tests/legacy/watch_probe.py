"""Adversarial review of the legacy backend's ping watch (_PingWatch) and _silent_since (JSON).

    python watch_probe.py PORT DATABASE SCENARIO [ARG]   # password in LEGACY_DB_PASSWORD

tests/legacy/watch_review.py runs the scenarios (Django 1.6), from tests/legacy/run.py.
Real PostgreSQL, no mocks. Every backend this probe SIGSTOPs is SIGCONTed by a
detached ``sh -c 'sleep N; kill -CONT pid'`` whatever happens to the probe.
"""
import json
import os
import signal
import subprocess
import sys
import threading
import time

from probe_tools import configure, interrupt_at

PORT, DATABASE, SCENARIO = sys.argv[1], sys.argv[2], sys.argv[3]
ARG = sys.argv[4] if len(sys.argv) > 4 else None
PASSWORD = os.environ["LEGACY_DB_PASSWORD"]
HOST = os.environ.get("WATCH_HOST") or "127.0.0.1"
POOL = {"pool_size": 1, "max_overflow": 0, "timeout": 1, "pre_ping": True}
POOL_OF_SCENARIO = {
    "deadline_race": {"timeout": 0.1},
    "exit_after_ping": {"timeout": 5},
    "exit_while_armed": {"timeout": 5, "pool_size": 2},
    "fork_armed": {"pool_size": 3},
    "healthy_after_silence": {"pool_size": 3},
    "collected_after_silence": {"pool_size": 3},
}
configure(HOST, PORT, DATABASE, "legacy-watch-review",
          dict(POOL, **POOL_OF_SCENARIO.get(SCENARIO, {})))

import django  # noqa: E402
from django.db import connection  # noqa: E402

from django_postgrespool import _legacy  # noqa: E402
from django_postgrespool._legacy import pool_stats  # noqa: E402


def one(sql):
    cursor = connection.cursor()
    cursor.execute(sql)
    return cursor.fetchone()[0]


def checked_out():
    return pool_stats("default")[0]["checked_out"]


def error_text(error):
    return "%s: %s" % (type(error).__name__, str(error).strip())


def stop(pid, thaw_after):
    """SIGSTOP ``pid``; a detached shell SIGCONTs it after ``thaw_after`` s whatever happens."""
    subprocess.Popen(["sh", "-c", "sleep %s; kill -CONT %d 2>/dev/null" % (thaw_after, pid)],
                     close_fds=True, preexec_fn=os.setsid)
    os.kill(pid, signal.SIGSTOP)


def thaw(pid):
    try:
        os.kill(pid, signal.SIGCONT)
    except OSError:
        pass


def silent_checkout(thaw_after=6):
    """Stop the backend of the pool's idle connection, check out: how long, which session."""
    pid = one("SELECT pg_backend_pid()")
    connection.close()  # idle in the pool, pinged at the next checkout
    stop(pid, thaw_after)
    started = time.time()
    try:
        next_pid, error = one("SELECT pg_backend_pid()"), None
    except Exception as failure:
        next_pid, error = None, error_text(failure)
    finally:
        waited = time.time() - started
        thaw(pid)
    connection.close()
    return {"waited": round(waited, 2), "error": error,
            "new_session": next_pid is not None and next_pid != pid}


# -- the scenarios ----------------------------------------------------------------


def unix_silent():
    """Idea 1: over a Unix-domain socket, the shutdown through an AF_INET fromfd ends the wait."""
    report = {"host": HOST,
              "unix": one("SELECT inet_server_addr() IS NULL")}  # NULL over a unix socket
    connection.close()
    report.update(silent_checkout())
    report["checked_out"] = checked_out()
    return report


def interrupt_ping():
    """Idea 2: KeyboardInterrupt at the line of _legacy.py containing ARG during a ping."""
    first = one("SELECT pg_backend_pid()")
    connection.close()
    report = {}
    interrupt_at(ARG)
    try:
        one("SELECT 1")
        report["interrupted"] = False
    except KeyboardInterrupt:
        report["interrupted"] = True
    finally:
        sys.settrace(None)
    try:
        connection.close()
    except Exception as error:
        report["close_error"] = error_text(error)
    report["checked_out_after"] = checked_out()
    # The next borrower: not the half-pinged session; a query spanning the old
    # deadline (timeout 1 s) is not cut by a watch left armed for the old raw.
    try:
        report["reused_half_pinged"] = one("SELECT pg_backend_pid()") == first
        one("SELECT pg_sleep(1.5) IS NULL")
        report["borrower_error"] = None
    except Exception as error:
        report["borrower_error"] = error_text(error)
    connection.close()
    # Later pings still end at the timeout.
    report.update(silent_checkout())
    report["checked_out"] = checked_out()
    return report


def fork_armed():
    """Idea 3: fork while a ping of the parent is armed (its backend stopped)."""
    parent_idle = one("SELECT pg_backend_pid()")
    connection.close()
    stop(parent_idle, 8)
    result = {}

    def parent_ping():  # another thread of the parent: pings parent_idle, armed 1 s
        try:
            result["pid"] = one("SELECT pg_backend_pid()")
        except Exception as error:
            result["error"] = error_text(error)
        finally:
            connection.close()

    pinger = threading.Thread(target=parent_ping)
    pinger.start()
    watch = _legacy._watches.get(os.getpid())
    began = time.time()
    while (watch is None or not watch._armed) and time.time() - began < 5:
        time.sleep(0.001)  # polled state, not a delay: the ping is armed now
        watch = _legacy._watches.get(os.getpid())
    armed_at_fork = bool(watch and watch._armed)
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child
        try:
            os.close(read)
            seen = {}
            seen.update(silent_checkout(thaw_after=8))
        except BaseException as error:
            seen = {"child_error": error_text(error)}
        os.write(write, json.dumps(seen).encode("ascii"))
        os._exit(0)
    os.close(write)
    chunks = []
    while True:
        chunk = os.read(read, 65536)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(read)
    os.waitpid(child, 0)
    pinger.join(15)
    thaw(parent_idle)
    report = {"armed_at_fork": armed_at_fork, "child": json.loads(b"".join(chunks) or b"{}"),
              "parent_ping": result}
    # The parent's own connections: still usable.
    try:
        report["parent_query"] = one("SELECT 1")
    except Exception as error:
        report["parent_query"] = error_text(error)
    connection.close()
    report["checked_out"] = checked_out()
    return report


def deadline_race():
    """Idea 4: the answer arrives around the 0.1 s deadline; the borrower must never see a
    connection whose socket was shut down."""
    iterations = int(ARG or 40)
    errors, discarded = [], 0
    for i in range(iterations):
        pid = one("SELECT pg_backend_pid()")
        connection.close()
        delay = 0.05 + 0.1 * i / max(iterations - 1, 1)  # 0.05 .. 0.15 s, across the deadline
        stop(pid, 5)
        timer = threading.Timer(delay, thaw, (pid,))
        timer.start()
        try:
            got = one("SELECT pg_backend_pid()")
            discarded += got != pid
            one("SELECT 1")  # the borrower's next query on the same connection
            one("SELECT 1")
        except Exception as error:
            errors.append("delay %.3f: %s" % (delay, error_text(error)))
        finally:
            timer.join()
            thaw(pid)
            try:
                connection.close()
            except Exception:
                pass
    return {"iterations": iterations, "errors": errors, "discarded": discarded,
            "checked_out": checked_out()}


def exit_after_ping():
    """Idea 5a: sys.exit right after a (successful) ping; timeout 5 s."""
    one("SELECT 1")
    connection.close()
    one("SELECT 1")  # pinged: the watch waits for its 5 s deadline
    connection.close()
    sys.stdout.write(json.dumps({"django": django.get_version()}) + "\n")
    sys.stdout.flush()
    sys.exit(0)


def exit_while_armed():
    """Idea 5b: sys.exit while a daemon thread's ping of a stopped backend is armed."""
    pid = one("SELECT pg_backend_pid()")
    connection.close()
    stop(pid, 8)

    def ping():
        try:
            one("SELECT 1")
        except Exception:
            pass

    pinger = threading.Thread(target=ping)
    pinger.daemon = True
    pinger.start()
    watch = _legacy._watches.get(os.getpid())
    began = time.time()
    while (watch is None or not watch._armed) and time.time() - began < 5:
        time.sleep(0.001)
        watch = _legacy._watches.get(os.getpid())
    sys.stdout.write(json.dumps({"django": django.get_version(),
                                 "armed": bool(watch and watch._armed)}) + "\n")
    sys.stdout.flush()
    sys.exit(0)


def healthy_after_silence():
    """Idea 6: after a silent episode, connections opened or returned later are reused."""
    pids, opened = [], threading.Event()
    hold = threading.Event()
    count = threading.Semaphore(0)

    def take():
        pids.append(one("SELECT pg_backend_pid()"))
        count.release()
        hold.wait(10)
        connection.close()

    threads = [threading.Thread(target=take) for _ in range(2)]
    for t in threads:
        t.start()
    for _ in threads:
        count.acquire()
    hold.set()
    for t in threads:
        t.join()
    # Two idle; stop both: the first ping fails, the other one is closed unpinged.
    for pid in pids:
        stop(pid, 8)
    try:
        after = [one("SELECT pg_backend_pid()")]
        connection.close()
    finally:
        for pid in pids:
            thaw(pid)
    # Now healthy: connections opened after the silence are never discarded (the empty
    # slots of the discarded ones may reconnect once each: FIFO QueuePool).
    invalidated = pool_stats("default")[0]["invalidated"]
    for _ in range(5):
        after.append(one("SELECT pg_backend_pid()"))
        connection.close()
    # A connection checked out before a second silent episode (by another thread) and
    # returned after it must be kept too.
    healthy_invalidated = pool_stats("default")[0]["invalidated"] - invalidated
    other = {}
    got, release = threading.Event(), threading.Event()

    def keep():
        other["pid"] = one("SELECT pg_backend_pid()")
        got.set()
        release.wait(10)
        connection.close()  # returned after the silence below

    # the main thread's connection idle; another thread holds a second one
    keeper = threading.Thread(target=keep)
    keeper.start()
    got.wait(10)
    silent = one("SELECT pg_backend_pid()")  # a third connection, idle after close
    connection.close()
    stop(silent, 8)
    # which idle one gets pinged is the pool's choice: ping until the silent one is met
    seen = []
    try:
        seen.append(one("SELECT pg_backend_pid()"))
    finally:
        thaw(silent)
    connection.close()
    release.set()
    keeper.join()
    invalidated = pool_stats("default")[0]["invalidated"]
    reused = []
    for _ in range(3):
        reused.append(one("SELECT pg_backend_pid()"))
        connection.close()
    stats = pool_stats("default")[0]
    return {"before": pids, "after": after, "kept_other": other.get("pid") in reused,
            "other": other.get("pid"), "reused": reused, "seen": seen,
            "healthy_invalidated": healthy_invalidated,
            "reused_invalidated": stats["invalidated"] - invalidated,
            "checked_out": stats["checked_out"]}


def collected_after_silence():
    """Idea 6b: a connection a thread dropped (given back by garbage collection, not
    checkin()) after the silence is not "idle since before the silence"."""
    import gc
    one("SELECT 1")
    connection.close()  # X idle, _RETURNED = now (before the silence)
    got, release, held = threading.Event(), threading.Event(), {}

    def drop():
        held["pid"] = one("SELECT pg_backend_pid()")  # X, in use during the silence
        got.set()
        release.wait(10)
        # ends without connection.close(): its thread-local wrapper is collected

    dropper = threading.Thread(target=drop)
    dropper.start()
    got.wait(10)
    silent = one("SELECT pg_backend_pid()")  # Y, fresh
    connection.close()
    stop(silent, 8)
    try:
        fresh = one("SELECT pg_backend_pid()")  # Y's ping unanswered: _silent_since; Z opened
    finally:
        thaw(silent)
    connection.close()
    release.set()
    dropper.join()
    gc.collect()  # X given back now, after the silence
    stats = pool_stats("default")[0]
    report = {"x": held.get("pid"), "z": fresh, "checked_out_after_gc": stats["checked_out"]}
    invalidated = stats["invalidated"]
    import logging
    warnings = []

    class Keep(logging.Handler):
        def emit(self, record):
            warnings.append(record.getMessage())

    logging.getLogger("django_postgrespool").addHandler(Keep())
    seen = []
    for _ in range(3):
        seen.append(one("SELECT pg_backend_pid()"))
        connection.close()
    report.update(seen=seen, invalidated=pool_stats("default")[0]["invalidated"] - invalidated,
                  warnings=warnings)
    return report


def signal_storm():
    """Signals to the process while the watch sleeps: one delivered to its thread
    interrupts its poll() (EINTR), which Python 2.7 raises; the watch must live on."""
    signal.signal(signal.SIGUSR1, lambda number, frame: None)
    one("SELECT 1")
    connection.close()
    report = silent_checkout()  # the watch runs, asleep with nothing armed
    me, sent = os.getpid(), [0]
    done = threading.Event()

    def storm():
        while not done.is_set():
            os.kill(me, signal.SIGUSR1)
            sent[0] += 1

    senders = [threading.Thread(target=storm) for _ in range(2)]
    for t in senders:
        t.start()
    deadline = time.time() + 2.0
    while time.time() < deadline:  # busy: the main thread takes fewer of them
        pass
    done.set()
    for t in senders:
        t.join()
    report = dict(silent_checkout(), first_waited=report["waited"], sent=sent[0])
    report["checked_out"] = checked_out()
    return report


def first_pings_race():
    """Threads racing to a process's first ping: each may make a watch (a pipe: two
    descriptors); the one kept is the first recorded, the others' pipes must be closed."""
    made, original = [0], _legacy._PingWatch

    class Counted(original):
        def __init__(self):
            made[0] += 1
            time.sleep(0.002)  # the window between the lookup and the record, widened
            original.__init__(self)

    _legacy._PingWatch = Counted
    rounds, kept = 20, []
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(rounds):
        _legacy._watches.clear()  # this process's first ping again
        go, got = threading.Event(), []

        def first():
            go.wait()
            got.append(_legacy._ping_watch())

        threads = [threading.Thread(target=first) for _ in range(8)]
        for t in threads:
            t.start()
        go.set()
        for t in threads:
            t.join()
        kept.append(len(set(map(id, got))))
    return {"rounds": rounds, "made": made[0], "watches_per_round": sorted(set(kept)),
            "descriptors_added": len(os.listdir("/proc/self/fd")) - before}


SCENARIOS = dict((f.__name__, f) for f in (
    first_pings_race,
    unix_silent, interrupt_ping, fork_armed, deadline_race, exit_after_ping, exit_while_armed,
    healthy_after_silence, collected_after_silence, signal_storm))

if __name__ == "__main__":
    result = SCENARIOS[SCENARIO]()
    result["django"] = django.get_version()
    sys.stdout.write(json.dumps(result, sort_keys=True) + "\n")
