"""Async views and an in-process ASGI driver for tests/backend/test_adversarial_async.py.

Requests go through Django's real ``ASGIHandler`` (request_started and
request_finished, ``ThreadSensitiveContext``: each request's sync work in a
thread of its own that ends after it) in an event loop of the test's thread.
The views use the alias named by ``STATE.alias``; this module is the
``ROOT_URLCONF`` while a test drives it (``override_settings``).
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from asgiref.sync import sync_to_async
from django.db import connections, models, transaction
from django.http import HttpResponse, StreamingHttpResponse
from django.urls import path

TABLE = "asgi_probe_row"


class State:
    """What the views share with the test: the alias, and what they saw."""

    def __init__(self) -> None:
        self.alias = "default"
        self.app = ""  # the alias's application_name
        self.lock = threading.Lock()
        self.holding: dict[int, int] = {}  # backend pid -> request number, while a view uses it
        self.problems: list[str] = []
        self.pids: list[int] = []
        self.gate: asyncio.Event | None = None  # what a view waits for (set by the test)
        self.started: asyncio.Event | None = None


STATE = State()

_model: Any = None


def rows() -> Any:
    """An unmanaged model on TABLE (made on first use, never at import)."""
    global _model
    if _model is None:

        class AsgiProbeRow(models.Model):
            k = models.IntegerField()
            v = models.TextField()

            class Meta:
                app_label = "django_postgrespool"
                db_table = TABLE
                managed = False

        _model = AsgiProbeRow
    return _model


def _q(sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with connections[STATE.alias].cursor() as cursor:
        cursor.execute(sql, params)
        return list(cursor.fetchall()) if cursor.description else []


def _claim(n: int) -> int:
    """Note that request ``n`` uses its connection now; complain if another does too."""
    pid = _q("SELECT pg_backend_pid()")[0][0]
    with STATE.lock:
        other = STATE.holding.get(pid)
        if other is not None:
            STATE.problems.append(f"backend {pid} used by requests {other} and {n} at once")
        STATE.holding[pid] = n
        STATE.pids.append(pid)
    return pid


def _unclaim(pid: int, n: int) -> None:
    again = _q("SELECT pg_backend_pid()")[0][0]
    with STATE.lock:
        if again != pid:
            STATE.problems.append(f"request {n} began on backend {pid}, ended on {again}")
        if STATE.holding.get(pid) == n:
            del STATE.holding[pid]


def _session_probe(n: int, session: bool) -> int:
    """What the previous borrower left: a transaction always; SET and temp tables if ``session``."""
    conn = connections[STATE.alias]
    pid = _claim(n)
    state = _q(
        "SELECT pg_current_xact_id_if_assigned() IS NULL, current_setting('probe.tag', true),"
        " to_regclass('pg_temp.probe_tmp') IS NULL, count(*) FROM asgi_probe_row WHERE k = -1"
    )[0]
    if not state[0] or state[3]:
        STATE.problems.append(f"request {n} found a transaction left open: {state}")
    if not conn.get_autocommit():
        STATE.problems.append(f"request {n} found autocommit off")
    if session and (state[1] not in (None, "") or not state[2]):
        STATE.problems.append(f"request {n} found session state of another: {state}")
    _q("SELECT set_config('probe.tag', %s, false)", (str(n),))
    if session:
        _q("CREATE TEMP TABLE probe_tmp (x int)")
    if n % 3 == 0:
        # Leaves a transaction open (autocommit off by hand): Django's request
        # end must roll it back before anyone else gets the connection.
        conn.set_autocommit(False)
        _q("INSERT INTO asgi_probe_row (k, v) VALUES (-1, 'uncommitted')")
    return pid


def _atomic_write(n: int) -> None:
    with transaction.atomic(using=STATE.alias):
        rows().objects.using(STATE.alias).create(k=n, v="atomic")
        _q("SELECT pg_advisory_xact_lock(4242)")


async def orm_view(request: Any) -> HttpResponse:
    """The async ORM, sync_to_async(thread_sensitive=True) and atomic, on one request thread."""
    n = int(request.GET["n"])
    session = request.GET.get("session") == "1"
    model = rows().objects.using(STATE.alias)
    pid = await sync_to_async(_session_probe)(n, session)
    await model.acreate(k=n, v="x")
    await asyncio.sleep(0)
    first = await model.filter(k=n).afirst()
    got = await model.aget(pk=first.pk)
    seen = [r.k async for r in model.filter(k__in=[n, n + 1000]).order_by("pk")]
    chunked = [r.k async for r in model.filter(k=n).aiterator(chunk_size=1)]
    await sync_to_async(_atomic_write)(n)
    await asyncio.sleep(0)
    if got.k != n or seen != [n] or chunked != [n]:
        STATE.problems.append(f"request {n}: wrong rows {got.k} {seen} {chunked}")
    await sync_to_async(_unclaim)(pid, n)
    return HttpResponse(str(pid))


def _pid_and_sleep(ms: int) -> int:
    return _q("SELECT pg_backend_pid(), pg_sleep(%s)", (ms / 1000.0,))[0][0]


async def unsensitive_view(request: Any) -> HttpResponse:
    """A query in the loop's default executor (sync_to_async(thread_sensitive=False))."""
    pid = await sync_to_async(_pid_and_sleep, thread_sensitive=False)(int(request.GET.get("ms", 0)))
    return HttpResponse(str(pid))


