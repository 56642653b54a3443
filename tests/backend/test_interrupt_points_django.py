"""Signal-handler interrupts inside Django's own frames, for the operations the pool relies on.

test_interrupt_points_wrapper.py raises its ``_Interrupt`` in the package's
frames and at the entry of the calls they make, never inside Django's. Here
the same tracer (test_interrupt_points.py's Injector, with that file's rules
for where a handler runs) also raises at every point of a frame whose code
is under ``django/db/`` (Atomic.__enter__/__exit__, BaseDatabaseWrapper's
set_autocommit(), commit(), rollback(), savepoint*(), close(),
close_if_unusable_or_obsolete(), connect(), run_and_clear_commit_hooks(),
CursorWrapper.execute()...), and at the entry of the calls those frames make
(psycopg's commit(), a Signal.send...).

One operation (an atomic block that commits, one that rolls back, nested
savepoints, on_commit callbacks, Django's close() and request end, a connect)
runs on this thread with the interrupt at its N-th point. Points in
transaction.py and base/base.py are all tried; beyond RUNS in all, the others
are sampled evenly (every k-th, deterministic). After each run:

* before any recovery: the wrapper does not point at a session the pool
  keeps idle or lends elsewhere (the wrapper file's audit_held);
* the interrupted request ends (close_old_connections()); the wrapper holds
  no lease past it; another thread's request, on a fresh wrapper of the same
  one-connection pool (so the very session this thread used, unless it was
  closed), finds no transaction open, autocommit on, the setup in place;
* this thread's next request (close_old_connections(), a query,
  close_old_connections()) runs on a fresh session in autocommit mode;
* nothing lost: the wrapper file's audit of the pool's counts and leases.

A failure of the first, second or fourth kind is the backend's (the stock
engine has no next borrower). A failure of this thread's next request alone
is compared with the stock engine (django.db.backends.postgresql) interrupted
at the same point (same kind, file and line, under the same chain of
Django's frames, same occurrence): the backend's
only if the stock engine recovers there.

Found (6 Dec), the backend's, fixed: with psycopg2, a server-side cursor's
close() (backend._closing_once's close_within()) interrupted just after
``self._closing.acquire(timeout=0)`` returned, before its ``try:``, left
the lock held: checkin's close_at_checkin() waited 5 s for it, gave up, and
the session went to the next borrower with the WITH HOLD cursor open (the
tests at the end; the sweep of server-side cursors finds it as point 94).
The lock is re-entrant now (the thread's own checkin closes the cursor at
once), and a cursor still open after checkin's close (its lock held by a
thread that ended) has its connection closed instead of lent. Those tests
fail on the code before.

Otherwise the only failures are Django's own,
the same with the stock engine: interrupted in Atomic.__enter__ after
``in_atomic_block = True`` (or its savepoint) and before the with-body runs,
or in Atomic.__exit__ before ``in_atomic_block = False``, the wrapper stays
``in_atomic_block`` with autocommit off; request_finished's close() then
only sets closed_in_transaction, and every later request on that thread
fails ("the connection is closed") until the thread ends. The backend
discards that connection (backend.py, _close(): closed inside an atomic
block), so the pool loses nothing and no other borrower sees it. Also
Django's: interrupted at set_autocommit(True)'s DatabaseErrorWrapper.__exit__
(the driver's autocommit already on, the wrapper's flag still off), a handler
that then opens an atomic block gets "SAVEPOINT can only be used in
transaction blocks" and the thread is stuck the same way.
"""

from __future__ import annotations

import contextlib
import gc
import inspect
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from types import FrameType, SimpleNamespace
from typing import Any

import pytest
from django.db import close_old_connections, connections, transaction
from django.db.backends.utils import debug_transaction
from django_postgrespool import backend as backend_module

from tests.backend.test_interrupt_points import Injector, _log
from tests.backend.test_interrupt_points_wrapper import (
    CHECK_SQL,
    Other,
    Run,
    WrapperInjector,
    _ours,
    marker_table,
)
from tests.backend.test_signal_storm import _Interrupt
from tests.conftest import with_contextlib_suppress_delete

# Heavy (hundreds of runs on PostgreSQL): with the tests with servers of their own.
pytestmark = pytest.mark.servers

RUNS = 75  # runs of one operation at most (beyond: transaction.py, base.py, and a sample)
MAX_FAILURES = 6  # reported together

