"""Every place a signal handler can interrupt one pool operation, tried one at a time.

test_signal_storm.py interrupts at random (SIGALRM every 0.3 ms) and found,
once in CI, a checkin that closed its connection under the waiter it had
just handed it to. This file looks for that family deterministically: one
pool operation (a checkin, a checkout, a discard, close(), sweep_idle()) runs
on this thread with a tracer that raises ``_Interrupt`` at its N-th
*injection point*, for N = 1, 2, 3, ... until a run meets no N-th point.
Each run starts from a fresh pool set up the same way; after it, the
program's recovery runs (the wrapper's discard or next connect() gives back
the checkout it still has, a retired pool's close() is run again), the other
threads finish, and nothing may be lost: no connection in use by nobody,
idle outside the idle set, gone but still counted, closed under its
borrower or lent to two borrowers; then the counts add up (assert_quiescent).

The injection points are where CPython 3.11 to 3.13 runs a Python signal
handler, and only those (a line tracer raising between two plain bytecodes,
as test_adversarial_process.py does, finds defects no handler can cause):

* a Python function's entry (RESUME: the eval breaker is checked before the
  body runs), a generator's resumption included;
* just after a call that did not run inline in the same evaluation loop (a C
  function, a type, a Python ``__init__`` reached through the type, a call
  with ``*args``): CALL checks the eval breaker once the callee has returned,
  so the call's effect has happened (an eventfd written, a lock released);
  a plain Python function's return to its caller checks nothing, and is no
  point;
* a loop's backward jump;
* a ``with`` statement's entry: a contended ``threading.Lock`` acquired by
  the main thread is interrupted there by a handler (EINTR), unacquired
  (a cursor's ``with`` adds a point equal to the one after ``cursor()``).

Not raised: inside SQLAlchemy's frames (QueuePool's own bookkeeping is not
safe from such an exception; documented in docs/evidence/reliability.rst, and
excluded by the storms too), inside the logging module's (a handler's lock,
acquired before its ``try``, would stay held by this thread and hang every
other thread's next warning: the standard library's hazard, not the pool's),
and in finalizers and WeakSet callbacks (CPython prints their exception and
drops it). A call into either library still counts as one point once it has
returned, when it is a C call; a Python one returns with no check.

Only this thread is traced: waiters and other borrowers are threads that
run normally. They are put in place before the operation starts, and act at
fixed places of it (a hook at a function's entry) so that each run meets the
same points. Before it
raises, the tracer lets a waiter that has been handed its connection, and
rung, finish its checkout: the exception then comes after the waiter has the
connection, the order in which the CI storm found the defect.
"""

from __future__ import annotations

import dis
import functools
import gc
import inspect
import linecache
import os
import queue
import select
import sys
import threading
import time
from collections.abc import Callable
from types import CodeType, FrameType
from typing import Any

import pytest
from django_postgrespool import pool as pool_module
from django_postgrespool.errors import PoolTimeout
from django_postgrespool.pool import (
    GONE,
    IDLE,
    IN_USE,
    RESERVED,
    Lease,
    _Doorbell,
    _Waiter,
)

from tests.backend.test_adversarial import (  # noqa: F401 (_fake_db_reset: an autouse fixture)
    FakeConnection,
    _fake_db_reset,
    assert_quiescent,
    make_pool,
)
from tests.backend.test_signal_storm import _Interrupt

# Lane-independent (a fake DB-API): with MATRIX=1, one lane per Python version (Makefile).
pytestmark = pytest.mark.pool_unit

# Limits that a healthy run never reaches (they only bound a failing one).
SETTLE = 2.0  # seconds another thread may take to finish what it was handed
MAX_POINTS = 3000  # injection points of one operation
MAX_FAILURES = 8  # points that lost something, reported together

# CALL_KW: a call with keyword arguments (3.13; CALL with KW_NAMES before it on 3.11/3.12).
_CALLS = frozenset({"CALL", "CALL_KW", "CALL_FUNCTION_EX"})
_PLAIN_CALLS = frozenset({"CALL", "CALL_KW"})
_BACKWARD = frozenset(
    name
    for name in (
        "JUMP_BACKWARD",
        "POP_JUMP_BACKWARD_IF_TRUE",
        "POP_JUMP_BACKWARD_IF_FALSE",
        "POP_JUMP_BACKWARD_IF_NONE",
        "POP_JUMP_BACKWARD_IF_NOT_NONE",
    )
    if name in dis.opmap
)
# Python functions a CALL reaches through C (a type's construction, an
# instance's __call__): CALL checks the eval breaker after them.
_THROUGH_C = frozenset({"__init__", "__new__", "__call__", "__init_subclass__", "__set_name__"})
_GENERATOR_FLAGS = 0x20 | 0x80 | 0x100 | 0x200  # generator, coroutine, iterable coroutine, async


@functools.cache
def _instructions(code: CodeType) -> dict[int, tuple[str, int, int, Any]]:
    """Offset -> (opname, next instruction's offset, jump target or -1, argument)."""
    listing = list(dis.get_instructions(code))
    table = {}
    for i, ins in enumerate(listing):
        after = listing[i + 1].offset if i + 1 < len(listing) else -1
        target = ins.argval if ins.opname in _BACKWARD else -1
        table[ins.offset] = (ins.opname, after, target, ins.arg)
    return table


def _where(frame: FrameType, base: FrameType | None, line: int | None = None) -> str:
    """The chain of calls inside the operation, and the source line."""
    names = []
    f: FrameType | None = frame
    while f is not None and f is not base:
        names.append(f.f_code.co_qualname)
        f = f.f_back
    lineno = frame.f_lineno if line is None else line
    text = linecache.getline(frame.f_code.co_filename, lineno).strip()
    return f"{' > '.join(reversed(names))} (line {lineno}: {text})"