async def slow_view(request: Any) -> HttpResponse:
    """A slow query on the request thread; the test disconnects meanwhile."""
    ms = int(request.GET.get("ms", 300))
    if STATE.started is not None:
        STATE.started.set()
    pid = await sync_to_async(_pid_and_sleep)(ms)
    return HttpResponse(str(pid))


def _lock_and_sleep(ms: int) -> int:
    pid = _q("SELECT pg_backend_pid(), pg_advisory_lock(777)")[0][0]
    _q("SELECT pg_sleep(%s)", (ms / 1000.0,))
    _q("SELECT pg_advisory_unlock(777)")
    return pid


async def stream_view(request: Any) -> StreamingHttpResponse:
    """Streams rows read by aiterator() (a server-side cursor); raises midway if asked."""
    fail = request.GET.get("fail") == "1"
    model = rows().objects.using(STATE.alias)

    async def content() -> Any:
        i = 0
        async for row in model.order_by("pk").aiterator(chunk_size=2):
            yield f"{row.k}\n"
            i += 1
            if fail and i == 3:
                raise ValueError("the view failed while streaming")
            if STATE.gate is not None and i == 3:
                if STATE.started is not None:
                    STATE.started.set()
                await STATE.gate.wait()

    return StreamingHttpResponse(content())


def _count_in_atomic(n: int) -> int:
    """Inside atomic: a row of this request's own, uncommitted; the count must see it alone."""
    conn = connections[STATE.alias]
    model = rows().objects.using(STATE.alias)
    with transaction.atomic(using=STATE.alias):
        model.create(k=-2, v=str(n))
        mine = model.filter(k=-2).count()
        pid = conn.connection.info.backend_pid if hasattr(conn.connection, "info") else None
        again = _q("SELECT pg_backend_pid()")[0][0]
        if pid is not None and pid != again:
            STATE.problems.append(f"request {n}: atomic block moved from {pid} to {again}")
        transaction.set_rollback(True, using=STATE.alias)
    return mine


async def abandon_view(request: Any) -> HttpResponse:
    """aiterator() abandoned after its first row (a ``break``): Python finalizes it in
    the event loop's thread, which closes its server-side cursor there while the
    request's thread goes on with the next queries."""
    n = int(request.GET["n"])
    model = rows().objects.using(STATE.alias)
    try:
        for i in range(int(request.GET.get("rounds", 10))):
            async for _row in model.order_by("pk").aiterator(chunk_size=2):
                break
            mine = await sync_to_async(_count_in_atomic)(n)
            if mine != 1:
                STATE.problems.append(f"request {n} round {i}: saw {mine} uncommitted rows, not 1")
            async for _row in model.order_by("pk").aiterator(chunk_size=2):
                break
            count = await model.filter(k__gte=0).acount()
            if count != 10:
                STATE.problems.append(f"request {n} round {i}: counted {count} rows, not 10")
    except Exception as error:  # noqa: BLE001 - told to the test, not to Django's error log
        # (Django's error report reprs the frames' querysets, which would query while
        # holding the logging lock: with a cap of 1, a wait for another thread's
        # connection while that thread waits for the lock.)
        del model
        STATE.problems.append(f"request {n}: {type(error).__name__}: {error}")
        return HttpResponse(status=500)
    return HttpResponse("ok")


def _atomic_that_rolls_back(off: threading.Event, closed: threading.Event) -> None:
    """An atomic block that rolls back (it raises). Once the driver's autocommit is off
    (its BEGIN), it waits for the view to close the abandoned cursor: a hook to pin the
    moment, nothing else changed."""
    conn = connections[STATE.alias]
    turn_off = conn._set_autocommit

    def hooked(autocommit: bool) -> None:
        turn_off(autocommit)
        if not autocommit and not off.is_set():
            off.set()
            closed.wait(5)

    conn._set_autocommit = hooked
    try:
        with transaction.atomic(using=STATE.alias):
            rows().objects.using(STATE.alias).create(k=-3, v="rolled back")
            raise LookupError("roll it back")
    except LookupError:
        pass
    finally:
        del conn._set_autocommit


async def abandon_atomic_view(request: Any) -> HttpResponse:
    """aiterator() abandoned while the request's thread enters an atomic block."""
    model = rows().objects.using(STATE.alias)
    agen = model.order_by("pk").aiterator(chunk_size=2)
    await agen.__anext__()  # its server-side cursor is open: the connection is kept
    off, closed = threading.Event(), threading.Event()
    work = asyncio.ensure_future(sync_to_async(_atomic_that_rolls_back)(off, closed))
    for _ in range(5000):
        if off.is_set():
            break
        await asyncio.sleep(0.001)
    # What a ``break`` out of ``async for`` leads to: the generator is finalized in the
    # event loop's thread (aclose(), then its sync generator), which closes the cursor.
    await agen.aclose()
    for _ in range(20):
        await asyncio.sleep(0)
    closed.set()
    await work
    return HttpResponse("ok")