_DJANGO_DB = f"{os.sep}django{os.sep}db{os.sep}"
_SITE = f"{os.sep}site-packages{os.sep}"
# Where the points are tried all, however many.
_ALWAYS = (f"django{os.sep}db{os.sep}transaction.py", f"base{os.sep}base.py")

_PSYCOPG2 = getattr(backend_module, "_PSYCOPG2_CURSOR", None) is not None

Key = tuple[str, str, int]  # (kind, file:line or entry, occurrence)


def _django_db(frame: FrameType) -> bool:
    return _DJANGO_DB in frame.f_code.co_filename


def _traced(frame: FrameType) -> bool:
    return _ours(frame) or _django_db(frame)


def _short(filename: str) -> str:
    return filename.rsplit(_SITE, 1)[-1] if _SITE in filename else filename


class DjangoInjector(WrapperInjector):
    """The wrapper file's injector, raising in Django's django/db frames too.

    ``target``: raise at that point (a key: kind, place, occurrence), not at
    the ``at``-th: the same place in another engine's run.
    """

    def __init__(self, at: int, target: Key | None = None) -> None:
        super().__init__(at)
        self.target = target
        self.seen: dict[tuple[str, str], int] = {}
        self.keys: list[Key] = []  # every point met, in order
        self.fired_key: Key | None = None

    def _excluded(self, frame: FrameType) -> bool:
        if Injector._excluded(self, frame):
            return True
        if _traced(frame):
            return False
        parent = frame.f_back
        return parent is None or parent is self.base or not _traced(parent)

    def _call(self, frame: FrameType, event: str, arg: Any) -> Any:
        local = Injector._call(self, frame, event, arg)
        if local is not None and not _traced(frame):
            frame.f_trace_opcodes = False  # its entry was the point
            frame.f_trace = None  # set by Injector._call
            return None
        return local

    def point(self, frame: FrameType, kind: str, line: int | None) -> None:
        code = frame.f_code
        place = f"{_short(code.co_filename)}:" + (
            f"{line}" if line is not None else f"{frame.f_lineno} {code.co_qualname}"
        )
        if kind == "at the entry":
            place = f"{_short(code.co_filename)}: {code.co_qualname}"
        # Django's frames leading there (the package's left out: the stock
        # engine has none), so the n-th time is the same in both engines.
        chain = []
        f: FrameType | None = frame
        while f is not None and f is not self.base:
            if _django_db(f):
                chain.append(f.f_code.co_qualname)
            f = f.f_back
        place = f"{place} [{' > '.join(reversed(chain))}]"
        n = self.seen[kind, place] = self.seen.get((kind, place), 0) + 1
        key = (kind, place, n)
        self.keys.append(key)
        if self.target is not None:
            if key != self.target:
                return
            self.at = self.count + 1
        if self.count + 1 == self.at:
            self.fired_key = key
        super().point(frame, kind, line)


# -- one run ------------------------------------------------------------------------------

Scenario = Callable[[Any, str], tuple[Callable[[], Any], type[BaseException] | None]]


def _fresh_request(alias: str) -> Callable[[], tuple[Any, ...]]:
    """Another thread's whole request on a fresh wrapper: what its session looks like."""

    def job() -> tuple[Any, ...]:
        close_old_connections()
        conn = connections[alias]
        try:
            with conn.cursor() as cursor:
                cursor.execute(CHECK_SQL)
                pid, app, fresh = cursor.fetchone()
                raw_autocommit = conn.connection.autocommit
                cursor.execute("SELECT count(*) FROM pg_cursors")
                (cursors,) = cursor.fetchone()
            close_old_connections()
            return pid, app, fresh, raw_autocommit, cursors
        finally:
            with_contextlib_suppress_delete(connections, alias)

    return job


def _backend_pid(raw: Any) -> int | None:
    if raw is None or raw.closed:
        return None
    info = getattr(raw, "info", None)
    return info.backend_pid if info is not None else raw.get_backend_pid()


def _same_thread_request(conn: Any) -> list[str]:
    """This thread's next request: a fresh transaction-less session in autocommit mode."""
    problems = []
    try:
        close_old_connections()  # request_started
        with conn.cursor() as cursor:
            cursor.execute(CHECK_SQL)
            _, _, fresh = cursor.fetchone()
        if not fresh:
            problems.append("the next request ran inside the interrupted one's transaction")
        if not conn.get_autocommit():
            problems.append("the next request ran with autocommit off")
        if conn.in_atomic_block:
            problems.append("the next request started inside an atomic block")
        close_old_connections()  # request_finished
    except Exception as error:  # noqa: BLE001 - reported
        problems.append(f"the next request failed: {error!r}")
    return problems


