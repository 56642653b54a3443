"""The two request bodies, shared by the in-process and the HTTP workload."""

from __future__ import annotations

import random

from django.db import connection
from django.http import HttpRequest, HttpResponse

from benchapp.models import Item


def one_query() -> int:
    """Run the one-query request body."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
        return int(cursor.fetchone()[0])


def orm_queries() -> int:
    """Run the few-ORM-queries request body: a get, a count and a short list."""
    item = Item.objects.get(pk=random.randint(1, 1000))
    count = Item.objects.filter(value=item.value).count()
    names = [i.name for i in Item.objects.filter(value__lt=5).order_by("id")[:10]]
    return count + len(names)


def one(request: HttpRequest) -> HttpResponse:
    return HttpResponse(str(one_query()), content_type="text/plain")


def orm(request: HttpRequest) -> HttpResponse:
    return HttpResponse(str(orm_queries()), content_type="text/plain")