def _atomic_burst() -> None:
    with transaction.atomic(using=STATE.alias):
        for _ in range(5):
            _q("SELECT 1")


async def atomic_burst_view(request: Any) -> HttpResponse:
    """An atomic block of a few statements, at once (the first thing the request does)."""
    try:
        await sync_to_async(_atomic_burst)()
    except Exception as error:  # noqa: BLE001 - told to the test
        STATE.problems.append(f"atomic burst: {type(error).__name__}: {error}")
        return HttpResponse(status=500)
    return HttpResponse("ok")


BACKGROUND: set[asyncio.Task[Any]] = set()


async def background_view(request: Any) -> HttpResponse:
    """Starts a task that writes a row after the response (fire and forget)."""
    n = int(request.GET["n"])

    async def later() -> None:
        await asyncio.sleep(0.05)
        await rows().objects.using(STATE.alias).acreate(k=n, v="background")

    task = asyncio.ensure_future(later())
    BACKGROUND.add(task)
    task.add_done_callback(BACKGROUND.discard)
    return HttpResponse("started")


async def wait_for_view(request: Any) -> HttpResponse:
    """A query given up on (asyncio.wait_for) while it runs; then more queries."""
    try:
        await asyncio.wait_for(sync_to_async(_pid_and_sleep)(150), 0.02)
    except asyncio.TimeoutError:
        pass
    first = await sync_to_async(_claim)(-2)
    again = await sync_to_async(_pid_and_sleep)(0)
    with STATE.lock:
        STATE.holding.pop(first, None)
    return HttpResponse(f"{first} {again}")


async def pid_view(request: Any) -> HttpResponse:
    """The backend, and how many cursors its session has open (pg_cursors is per session)."""
    pid, cursors = await sync_to_async(
        lambda: _q("SELECT pg_backend_pid(), (SELECT count(*) FROM pg_cursors)")[0]
    )()
    return HttpResponse(f"{pid} {cursors}")


async def close_old_view(request: Any) -> HttpResponse:
    """close_old_connections() called from the async view itself, between queries."""
    from django.db import close_old_connections

    first = await sync_to_async(_claim)(-1)
    close_old_connections()  # in the event loop's thread: nothing of the request thread's
    again = await sync_to_async(lambda: _q("SELECT pg_backend_pid()")[0][0])()
    with STATE.lock:
        STATE.holding.pop(first, None)
    return HttpResponse(f"{first} {again}")


urlpatterns = [
    path("orm/", orm_view),
    path("unsensitive/", unsensitive_view),
    path("slow/", slow_view),
    path("stream/", stream_view),
    path("pid/", pid_view),
    path("abandon/", abandon_view),
    path("background/", background_view),
    path("atomic-burst/", atomic_burst_view),
    path("wait-for/", wait_for_view),
    path("abandon-atomic/", abandon_atomic_view),
    path("close-old/", close_old_view),
]


class Reply:
    def __init__(self) -> None:
        self.status: int | None = None
        self.body = b""
        self.error: BaseException | None = None


async def call(
    handler: Any,
    url: str,
    *,
    disconnect: asyncio.Event | None = None,
    fail_send_after: int | None = None,
) -> Reply:
    """One request through ``handler`` (an ASGIHandler). ``disconnect``: the client goes
    away when it is set; ``fail_send_after``: the ``send`` of the body raises OSError
    (a client gone, as some servers tell it) after that many body messages."""
    path_, _, query = url.partition("?")
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path_,
        "raw_path": path_.encode(),
        "query_string": query.encode(),
        "root_path": "",
        "headers": [(b"host", b"testserver")],
        "client": ("127.0.0.1", 40000),
        "server": ("testserver", 80),
    }
    reply = Reply()
    first = True
    bodies = 0

    async def receive() -> dict[str, Any]:
        nonlocal first
        if first:
            first = False
            return {"type": "http.request", "body": b"", "more_body": False}
        if disconnect is None:
            await asyncio.Event().wait()  # never: Django cancels this listener
        else:
            await disconnect.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal bodies
        if message["type"] == "http.response.start":
            reply.status = message["status"]
        elif message["type"] == "http.response.body":
            if fail_send_after is not None and bodies >= fail_send_after:
                raise OSError("the client has gone away")
            bodies += 1
            reply.body += message.get("body", b"")

    try:
        await handler(scope, receive, send)
    except Exception as error:  # noqa: BLE001 - what the server would log
        # Without its traceback: the failed view's frames (an abandoned aiterator's
        # cursor) are let go now, as a server that logged the error would.
        reply.error = error.with_traceback(None)
        error.__context__ = error.__cause__ = None
    return reply
