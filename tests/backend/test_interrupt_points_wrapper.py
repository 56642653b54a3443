"""Every place a signal handler can interrupt the Django wrapper, tried one at a time.

test_interrupt_points.py does this for the pool core (pool.py); the wrapper
(backend.py: connect(), _borrow(), _close(), _give_back_dropped(),
_held_lease(), close_if_unusable_or_obsolete(), lease='transaction') was
only tried by random SIGALRM storms. Here one wrapper operation runs on this
thread, on the suite's real PostgreSQL, with test_interrupt_points.py's
tracer raising ``_Interrupt`` at its N-th injection point, for N = 1, 2, ...
until a run meets no N-th point. The points are where CPython runs a Python
signal handler (see that file's docstring), restricted here to:

* every point inside a frame of the ``django_postgrespool`` package;
* the entry of a Python function called from such a frame (Django's
  ``Signal.send``, psycopg's ``rollback()``...): the handler runs there
  before the callee did anything.

Not raised: inside Django's own frames (its close(), connect() and
Atomic.__exit__ are not signal-safe either: an exception between its
``self._close()`` and ``self.connection = None`` is Django's to handle, and
the wrapper's recovery is what is checked here), nor, as in the core's
file, inside SQLAlchemy's, the logging module's and finalizers' frames. So a
new physical connection's opening (QueuePool's creator, under SQLAlchemy's
frames) is not interrupted; Django's setup of it (our get_connection_params,
get_new_connection, init_connection_state, the connection_created send) is.

Each run starts from a fresh pool and a fresh wrapper set up the same way.
After the operation, the state is looked at before any recovery (the
wrapper must not point at a session the pool lends elsewhere or keeps idle),
then the program's recovery runs: the interrupted request's end and the next
request's start (close_old_connections() twice) and one more request on the
same thread, which must run on a healthy session: checked out by this
wrapper alone (another thread holding at the same time has another backend
pid), no transaction left open, the session's setup in place (the
application_name, the connection_created receiver's SET). Then nothing may
be lost: checked_out 0, opened - closed == size, every lease idle in the
idle set with its connection open.

Found (6 Dec, both fixed; the tests below fail on the code before): a
give-back interrupted after it handed the connection to a waiting thread left
the wrapper's ``connection`` pointing at it until the next
close_old_connections() (a query in an exception handler would have run on
the waiter's session); and, with no interrupt, psycopg2 left a transaction
begun by hand open across checkin (its rollback() does nothing in autocommit
mode).
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections.abc import Callable, Iterator
from types import CodeType, FrameType
from typing import Any

import pytest
from django.db import close_old_connections, connections, transaction
from django.db.backends.signals import connection_created
from django_postgrespool import pool_stats, registry
from django_postgrespool.pool import IDLE, IN_USE, ConnectionPool, _Doorbell

from tests.backend.test_interrupt_points import Injector, _log
from tests.backend.test_signal_storm import _Interrupt
from tests.conftest import with_contextlib_suppress_delete

# Heavy (hundreds of runs on PostgreSQL, 30-45 s a lane): with MATRIX=1, in
# SERVER_LANES only (both drivers), as the tests with servers of their own.
pytestmark = pytest.mark.servers

MAX_POINTS = 3000  # injection points of one operation (bounds a failing run)
MAX_FAILURES = 6  # points that lost something, reported together
WAIT = 10.0  # seconds a helper thread may take for one job

# One statement: the backend's pid, its application_name, and whether this
# statement is the first of its transaction (now() is the transaction's
# start): a transaction left open by the interrupted request makes it false.
CHECK_SQL = (
    "SELECT pg_backend_pid(), current_setting('application_name'), now() = statement_timestamp()"
)


def _ours(frame: FrameType) -> bool:
    return frame.f_globals.get("__name__", "").startswith("django_postgrespool")


class WrapperInjector(Injector):
    """Injector raising only in the package's frames and at the entry of calls they make."""

    def _excluded(self, frame: FrameType) -> bool:
        if super()._excluded(frame):
            return True
        if _ours(frame):
            return False
        parent = frame.f_back
        # A callee of ours keeps its entry point (counted by Injector._call);
        # nothing inside it is traced (see _call).
        return parent is None or parent is self.base or not _ours(parent)

    def _call(self, frame: FrameType, event: str, arg: Any) -> Any:
        local = super()._call(frame, event, arg)
        if local is not None and not _ours(frame):
            # Its entry was the point: no opcode tracing of Django's or
            # psycopg's body (only the package's frames are raised in).
            frame.f_trace_opcodes = False
            frame.f_trace = None  # set by Injector._call
            return None
        return local