def _caused_by_interrupt(error: BaseException | None) -> bool:
    while error is not None:
        if isinstance(error, _Interrupt):
            return True
        error = error.__context__
    return False


class Outcome:
    def __init__(self) -> None:
        self.fired: str | None = None
        self.key: Key | None = None
        self.keys: list[Key] = []
        self.ours: list[str] = []  # the pool's, or another borrower's
        self.same_thread: list[str] = []  # this thread's next request


def run_once(
    alias: str,
    app: str,
    scenario: Scenario,
    *,
    pooled: bool,
    at: int,
    target: Key | None = None,
    handler_query: bool = False,
) -> Outcome:
    out = Outcome()
    run = Run(alias, app)
    other: Other | None = None
    try:
        conn = run.conn
        operation, expected = scenario(conn, alias)
        injector = DjangoInjector(at, target)
        _, error = injector.run(operation)
        out.fired, out.key, out.keys = injector.fired, injector.fired_key, injector.keys
        if out.fired is not None:
            # Or what a `finally` of Django's raised over it (Atomic.__exit__'s
            # set_autocommit(True) with the transaction still open).
            if not _caused_by_interrupt(error):
                out.ours.append(f"the interrupt became {error!r}")
        elif error is not None and not (expected and isinstance(error, expected)):
            out.ours.append(f"the operation raised {error!r}")
        if pooled:
            try:
                run.audit_held()
            except AssertionError as failure:
                out.ours.append(str(failure))
        if handler_query:
            # The interrupted request's exception handler goes on with the
            # database: a query, then an atomic block of its own.
            try:
                with conn.cursor() as cursor:
                    cursor.execute("SELECT 1")
            except Exception:  # noqa: BLE001, S110 - Django's (needs_rollback, a closed one)
                pass
            try:
                with transaction.atomic(using=alias), conn.cursor() as cursor:
                    cursor.execute("SELECT 1")
            except Exception:  # noqa: BLE001, S110 - Django's (TransactionManagementError...)
                pass
        try:
            close_old_connections()  # the interrupted request's end
        except Exception as failure:  # noqa: BLE001 - reported
            out.same_thread.append(f"the request's end raised {failure!r}")
        if pooled:
            mine = _backend_pid(conn.connection)
            if conn._lease is not None:
                out.ours.append(f"the wrapper kept {conn._lease!r} past the request's end")
            else:
                other = Other(alias, "next borrower")
                try:
                    pid, other_app, fresh, raw_autocommit, cursors = other.call(
                        _fresh_request(alias)
                    )
                except AssertionError as failure:
                    out.ours.append(f"another thread's request: {failure}")
                else:
                    if not fresh:
                        out.ours.append(
                            f"another thread was lent backend {pid} with a transaction open"
                        )
                    if raw_autocommit is not True:
                        out.ours.append(f"another thread was lent backend {pid} in autocommit off")
                    if cursors:
                        out.ours.append(f"another thread was lent backend {pid} with a cursor open")
                    if other_app != app:
                        out.ours.append(f"another thread's application_name {other_app!r}")
                    if mine is not None and pid == mine:
                        out.ours.append(f"backend {pid} lent while this wrapper still points at it")
        out.same_thread += _same_thread_request(conn)
    finally:
        if other is not None:
            other.stop()
        try:
            with_contextlib_suppress_delete(connections, alias)
        except Exception as failure:  # noqa: BLE001 - reported
            out.same_thread.append(f"closing the wrapper raised {failure!r}")
        try:
            if pooled:
                try:
                    run.audit()
                except AssertionError as failure:
                    out.ours.append(str(failure))
        finally:
            run.close()
    return out


def _chosen(keys: list[Key]) -> list[int]:
    """The points tried (1-based): all of transaction.py's and base.py's, a sample of others."""
    always = [i for i, key in enumerate(keys, 1) if key[1].split(":")[0].endswith(_ALWAYS)]
    rest = [i for i in range(1, len(keys) + 1) if i not in set(always)]
    room = max(RUNS - len(always), 10)
    step = max(1, math.ceil(len(rest) / room))
    return sorted(set(always) | set(rest[::step]))