class _Frame:
    """One traced frame's last instruction: tells a point from the next opcode event."""

    __slots__ = ("injector", "inline", "last")

    def __init__(self, injector: Injector) -> None:
        self.injector = injector
        self.last: tuple[int, tuple[str, int, int, Any]] | None = None
        self.inline = False  # the last CALL ran a Python function in this loop

    def trace(self, frame: FrameType, event: str, arg: Any) -> Any:
        injector = self.injector
        if injector.fired is not None:
            return None
        if event != "opcode":
            return self.trace
        offset = frame.f_lasti
        ins = _instructions(frame.f_code).get(offset)
        if ins is None:
            return self.trace
        kind = None
        last = self.last
        if last is not None:
            last_offset, (name, after, target, _) = last
            if name in _CALLS and offset == after and not self.inline:
                kind = "after the call"
                line = _line_of(frame.f_code, last_offset)
            elif name in _BACKWARD and offset == target:
                kind, line = "at the loop's jump", _line_of(frame.f_code, last_offset)
        if kind is None and ins[0] == "BEFORE_WITH":
            kind, line = "at the entry of the with (a contended lock)", None
        self.last = offset, ins
        self.inline = False
        if kind is not None and not injector.collecting:
            injector.point(frame, kind, line)
        return self.trace


@functools.cache
def _line_of(code: CodeType, offset: int) -> int | None:
    for ins in dis.get_instructions(code):
        if ins.offset == offset:
            return ins.positions.lineno if ins.positions else None
    return None


class Injector:
    """Raise _Interrupt at this thread's ``at``-th injection point of one operation.

    ``hooks``: code object -> a callable run (once, not traced) when this
    thread enters that function, before the point is counted: another
    thread's move made at the same place of every run. ``settle``: called
    just before raising.
    """

    def __init__(
        self,
        at: int,
        hooks: dict[CodeType, Callable[[], None]] | None = None,
        settle: Callable[[], None] | None = None,
    ) -> None:
        self.at = at
        self.count = 0
        self.hooks = dict(hooks or {})
        self.settle = settle
        self.fired: str | None = None
        self.base: FrameType | None = None
        # The garbage collector runs in this thread: what it runs (a generator
        # left suspended by an earlier run, closed now) is no point of the
        # operation, and an interrupt there would be swallowed as unraisable.
        self.collecting = False
        self.thread = 0
        self.inside_sqlalchemy = False  # its frames are points too

    def _collector(self, phase: str, info: dict[str, int]) -> None:
        if threading.get_ident() == self.thread:
            self.collecting = phase == "start"

    def run(self, operation: Callable[..., Any], *args: Any) -> tuple[Any, BaseException | None]:
        """Run ``operation(*args)`` traced; return its result, or what it raised."""
        self.base = sys._getframe()
        self.thread = threading.get_ident()
        previous = sys.gettrace()
        gc.callbacks.append(self._collector)
        sys.settrace(self._call)
        try:
            return operation(*args), None
        except BaseException as error:  # noqa: BLE001 - the caller looks at it
            return None, error
        finally:
            sys.settrace(previous)
            gc.callbacks.remove(self._collector)
            self.collecting = False

    def _call(self, frame: FrameType, event: str, arg: Any) -> Any:
        code = frame.f_code
        if (
            self.fired is not None
            or event != "call"
            or self.collecting
            or code is _COLLECTOR_CODE
        ):
            return None
        hook = self.hooks.pop(code, None)
        if hook is not None:
            hook()
        parent = frame.f_back
        tracer = getattr(parent.f_trace, "__self__", None) if parent is not None else None
        if (
            isinstance(tracer, _Frame)
            and tracer.last is not None
            and tracer.last[1][0] in _PLAIN_CALLS
            and code.co_name not in _THROUGH_C
            and not code.co_flags & _GENERATOR_FLAGS
        ):
            tracer.inline = True  # a Python function run by this CALL, in the same loop
        if self._excluded(frame):
            return None
        ins = _instructions(code).get(frame.f_lasti)
        # RESUME 0 (a call) and 1 (after a yield) check the eval breaker; 2 and 3 do not
        # (3.13 adds the exception depth in bit 2).
        if ins is None or ins[0] != "RESUME" or (ins[3] or 0) & 3 < 2:
            self.point(frame, "at the entry", None)
        local = _Frame(self)
        frame.f_trace_opcodes = True
        frame.f_trace_lines = False
        # Set here, not only returned: on 3.13 a frame's opcode events are
        # turned on when its f_trace is set with f_trace_opcodes on, and the
        # return value of the call event does not count as setting it (the
        # opcodes of a function's first traced call would go unseen).
        frame.f_trace = local.trace
        return local.trace

    def _excluded(self, frame: FrameType) -> bool:
        f: FrameType | None = frame
        while f is not None and f is not self.base:
            module = f.f_globals.get("__name__", "")
            if (
                (module.startswith("sqlalchemy.") and not self.inside_sqlalchemy)
                or module in ("logging", "weakref", "_weakrefset")
                or f.f_code.co_name == "__del__"
            ):
                return True
            if self.inside_sqlalchemy and isinstance(f.f_locals.get("self"), FakeConnection):
                return True  # the fake stands for the driver's C code
            f = f.f_back
        return False

    def point(self, frame: FrameType, kind: str, line: int | None) -> None:
        self.count += 1
        if self.count != self.at:
            return
        self.fired = f"{kind}: {_where(frame, self.base, line)}"
        if self.settle is not None:
            self.settle()
        raise _Interrupt(self.fired)


_COLLECTOR_CODE = Injector._collector.__code__


