"""Adversarial review of the legacy backend: one scenario per run, on Django 1.4 or 1.6 (JSON).

    python review_probe.py PORT DATABASE SCENARIO   # password in LEGACY_DB_PASSWORD

tests/legacy/run.py runs every scenario in both legacy virtualenvs and
checks the facts each one reports. Real PostgreSQL, no mocks; races are
made deterministic with events and a one-connection pool, not with sleeps.
"""
import gc
import json
import os
import signal
import sys
import threading
import time
import urllib

from probe_tools import configure, interrupt_at

PORT, DATABASE, SCENARIO = sys.argv[1], sys.argv[2], sys.argv[3]
PASSWORD = os.environ["LEGACY_DB_PASSWORD"]
POOL = {"pool_size": 1, "max_overflow": 0, "timeout": 5}
# stale_cursor: the next borrower gets the connection just given back (LIFO) while
# the first one can still check out another. interrupt, dropped_wrapper: DISCARD ALL,
# so that a temporary table left over tells a session that was not reset.
POOL_OF_SCENARIO = {"stale_cursor": {"pool_size": 2, "use_lifo": True},
                    "interrupt": {"reset": "discard"}, "dropped_wrapper": {"reset": "discard"},
                    "silent_server": {"pre_ping": True, "timeout": 1, "pool_size": 3}}
configure("127.0.0.1", PORT, DATABASE, "legacy-review",
          dict(POOL, **POOL_OF_SCENARIO.get(SCENARIO, {})))

import django  # noqa: E402
from django.db import connection, connections, transaction  # noqa: E402
from django.db.backends.signals import connection_created  # noqa: E402

from django_postgrespool import _legacy  # noqa: E402
from django_postgrespool._legacy import close_pools, pool_stats  # noqa: E402

DJANGO_16 = django.VERSION >= (1, 6)


def one(sql, params=(), alias="default"):
    cursor = connections[alias].cursor()
    cursor.execute(sql, params)
    return cursor.fetchone()[0]


def begin():
    """Make the next statement start a transaction (Django 1.4 is never in autocommit here)."""
    if DJANGO_16:
        transaction.set_autocommit(False)


def commit():
    connection._commit()
    if DJANGO_16:
        transaction.set_autocommit(True)


def checked_out(alias="default"):
    return pool_stats(alias)[0]["checked_out"]


# -- the scenarios ----------------------------------------------------------------


def thread_end():
    """Threads end holding a connection, in a transaction: is it given back, rolled back?"""
    gc.disable()  # what a garbage collection would make good is not counted
    pids, errors = [], []

    def work():
        try:
            connection.cursor()
            begin()
            cursor = connection.cursor()
            cursor.execute("CREATE TEMP TABLE legacy_thread_end (x int)")
            cursor.execute("SELECT pg_backend_pid()")
            pids.append(cursor.fetchone()[0])
        except Exception as error:
            errors.append("%s: %s" % (type(error).__name__, error))

    for _ in range(3):  # pool_size=1: each needs the connection the last one left
        t = threading.Thread(target=work)
        t.start()
        t.join()
    cursor = connection.cursor()
    cursor.execute("SELECT pg_backend_pid(), to_regclass('legacy_thread_end') IS NULL")
    pid, clean = cursor.fetchone()
    connection.close()
    return {"pids": pids + [pid], "clean": clean, "errors": errors}


def late_thread_end():
    """A thread's locals freed after the next checkout began waiting (join() returns first).

    The thread's _Leases is kept alive past its end (as when the interpreter
    frees a thread's locals a moment after join() returns), and let go of
    0.5 s into the next checkout's wait at the cap: that checkout must take
    the connection back then, not wait out its timeout (5 s).
    """
    kept = []

    def work():
        one("SELECT 1")
        kept.append(_legacy._threads.leases)  # the thread ends holding its connection

    t = threading.Thread(target=work)
    t.start()
    t.join()
    free = threading.Timer(0.5, kept.pop)
    free.start()
    started = time.time()
    try:
        one("SELECT 1")
        error = None
    except Exception as failure:
        error = "%s: %s" % (type(failure).__name__, failure)
    waited = time.time() - started
    free.join()
    connection.close()
    return {"waited": round(waited, 2), "error": error, "checked_out": checked_out()}


