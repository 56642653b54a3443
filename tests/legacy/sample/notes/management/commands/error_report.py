"""Django's DEBUG error page for errors raised through the pool; report our frames (as JSON).

    manage.py error_report   # prints {"SCENARIO": {"ours": N, "leaks": [...]}, ...}

(tests/legacy/old_django_probe.py runs the same scenarios on Django 1.4.)

Each scenario opens a connection of an alias of its own that fails in a
different place; the page is rendered with DEBUG on, where Django shows
every local of every frame.
"""
import json
import os
import sys

import django_postgrespool
from django.db import connections
from django.test.utils import override_settings
from django.core.management.base import BaseCommand
from django.views.debug import ExceptionReporter

OURS = os.path.dirname(django_postgrespool.__file__)
SCENARIOS = {
    # The server refuses the connection: raised where the pool opens one.
    "refused": {"PORT": "1"},
    # Invalid pool options: raised where the pool is built.
    "bad_options": {"POOL_OPTIONS": {"pool_size": -1}},
    # The password in OPTIONS (libpq takes it from there too), invalid pool options.
    "options_password": {"POOL_OPTIONS": {"pool_size": -1}, "PASSWORD": "",
                         "OPTIONS": {"password": os.environ["LEGACY_DB_PASSWORD"]}},
}


def our_frames(alias):
    try:
        connections[alias].cursor()
    except Exception:
        exc_info = sys.exc_info()
    else:
        raise AssertionError("alias %r raised nothing" % alias)
    with override_settings(DEBUG=True):
        page = ExceptionReporter(None, *exc_info).get_traceback_html()
    # The frames, without the sections after them (the settings, Django's).
    traceback = page.split('<div id="browserTraceback">', 1)[1].split("</ul>", 1)[0]
    frames = [f.split("<code>", 1)[-1] for f in traceback.split('<li class="frame ')[1:]]
    return exc_info[0].__name__, [f for f in frames if f.startswith(OURS)]


def where(frame):
    """'file in function' of a frame of the page."""
    filename, rest = frame.split("</code>", 1)
    return "%s in %s" % (filename, rest.split("<code>", 1)[1].split("</code>", 1)[0])


def report_of_scenarios(password):
    """Run every scenario; return what our frames of each page show."""
    report = {}
    for name, overrides in sorted(SCENARIOS.items()):
        entry = dict(connections.databases["default"], **overrides)
        entry["OPTIONS"] = dict(entry.get("OPTIONS") or {}, **overrides.get("OPTIONS", {}))
        connections.databases[name] = entry
        error, frames = our_frames(name)
        report[name] = {
            "error": error,
            "ours": len(frames),
            "leaks": [where(f) for f in frames if password in f],
        }
    return report


class Command(BaseCommand):
    def handle(self, *args, **options):
        report = report_of_scenarios(os.environ["LEGACY_DB_PASSWORD"])
        self.stdout.write(json.dumps(report, sort_keys=True))