def _until(condition: Callable[[], bool], timeout: float = SETTLE) -> bool:
    """Poll ``condition`` (no event tells of a thread's place in the pool's line)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.0002)
    return True


class Borrower:
    """Another thread of the program: borrows and gives back when told, never interrupted."""

    def __init__(self, world: World, name: str) -> None:
        self.world = world
        self.name = name
        self.lease: Lease | None = None
        self.borrowed_at = 0.0
        self.bell: _Doorbell | None = None  # its thread's: tells its waiters
        self.busy = threading.Event()  # a checkout of its is under way
        self._jobs: queue.SimpleQueue[tuple[Callable[[], None] | None, threading.Event]] = (
            queue.SimpleQueue()
        )
        self.thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self.thread.start()

    def __repr__(self) -> str:
        return self.name

    def _serve(self) -> None:
        while True:
            job, done = self._jobs.get()
            if job is None:
                done.set()
                return
            try:
                job()
            except BaseException as error:  # noqa: BLE001 - reported by the world
                self.world.errors.append(f"{self}: {error!r}")
            finally:
                done.set()

    def submit(self, job: Callable[[], None] | None) -> threading.Event:
        done = threading.Event()
        self._jobs.put((job, done))
        return done

    def call(self, job: Callable[[], None]) -> None:
        assert self.submit(job).wait(10), f"{self} hung"

    def start_checkout(self) -> None:
        """Check out in its thread; return once it waits in the pool's line."""
        pool = self.world.pool
        before = len(pool._waiters)
        self.busy.set()
        self.submit(self._checkout)
        assert _until(lambda: len(pool._waiters) > before), f"{self} never waited"
        waiter = pool._waiters[-1]
        self.bell = waiter.bell

    def _checkout(self) -> None:
        try:
            lease = self.world.pool.checkout(self.world.connect, None, self.thread)
            self.world.took(lease, self)
            self.lease, self.borrowed_at = lease, lease.borrowed_at
        finally:
            self.busy.clear()

    def give_back(self, how: str = "checkin") -> None:
        def job() -> None:
            lease, borrowed_at = self.lease, self.borrowed_at
            assert lease is not None
            self.world.returns(lease, borrowed_at, self)
            self.lease = None
            if how == "checkin":
                self.world.pool.checkin(lease, None, borrowed_at)
            else:
                self.world.pool.discard(lease, "its borrower discards it", borrowed_at)

        self.call(job)

    def waiter(self) -> _Waiter | None:
        """Its waiter in the pool's line, if it waits there now."""
        return next((w for w in list(self.world.pool._waiters) if w.bell is self.bell), None)

    def asleep(self) -> bool:
        """Blocked in its waiter's poll."""
        frame = sys._current_frames().get(self.thread.ident or 0)
        return frame is not None and frame.f_code is _Doorbell.listen.__code__

    def rung(self) -> bool:
        bell = self.bell
        return bell is not None and bool(select.select([bell.fd], [], [], 0)[0])

    def stable(self) -> bool:
        """Holding what it was given, or asleep in the line unserved."""
        if not self.busy.is_set():
            return True
        waiter = self.waiter()
        return waiter is not None and not waiter.served and self.asleep() and not self.rung()

    def hurry(self) -> None:
        """Its wait is old enough (fair_after): wake it as its guard's nap would."""
        waiter = self.waiter()
        if waiter is not None:
            waiter.since = time.monotonic() - 10.0
            if self.bell is not None:
                self.bell.ring()

    def stop(self) -> None:
        if not self.thread.is_alive():
            return
        self.submit(None).wait(10)
        self.thread.join(10)


class _Again(Exception):
    """The set-up lost a race with another thread's clock: run this point again."""