class Other:
    """Another thread of the program, with its own wrapper: never interrupted."""

    def __init__(self, alias: str, name: str) -> None:
        self.alias = alias
        self.name = name
        self.pid: int | None = None  # its backend's pid while it holds a connection
        self._block: Any = None  # the atomic block it holds its connection in
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any] | None, queue.SimpleQueue]] = (
            queue.SimpleQueue()
        )
        self.thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            job, answer = self._jobs.get()
            if job is None:
                with_contextlib_suppress_delete(connections, self.alias)
                answer.put(None)
                return
            try:
                answer.put((job(), None))
            except BaseException as error:  # noqa: BLE001 - handed to the caller
                answer.put((None, error))

    def call(self, job: Callable[[], Any]) -> Any:
        answer: queue.SimpleQueue = queue.SimpleQueue()
        self._jobs.put((job, answer))
        try:
            result, error = answer.get(timeout=WAIT)
        except queue.Empty:
            raise AssertionError(f"{self.name} hung") from None
        if error is not None:
            raise AssertionError(f"{self.name}: {error!r}") from error
        return result

    def hold(self) -> int:
        """Begin a request: borrow, and tell the backend's pid (the connection is kept)."""

        def job() -> int:
            # Inside an atomic block: held with lease='transaction' too.
            block = transaction.atomic(using=self.alias)
            block.__enter__()
            self._block = block
            with connections[self.alias].cursor() as cursor:
                cursor.execute("SELECT pg_backend_pid()")
                (pid,) = cursor.fetchone()
            return pid

        self.pid = self.call(job)
        return self.pid

    def release(self) -> None:
        """End its request (request_finished)."""
        block, self._block = self._block, None
        if block is not None:
            self.pid = None

            def job() -> None:
                block.__exit__(None, None, None)
                close_old_connections()

            self.call(job)

    def stop(self) -> None:
        if self.thread.is_alive():
            answer: queue.SimpleQueue = queue.SimpleQueue()
            self._jobs.put((None, answer))
            answer.get(timeout=WAIT)
            self.thread.join(WAIT)