def explore(
    pooled: tuple[str, str],
    stock: tuple[str, str],
    scenario: Scenario,
    *,
    handler_query: bool = False,
) -> list[str]:
    """Interrupt ``scenario`` at each chosen point; return the points (fails on ours)."""
    alias, app = pooled
    through = run_once(alias, app, scenario, pooled=True, at=10**9, handler_query=handler_query)
    assert through.fired is None
    assert not through.ours and not through.same_thread, (through.ours, through.same_thread)
    chosen = _chosen(through.keys)
    failures: list[str] = []
    points: list[str] = []
    django_stuck: dict[Key, list[str]] = {}
    for at in chosen:
        out = run_once(alias, app, scenario, pooled=True, at=at, handler_query=handler_query)
        if out.fired is None:
            continue
        points.append(out.fired)
        if out.ours:
            failures.append(f"point {at}, {out.fired}: {out.ours}")
        elif out.same_thread:
            assert out.key is not None
            django_stuck[out.key] = out.same_thread + [out.fired]
        if len(failures) >= MAX_FAILURES:
            break
    # This thread's next request alone: the stock engine, interrupted at the same place.
    for key, problems in django_stuck.items():
        if len(failures) >= MAX_FAILURES:
            break
        s_alias, s_app = stock
        out = run_once(
            s_alias, s_app, scenario, pooled=False, at=0, target=key, handler_query=handler_query
        )
        if out.fired is None or not out.same_thread:
            seen = "never meets it" if out.fired is None else "recovers"
            failures.append(f"{key} (the stock engine {seen}): {problems}")
        else:
            print(f"Django's own, at {key}:\n  pooled: {problems}\n  stock: {out.same_thread}")
    _log(points)
    print(f"{len(through.keys)} points, {len(chosen)} tried, {len(django_stuck)} Django's own")
    assert not failures, "\n".join(failures)
    return points


# -- the fixtures ---------------------------------------------------------------------------

OPTIONS = {"pool_size": 1, "max_overflow": 0, "timeout": 3, "fair_after": 0.0}


@pytest.fixture
def aliases(pooled_alias: Any) -> Callable[..., tuple[tuple[str, str], tuple[str, str]]]:
    """(the pooled alias, the stock engine's alias): one connection, on the suite's server."""

    def make(**pool_options: Any) -> tuple[tuple[str, str], tuple[str, str]]:
        pooled = pooled_alias("djinterrupted", pool_options={**OPTIONS, **pool_options})
        stock = pooled_alias("djstock", ENGINE="django.db.backends.postgresql")
        return pooled, stock

    return make


@pytest.fixture
def rows(pooled_alias: Any) -> Iterator[str]:
    yield from marker_table(pooled_alias, "djtables", "interrupt_dj")


# -- the operations ------------------------------------------------------------------------


class _Rollback(Exception):
    """The block's own error: Atomic.__exit__ rolls back."""


def _start(conn: Any) -> None:
    close_old_connections()  # request_started
    with conn.cursor() as cursor:
        cursor.execute("SELECT 1")  # the request holds its connection (lease='request')


def atomic_commit(table: str) -> Scenario:
    def scenario(conn: Any, alias: str) -> tuple[Callable[[], Any], None]:
        _start(conn)

        def operation() -> None:
            with transaction.atomic(using=alias), conn.cursor() as cursor:
                cursor.execute(f"INSERT INTO {table} VALUES (1)")

        return operation, None

    return scenario


def atomic_rollback(table: str) -> Scenario:
    def scenario(conn: Any, alias: str) -> tuple[Callable[[], Any], type[BaseException]]:
        _start(conn)

        def operation() -> None:
            with transaction.atomic(using=alias):
                with conn.cursor() as cursor:
                    cursor.execute(f"INSERT INTO {table} VALUES (2)")
                raise _Rollback

        return operation, _Rollback

    return scenario


def nested(table: str) -> Scenario:
    def scenario(conn: Any, alias: str) -> tuple[Callable[[], Any], None]:
        _start(conn)

        def operation() -> None:
            with transaction.atomic(using=alias):
                try:
                    with transaction.atomic(using=alias), conn.cursor() as cursor:
                        cursor.execute(f"INSERT INTO {table} VALUES (3)")
                        raise _Rollback
                except _Rollback:
                    pass
                with transaction.atomic(using=alias), conn.cursor() as cursor:
                    cursor.execute(f"INSERT INTO {table} VALUES (4)")

        return operation, None

    return scenario