class World:
    """One run's pool, the threads around the operation, and who holds what."""

    def __init__(self, connect: Callable[[], Any] = FakeConnection, **options: Any) -> None:
        self.connect = connect  # the driver's connect()
        self.pool = make_pool(**options)
        # The scenarios sweep (max_idle) and look for leaks themselves: the
        # housekeeper's thread, woken by each new pool, would do it in the
        # middle of a run (the audit then saw its retire half done).
        keeper = pool_module._housekeeper
        with keeper._lock:
            keeper._pools.discard(self.pool)
        self.main = threading.current_thread()
        self.errors: list[str] = []
        self.held: dict[Lease, float] = {}  # this thread's checkouts
        self.borrowers: list[Borrower] = []
        self.young = False  # waiters joined the line just now (less than fair_after ago)

    # -- who holds what

    def took(self, lease: Lease, who: object) -> None:
        if lease.raw.user not in (None, "dead"):  # a dead thread's is reclaimed
            self.errors.append(f"{who} was lent a connection {lease.raw.user} holds")
        lease.raw.user = who

    def returns(self, lease: Lease, borrowed_at: float, who: object) -> None:
        """``who`` gives back its checkout: it must still be its, open, lent once."""
        if lease.raw.user is not who:
            self.errors.append(f"{who}'s connection was lent to {lease.raw.user} meanwhile")
        if lease.raw.closed:
            self.errors.append(f"{who}'s connection was closed under it")
        if lease.state is not IN_USE or lease.borrowed_at != borrowed_at:
            self.errors.append(f"{who}'s checkout was taken from it: {lease!r}")
        lease.raw.user = None

    def checkout(self) -> Lease:
        lease = self.pool.checkout(self.connect, None, self.main)
        self.took(lease, "main")
        self.held[lease] = lease.borrowed_at
        return lease

    def let_go(self, lease: Lease) -> float:
        """This thread lets go of ``lease`` to give it back: the wrapper's order."""
        borrowed_at = self.held.pop(lease)
        self.returns(lease, borrowed_at, "main")
        return borrowed_at

    def borrower(self) -> Borrower:
        borrower = Borrower(self, f"borrower {len(self.borrowers) + 1}")
        self.borrowers.append(borrower)
        return borrower

    def waiters(self, count: int, *, young: bool) -> list[Borrower]:
        """``count`` borrowers waiting in line, each joined before the next."""
        borrowers = [self.borrower() for _ in range(count)]
        for borrower in borrowers:
            borrower.start_checkout()
        self.young = young
        for borrower in borrowers:
            waiter = borrower.waiter()
            assert waiter is not None
            joined = waiter.since
            # Young: joined "just now" for the whole run; else long ago (due).
            waiter.since = time.monotonic() + (60.0 if young else -10.0)
            if young and waiter.guard and time.monotonic() >= joined + self.pool._fair_after:
                # Its guard's wake-up at fair_after may have come first (a
                # loaded machine): it would not look at the idle set again.
                raise _Again
        return borrowers

    def dead_holder(self) -> Lease:
        """A thread that ended holding a connection (a task that outlived its request)."""
        got: list[Lease] = []
        thread = threading.Thread(
            target=lambda: got.append(
                self.pool.checkout(self.connect, None, threading.current_thread())
            )
        )
        thread.start()
        thread.join(10)
        (lease,) = got
        lease.raw.user = "dead"
        return lease

    # -- the other threads during and after the operation

    def settle(self) -> None:
        """Before the raise: a waiter that was handed a connection and rung has it."""
        for borrower in self.borrowers:
            _until(lambda b=borrower: b.stable() or (b.asleep() and not b.rung()))

    def _stable(self) -> None:
        for borrower in self.borrowers:
            if not _until(borrower.stable):
                waiter = borrower.waiter()
                self.errors.append(
                    f"{borrower} never settled (its waiter {waiter and waiter.served})"
                )

    def audit(self, when: str) -> None:
        """Nothing lost, nothing lent twice, nothing closed under its borrower."""
        pool = self.pool
        holders: dict[Lease, list[tuple[object, float]]] = {}
        for lease, borrowed_at in self.held.items():
            holders.setdefault(lease, []).append(("main", borrowed_at))
        for borrower in self.borrowers:
            if borrower.lease is not None:
                holders.setdefault(borrower.lease, []).append((borrower, borrower.borrowed_at))
        problems = []
        for lease, who in holders.items():
            if len(who) > 1:
                problems.append(f"{lease!r} lent to {who}")
            for name, borrowed_at in who:
                if lease.state is not IN_USE or lease.borrowed_at != borrowed_at:
                    problems.append(f"{name}'s checkout taken from it: {lease!r}")
                if lease.raw.closed:
                    problems.append(f"{name}'s connection closed under it")
                if lease not in pool._leases:
                    problems.append(f"{name}'s connection not counted by the pool")
        for lease in list(pool._leases):
            owner = lease.owner
            dead = owner is not None and not owner.is_alive()
            if lease.state is IN_USE and lease not in holders and not dead:
                problems.append(f"{lease!r} in use by nobody")
            elif lease.state is IDLE and lease not in pool._idle:
                problems.append(f"{lease!r} idle outside the idle set")
            elif lease.state is GONE:
                problems.append(f"{lease!r} gone but still counted")
            elif lease.state is RESERVED:
                problems.append(f"{lease!r} reserved for nobody (everyone settled)")
            elif lease.state is IDLE and lease.raw.closed:
                problems.append(f"{lease!r} idle with its connection closed")
        for lease in list(pool._idle):
            if lease.state is not IDLE or lease not in pool._leases:
                problems.append(f"{lease!r} in the idle set")
        stats = pool.stats()
        if not pool.closed and not (
            stats["opened"] - stats["closed"] == len(pool._leases) == pool._queue.checkedout()
        ):
            problems.append(
                f"counts: opened {stats['opened']} - closed {stats['closed']}, "
                f"{len(pool._leases)} leases, QueuePool {pool._queue.checkedout()}"
            )
        assert not problems and not self.errors, f"{when}: {problems + self.errors}"

    def fill(self) -> None:
        """This thread checks out until the pool holds max_connections, then gives back.

        A slot under the cap that QueuePool lost count of would time out.
        """
        pool = self.pool
        cap = pool.options.max_connections
        taken = []
        try:
            while len(pool._leases) < cap or pool._idle:
                taken.append(self.checkout())
        except PoolTimeout:
            self.errors.append(f"the pool reached {len(pool._leases)} connections of {cap}")
        for lease in taken:
            pool.checkin(lease, None, self.let_go(lease))

    def finish(self) -> None:
        """The program goes on: everyone gives back what it holds and is served in turn."""
        for _ in range(50):
            self._stable()
            self.audit("after the operation and its recovery")
            if self.held:
                lease = next(iter(self.held))
                self.pool.checkin(lease, None, self.let_go(lease))
                continue
            holding = [b for b in self.borrowers if b.lease is not None]
            if holding:
                holding[0].give_back()
                continue
            waiting = [b for b in self.borrowers if b.busy.is_set()]
            if not waiting:
                break
            # Nothing lent, someone waits: served by a connection left idle
            # (within fair_after) or by room to open one, at its guard's nap.
            for borrower in waiting:
                borrower.hurry()
            if not _until(lambda w=waiting: not all(b.busy.is_set() for b in w), 1.0):
                self.errors.append(
                    f"waiting with nothing lent: {waiting}, {len(self.pool._idle)} idle"
                )
        else:
            raise AssertionError("the program never settled")
        self.audit("at the end")
        pool = self.pool
        if pool.closed:
            pool.close()  # a dead thread's connection (the registry closes a pool again)
            stats = pool.stats()
            assert not pool._leases and not pool._idle and not pool._waiters
            assert stats["opened"] == stats["closed"], stats
            assert all(c.closed for c in FakeConnection.every)
            return
        # A dead thread's connection: the next checkouts at the cap take it back.
        taken = []
        while any(
            lease.state is IN_USE and lease.owner is not None and not lease.owner.is_alive()
            for lease in list(pool._leases)
        ):
            taken.append(self.checkout())
            assert len(taken) <= pool.options.max_connections
        for lease in taken:
            pool.checkin(lease, None, self.let_go(lease))
        assert_quiescent(pool)

    def close(self) -> None:
        for borrower in self.borrowers:
            if borrower.busy.is_set():
                borrower.hurry()
            borrower.stop()
        self.pool.close()
        for conn in FakeConnection.every:
            conn.close()
        FakeConnection.every = []


Scenario = Callable[[World], tuple[Callable[..., Any], tuple[Any, ...], Callable[..., None]]]


def explore(
    options: dict[str, Any],
    scenario: Callable[[World], Any],
    hooks: Callable[[World], dict[CodeType, Callable[[], None]]] | None = None,
    *,
    inside_sqlalchemy: bool = False,
    unavoidable: str | None = None,
) -> list[str]:
    """Run the scenario's operation once per injection point, then once through.

    ``scenario(world)`` sets the world up and returns (operation, args,
    recover); ``recover(result, error)`` is the program's recovery. Return
    the points met, in order; fail with every point that lost something
    (up to MAX_FAILURES of them).
    """
    points: list[str] = []
    failures: list[str] = []
    for at in range(1, MAX_POINTS + 1):
        for _ in range(20):
            world = World(**options)
            try:
                operation, args, recover = scenario(world)
                break
            except _Again:
                world.close()
        else:
            raise AssertionError("the set-up never won its race with fair_after")
        try:
            injector = Injector(at, hooks(world) if hooks else None, world.settle)
            injector.inside_sqlalchemy = inside_sqlalchemy
            result, error = injector.run(operation, *args)
            where = injector.fired
            context = f"point {at}, {where or 'no injection'}"
            try:
                if where is not None:
                    assert isinstance(error, _Interrupt), f"the interrupt became {error!r}"
                recover(result, error)
                if inside_sqlalchemy:
                    world.fill()
                world.finish()
            except AssertionError as failure:
                if unavoidable is None or unavoidable not in context:
                    failures.append(f"{context}: {failure}")
        finally:
            world.close()
        if where is None or len(failures) >= MAX_FAILURES:
            break
        points.append(where)
    else:
        raise AssertionError("the operation never ran through")
    _log(points)
    assert not failures, "\n".join(failures)
    return points