class Run:
    """One run's alias state: a fresh pool, this thread's fresh wrapper, other threads."""

    def __init__(self, alias: str, app: str) -> None:
        self.alias = alias
        self.app = app  # the session's application_name, set up by Django
        self.others: list[Other] = []
        self.receiver_app: str | None = None  # the last one a connection_created receiver set
        # This thread's wrapper and the alias's pools from the run before go.
        with_contextlib_suppress_delete(connections, alias)
        registry.close_pools(alias=alias)
        assert not pool_stats(alias), pool_stats(alias)

    @property
    def conn(self) -> Any:
        return connections[self.alias]

    @property
    def pool(self) -> ConnectionPool:
        pool = self.conn._pool
        assert pool is not None
        return pool

    def other(self) -> Other:
        other = Other(self.alias, f"other {len(self.others) + 1}")
        self.others.append(other)
        return other

    def request(self, sql: str = "SELECT 1") -> None:
        """A whole request on this thread, ended as request_finished does."""
        close_old_connections()
        with self.conn.cursor() as cursor:
            cursor.execute(sql)
        close_old_connections()

    # -- the checks

    def audit_held(self) -> None:
        """Right after the operation: what is lent is held by someone who will give it back.

        Before any recovery: an exception handler of the interrupted request
        (a got_request_exception receiver, a log handler writing to the
        database) may query through this wrapper at once.
        """
        conn, pool = self.conn, self.conn._pool
        if pool is None:  # interrupted before the pool was built
            return
        others = {o.pid for o in self.others if o.pid is not None}
        problems = []
        mine = {conn._lease, conn._last_lease} - {None}
        for lease in list(pool._leases):
            if (
                lease.state is IN_USE
                and lease not in mine
                and lease.owner is threading.current_thread()
            ):
                problems.append(f"{lease!r} lent to this thread, not held by its wrapper")
        raw = conn.connection
        if raw is not None and not raw.closed:
            lease = next((le for le in list(pool._leases) if le.raw is raw), None)
            if lease is not None and not (
                lease.state is IN_USE
                and lease.owner in (threading.current_thread(), None)
                and conn._checkout is not None
                and lease.borrowed_at == conn._checkout[2]
            ):
                problems.append(
                    f"the wrapper's connection is {lease!r} (owner {lease.owner}), not its "
                    f"checkout: its next query would run on a session the pool "
                    f"{'keeps idle' if lease.state is IDLE else 'lends elsewhere'}"
                )
        assert not problems, f"before recovery ({len(others)} other holder(s)): {problems}"

    def recover_and_check(self, holder: Other | None = None) -> None:
        """The program's recovery, then one more request: on a healthy session of its own."""
        conn = self.conn
        close_old_connections()  # the interrupted request's end (request_finished)
        close_old_connections()  # the next request's start (request_started)
        with conn.cursor() as cursor:
            cursor.execute(CHECK_SQL)
            pid, app, fresh = cursor.fetchone()
            lease = conn._lease
            assert lease is not None and lease.state is IN_USE, lease
            assert lease.raw is conn.connection, "the wrapper's connection is not its lease's"
            assert lease.owner in (threading.current_thread(), None), lease.owner
            assert fresh, "the session was still in the interrupted request's transaction"
            expected = self.receiver_app or self.app
            assert app == expected, f"application_name {app!r}, not {expected!r}"
            # Another thread holds a connection at the same time: a session of its own.
            other = holder if holder is not None else self.other()
            other_pid = other.pid if other.pid is not None else other.hold()
            assert other_pid != pid, f"backend {pid} lent to two threads at once"
        close_old_connections()  # the request's end
        for other in self.others:
            other.release()
        self.audit()

    def audit(self) -> None:
        """Nothing lost: nothing checked out, the counts add up, every idle session usable."""
        problems = []
        for stats in pool_stats(self.alias):
            if stats["checked_out"]:
                problems.append(f"checked_out {stats['checked_out']}")
            if stats["opened"] - stats["closed"] != stats["size"]:
                problems.append(
                    f"opened {stats['opened']} - closed {stats['closed']} != size {stats['size']}"
                )
        for pool in registry.all_pools():
            if pool.alias != self.alias:
                continue
            for lease in list(pool._leases):
                if lease.state is not IDLE or lease not in pool._idle:
                    problems.append(f"{lease!r} (owner {lease.owner}) lent to nobody")
                elif lease.raw.closed:
                    problems.append(f"{lease!r} idle with its connection closed")
            if pool._queue.checkedout() != len(pool._leases):
                problems.append(
                    f"QueuePool counts {pool._queue.checkedout()}, {len(pool._leases)} leases"
                )
        assert not problems, f"after recovery: {problems}"

    def close(self) -> None:
        for other in self.others:
            try:
                other.release()
            finally:
                other.stop()
        try:
            with_contextlib_suppress_delete(connections, self.alias)
        finally:
            registry.close_pools(alias=self.alias)


# (operation, the program's continuation after it: called with what it raised)
Operation = tuple[Callable[[], Any], Callable[[BaseException | None], None]]


def _nothing(error: BaseException | None) -> None:
    pass


def explore(
    alias: str,
    app: str,
    scenario: Callable[[Run], Operation],
    *,
    hooks: Callable[[Run], dict[CodeType, Callable[[], None]]] | None = None,
    check: Callable[[Run], None] | None = None,
    holder: Callable[[Run], Other | None] | None = None,
) -> list[str]:
    """Run the scenario's operation once per injection point, then once through.

    ``check(run)``: after the run that met no point, before recovery (the
    scenario did what it says). ``holder(run)``: another thread that holds a
    connection during the recovery request (else one is made to hold).
    """
    points: list[str] = []
    failures: list[str] = []
    for at in range(1, MAX_POINTS + 1):
        run = Run(alias, app)
        where = None
        try:
            operation, carry_on = scenario(run)
            injector = WrapperInjector(at, hooks(run) if hooks else None)
            _, error = injector.run(operation)
            where = injector.fired
            context = f"point {at}, {where or 'no injection'}"
            try:
                if where is not None:
                    assert isinstance(error, _Interrupt), f"the interrupt became {error!r}"
                elif error is not None:
                    raise AssertionError(f"the operation raised {error!r}") from error
                elif check is not None:
                    check(run)
                try:
                    run.audit_held()
                finally:
                    carry_on(error)
                    run.recover_and_check(holder(run) if holder else None)
            except Exception as failure:  # noqa: BLE001 - reported together
                failures.append(f"{context}: {failure!r}")
        finally:
            run.close()
        if where is None or len(failures) >= MAX_FAILURES:
            break
        points.append(where)
    else:
        raise AssertionError("the operation never ran through")
    _log(points)
    assert not failures, "\n".join(failures)
    return points


