"""A forked child never uses, nor closes, its parent's connections."""

from __future__ import annotations

import gc
import json
import os

from django.db import connections
from django_postgrespool import registry

from tests.support.requests import backend_pid, run_request


def in_child(work) -> dict:
    """Run ``work()`` in a forked child; return what it returned (JSON) or its error."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 0
        try:
            os.close(read)
            result = {"ok": work()}
        except BaseException as error:  # noqa: BLE001 - reported to the parent
            result = {"error": f"{type(error).__name__}: {error}"}
            code = 1
        try:
            os.write(write, json.dumps(result).encode())
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read) as pipe:
        data = pipe.read()
    os.waitpid(pid, 0)
    return json.loads(data)


def test_child_gets_fresh_connections_and_parent_keeps_its_own(pooled_alias, monitor):
    alias, app = pooled_alias()
    parent_pid = backend_pid(alias)
    child = in_child(lambda: [backend_pid(alias), backend_pid(alias)])
    assert "ok" in child, child
    first, second = child["ok"]
    assert first == second != parent_pid
    assert backend_pid(alias) == parent_pid
    assert parent_pid in monitor.pids(app)


def test_child_closing_inherited_pools_does_not_end_parent_sessions(pooled_alias, monitor):
    alias, app = pooled_alias()
    parent_pid = backend_pid(alias)

    def close_everything():
        # The worst a child can do: close and collect every inherited
        # connection (as interpreter shutdown in a gunicorn worker would).
        for pool in registry._abandoned:
            pool._queue.dispose()
        registry._abandoned.clear()
        gc.collect()
        return True

    assert in_child(close_everything) == {"ok": True}
    assert parent_pid in monitor.pids(app)
    assert backend_pid(alias) == parent_pid


def test_connection_checked_out_at_fork_is_not_shared_with_the_child(pooled_alias, monitor):
    alias, app = pooled_alias()
    result = {}

    def body(cursor):
        cursor.execute("SELECT pg_backend_pid()")
        parent_pid = cursor.fetchone()[0]
        result["child"] = in_child(lambda: backend_pid(alias))
        cursor.execute("SELECT pg_backend_pid()")  # still works in the parent
        return parent_pid, cursor.fetchone()[0]

    before, after = run_request(alias, body)
    assert before == after
    assert result["child"]["ok"] != before
    assert connections[alias].connection is None


def test_multiprocessing_fork_pool_workers_query_on_their_own(pooled_alias, monitor):
    import multiprocessing

    alias, app = pooled_alias()
    parent_pid = backend_pid(alias)
    with multiprocessing.get_context("fork").Pool(2) as workers:
        pids = workers.map(_worker_backend_pid, [alias] * 4)
    assert parent_pid not in pids
    assert backend_pid(alias) == parent_pid


def _worker_backend_pid(alias: str) -> int:
    return backend_pid(alias)