def _recover_checkin(world: World, lease: Lease, borrowed_at: float, how: str) -> None:
    """The wrapper's recovery after an interrupted give-back (backend._close()/connect())."""
    if how == "discard":  # _close()'s except: the pool closes it unless it has it back
        world.pool.discard(lease, "giving it back was interrupted", borrowed_at)
    # The next connect(): _give_back_dropped() gives that checkout back if it is still lent.
    if lease.state is IN_USE and lease.borrowed_at == borrowed_at:
        world.pool.checkin(lease, None, borrowed_at)


def _keep_result(world: World) -> Callable[[Any, BaseException | None], None]:
    """A checkout's recovery: none (its caller never had the lease); a lease it returned is held."""

    def recover(result: Any, error: BaseException | None) -> None:
        if error is None:
            world.took(result, "main")
            world.held[result] = result.borrowed_at
        elif not isinstance(error, _Interrupt | PoolTimeout):
            raise AssertionError(f"the checkout raised {error!r}")

    return recover


def _log(points: list[str]) -> None:
    # Shown with -s (or on failure): the points the test went through.
    print(f"\n{len(points)} injection points:")
    for n, where in enumerate(points, 1):
        print(f"  {n:3d} {where}")


class PingableConnection(FakeConnection):
    """The fake with psycopg 3's ``info``: its health check passes (the plain fake's fails)."""

    def __init__(self) -> None:
        super().__init__()
        self.info = self.pgconn


# (fair_after, young): a waiter that has waited long enough is handed a
# connection at once; a young one (within fair_after) lets it stay idle and
# takes it when its guard's nap ends.
FAIRNESS = {
    "fair_after=0": (0.0, False),
    "due waiter": (0.03, False),
    "young waiter": (0.03, True),
}
SIZES = [(1, 0), (1, 1), (2, 0)]  # (pool_size, max_overflow)


# -- 1. checkin -------------------------------------------------------------------------


@pytest.mark.parametrize("recovery", ["discard", "checkin"])
@pytest.mark.parametrize("lifo", [False, True])
@pytest.mark.parametrize(("pool_size", "max_overflow"), SIZES)
def test_an_interrupted_checkin_with_nobody_waiting(
    pool_size: int, max_overflow: int, lifo: bool, recovery: str
) -> None:
    # With max_overflow 1 the connection given back is beyond pool_size: closed.
    def scenario(world: World) -> Any:
        leases = [world.checkout() for _ in range(pool_size + max_overflow)]
        lease = leases[-1]
        borrowed_at = world.let_go(lease)

        def recover(result: Any, error: BaseException | None) -> None:
            if error is not None:
                _recover_checkin(world, lease, borrowed_at, recovery)

        return world.pool.checkin, (lease, None, borrowed_at), recover

    options = {"pool_size": pool_size, "max_overflow": max_overflow, "use_lifo": lifo}
    points = explore(options, scenario)
    assert len(points) > 10


@pytest.mark.parametrize("waiters", [1, 2])
@pytest.mark.parametrize("fairness", list(FAIRNESS))
@pytest.mark.parametrize(("pool_size", "max_overflow"), SIZES)
def test_an_interrupted_checkin_that_hands_its_connection_over(
    pool_size: int, max_overflow: int, fairness: str, waiters: int
) -> None:
    # The CI storm's defect: the hand-off's wake-up interrupted once the
    # waiter has the connection. Every borrower's connection is checked on
    # its way back: open, still its checkout, lent to it alone.
    fair_after, young = FAIRNESS[fairness]

    def scenario(world: World) -> Any:
        leases = [world.checkout() for _ in range(pool_size + max_overflow)]
        world.waiters(waiters, young=young)
        lease = leases[0]
        borrowed_at = world.let_go(lease)

        def recover(result: Any, error: BaseException | None) -> None:
            if error is not None:
                # The wrapper's _close(): discard, then the next connect()'s checkin.
                _recover_checkin(world, lease, borrowed_at, "discard")

        return world.pool.checkin, (lease, None, borrowed_at), recover

    options = {"pool_size": pool_size, "max_overflow": max_overflow, "fair_after": fair_after}
    points = explore(options, scenario)
    assert len(points) > 10


@pytest.mark.parametrize("lifo", [False, True])
def test_an_interrupted_checkin_beyond_pool_size_with_others_idle_beyond_it(lifo: bool) -> None:
    # Found by this file (6 Dec): interrupted at _retire()'s entry after
    # _surplus() had taken the idle connection out of _leases, it was never
    # closed and QueuePool counted its slot for ever. pool_size 1, three
    # connections: one lent, one idle beyond pool_size
    # (given back while someone waited within fair_after: nobody closed it),
    # and the one given back now, closed as surplus with the idle one.
    def scenario(world: World) -> Any:
        first, second, third = (world.checkout() for _ in range(3))
        pool = world.pool
        pool._max_idle = 60.0  # the state a young waiter leaves: idle beyond pool_size
        pool.checkin(first, None, world.let_go(first))
        pool._max_idle = None
        assert len(pool._idle) == 1
        borrowed_at = world.let_go(second)

        def recover(result: Any, error: BaseException | None) -> None:
            if error is not None:
                _recover_checkin(world, second, borrowed_at, "discard")

        return pool.checkin, (second, None, borrowed_at), recover

    points = explore({"pool_size": 1, "max_overflow": 2, "use_lifo": lifo}, scenario)
    assert any("_close_idle_surplus" in p for p in points)


