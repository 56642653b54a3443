"""Adversarial review: the health check's deadline (``_PingWatch``, ``_shut_down``).

A round trip of ``pre_ping=True`` still unanswered at the pool's ``timeout``
has its socket shut down by one watch thread per process. Attacked here: a
healthy connection shut down (a signal handler's exception mid-ping, a
descriptor reused), the watch never running (its thread failing to start, a
fork while it holds its lock, from a thread other than the main one, gevent),
its cost when idle, two pools with different timeouts, and real frozen
PostgreSQL backends (SIGSTOP) over TCP, a unix socket and TLS, with both
drivers: what a checkout then costs, and whether the frozen connection is
closed without leaking its descriptor.

The fake connections are test_pool_unit.py's (a socketpair each, so that the
watch's shutdown is real). The real ones use a server of this module's own.

Its five defects were fixed the same day (6 Dec 2026): a watch thread that failed
to start once never started again, and its failure failed the ping (a healthy
connection retired); each later checkout pinged another silent idle connection
for a whole timeout; under gevent with psycopg2 the watch was a greenlet of the
hub the blocking round trip held.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from django.db import connections
from django_postgrespool import pool as pool_module
from django_postgrespool.pool import GONE, IN_USE, _PingWatch

from tests.backend.test_pool_unit import (
    FakeConnection,
    SilentConnection,
    _shut,
    make_pool,
)
from tests.backend.test_signal_storm import _elsewhere
from tests.support.db import DRIVER
from tests.support.pgcluster import PASSWORD, SUPERUSER, Cluster
from tests.support.requests import hold_at_once, run_request

# Frozen backends of a server of this module's own (SIGSTOP).
pytestmark = pytest.mark.servers

WATCH_NAME = "django_postgrespool ping watch"


class _Interrupt(BaseException):
    """What a signal handler raises (KeyboardInterrupt is pytest's own)."""


@pytest.fixture
def fresh_watch(monkeypatch: pytest.MonkeyPatch) -> _PingWatch:
    """A watch of this test's own: nothing armed, no thread yet."""
    watch = _PingWatch()
    monkeypatch.setattr(pool_module, "_ping_watch", watch)
    return watch


def _ping_in_thread(pool: Any, lease: Any) -> tuple[threading.Thread, list[Any]]:
    """Check out (pinging ``lease``, idle in ``pool``) in a daemon thread; its outcome."""
    outcome: list[Any] = []

    def run() -> None:
        me = threading.current_thread()
        started = time.monotonic()
        try:
            got: Any = pool.checkout(FakeConnection, lease, me)
        except BaseException as error:  # noqa: BLE001 - looked at by the test
            got = error
        outcome.append((got, time.monotonic() - started))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def _release(lease: Any) -> None:
    """Make a silent fake connection's round trip end (a test's cleanup)."""
    try:
        lease.raw._sock.shutdown(2)
    except OSError:
        pass


# -- the watch thread never starting ---------------------------------------------------


def _watch_start_fails(
    monkeypatch: pytest.MonkeyPatch, error: BaseException | type[BaseException], times: int = -1
) -> list[int]:
    """Make the watch thread's start raise ``error`` (``times`` times, -1: always); count them."""
    real_start = threading.Thread.start
    failures = [0]

    def start(self: threading.Thread) -> None:
        if self.name == WATCH_NAME and failures[0] != times:
            failures[0] += 1
            raise error
        real_start(self)

    monkeypatch.setattr(threading.Thread, "start", start)
    return failures


@pytest.mark.parametrize("failure", ["no thread", "signal"])
def test_a_watch_thread_that_failed_to_start_is_started_by_the_next_ping(
    fresh_watch: _PingWatch, monkeypatch: pytest.MonkeyPatch, failure: str
) -> None:
    # "can't start new thread" (a container's pids.max, RLIMIT_NPROC) once, or
    # a signal handler's exception (KeyboardInterrupt, gunicorn's SystemExit, a
    # SIGALRM time limit) in arm() between `_pid = os.getpid()` and the start of
    # the thread (threading.Event(), threading.Thread(): Python code, where a
    # handler runs): arm() has already recorded this process as watched. The
    # storm test below hits that window by itself now and then.
    failures = _watch_start_fails(
        monkeypatch,
        _Interrupt if failure == "signal" else RuntimeError("can't start new thread"),
        times=1,
    )
    me = threading.current_thread()
    first = make_pool(pool_size=1, max_overflow=1, pre_ping=True, timeout=0.3)
    warm = first.checkout(FakeConnection, None, me)
    first.checkin(warm)
    if failure == "signal":
        with pytest.raises(_Interrupt):
            first.checkout(FakeConnection, warm, me)  # the ping whose watch failed
    else:
        first.checkin(first.checkout(FakeConnection, warm, me))  # the ping whose watch failed
    assert failures[0] == 1
    # Later, a server stops answering: the ping must still be given up.
    pool = make_pool(pool_size=1, max_overflow=1, pre_ping=True, timeout=0.3)
    silent = pool.checkout(SilentConnection, None, me)
    pool.checkin(silent)
    thread, outcome = _ping_in_thread(pool, silent)
    thread.join(3)
    hung = thread.is_alive()
    _release(silent)
    thread.join(5)
    assert not hung, "the ping was still waiting 3 s after its 0.3 s deadline"
    ((got, took),) = outcome
    assert got is not silent and silent.state is GONE and took < 3


def test_a_watch_that_cannot_start_never_retires_a_healthy_connection(
    fresh_watch: _PingWatch, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The deadline is the watch's business: its failure is not the connection's.
    _watch_start_fails(monkeypatch, RuntimeError("can't start new thread"))
    me = threading.current_thread()
    pool = make_pool(pool_size=1, max_overflow=1, pre_ping=True, timeout=5)
    lease = pool.checkout(FakeConnection, None, me)
    pool.checkin(lease)
    again = pool.checkout(FakeConnection, lease, me)
    pool.checkin(again)
    assert again is lease and pool.stats()["invalidated"] == 0, pool.stats()
    assert not fresh_watch._armed


# -- guards: the watch thread itself ----------------------------------------------------


def _cpu_ticks(native_id: int) -> int:
    with open(f"/proc/self/task/{native_id}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def test_the_watch_sleeps_while_idle_and_while_a_distant_deadline_is_armed(
    fresh_watch: _PingWatch,
) -> None:
    me = threading.current_thread()
    pool = make_pool(pool_size=1, max_overflow=1, pre_ping=True, timeout=0.2)
    lease = pool.checkout(FakeConnection, None, me)
    pool.checkin(lease)
    earlier = {t for t in threading.enumerate() if t.name == WATCH_NAME}  # other tests' watches
    pool.checkin(pool.checkout(FakeConnection, lease, me))  # starts the watch
    (watch,) = [t for t in threading.enumerate() if t.name == WATCH_NAME and t not in earlier]
    before = _cpu_ticks(watch.native_id)
    time.sleep(1.0)
    idle = _cpu_ticks(watch.native_id) - before
    # A deadline 30 s away, armed and waited for (a ping in flight).
    distant = make_pool(pool_size=1, max_overflow=1, pre_ping=True, timeout=30)
    silent = distant.checkout(SilentConnection, None, me)
    distant.checkin(silent)
    thread, _ = _ping_in_thread(distant, silent)
    try:
        assert _wait(lambda: silent.raw in fresh_watch._armed, 5)
        before = _cpu_ticks(watch.native_id)
        time.sleep(1.0)
        armed = _cpu_ticks(watch.native_id) - before
    finally:
        _release(silent)
        thread.join(5)
    ticks = os.sysconf("SC_CLK_TCK")
    assert idle <= ticks // 20 and armed <= ticks // 20, (idle, armed, ticks)  # <= 50 ms of 1 s
    assert not fresh_watch._armed


def _wait(predicate: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return bool(predicate())


def test_a_shorter_deadline_armed_after_a_longer_one_is_kept(fresh_watch: _PingWatch) -> None:
    me = threading.current_thread()
    slow = make_pool(pool_size=1, max_overflow=1, pre_ping=True, timeout=30)
    quick = make_pool(pool_size=1, max_overflow=1, pre_ping=True, timeout=0.3)
    long_silent = slow.checkout(SilentConnection, None, me)
    slow.checkin(long_silent)
    short_silent = quick.checkout(SilentConnection, None, me)
    quick.checkin(short_silent)
    long_thread, _ = _ping_in_thread(slow, long_silent)
    try:
        assert _wait(lambda: long_silent.raw in fresh_watch._armed, 5)
        time.sleep(0.1)  # the watch sleeps until the 30 s deadline
        started = time.monotonic()
        got = quick.checkout(FakeConnection, short_silent, me)
        took = time.monotonic() - started
        assert got is not short_silent and short_silent.state is GONE
        assert 0.3 <= took < 3, took
        assert not _shut(long_silent.raw._sock), "the 30 s round trip was cut at 0.3 s"
        assert long_silent.raw in fresh_watch._armed
        quick.checkin(got)
    finally:
        _release(long_silent)
        long_thread.join(5)
    assert not fresh_watch._armed


def test_a_fork_from_another_thread_while_the_watch_holds_its_lock_gets_a_watch(
    fresh_watch: _PingWatch,
) -> None:
    me = threading.current_thread()
    pool = make_pool(pool_size=1, max_overflow=1, pre_ping=True, timeout=0.2)
    lease = pool.checkout(FakeConnection, None, me)
    pool.checkin(lease)
    pool.checkin(pool.checkout(FakeConnection, lease, me))  # the parent's watch runs
    forked: list[int] = []

    def fork() -> None:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            code = 1
            try:
                child = make_pool(pool_size=1, max_overflow=1, pre_ping=True, timeout=0.2)
                here = threading.current_thread()
                first = child.checkout(SilentConnection, None, here)
                child.checkin(first)
                started = time.monotonic()
                got = child.checkout(FakeConnection, first, here)
                code = 0 if got is not first and time.monotonic() - started < 3 else 2
            finally:
                os._exit(code)
        forked.append(pid)

    with pool_module._ping_watch._lock:  # as the watch holds it while it looks
        forker = threading.Thread(target=fork)
        forker.start()
        forker.join(10)
    (pid,) = forked
    deadline = time.monotonic() + 10
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("the child's ping was never given up")
        time.sleep(0.05)
    assert os.waitstatus_to_exitcode(status) == 0


def test_a_pool_closed_while_its_ping_waits_still_gives_it_up(fresh_watch: _PingWatch) -> None:
    me = threading.current_thread()
    pool = make_pool(pool_size=2, max_overflow=0, pre_ping=True, timeout=0.5)
    silent = pool.checkout(SilentConnection, None, me)
    other = pool.checkout(FakeConnection, None, me)
    pool.checkin(silent)
    pool.checkin(other)
    thread, outcome = _ping_in_thread(pool, silent)
    try:
        assert _wait(lambda: silent.raw in fresh_watch._armed, 5)
        pool.close()  # closes the idle one; the one being pinged is the checkout's
        thread.join(4)
        assert not thread.is_alive(), "the ping was still waiting 4 s after its 0.5 s deadline"
    finally:
        _release(silent)
        thread.join(5)
    ((got, took),) = outcome
    assert silent.state is GONE and silent.raw.closed, (got, took)
    if not isinstance(got, BaseException):
        pool.checkin(got)
    assert other.raw.closed  # the idle one, by close()
    assert pool.stats()["checked_out"] == 0 and not fresh_watch._armed


# -- guards: signal handlers' exceptions mid-ping ---------------------------------------


def test_an_entry_left_armed_by_an_interrupted_ping_never_shuts_a_reused_descriptor(
    fresh_watch: _PingWatch, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The handler's exception at disarm()'s call: the entry stays armed, the
    # checkout closes the connection, and its descriptor number goes to the
    # next socket opened. At the deadline the watch must leave that one alone.
    me = threading.current_thread()
    pool = make_pool(pool_size=1, max_overflow=1, pre_ping=True, timeout=0.3)
    lease = pool.checkout(FakeConnection, None, me)
    pool.checkin(lease)
    fd = lease.raw.fileno()
    real_disarm = fresh_watch.disarm
    calls = [0]

    def disarm(raw: Any) -> bool:
        calls[0] += 1
        if calls[0] == 1:
            raise _Interrupt
        return real_disarm(raw)

    monkeypatch.setattr(fresh_watch, "disarm", disarm)
    with pytest.raises(_Interrupt):
        pool.checkout(FakeConnection, lease, me)
    assert lease.state is GONE and lease.raw.closed and lease.raw in fresh_watch._armed
    # Whatever opens next takes the lowest free descriptors: the closed one's.
    newcomers = [FakeConnection() for _ in range(3)]
    reused = [c for c in newcomers if fd in (c._sock.fileno(), c.server_side.fileno())]
    assert reused, "the closed connection's descriptor was not reused"
    assert _wait(lambda: not fresh_watch._armed, 5)
    time.sleep(0.05)
    for conn in newcomers:
        assert not _shut(conn._sock) and not _shut(conn.server_side)
        conn.close()


def test_a_signal_storm_during_pings_never_shuts_a_connection_left_open(
    fresh_watch: _PingWatch,
) -> None:
    # SIGALRM every 0.3 ms while the main thread checks out with pre_ping:
    # the handler's exception lands in arm(), execute(), disarm() and the
    # checkout around them. Afterwards, and once every deadline has passed,
    # no connection still open (in the pool or not) has a shut socket.
    made: list[FakeConnection] = []

    class Tracked(FakeConnection):
        def __init__(self) -> None:
            super().__init__()
            made.append(self)

    pool = make_pool(pool_size=2, max_overflow=0, pre_ping=True, timeout=0.05)
    me = threading.current_thread()
    # The watch's thread started before the storm: one that never starts is
    # test_a_watch_thread_that_failed_to_start_is_started_by_the_next_ping's.
    warm = pool.checkout(Tracked, None, me)
    pool.checkin(warm)
    pool.checkin(pool.checkout(Tracked, warm, me))
    assert fresh_watch._pid == os.getpid()
    state = {"armed": False, "raised": 0}
    held: dict[str, Any] = {}

    def handler(signum: int, frame: Any) -> None:
        # Not in SQLAlchemy's pool nor a finalizer (test_signal_storm.py's reasons).
        if state["armed"] and not _elsewhere(frame):
            state["armed"] = False
            state["raised"] += 1
            raise _Interrupt

    previous = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, 0.0003, 0.0003)
    last: Any = None
    try:
        stop = time.monotonic() + 1.5
        while time.monotonic() < stop:
            try:
                try:
                    state["armed"] = True
                    lease = pool.checkout(Tracked, last, me)
                    held["lease"] = last = lease
                    state["armed"] = False
                except _Interrupt:
                    pass
            except _Interrupt:
                pass
            state["armed"] = False
            lease = held.pop("lease", None)
            if lease is not None and lease.state is IN_USE:
                pool.checkin(lease, None, lease.borrowed_at)
    finally:
        state["armed"] = False
        signal.setitimer(signal.ITIMER_REAL, 0, 0)
        signal.signal(signal.SIGALRM, previous)
    assert state["raised"] > 50, state
    assert _wait(lambda: not fresh_watch._armed, 5), (time.monotonic(), fresh_watch._armed)
    time.sleep(0.05)
    shut_open = [c for c in made if not c.closed and _shut(c._sock)]
    assert not shut_open, f"{len(shut_open)} of {len(made)} open connections were shut down"
    assert pool.stats()["checked_out"] == 0


# -- real servers: frozen backends ------------------------------------------------------


@pytest.fixture(scope="module")
def server() -> Iterator[Cluster]:
    srv = Cluster(ssl=True)
    try:
        srv.start()
        yield srv
    finally:
        srv.destroy()


@pytest.fixture
def frozen_alias(pooled_alias, server):
    def make(name: str, transport: str = "tcp", *, pool_options: dict, **options: Any):
        host = str(server.socket_dir) if transport == "unix" else "127.0.0.1"
        if transport == "ssl":
            options["sslmode"] = "require"
        elif transport == "tcp":
            options["sslmode"] = "disable"
        return pooled_alias(
            name,
            pool_options=pool_options,
            options=options,
            NAME="postgres",
            USER=SUPERUSER,
            PASSWORD=PASSWORD,
            HOST=host,
            PORT=str(server.port),
        )

    return make


@pytest.fixture
def frozen() -> Iterator[list[int]]:
    """Backend pids to SIGSTOP; every one is continued at the end of the test."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass


def _freeze(frozen: list[int], pid: int) -> None:
    frozen.append(pid)
    os.kill(pid, signal.SIGSTOP)


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _request_in_thread(alias: str) -> tuple[threading.Thread, list[Any]]:
    outcome: list[Any] = []

    def run() -> None:
        started = time.monotonic()
        try:
            got: Any = run_request(alias)
        except BaseException as error:  # noqa: BLE001 - looked at by the test
            got = error
        finally:
            connections[alias].close()
        outcome.append((got, time.monotonic() - started))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


@pytest.mark.parametrize("transport", ["tcp", "unix", "ssl"])
def test_a_frozen_backend_is_given_up_closed_and_its_descriptor_freed(
    frozen_alias, frozen, transport: str
) -> None:
    alias, app = frozen_alias(
        "frozen",
        transport,
        pool_options={"pool_size": 1, "max_overflow": 1, "pre_ping": True, "timeout": 1},
        connect_timeout=3,
    )
    first = run_request(alias)
    connections[alias].close()
    pool = connections[alias]._current_pool()
    (old,) = pool._leases
    fds = _fds()
    _freeze(frozen, first)
    thread, outcome = _request_in_thread(alias)
    thread.join(8)
    assert not thread.is_alive(), "the checkout's ping was still waiting after 8 s"
    ((got, took),) = outcome
    assert isinstance(got, int) and got != first, got
    assert 0.9 <= took < 6, took
    assert old.state is GONE and old.raw.closed
    stats = pool.stats()
    assert stats["invalidated"] == 1 and stats["size"] == 1 and stats["checked_out"] == 0, stats
    assert not pool_module._ping_watch._armed
    # One connection closed, one opened: as many descriptors as before.
    assert _wait(lambda: _fds() == fds, 2), (fds, _fds())
    # The healthy one is not shut down later.
    time.sleep(1.2)
    assert run_request(alias) == got


def test_one_checkout_waits_one_timeout_however_many_idle_sessions_froze(
    frozen_alias, frozen, monitor
) -> None:
    alias, pids = _three_frozen(frozen_alias, frozen, "frozen3", timeout=1)
    thread, outcome = _request_in_thread(alias)
    thread.join(8)
    assert not thread.is_alive()
    ((got, took),) = outcome
    assert isinstance(got, int) and got not in pids, got
    assert 0.9 <= took < 2.5, took  # one timeout, not three


def _three_frozen(
    frozen_alias: Any, frozen: Any, name: str, timeout: float
) -> tuple[str, list[int]]:
    """An alias of three pooled sessions, all idle and frozen; its name and their pids."""
    alias, _ = frozen_alias(
        name,
        pool_options={"pool_size": 3, "max_overflow": 0, "pre_ping": True, "timeout": timeout},
        connect_timeout=3,
    )
    hold_at_once(alias, 3)
    pool = connections[alias]._current_pool()
    assert len(pool._idle) == 3, pool.stats()
    pids = [
        lease.raw.info.backend_pid if DRIVER == "psycopg" else lease.raw.get_backend_pid()
        for lease in pool._idle
    ]
    for pid in pids:
        _freeze(frozen, pid)
    return alias, pids


def test_silent_sessions_cost_one_timeout_not_one_per_request(frozen_alias, frozen) -> None:
    # The network to the server's old address went silent (or its sessions
    # froze) while new connections get answers: three pooled sessions, three
    # requests one after the other. The first request pays the timeout; the
    # two other sessions were opened before that unanswered ping (they are
    # suspect, _suspect_before) and are as silent: pinging each again, for a
    # full timeout, on the next requests' time, is what the docs say the pool
    # avoids ("rather than pinging other idle connections that may be as silent").
    alias, pids = _three_frozen(frozen_alias, frozen, "silent3", timeout=1.5)
    took: list[float] = []
    for _ in range(3):
        thread, outcome = _request_in_thread(alias)
        thread.join(8)
        assert not thread.is_alive()
        ((got, spent),) = outcome
        assert isinstance(got, int) and got not in pids, got
        took.append(spent)
    assert sum(took) < 3.0, took  # today about 1.5 s each: 4.5 s


# -- gevent ----------------------------------------------------------------------------


GEVENT_SCRIPT = """
from gevent import monkey

monkey.patch_all()

import json, os, signal, sys, time

import django
from django.conf import settings

settings.configure(
    DATABASES={{"default": {{
        "ENGINE": "django_postgrespool", "NAME": "postgres", "USER": {user!r},
        "PASSWORD": {password!r}, "HOST": "127.0.0.1", "PORT": "{port}",
        "OPTIONS": {{"connect_timeout": 3, "sslmode": "disable"}},
        "POOL_OPTIONS": {{"pool_size": 1, "max_overflow": 1, "pre_ping": True, "timeout": 1}},
    }}}},
    INSTALLED_APPS=[], USE_TZ=True,
)
django.setup()
from django.db import connection


def pid():
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        return cursor.fetchone()[0]


first = pid()
connection.close()
print(first, flush=True)
os.kill(first, signal.SIGSTOP)
started = time.monotonic()
second = pid()
print(json.dumps({{"second": second, "took": time.monotonic() - started}}), flush=True)
connection.close()
os.kill(first, signal.SIGCONT)
"""


def test_under_gevent_a_frozen_backends_ping_is_given_up(server, tmp_path) -> None:
    script = tmp_path / "gevent_ping.py"
    script.write_text(
        textwrap.dedent(GEVENT_SCRIPT).format(user=SUPERUSER, password=PASSWORD, port=server.port)
    )
    process = subprocess.Popen(
        [sys.executable, str(script)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    first = 0
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line.strip().isdigit(), (line, process.stderr.read() if process.stderr else "")
        first = int(line)
        try:
            out, err = process.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            pytest.fail("under gevent the ping of a frozen backend was still waiting after 10 s")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if first:
            try:
                os.kill(first, signal.SIGCONT)
            except ProcessLookupError:
                pass
    result = json.loads(out.strip().splitlines()[-1])
    assert result["second"] != first and result["took"] < 6, (result, err[-2000:])