def on_commit(table: str) -> Scenario:
    def scenario(conn: Any, alias: str) -> tuple[Callable[[], Any], None]:
        _start(conn)

        def callback() -> None:
            with conn.cursor() as cursor:
                cursor.execute(f"INSERT INTO {table} VALUES (6)")

        def operation() -> None:
            with transaction.atomic(using=alias):
                with conn.cursor() as cursor:
                    cursor.execute(f"INSERT INTO {table} VALUES (5)")
                transaction.on_commit(callback, using=alias)
                transaction.on_commit(callback, using=alias, robust=True)

        return operation, None

    return scenario


def request_end(dirty: bool) -> Scenario:
    def scenario(conn: Any, alias: str) -> tuple[Callable[[], Any], None]:
        _start(conn)
        if dirty:  # a request that left autocommit off: Django's way, close()
            conn.set_autocommit(False)
            with conn.cursor() as cursor:
                cursor.execute("SELECT 1")
        return close_old_connections, None

    return scenario


def request_end_after_error(conn: Any, alias: str) -> tuple[Callable[[], Any], None]:
    # errors_occurred: request_finished takes Django's way (is_usable(), then close()).
    _start(conn)
    try:
        with conn.cursor() as cursor:
            cursor.execute("SELECT * FROM interrupt_no_such_table")
    except Exception:  # noqa: BLE001, S110 - the error wanted
        pass
    assert conn.errors_occurred
    return close_old_connections, None


def set_rollback(table: str) -> Scenario:
    def scenario(conn: Any, alias: str) -> tuple[Callable[[], Any], None]:
        _start(conn)

        def operation() -> None:
            with transaction.atomic(using=alias):
                with conn.cursor() as cursor:
                    cursor.execute(f"INSERT INTO {table} VALUES (7)")
                transaction.set_rollback(True, using=alias)

        return operation, None

    return scenario


def autocommit_query(table: str) -> Scenario:
    # No atomic block: lease='transaction' gives the connection back as the cursor closes.
    def scenario(conn: Any, alias: str) -> tuple[Callable[[], Any], None]:
        _start(conn)

        def operation() -> None:
            with conn.cursor() as cursor:
                cursor.execute(f"INSERT INTO {table} VALUES (8)")
                cursor.execute(f"SELECT count(*) FROM {table}")
                cursor.fetchone()

        return operation, None

    return scenario


def server_side_cursor(table: str) -> Scenario:
    # QuerySet.iterator()'s cursor (chunked_cursor()): WITH HOLD in autocommit mode.
    def scenario(conn: Any, alias: str) -> tuple[Callable[[], Any], None]:
        _start(conn)

        def operation() -> None:
            cursor = conn.chunked_cursor()
            try:
                cursor.execute("SELECT generate_series(1, 20)")
                while cursor.fetchmany(7):
                    pass
            finally:
                cursor.close()

        return operation, None

    return scenario


def connect_affinity(conn: Any, alias: str) -> tuple[Callable[[], Any], None]:
    # Its last connection idle in the pool: taken back, Django's setup skipped.
    _start(conn)
    close_old_connections()
    return conn.ensure_connection, None


def djangos_close(conn: Any, alias: str) -> tuple[Callable[[], Any], None]:
    _start(conn)
    return conn.close, None


def connect(conn: Any, alias: str) -> tuple[Callable[[], Any], None]:
    close_old_connections()
    return conn.ensure_connection, None


# -- the tests -------------------------------------------------------------------------------

OPERATIONS = {
    "atomic commit": atomic_commit,
    "atomic rollback": atomic_rollback,
    "set_rollback": set_rollback,
    "nested savepoints": nested,
    "on_commit": on_commit,
}


@pytest.mark.parametrize("handler", [False, True])
@pytest.mark.parametrize("lease", ["request", "transaction"])
@pytest.mark.parametrize("name", list(OPERATIONS))
def test_an_interrupted_atomic_block(
    aliases: Any, rows: str, name: str, lease: str, handler: bool
) -> None:
    # handler: the program catches the interrupt and goes on with the database
    # in the same request (an exception handler, an `except SoftTimeLimitExceeded:`).
    pooled, stock = aliases(lease=lease)
    points = explore(pooled, stock, OPERATIONS[name](rows), handler_query=handler)
    assert any("Atomic.__exit__" in p for p in points)
    assert any("set_autocommit" in p for p in points)