@pytest.fixture
def db(pooled_alias: Any) -> Callable[..., tuple[str, str]]:
    """A pooled alias of the suite's server: two connections, fair_after 0 (no timing)."""

    def make(**pool_options: Any) -> tuple[str, str]:
        options = {"pool_size": 2, "max_overflow": 0, "timeout": 3, "fair_after": 0.0}
        return pooled_alias("interrupted", pool_options={**options, **pool_options})

    return make


@pytest.fixture
def receiver() -> Iterator[Callable[[str], Callable[[Run], None]]]:
    """A connection_created receiver setting a new application_name at each checkout.

    Its setup must be in place for every query: after recovery, the session
    has the name set by its last call (it ran for this checkout).
    """
    installed: list[Callable[..., None]] = []

    def install(alias: str) -> Callable[[Run], None]:
        counter = itertools.count()
        state: dict[str, Run] = {}

        def on_created(sender: Any, connection: Any, **kwargs: Any) -> None:
            run = state.get("run")
            if connection.alias != alias or run is None:
                return
            name = f"{run.app}-r{next(counter)}"
            with connection.cursor() as cursor:
                cursor.execute("SELECT set_config('application_name', %s, false)", [name])
            run.receiver_app = name

        connection_created.connect(on_created, weak=False)
        installed.append(on_created)
        return lambda run: state.__setitem__("run", run)

    yield install
    for on_created in installed:
        connection_created.disconnect(on_created)


# -- connect() ----------------------------------------------------------------------------


def _connect(run: Run) -> Operation:
    return run.conn.ensure_connection, _nothing


def _source(expected: str) -> Callable[[Run], None]:
    def check(run: Run) -> None:
        assert run.conn._checkout is not None and run.conn._checkout[0] == expected, (
            run.conn._checkout
        )

    return check


@pytest.mark.parametrize("with_receiver", [False, True])
def test_an_interrupted_connect_with_an_affinity_hit(
    db: Any, receiver: Any, with_receiver: bool
) -> None:
    # The wrapper's last connection is idle: taken back, Django's setup skipped,
    # only the per-connect state reset (and the receivers sent).
    alias, app = db()
    attach = receiver(alias) if with_receiver else None

    def scenario(run: Run) -> Operation:
        if attach is not None:
            attach(run)
        run.request()
        return _connect(run)

    points = explore(alias, app, scenario, check=_source("affinity"))
    assert any("_borrow" in p for p in points)
    assert not with_receiver or any("send" in p for p in points)


# The pool's construction (about 230 points: options, metrics) is tried once.
@pytest.mark.parametrize(
    ("with_receiver", "pool_built"), [(False, False), (False, True), (True, True)]
)
def test_an_interrupted_connect_that_opens_a_connection(
    db: Any, receiver: Any, with_receiver: bool, pool_built: bool
) -> None:
    # The first connect() of a process (pool_built False: the pool is built
    # too) or of an alias whose pool has nothing idle: Django's whole setup.
    alias, app = db()
    attach = receiver(alias) if with_receiver else None

    def scenario(run: Run) -> Operation:
        if attach is not None:
            attach(run)
        if pool_built:
            run.conn._current_pool()
        return _connect(run)

    points = explore(alias, app, scenario, check=_source("new"))
    assert any("init_connection_state" in p for p in points)
    assert any("_connect_new" in p for p in points)