def dropped_wrapper():
    """A wrapper dropped holding a connection: garbage collection gives it back, reset."""
    one("CREATE TEMP TABLE legacy_dropped (x int); SELECT 1")
    commit()
    pid = one("SELECT pg_backend_pid()")
    del connections._connections.default  # as if its thread-local storage were gone
    gc.collect()
    report = {"held_after_gc": checked_out()}
    try:
        cursor = connection.cursor()
        cursor.execute("SELECT pg_backend_pid(), to_regclass('legacy_dropped') IS NULL")
        next_pid, report["clean"] = cursor.fetchone()
        report["same_session"] = next_pid == pid
    except Exception as error:
        report["error"] = "%s: %s" % (type(error).__name__, str(error).strip())
    connection.close()
    return report


def stale_cursor():
    """A cursor kept past close() must not run on the session lent to the next borrower."""
    cursor = connection.cursor()
    cursor.execute("SELECT pg_backend_pid()")
    mine = cursor.fetchone()[0]
    connection.close()
    theirs, ready, release = [], threading.Event(), threading.Event()

    def borrower():
        theirs.append(one("SELECT pg_backend_pid()"))
        ready.set()
        release.wait(30)
        connection.close()

    t = threading.Thread(target=borrower)
    t.start()
    ready.wait(30)
    report = {"same_session": theirs == [mine], "ran_on": None, "error": None}
    try:
        cursor.execute("SELECT pg_backend_pid()")
        report["ran_on"] = "the borrower's session" if cursor.fetchone()[0] == mine else "another"
    except Exception as error:
        report["error"] = type(error).__name__
    release.set()
    t.join()
    connection.close()
    return report


def session_state():
    """The driver's state (read-only, cursor_factory, notifies) must not reach the next borrower."""
    import psycopg2.extras

    pid = one("SELECT pg_backend_pid()")
    raw = connection.connection
    raw.rollback()
    raw.cursor().execute("LISTEN legacy_review")
    raw.cursor().execute("NOTIFY legacy_review, 'for the first borrower'")
    raw.commit()
    raw.poll()
    pending = len(raw.notifies)
    raw.readonly = True
    raw.cursor_factory = psycopg2.extras.RealDictCursor
    connection.close()
    cursor = connection.cursor()
    cursor.execute("SELECT pg_backend_pid()")
    row = cursor.fetchone()
    report = {
        "same_session": pid in (row.values() if isinstance(row, dict) else row),
        "pending_before": pending,
        "row_type": type(row).__name__,
        "notifies_after": len(connection.connection.notifies),
    }
    try:
        cursor.execute("CREATE TEMP TABLE legacy_review_rw (x int)")
        report["write"] = "ok"
    except Exception as error:
        report["write"] = str(error).strip()
    connection.close()
    return report