# psycopg's ServerCursor interrupted at its __init__'s entry: its __del__ complains.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("handler", [False, True])
@pytest.mark.parametrize("lease", ["request", "transaction"])
@pytest.mark.parametrize("name", ["autocommit query", "server-side cursor"])
def test_an_interrupted_query_outside_atomic(
    aliases: Any, rows: str, name: str, lease: str, handler: bool
) -> None:
    # psycopg2, server-side cursor, lease 'request': the sweep meets the
    # point of test_a_server_side_cursor_close_interrupted_after_taking_its_lock
    # (sampled away with lease 'transaction').
    pooled, stock = aliases(lease=lease)
    scenario = (autocommit_query if name == "autocommit query" else server_side_cursor)(rows)
    points = explore(pooled, stock, scenario, handler_query=handler)
    assert any("CursorWrapper" in p for p in points)


@pytest.mark.parametrize("state", ["clean", "autocommit off", "errors occurred"])
def test_an_interrupted_request_end(aliases: Any, state: str) -> None:
    pooled, stock = aliases()
    if state == "errors occurred":
        scenario = request_end_after_error
    else:
        scenario = request_end(state == "autocommit off")
    points = explore(pooled, stock, scenario)
    assert any("close_if_unusable_or_obsolete" in p for p in points)


def test_an_interrupted_djangos_close(aliases: Any) -> None:
    pooled, stock = aliases()
    points = explore(pooled, stock, djangos_close)
    assert any("BaseDatabaseWrapper.close" in p for p in points)


def test_an_interrupted_connect(aliases: Any) -> None:
    # A fresh pool each run: Django's whole connect path (a new connection).
    pooled, stock = aliases()
    points = explore(pooled, stock, connect)
    assert any("BaseDatabaseWrapper.connect" in p for p in points)


def test_an_interrupted_connect_with_an_affinity_hit(aliases: Any) -> None:
    pooled, stock = aliases()
    points = explore(pooled, stock, connect_affinity)
    assert any("BaseDatabaseWrapper.ensure_connection" in p for p in points)


# -- found -------------------------------------------------------------------------------


def _closing_point() -> Key:
    """The point just after close_within()'s lock is taken (backend._closing_once)."""
    source = inspect.getsource(backend_module)
    line = source[: source.index("if self._closing.acquire(timeout=wait)")].count("\n") + 1
    return ("after the call", f"{_short(backend_module.__file__ or '')}:{line} []", 1)


def _open_cursors(alias: str) -> Callable[[], int]:
    def job() -> int:
        close_old_connections()
        try:
            with connections[alias].cursor() as cursor:
                cursor.execute("SELECT count(*) FROM pg_cursors")
                (count,) = cursor.fetchone()
            close_old_connections()
            return int(count)
        finally:
            with_contextlib_suppress_delete(connections, alias)

    return job


@pytest.mark.skipif(not _PSYCOPG2, reason="psycopg2's server-side cursors only")
def test_a_server_side_cursor_close_interrupted_after_taking_its_lock(aliases: Any) -> None:
    # QuerySet.iterator() in autocommit mode (lease 'request', pool_size 1):
    # psycopg2's named cursor, DECLAREd WITH HOLD, read in part; its close()
    # (the iterator's end, a generator's finalizer) is interrupted by a signal
    # handler at the point after `self._closing.acquire(timeout=0)` returned
    # True (a C call: CALL checks the eval breaker), before the `try:` whose
    # `finally` releases it. The lock stays held: at the request's end the
    # pool's reset called close_at_checkin(), which waited 5 s for the lock,
    # gave up without closing, and the rollback left a WITH HOLD cursor
    # open: the next borrower (another thread here) got a session with the
    # interrupted request's cursor (its materialized rows, its name). The
    # lock is re-entrant now: this thread's own checkin closes it at once.
    with _cursor_read_in_part(aliases) as (conn, cursor, next_borrower_cursors):
        injector = DjangoInjector(0, _closing_point())
        _, error = injector.run(cursor.close)
        assert isinstance(error, _Interrupt), (error, injector.keys)
        started = time.monotonic()
        close_old_connections()  # the request's end: checkin
        assert time.monotonic() - started < 4.0, "checkin waited for its own thread's lock"
        assert conn._lease is None
        assert next_borrower_cursors() == 0, "the next borrower's session has a cursor"


