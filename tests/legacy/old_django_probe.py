"""Requests through the pooled engine on Django 1.4/1.5 (no get_new_connection hook) or 1.6.

    python old_django_probe.py PORT DATABASE   # password in LEGACY_DB_PASSWORD; prints JSON

Each request runs through Django's WSGI handler; the last one writes without
committing, and the request after it must not see that row.
"""
import json
import os
import sys
from wsgiref.util import setup_testing_defaults

from django.conf import settings

settings.configure(
    DEBUG=False,
    ALLOWED_HOSTS=["*"],
    ROOT_URLCONF=__name__,
    DATABASES={
        "default": {
            "ENGINE": "django_postgrespool",
            "NAME": sys.argv[2],
            "USER": "postgres",
            "PASSWORD": os.environ["LEGACY_DB_PASSWORD"],
            "HOST": "127.0.0.1",
            "PORT": sys.argv[1],
            "OPTIONS": {"application_name": "legacy-old-django"},
            "POOL_OPTIONS": {"pool_size": 1, "max_overflow": 0, "timeout": 1},
        }
    },
)

import django  # noqa: E402
from django.conf.urls import patterns, url  # noqa: E402
from django.core.handlers.wsgi import WSGIHandler  # noqa: E402
from django.db import connection, connections  # noqa: E402
from django.http import HttpResponse  # noqa: E402

from django_postgrespool._legacy import pool_stats  # noqa: E402


def pid(request):
    cursor = connection.cursor()
    cursor.execute("SELECT pg_backend_pid()")
    return HttpResponse(str(cursor.fetchone()[0]))


def leave_open(request):
    cursor = connection.cursor()
    cursor.execute("CREATE TABLE legacy_left_open (x int)")  # never committed
    return pid(request)


def count(request):
    cursor = connection.cursor()
    cursor.execute(
        "SELECT count(*) FROM pg_tables WHERE tablename = 'legacy_left_open'")
    return HttpResponse(str(cursor.fetchone()[0]))


urlpatterns = patterns("", url(r"^pid/$", pid), url(r"^leave-open/$", leave_open),
                       url(r"^count/$", count))


def request(handler, path):
    environ = {"PATH_INFO": path}
    setup_testing_defaults(environ)
    body = handler(environ, lambda status, headers: None)
    try:
        return b"".join(body).decode("ascii")
    finally:
        body.close()  # request_finished: Django closes, the pool takes it back


def error_page():
    """Our frames of Django's DEBUG page, per scenario of the sample's error_report command."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "sample", "notes",
                                    "management", "commands"))
    from error_report import report_of_scenarios

    return report_of_scenarios(os.environ["LEGACY_DB_PASSWORD"])


handler = WSGIHandler()
pids = [request(handler, "/pid/") for _ in range(3)]
pids.append(request(handler, "/leave-open/"))
left_over = request(handler, "/count/")
(stats,) = pool_stats("default")
print(json.dumps({
    "django": django.get_version(),
    "engine": "%s.%s" % (type(connections["default"]).__module__,
                         type(connections["default"]).__name__),
    "pids": pids,
    "left_over": int(left_over),
    "opened": stats["opened"],
    "checkouts": stats["checkouts"],
    "error_page": error_page(),
}, sort_keys=True))