@pytest.mark.parametrize("waiter", [False, True])
@pytest.mark.parametrize(("pool_size", "max_overflow"), [(1, 0), (1, 1)])
def test_an_interrupted_checkin_after_the_pool_was_closed(
    pool_size: int, max_overflow: int, waiter: bool
) -> None:
    # A settings switch retired the pool while its connections were lent:
    # each is closed as it comes back; a waiter hears of the room.
    def scenario(world: World) -> Any:
        leases = [world.checkout() for _ in range(pool_size + max_overflow)]
        if waiter:
            world.waiters(1, young=False)
        world.pool.close(retired=True)
        lease = leases[0]
        borrowed_at = world.let_go(lease)

        def recover(result: Any, error: BaseException | None) -> None:
            if error is not None:
                _recover_checkin(world, lease, borrowed_at, "discard")

        return world.pool.checkin, (lease, None, borrowed_at), recover

    points = explore({"pool_size": pool_size, "max_overflow": max_overflow}, scenario)
    assert len(points) > 10


# -- 2. checkout ------------------------------------------------------------------------


def _checkout(world: World, prefer: Lease | None = None) -> Any:
    return world.pool.checkout, (world.connect, prefer, world.main), _keep_result(world)


@pytest.mark.parametrize("pre_ping", [False, "socket", True])
@pytest.mark.parametrize("lifo", [False, True])
@pytest.mark.parametrize("source", ["affinity", "idle", "new"])
def test_an_interrupted_checkout_that_needs_no_wait(
    source: str, lifo: bool, pre_ping: bool | str
) -> None:
    # pre_ping True: the health check's round trip passes (PingableConnection).
    def scenario(world: World) -> Any:
        pool = world.pool
        prefer = None
        if source != "new":
            leases = [world.checkout() for _ in range(2)]
            for lease in leases:
                pool.checkin(lease, None, world.let_go(lease))
            prefer = leases[0] if source == "affinity" else None
        return _checkout(world, prefer)

    options = {"pool_size": 2, "max_overflow": 0, "use_lifo": lifo, "pre_ping": pre_ping}
    points = explore({"connect": PingableConnection, **options}, scenario)
    assert len(points) >= 5


@pytest.mark.parametrize("pre_ping", ["socket", True])
@pytest.mark.parametrize("idle", [1, 2])
def test_an_interrupted_checkout_whose_health_check_fails(pre_ping: bool | str, idle: int) -> None:
    # The fake has no `info`: its round trip fails. With "socket", the
    # server's side has written (a terminated backend): polled, then pinged.
    # Each idle connection fails in turn and is closed; a new one is opened.
    def scenario(world: World) -> Any:
        pool = world.pool
        leases = [world.checkout() for _ in range(idle)]
        for lease in leases:
            pool.checkin(lease, None, world.let_go(lease))
            lease.raw.server_side.send(b"E")
        return _checkout(world)

    points = explore({"pool_size": 2, "max_overflow": 0, "pre_ping": pre_ping}, scenario)
    assert any("_ping" in p for p in points) and any("_retire" in p for p in points)


@pytest.mark.parametrize(("pool_size", "max_overflow"), [(1, 0), (2, 0), (1, 1)])
def test_an_interrupted_checkout_that_reclaims_a_dead_threads_connection(
    pool_size: int, max_overflow: int
) -> None:
    # Every other connection lent to this thread's earlier checkouts, one to
    # a thread that ended: reclaimed (reset) by the checkout, at the cap or below.
    def scenario(world: World) -> Any:
        for _ in range(pool_size + max_overflow - 1):
            world.checkout()
        world.dead_holder().raw.pgconn.transaction_status = 2  # left in a transaction
        return _checkout(world)

    points = explore({"pool_size": pool_size, "max_overflow": max_overflow}, scenario)
    assert any("_reclaim_dead" in p for p in points)


def _at_sleep(world: World, move: Callable[[], None]) -> dict[CodeType, Callable[[], None]]:
    """``move`` made by another thread as this thread's checkout is about to sleep in line.

    At _Doorbell.listen's entry: after the wait cleared its bell, so a ring
    made by ``move`` is heard at once.
    """
    return {_Doorbell.listen.__code__: move}


@pytest.mark.parametrize("fair_after", [0.0, 0.03])
@pytest.mark.parametrize("move", ["hand-off", "room", "dead thread"])
@pytest.mark.parametrize(("pool_size", "max_overflow"), [(1, 0), (1, 1)])
def test_an_interrupted_checkout_that_waits_and_is_served(
    pool_size: int, max_overflow: int, move: str, fair_after: float
) -> None:
    # Another borrower holds every connection; as this checkout sleeps in
    # line, it gives one back (a hand-off; within fair_after it is left idle
    # and taken at the guard's wake-up), closes it (room for a new one), or
    # its thread ends holding it (reclaimed by the waiting checkout).
    def scenario(world: World) -> Any:
        other = world.borrower()
        other.call(other._checkout)
        for _ in range(pool_size + max_overflow - 1):
            world.checkout()  # this thread holds the others (another alias's wrapper)
        return _checkout(world)

    def hooks(world: World) -> dict[CodeType, Callable[[], None]]:
        other = world.borrowers[0]

        def act() -> None:
            if move == "dead thread":
                lease = other.lease
                assert lease is not None
                other.lease = None
                lease.raw.user = "dead"
                other.stop()  # its thread ends holding the connection
                bell = world.pool._waiters[0].bell
                assert bell is not None
                bell.ring()  # its nap cut short: it looks for ended threads at once
            else:
                other.give_back("checkin" if move == "hand-off" else "discard")

        return _at_sleep(world, act)

    options = {"pool_size": pool_size, "max_overflow": max_overflow, "fair_after": fair_after}
    points = explore(options, scenario, hooks)
    assert any("_wait_as" in p for p in points)


@pytest.mark.parametrize("fair_after", [0.0, 0.03])
def test_an_interrupted_checkout_that_times_out(fair_after: float) -> None:
    # Nothing comes back within the timeout: PoolTimeout (or the interrupt),
    # and the line is left as it was found.
    def scenario(world: World) -> Any:
        other = world.borrower()
        other.call(other._checkout)
        return _checkout(world)

    points = explore(
        {"pool_size": 1, "max_overflow": 0, "timeout": 0.01, "fair_after": fair_after}, scenario
    )
    assert any("_timeout_error" in p for p in points)


# -- 3. discard, close, sweep -------------------------------------------------------------