def receiver_error():
    """A connection_created receiver that raises once: the next query must run with its setup."""
    calls = []

    def receiver(sender, connection, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("receiver failed")
        connection.cursor().execute("SET application_name = 'legacy-receiver-ran'")

    connection_created.connect(receiver, weak=False)
    report = {}
    try:
        connection.cursor()
        report["first"] = "no error"
    except RuntimeError as error:
        report["first"] = str(error)
        report["held_after_error"] = checked_out()
    report["application_name"] = one("SELECT current_setting('application_name')")
    report["calls"] = len(calls)
    connection.close()
    report["held_at_end"] = checked_out()
    connection_created.disconnect(receiver)
    return report


def fork():
    """A fork child must neither use nor end the sessions of its parent (busy or idle)."""
    connections.databases["idle"] = dict(connections.databases["default"],
                                         POOL_OPTIONS=dict(POOL, pre_ping=True))
    one("CREATE TABLE IF NOT EXISTS legacy_fork (x int); SELECT 1")
    one("TRUNCATE legacy_fork; SELECT 1")
    commit()
    idle_pid = one("SELECT pg_backend_pid()", alias="idle")
    connections["idle"].close()  # idle in its pool
    begin()
    one("INSERT INTO legacy_fork VALUES (1); SELECT 1")  # not committed when the child runs
    parent_pid = one("SELECT pg_backend_pid()")
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child
        try:
            os.close(read)
            seen = {"child_pid": one("SELECT pg_backend_pid()")}
            connection.close()
            close_pools()  # what a post-fork hook does
            gc.collect()
        except BaseException as error:
            seen = {"child_error": "%s: %s" % (type(error).__name__, error)}
        os.write(write, json.dumps(seen).encode("ascii"))
        os._exit(0)
    os.close(write)
    seen = json.loads(os.read(read, 65536).decode("ascii"))
    os.close(read)
    os.waitpid(child, 0)
    report = {"child": seen.get("child_error") or (
        "the parent's session" if seen["child_pid"] == parent_pid else "a session of its own")}
    try:
        report["parent_session_kept"] = one("SELECT pg_backend_pid()") == parent_pid
        commit()
        report["committed_rows"] = one("SELECT count(*) FROM legacy_fork")
    except Exception as error:
        report["parent_error"] = "%s: %s" % (type(error).__name__, str(error).strip())
    connection.close()
    report["idle_session_kept"] = one("SELECT pg_backend_pid()", alias="idle") == idle_pid
    report["idle_invalidated"] = pool_stats("idle")[0]["invalidated"]
    connections["idle"].close()
    one("DROP TABLE legacy_fork; SELECT 1")
    connection.close()
    return report


def fork_reused_descriptor():
    """A fork child that closed the socket of an inherited connection and reused its number.

    As a daemon does: the number is a file of the child's now. Nothing of the
    pool may write to it, close it, or point it at /dev/null.
    """
    import tempfile

    one("SELECT 1")  # lent to this wrapper when the process forks
    number = connection.connection.fileno()
    path = tempfile.mktemp(prefix="legacy-review-")
    child = os.fork()
    if child == 0:  # pragma: no cover - the child
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            os.dup2(fd, number)  # closes the inherited socket's descriptor first
            os.close(fd)
            one("SELECT 1")
            connection.close()
            close_pools()
            gc.collect()
            os.write(number, b"intact")
            os.close(number)
        finally:
            os._exit(0)
    os.waitpid(child, 0)
    with open(path, "rb") as f:
        content = f.read().decode("latin-1")
    os.unlink(path)
    report = {"file": content if len(content) < 40 else content[:40] + "...",
              "parent_session_kept": one("SELECT 1") == 1}
    connection.close()
    return report


def interrupt():
    """KeyboardInterrupt at the wrong line of a checkin or a checkout: nothing dirty or held."""
    report = {}
    one("CREATE TEMP TABLE legacy_interrupted (x int); SELECT 1")
    commit()
    pid = one("SELECT pg_backend_pid()")
    interrupt_at('cursor.execute("DISCARD ALL")')  # reset='discard': rolled back, not discarded yet
    try:
        connection.close()
        report["checkin"] = "not interrupted"
    except KeyboardInterrupt:
        report["checkin"] = "interrupted"
        report["held_while_unwinding"] = checked_out()
    finally:
        sys.settrace(None)
    sys.exc_clear()
    gc.collect()
    cursor = connection.cursor()
    cursor.execute("SELECT to_regclass('legacy_interrupted') IS NULL, pg_backend_pid()")
    report["next_borrower_clean"], next_pid = cursor.fetchone()
    report["next_borrower_same_session"] = next_pid == pid
    connection.close()
    interrupt_at('self._counts["checkouts"] += 1')  # after the health check
    try:
        connection.cursor()
        report["checkout"] = "not interrupted"
    except KeyboardInterrupt:
        report["checkout"] = "interrupted"
        report["held_after_checkout_interrupt"] = checked_out()
    finally:
        sys.settrace(None)
    sys.exc_clear()
    gc.collect()
    one("SELECT 1")
    report["held_by_next"] = checked_out()
    connection.close()
    report["held_at_end"] = checked_out()
    return report


def password_in_name():
    """A password in NAME (URI, conninfo) or OPTIONS' dsn: not in stats, repr, our frames."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "sample", "notes",
                                    "management", "commands"))
    from error_report import our_frames

    secret = "s3cr'et @:/?#%\\ pw"
    quoted = urllib.quote(secret, safe="")
    escaped = secret.replace("\\", "\\\\").replace("'", "\\'")
    default = connections.databases["default"]
    aliases = {
        "uri": dict(default, PASSWORD="", NAME="postgresql://postgres:%s@127.0.0.1:%s/%s"
                    % (quoted, PORT, DATABASE)),
        "conninfo": dict(default, PASSWORD="",
                         NAME="dbname=%s password='%s'" % (DATABASE, escaped)),
        "dsn": dict(default, PASSWORD="", PORT="1",
                    OPTIONS={"dsn": "password='%s'" % escaped}),
    }
    report = {}
    for alias, entry in sorted(aliases.items()):
        connections.databases[alias] = entry
        error, frames = our_frames(alias)  # none of them can connect
        shown = [repr(pool_stats(alias)), repr([p for p in _legacy._pools.values()
                                                 if p.alias == alias])] + frames
        report[alias] = {
            "error": error,
            "our_frames": len(frames),
            "leaks": sum(1 for text in shown
                         if "s3cr" in text or quoted in text or "et @:/" in text),
        }
    return report


def hand_begin():
    """A transaction begun by hand ("BEGIN" as a statement) must not reach the next borrower.

    On Django 1.6 the connection is in autocommit mode, where psycopg2's
    rollback() sends nothing (it goes by its own idea of the connection).
    """
    cursor = connection.cursor()
    cursor.execute("BEGIN")  # Django 1.4: psycopg2 began one already (a warning)
    cursor.execute("SET LOCAL application_name = 'begun by hand'")  # until the transaction ends
    cursor.execute("SELECT pg_backend_pid()")
    pid = cursor.fetchone()[0]
    connection.close()
    cursor = connection.cursor()
    cursor.execute("SELECT current_setting('application_name'), pg_backend_pid()")
    name, next_pid = cursor.fetchone()
    connection.close()
    return {"same_session": pid == next_pid, "no_transaction_left": name != "begun by hand"}


def silent_server():
    """A health check's round trip to a backend that stops answering ends at the pool's timeout,
    and the other connections idle since then are not pinged (each would cost the timeout)."""
    pids, opened = [], threading.Event()

    def hold():
        pids.append(one("SELECT pg_backend_pid()"))
        opened.wait(10)  # three connections at once
        connection.close()  # idle in the pool, pinged at the next checkout

    threads = [threading.Thread(target=hold) for _ in range(3)]
    for t in threads:
        t.start()
    while len(pids) < 3 and all(t.is_alive() for t in threads):
        time.sleep(0.01)
    opened.set()
    for t in threads:
        t.join()
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)  # the connections stay open; nothing answers

    def thaw_all():
        for pid in pids:
            os.kill(pid, signal.SIGCONT)

    thaw = threading.Timer(15, thaw_all)  # whatever happens below
    thaw.start()
    started = time.time()
    try:
        next_pid = one("SELECT pg_backend_pid()")
        error = None
    except Exception as failure:
        next_pid, error = None, "%s: %s" % (type(failure).__name__, failure)
    finally:
        waited = time.time() - started
        thaw_all()
        thaw.cancel()
    connection.close()
    stats = pool_stats("default")[0]
    return {"waited": round(waited, 2), "error": error, "idle": len(set(pids)),
            "new_session": next_pid is not None and next_pid not in pids,
            "checked_out": stats["checked_out"]}


SCENARIOS = dict((f.__name__, f) for f in (
    thread_end, late_thread_end, dropped_wrapper, stale_cursor, session_state, receiver_error, fork,
    fork_reused_descriptor, interrupt, password_in_name, hand_begin, silent_server))

if __name__ == "__main__":
    result = SCENARIOS[SCENARIO]()
    result["django"] = django.get_version()
    sys.stdout.write(json.dumps(result, sort_keys=True) + "\n")
