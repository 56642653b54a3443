"""Serve requests through Django's WSGI handler and report what the pool did (as JSON)."""
import json
import threading
from wsgiref.util import setup_testing_defaults

from django.core.handlers.wsgi import WSGIHandler
from django.core.management.base import BaseCommand
from django.db import connections

from django_postgrespool._legacy import pool_stats


def request(handler, path):
    environ = {"PATH_INFO": path}
    setup_testing_defaults(environ)
    status = []
    body = handler(environ, lambda s, h: status.append(s))
    try:
        return status[0], b"".join(body).decode("ascii")
    finally:
        body.close()  # sends request_finished: Django closes, the pool takes it back


def exhaust():
    """Hold every connection of the pool in threads; return the error of one more."""
    cap = pool_stats("default")[0]["pool_size"] + pool_stats("default")[0]["max_overflow"]
    release, ready = threading.Event(), threading.Semaphore(0)

    def hold():
        connections["default"].cursor()
        ready.release()
        release.wait(30)
        connections["default"].close()

    threads = [threading.Thread(target=hold) for _ in range(cap)]
    for t in threads:
        t.start()
    for _ in threads:
        ready.acquire()
    try:
        connections["default"].cursor()
        return None
    except Exception as error:
        return "%s.%s: %s" % (type(error).__module__, type(error).__name__, error)
    finally:
        release.set()
        for t in threads:
            t.join()


class Command(BaseCommand):
    def handle(self, *args, **options):
        handler = WSGIHandler()
        pids = [request(handler, "/pid/")[1] for _ in range(3)]
        open_pid = request(handler, "/leave-open/")[1]
        left_over = request(handler, "/count/")[1]
        pids.append(request(handler, "/pid/")[1])
        cursor = connections["default"].cursor()
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'legacy-sample'")
        sessions = cursor.fetchone()[0]
        connections["default"].close()
        report = {
            "pids": pids,
            "open_pid": open_pid,
            "left_over": int(left_over),
            "sessions": sessions,
            "engine": "%s.%s" % (type(connections["default"]).__module__,
                                 type(connections["default"]).__name__),
            "timeout_error": exhaust(),
            "stats": pool_stats("default"),
        }
        self.stdout.write(json.dumps(report, sort_keys=True))
