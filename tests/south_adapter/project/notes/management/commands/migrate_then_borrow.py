"""Run migrate, give the connection back, borrow one again; print what the pool did (JSON)."""

import json

from django.core.management import call_command
from django.core.management.base import BaseCommand
from django.db import connections
from django_postgrespool import pool_stats


class Command(BaseCommand):
    def add_arguments(self, parser):
        parser.add_argument("--database", default="default")

    def handle(self, *args, **options):
        alias = options["database"]
        call_command("migrate", database=alias, interactive=False, verbosity=0)
        connections[alias].close()  # what the end of a request does
        with connections[alias].cursor() as cursor:
            cursor.execute("SELECT pg_backend_pid()")
            (pid,) = cursor.fetchone()
        connections[alias].close()
        (stats,) = pool_stats(alias=alias)
        self.stdout.write(json.dumps({"pid": pid, "opened": stats["opened"]}))