def test_an_interrupted_connect_that_waits_at_the_cap(db: Any) -> None:
    # Two other threads hold both connections; as this thread's checkout is
    # about to sleep in line, the first gives its connection back: handed to
    # this checkout. The second still holds it during the recovery request.
    alias, app = db()

    def scenario(run: Run) -> Operation:
        first, second = run.other(), run.other()
        first.hold()
        second.hold()
        run.conn._current_pool()

        def carry_on(error: BaseException | None) -> None:
            first.release()  # its request ends anyway (if the hook never ran)

        return run.conn.ensure_connection, carry_on

    def hooks(run: Run) -> dict[CodeType, Callable[[], None]]:
        return {_Doorbell.listen.__code__: run.others[0].release}

    points = explore(
        alias,
        app,
        scenario,
        hooks=hooks,
        check=_source("handoff"),
        holder=lambda run: run.others[1],
    )
    assert any("_wait_as" in p for p in points)


# -- giving back at a request's end -------------------------------------------------------

# What the interrupted request leaves on its session, and the reset that
# undoes it: nothing; a session-level SET (only reset='discard' undoes it,
# docs/reference/options.rst); a transaction begun by hand ('rollback' "ends
# any open or failed transaction", same page).
DIRT = {
    "nothing": ("rollback", "SELECT 1"),
    "set": ("discard", "SET application_name = 'dirty'"),
    "begin": ("rollback", "BEGIN; SELECT 1"),
}


def _holding(run: Run, dirt: str) -> None:
    close_old_connections()
    with run.conn.cursor() as cursor:
        for statement in dirt.split("; "):
            cursor.execute(statement)


@pytest.mark.parametrize(
    "dirt",
    ["nothing", "set", "begin"],
)
@pytest.mark.parametrize("how", ["close", "close_if_unusable_or_obsolete"])
def test_an_interrupted_give_back_at_a_requests_end(db: Any, how: str, dirt: str) -> None:
    # close(): a program's own; close_if_unusable_or_obsolete(): request_finished's,
    # its fast way (CONN_MAX_AGE 0, nothing unusual).
    reset, statements = DIRT[dirt]
    alias, app = db(reset=reset)

    def scenario(run: Run) -> Operation:
        _holding(run, statements)
        return getattr(run.conn, how), _nothing

    points = explore(alias, app, scenario)
    assert any("_close" in p for p in points) and any("checkin" in p for p in points)


def test_a_transaction_begun_by_hand_is_not_lent_to_the_next_request(db: Any) -> None:
    # The minimal reproduction (no interrupt): pool_size 1, a request runs
    # BEGIN by hand (autocommit mode) and ends; pool._reset() sees the
    # server's status INTRANS and calls raw.rollback(), which psycopg2 skips
    # in autocommit mode. The next request's statements run inside that
    # transaction (now() is its start): never committed unless someone does.
    alias, _ = db(pool_size=1)
    conn = connections[alias]
    with conn.cursor() as cursor:
        cursor.execute("BEGIN")
        cursor.execute("SELECT 1")
    conn.close()
    with conn.cursor() as cursor:
        cursor.execute("SELECT now() = statement_timestamp()")
        fresh = cursor.fetchone()
    conn.close()
    assert fresh == (True,), "the next request ran inside the previous one's transaction"


def _third_waits(run: Run) -> Callable[[BaseException | None], None]:
    """Another thread asks for a connection and waits in line; return the program's carry-on.

    Called once this thread and another hold every connection: the
    operation's give-back hands this thread's connection over to it.
    """
    third = run.other()
    job = threading.Thread(target=lambda: _safe(third.hold), daemon=True)
    job.start()
    pool = run.pool
    deadline = time.monotonic() + WAIT
    while not pool._waiters and time.monotonic() < deadline:
        time.sleep(0.0005)
    assert pool._waiters, "the third thread never waited"

    def carry_on(error: BaseException | None) -> None:
        # The interrupted request's end gives back what it still holds: the
        # waiting thread is served by then, and its request ends.
        close_old_connections()
        job.join(WAIT)
        assert third.pid is not None, "the waiting thread was never served"
        third.release()

    return carry_on


def _safe(job: Callable[[], Any]) -> None:
    try:
        job()
    except AssertionError:
        pass  # seen by carry_on (its pid stays None)


# Found by this file: interrupted once its connection was handed over to a
# waiting thread, _close() re-raises without clearing self.connection; its
# callers other than Django's close() (the fast way of
# close_if_unusable_or_obsolete(), lease='transaction''s _release_if_idle())
# leave it set to the waiter's connection (see the test below).