@pytest.mark.skipif(not _PSYCOPG2, reason="psycopg2's server-side cursors only")
def test_a_server_side_cursor_whose_close_never_ended_closes_its_connection(
    aliases: Any,
) -> None:
    # The same close interrupted on another thread that then ended (a
    # generator abandoned by an async view, finalized on the event loop's
    # thread): the cursor's lock is held for good. Checkin waits for it (5 s),
    # cannot close the cursor, and must not lend the session with it open:
    # the connection is closed (the pool opens another).
    with _cursor_read_in_part(aliases) as (conn, cursor, next_borrower_cursors):
        pool = conn._lease.pool
        closed_before = pool.stats()["closed"]
        ended = threading.Thread(target=cursor._closing.acquire)
        ended.start()
        ended.join(10)
        close_old_connections()  # the request's end: checkin
        assert pool.stats()["closed"] == closed_before + 1, "its connection was kept"
        assert next_borrower_cursors() == 0, "the next borrower's session has a cursor"


def test_a_server_side_cursor_left_open_is_closed_before_the_next_borrower(aliases: Any) -> None:
    # The control for the test above (both drivers): no interrupt, the cursor
    # read in part and left open at the request's end: checkin closes it.
    with _cursor_read_in_part(aliases) as (_, _, next_borrower_cursors):
        close_old_connections()  # the request's end: checkin
        assert next_borrower_cursors() == 0


@contextlib.contextmanager
def _cursor_read_in_part(aliases: Any) -> Iterator[tuple[Any, Any, Callable[[], int]]]:
    """A request's server-side cursor (QuerySet.iterator()'s), read in part.

    Yields the wrapper, the cursor, and a function counting the cursors open
    on the session another thread's request gets next (pool_size 1: this one).
    """
    (alias, app), _ = aliases()
    run = Run(alias, app)
    other = Other(alias, "next borrower")
    try:
        conn = run.conn
        _start(conn)
        cursor = conn.chunked_cursor()
        cursor.execute("SELECT generate_series(1, 20)")
        cursor.fetchmany(7)
        yield conn, cursor, lambda: other.call(_open_cursors(alias))
    finally:
        other.stop()
        run.close()


def _suspended_in_a_cycle() -> None:
    """Leave a generator of Django's suspended, in a reference cycle (garbage)."""
    manager = debug_transaction(SimpleNamespace(queries_logged=False), "SELECT 1")
    manager.__enter__()
    cycle: list[Any] = [manager]
    cycle.append(cycle)


def _collect_half_built_driver_objects() -> None:
    """Collect the garbage left by interrupts injected into a driver's constructors.

    A psycopg cursor interrupted inside its ``__init__`` is half built: its
    ``__del__`` raises AttributeError whenever the collector gets to it, an
    unraisable exception that fails whichever test runs then (7 Dec, this
    module's last test, with lanes run side by side). Collected at the end of
    the test that made it, with those exceptions, and only those, ignored.
    """
    previous = sys.unraisablehook

    def hook(unraisable: Any) -> None:
        module = getattr(unraisable.object, "__module__", None) or ""
        if isinstance(unraisable.exc_value, AttributeError) and module.startswith("psycopg"):
            return
        previous(unraisable)

    sys.unraisablehook = hook
    try:
        gc.collect()
    finally:
        sys.unraisablehook = previous


@pytest.fixture(autouse=True)
def _half_built_driver_objects_collected() -> Iterator[None]:
    yield
    _collect_half_built_driver_objects()


def test_the_points_the_garbage_collector_runs_are_not_counted() -> None:
    # An earlier run may leave a generator suspended (interrupted at its
    # manager's __exit__ entry); the collector closes it whenever it runs, so
    # its frames are no point of the operation: an interrupt raised there is
    # swallowed as unraisable (6 Dec: "the interrupt became _Rollback").
    for at in (10**9, 1):
        _collect_half_built_driver_objects()
        _suspended_in_a_cycle()
        injector = DjangoInjector(at)
        _, error = injector.run(gc.collect)
        assert injector.keys == [], injector.keys
        assert injector.fired is None and error is None
