from django.core.signals import request_finished, request_started
from django.db import connections


def request(alias):
    request_started.send(sender=None)
    try:
        with connections[alias].cursor() as cur:
            cur.execute("SELECT pg_backend_pid()")
            return cur.fetchone()[0]
    finally:
        request_finished.send(sender=None)


def test_same_backend_pid_across_requests(pooled_alias, monitor):
    alias, app = pooled_alias()
    first = request(alias)
    second = request(alias)
    assert first == second
    assert monitor.count(app) == 1