@pytest.mark.parametrize(
    ("how", "waiting"),
    [
        ("close", False),
        ("close", True),
        ("close_if_unusable_or_obsolete", False),
        ("close_if_unusable_or_obsolete", True),
    ],
)
def test_an_interrupted_give_back_handed_to_a_waiting_thread(
    db: Any, how: str, waiting: bool
) -> None:
    # pool_size 2: this thread and another hold both; a third waits in line
    # and is handed this thread's connection at the request's end.
    alias, app = db()

    def scenario(run: Run) -> Operation:
        holder = run.other()
        holder.hold()
        _holding(run, "SELECT 1")
        return getattr(run.conn, how), _third_waits(run) if waiting else _nothing

    points = explore(alias, app, scenario, holder=lambda run: run.others[0])
    assert not waiting or any("_hand_over" in p for p in points)


@pytest.mark.parametrize("lease", ["request", "transaction"])
def test_a_give_back_interrupted_after_its_hand_off_lets_go_of_the_connection(
    db: Any, monkeypatch: pytest.MonkeyPatch, lease: str
) -> None:
    # The minimal reproduction. pool_size 1: this thread holds the connection,
    # another waits for it. request_finished's close_if_unusable_or_obsolete()
    # takes its fast way: _close() -> checkin() hands the connection to the
    # waiter and rings its bell; a signal handler runs just after the ring
    # (os.eventfd_write returned: a real point). _close()'s except discards
    # nothing (the lease is the waiter's now) and re-raises, skipping its
    # `self.connection = None` (backend.py, the end of _close()) and the fast
    # way's (close_if_unusable_or_obsolete(), just after its self._close()).
    # The wrapper keeps the raw connection: until the next request's
    # close_old_connections(), a query on this thread (an exception handler
    # writing to the database, an `except SoftTimeLimitExceeded:` block)
    # runs on the waiting thread's session. Django's close() clears
    # self.connection in its `finally`, which the fast way skips.
    # lease='transaction': the same, from _release_if_idle() (a cursor's
    # close() in autocommit mode, or an atomic block's end): the connection
    # is handed over as the cursor closes, the exception goes out of close().
    alias, _ = db(pool_size=1, lease=lease)
    run = Run(alias, "")
    try:
        close_old_connections()
        conn = run.conn
        cursor = conn.cursor()
        cursor.execute("SELECT 1")
        carry_on = _third_waits(run)
        waiter_type = type(run.pool._waiters[0])
        real = waiter_type.wake

        def wake(self: Any) -> None:
            real(self)
            monkeypatch.setattr(waiter_type, "wake", real)
            raise _Interrupt("a handler just after the ring")

        monkeypatch.setattr(waiter_type, "wake", wake)
        with pytest.raises(_Interrupt):
            cursor.close()  # lease='transaction': gives the connection back
            if lease == "request":
                conn.close_if_unusable_or_obsolete()  # request_finished
        third = run.others[0]
        deadline = time.monotonic() + WAIT
        while third.pid is None and time.monotonic() < deadline:
            time.sleep(0.0005)
        assert third.pid is not None, "the waiting thread was never served"
        # What the interrupted request's own error handling does next, a
        # query, must not find the waiter's session on this wrapper (on the
        # code before, it ran on backend third.pid): it borrows again, and at
        # the cap (pool_size 1) waits for the waiter to give it back.
        assert conn.connection is None, "the wrapper kept the session lent to another thread"
        assert conn._lease is None
        carry_on(None)
        with conn.cursor() as cursor:
            cursor.execute("SELECT pg_backend_pid()")
            cursor.fetchone()
    finally:
        close_old_connections()
        run.close()