@pytest.mark.parametrize("waiter", [False, True])
@pytest.mark.parametrize(("pool_size", "max_overflow"), [(1, 0), (1, 1), (2, 0)])
def test_an_interrupted_discard(pool_size: int, max_overflow: int, waiter: bool) -> None:
    # The wrapper discards a connection closed inside atomic(), or whose
    # setup failed; a waiter hears of the room and opens one.
    def scenario(world: World) -> Any:
        leases = [world.checkout() for _ in range(pool_size + max_overflow)]
        if waiter:
            world.waiters(1, young=False)
        lease = leases[0]
        borrowed_at = world.let_go(lease)

        def recover(result: Any, error: BaseException | None) -> None:
            if error is not None:  # _close()'s except, then the next connect()
                _recover_checkin(world, lease, borrowed_at, "discard")

        return world.pool.discard, (lease, "closed inside atomic", borrowed_at), recover

    points = explore({"pool_size": pool_size, "max_overflow": max_overflow}, scenario)
    assert any("_signal_room" in p for p in points)


@pytest.mark.parametrize("waiter", [False, True])
def test_an_interrupted_close_while_connections_are_lent(waiter: bool) -> None:
    # A settings switch retires the pool: one connection lent to this thread,
    # one to a thread that ended, one idle (or, with a waiter, none idle).
    # The registry runs close() again until it has run to its end.
    def scenario(world: World) -> Any:
        pool = world.pool
        world.checkout()
        if waiter:  # at the cap (a dead thread's connection would be reclaimed by it)
            world.checkout()
            world.checkout()
            world.waiters(1, young=False)
        else:
            world.dead_holder()
            idle = world.checkout()
            pool.checkin(idle, None, world.let_go(idle))

        def recover(result: Any, error: BaseException | None) -> None:
            if error is not None:
                pool.close(retired=True)

        return pool.close, (), recover

    points = explore({"pool_size": 2, "max_overflow": 1}, scenario)
    assert any("_reclaim_dead" in p for p in points)
    assert waiter or any("_take_idle" in p for p in points)


@pytest.mark.parametrize("from_checkin", [False, True])
def test_an_interrupted_sweep_of_idle_connections(from_checkin: bool) -> None:
    # max_idle: connections beyond pool_size idle since the last sweep are
    # closed, by the housekeeper or by a checkin of the main thread (where
    # a signal handler runs).
    def scenario(world: World) -> Any:
        pool = world.pool
        leases = [world.checkout() for _ in range(3)]
        for lease in leases[:2]:
            pool.checkin(lease, None, world.let_go(lease))
        pool.sweep_idle(pool._next_sweep)  # the first sweep notes how many stayed idle
        if from_checkin:
            pool._next_sweep = 0.0  # due: this checkin sweeps
            last = leases[2]
            borrowed_at = world.let_go(last)

            def recover(result: Any, error: BaseException | None) -> None:
                if error is not None:
                    _recover_checkin(world, last, borrowed_at, "discard")

            return pool.checkin, (last, None, borrowed_at), recover
        return pool.sweep_idle, (pool._next_sweep,), lambda result, error: None

    points = explore({"pool_size": 1, "max_overflow": 2, "max_idle": 60.0}, scenario)
    assert any("_close_idle_surplus" in p for p in points)


def _interrupt_first_call(monkeypatch: pytest.MonkeyPatch, owner: type, name: str) -> None:
    """Make ``owner.name`` raise _Interrupt at its first call (a handler at the call's
    entry, before it does anything), and behave at the next ones."""
    real = getattr(owner, name)
    calls = [0]

    def patched(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] == 1:
            raise _Interrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(owner, name, patched)


def test_an_interrupt_at_the_entry_of_sqlalchemys_invalidate_still_closes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The tracer raises nowhere in SQLAlchemy's frames, but the entry of the
    # outermost SQLAlchemy call is a real handler point: there SQLAlchemy has
    # done nothing yet. _retire() closed nothing then (the exception went
    # past its `except Exception`), and QueuePool counted the slot for ever.
    pool = make_pool(pool_size=1, max_overflow=0)
    lease = pool.checkout(FakeConnection, None, None)
    _interrupt_first_call(monkeypatch, type(lease.fairy), "invalidate")
    with pytest.raises(_Interrupt):
        pool.discard(lease, "a test", lease.borrowed_at)
    assert lease.state is GONE and lease.raw.closed
    assert pool._queue.checkedout() == 0
    assert_quiescent(pool)


def test_a_close_interrupted_as_it_closes_a_dead_threads_connection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # close() reclaims the connection of a thread that ended (RESERVED), then
    # closes it: interrupted at _retire()'s entry, the connection stayed
    # RESERVED and open for good (a second close() reclaims IN_USE ones only).
    pool = make_pool(pool_size=2, max_overflow=0)
    got: list[Lease] = []
    holder = threading.Thread(
        target=lambda: got.append(pool.checkout(FakeConnection, None, threading.current_thread()))
    )
    holder.start()
    holder.join()
    _interrupt_first_call(monkeypatch, type(pool), "_retire")
    with pytest.raises(_Interrupt):
        pool.close()
    pool.close()  # as the registry does with a pool whose close() was cut short
    (lease,) = got
    assert lease.state is GONE and lease.raw.closed
    assert not pool._leases and not pool._idle


# -- the threads started on demand ------------------------------------------------------


