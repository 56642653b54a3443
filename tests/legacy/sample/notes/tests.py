from django.db import connections
from django.test import TestCase

from notes.models import Note


class PooledTestDatabaseTests(TestCase):
    def test_south_migrated_the_pooled_test_database(self):
        Note.objects.create(title="Hello there", slug="hello-there")
        self.assertEqual(Note.objects.get().slug, "hello-there")
        self.assertEqual(type(connections['default']).__module__, "django_postgrespool._legacy")
