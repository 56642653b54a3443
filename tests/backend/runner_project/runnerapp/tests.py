import threading

from django.db import IntegrityError, connection, connections, transaction
from django.test import TestCase, TransactionTestCase
from django_postgrespool import pool_stats

from runnerapp.models import Note


class NoteTestCase(TestCase):
    databases = {"default", "other"}

    def test_rows_are_rolled_back_between_tests_a(self):
        self.assertEqual(Note.objects.count(), 0)
        Note.objects.create(text="a")

    def test_rows_are_rolled_back_between_tests_b(self):
        self.assertEqual(Note.objects.count(), 0)
        Note.objects.create(text="b")

    def test_integrity_error_inside_test_transaction(self):
        Note.objects.create(text="x")
        with self.assertRaises(IntegrityError), transaction.atomic():
            Note.objects.create(text="x")
        self.assertEqual(Note.objects.count(), 1)

    def test_other_alias_is_pooled_too(self):
        Note.objects.using("other").create(text="o")
        self.assertEqual(Note.objects.using("other").count(), 1)
        self.assertTrue(connection.settings_dict["NAME"].startswith("test_"))

    def test_on_commit_hooks_run_with_capture(self):
        calls = []
        with self.captureOnCommitCallbacks(execute=True):
            transaction.on_commit(lambda: calls.append(1))
        self.assertEqual(calls, [1])


class NoteTransactionTestCase(TransactionTestCase):
    databases = {"default", "other"}

    def test_commits_are_visible_from_another_thread(self):
        Note.objects.create(text="committed")
        seen = []

        def look():
            seen.append(Note.objects.filter(text="committed").count())
            connections.close_all()

        t = threading.Thread(target=look)
        t.start()
        t.join()
        self.assertEqual(seen, [1])
        self.assertTrue(any(s["checkouts"] for s in pool_stats("default")))

    def test_flush_between_tests(self):
        self.assertEqual(Note.objects.count(), 0)
        Note.objects.create(text="flushed")
