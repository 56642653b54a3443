from django.db import connection, transaction
from django.http import HttpResponse

from notes.models import Note


def pid(request):
    cursor = connection.cursor()
    cursor.execute("SELECT pg_backend_pid()")
    return HttpResponse(str(cursor.fetchone()[0]))


def leave_open(request):
    """Write in a transaction and never commit it: the pool must roll it back."""
    transaction.set_autocommit(False)
    Note.objects.create(title="never committed")
    return pid(request)


def count(request):
    return HttpResponse(str(Note.objects.filter(title="never committed").count()))