# (connect() with a waiting thread would wait at the cap for that thread's end.)
@pytest.mark.parametrize(
    ("how", "waiting"),
    [
        ("close_if_unusable_or_obsolete", False),
        ("close_if_unusable_or_obsolete", True),
        ("ensure_connection", False),
    ],
)
def test_an_interrupted_recovery_of_a_dropped_lease(db: Any, how: str, waiting: bool) -> None:
    # The recovery itself interrupted. State: an earlier close() was cut as
    # _held_lease() popped the lease (the pop returns from a C call: a point),
    # so the lease is IN_USE for this wrapper's checkout and Django's close()
    # cleared self.connection. The next request's start gives it back
    # (_give_back_dropped(), from close_if_unusable_or_obsolete() or connect()).
    alias, app = db()

    def scenario(run: Run) -> Operation:
        holder = run.other()
        holder.hold()
        _holding(run, "SELECT 1")
        conn = run.conn
        lease = conn.__dict__.pop("_lease")
        conn.connection = None
        assert lease.state is IN_USE and conn._last_lease is lease
        return getattr(conn, how), _third_waits(run) if waiting else _nothing

    points = explore(alias, app, scenario, holder=lambda run: run.others[0])
    assert any("_give_back_dropped" in p for p in points)


# -- close() inside atomic ----------------------------------------------------------------


def marker_table(pooled_alias: Any, alias_name: str, prefix: str) -> Iterator[str]:
    """A table of one integer column, made and dropped through an alias of its own."""
    alias, _ = pooled_alias(alias_name)
    name = f"{prefix}_{int(time.time() * 1000) % 10**9}_{threading.get_ident() % 1000}"
    with connections[alias].cursor() as cursor:
        cursor.execute(f"CREATE TABLE {name} (marker integer)")
    try:
        yield name
    finally:
        with connections[alias].cursor() as cursor:
            cursor.execute(f"DROP TABLE {name}")
        connections[alias].close()


@pytest.fixture
def table(pooled_alias: Any) -> Iterator[str]:
    yield from marker_table(pooled_alias, "tables", "interrupt_rows")


def test_an_interrupted_close_inside_an_atomic_block(db: Any, table: str) -> None:
    # Django keeps self.connection after a close inside atomic
    # (closed_in_transaction): the wrapper discards the connection, so its
    # transaction is rolled back by the server and it is never lent again.
    alias, app = db()
    markers = itertools.count(1)

    def scenario(run: Run) -> Operation:
        close_old_connections()
        marker = next(markers)
        block = transaction.atomic(using=alias)
        block.__enter__()
        with run.conn.cursor() as cursor:
            cursor.execute(f"INSERT INTO {table} VALUES (%s)", [marker])

        def carry_on(error: BaseException | None) -> None:
            # The `with atomic():` the interrupt goes through, or its normal end.
            try:
                block.__exit__(type(error) if error else None, error, None)
            except Exception:  # noqa: BLE001, S110 - Django's own (a closed connection)
                pass
            with connections[alias].cursor() as cursor:
                cursor.execute(f"SELECT count(*) FROM {table} WHERE marker = %s", [marker])
                assert cursor.fetchone() == (0,), "the closed transaction was committed"
            connections[alias].close()

        return run.conn.close, carry_on

    points = explore(alias, app, scenario)
    assert any("discard" in p for p in points)


# -- lease='transaction' ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("end", "waiting"),
    [
        ("atomic", False),
        ("cursor", False),
        ("atomic", True),
        ("cursor", True),
    ],
)
def test_an_interrupted_give_back_between_transactions(
    db: Any, table: str, end: str, waiting: bool
) -> None:
    # lease='transaction': the connection goes back at an atomic block's end
    # (set_autocommit(True)) or, in autocommit mode, as the last cursor closes;
    # waiting: to a third thread waiting in line while another holds the other.
    alias, app = db(lease="transaction")

    def scenario(run: Run) -> Operation:
        close_old_connections()
        carry_on = _nothing
        if waiting:
            run.other().hold()
        if end == "atomic":
            block = transaction.atomic(using=alias)
            block.__enter__()
            with run.conn.cursor() as cursor:
                cursor.execute(f"INSERT INTO {table} VALUES (0)")
            operation = lambda: block.__exit__(None, None, None)  # noqa: E731
        else:
            cursor = run.conn.cursor()
            cursor.execute("SELECT 1")
            operation = cursor.close
        assert run.conn._lease is not None
        if waiting:
            carry_on = _third_waits(run)
        return operation, carry_on

    def check(run: Run) -> None:
        assert run.conn._lease is None and run.conn.connection is None, "not given back"

    holder = (lambda run: run.others[0]) if waiting else None
    points = explore(alias, app, scenario, check=check, holder=holder)
    assert any("_release_if_idle" in p for p in points)