def _until_true(condition: Callable[[], bool], timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_a_ping_watch_whose_start_was_cut_short_is_started_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # arm() decides to start the watch under its lock and starts it outside:
    # a handler at the lock's release or at _start()'s entry cut that short
    # where no `finally` of the start sees it. The process counted as
    # watched for good: no later round trip had a time limit (this file, run
    # before test_pool_unit.py in one process, made its never-answered ping
    # wait for ever).
    watch = pool_module._PingWatch()
    monkeypatch.setattr(pool_module, "_ping_watch", watch)
    monkeypatch.setattr(pool_module, "_START_AGAIN_AFTER", 0.05)
    _interrupt_first_call(monkeypatch, pool_module._PingWatch, "_start")
    first = FakeConnection()
    with pytest.raises(_Interrupt):
        watch.arm(first, time.monotonic() + 60)
    assert watch.disarm(first)
    time.sleep(0.1)
    silent = FakeConnection()  # nobody answers: its deadline passes
    watch.arm(silent, time.monotonic() + 0.05)
    assert _until_true(lambda: silent not in watch._armed), "no watch gave the round trip up"
    assert not watch.disarm(silent)  # too late: its checkout closes it


def test_a_housekeeper_whose_start_was_cut_short_is_started_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The same for the housekeeper (max_idle, leak_timeout): watch() asked for
    # the thread, and a handler's exception came before it was started.
    keeper = pool_module._Housekeeper()
    monkeypatch.setattr(pool_module, "_housekeeper", keeper)
    monkeypatch.setattr(pool_module, "_START_AGAIN_AFTER", 0.05)
    real = pool_module._Housekeeper._should_start
    cut = [False]

    def should_start(self: Any) -> bool:
        asked = real(self)
        if asked and not cut[0]:
            cut[0] = True
            raise _Interrupt  # as the lock is let go, before the start
        return asked

    monkeypatch.setattr(pool_module._Housekeeper, "_should_start", should_start)
    with pytest.raises(_Interrupt):
        make_pool(pool_size=1, max_overflow=1, max_idle=60.0)
    assert keeper._pid == 0
    time.sleep(0.1)
    pool = make_pool(pool_size=1, max_overflow=1, max_idle=60.0)
    assert _until_true(lambda: keeper._pid == os.getpid()), "the housekeeper never started"
    pool.close()


def test_a_second_thread_started_before_the_first_ran_ends_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A start thought cut short may have started its thread all the same (an
    # exception as Thread.start() waited for it): asked again, a second one
    # finds the first recorded and ends, rather than two watches sharing one bell.
    watch = pool_module._PingWatch()
    monkeypatch.setattr(pool_module, "_ping_watch", watch)
    assert watch._runs_here()  # the first one, recorded
    threads_before = threading.active_count()
    second = threading.Thread(target=watch._run, daemon=True)
    second.start()
    second.join(2)
    assert not second.is_alive() and threading.active_count() == threads_before


# -- inside SQLAlchemy's frames ---------------------------------------------------------
#
# Its QueuePool's bookkeeping is no safer from a signal handler's exception
# than any Python code: interrupted inside a checkin or an invalidate() it
# may put a record back with its connection still open, or count a slot
# nobody holds (the pool's capacity then one less for good); inside a
# connect(), after the driver connected, nobody holds that connection. Each
# point of SQLAlchemy's frames is tried here too: no connection is left open
# that the pool does not hold, none is lent twice, and the pool still
# reaches max_connections (World.fill; the pool frees a lost slot as it
# finds QueuePool at its cap below its own count).

SQLA_OPTIONS = {"timeout": 0.3}


def _lineno(function: Callable[..., Any], text: str) -> int:
    lines, first = inspect.getsourcelines(function)
    return first + next(i for i, source in enumerate(lines) if text in source)


@pytest.mark.parametrize("how", ["discard", "checkin"])
@pytest.mark.parametrize("beyond", [False, True])
def test_a_checkin_interrupted_inside_sqlalchemy(beyond: bool, how: str) -> None:
    # beyond: the connection given back is beyond pool_size and closed.
    def scenario(world: World) -> Any:
        leases = [world.checkout() for _ in range(2)]
        lease = leases[-1 if beyond else 0]
        borrowed_at = world.let_go(lease)

        def recover(result: Any, error: BaseException | None) -> None:
            if error is not None:
                _recover_checkin(world, lease, borrowed_at, how)

        return world.pool.checkin, (lease, None, borrowed_at), recover

    sizes = {"pool_size": 1, "max_overflow": 1} if beyond else {"pool_size": 2, "max_overflow": 0}
    points = explore({**sizes, **SQLA_OPTIONS}, scenario, inside_sqlalchemy=True)
    assert any("_ConnectionRecord.invalidate" in p for p in points) == beyond


def test_a_discard_interrupted_inside_sqlalchemy() -> None:
    def scenario(world: World) -> Any:
        leases = [world.checkout() for _ in range(2)]
        lease = leases[0]
        borrowed_at = world.let_go(lease)

        def recover(result: Any, error: BaseException | None) -> None:
            if error is not None:
                _recover_checkin(world, lease, borrowed_at, "discard")

        return world.pool.discard, (lease, "closed inside atomic", borrowed_at), recover

    options = {"pool_size": 1, "max_overflow": 1, **SQLA_OPTIONS}
    points = explore(options, scenario, inside_sqlalchemy=True)
    assert any("_finalize_fairy" in p for p in points)


@pytest.mark.parametrize("lifo", [False, True])
def test_a_checkout_of_a_new_connection_interrupted_inside_sqlalchemy(lifo: bool) -> None:
    def scenario(world: World) -> Any:
        world.checkout()  # held: the checkout opens the second
        return _checkout(world, None)

    # Unavoidable: between the driver's connect() returning to the creator
    # and the creator storing it, nobody holds the connection (a real driver
    # closes it as it is freed, at once: the fake is kept by its registry).
    line = inspect.getsource(pool_module._create).splitlines()[-2].strip()
    assert line == "_opening.made = made = open_connection()"
    options = {"pool_size": 1, "max_overflow": 1, "use_lifo": lifo, **SQLA_OPTIONS}
    points = explore(
        {"connect": PingableConnection, **options},
        scenario,
        inside_sqlalchemy=True,
        unavoidable=f"_create (line {_lineno(pool_module._create, line)}: {line})",
    )
    assert any("_inc_overflow" in p for p in points)


def test_a_sweep_interrupted_inside_sqlalchemy() -> None:
    def scenario(world: World) -> Any:
        pool = world.pool
        leases = [world.checkout() for _ in range(3)]
        for lease in leases:
            pool.checkin(lease, None, world.let_go(lease))
        pool.sweep_idle(pool._next_sweep)  # the first sweep notes how many stayed idle
        return pool.sweep_idle, (pool._next_sweep,), lambda result, error: None

    options = {"pool_size": 1, "max_overflow": 2, "max_idle": 60.0, **SQLA_OPTIONS}
    points = explore(options, scenario, inside_sqlalchemy=True)
    assert any("_ConnectionRecord" in p for p in points)
