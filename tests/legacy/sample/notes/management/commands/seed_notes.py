from django.core.management.base import BaseCommand

from notes.models import Note


class Command(BaseCommand):
    help = "Insert a few notes for the data migration to fill in."

    def handle(self, *args, **options):
        for title in ("First Note", "Second note", "A third one"):
            Note.objects.create(title=title)
        self.stdout.write("seeded %d notes" % Note.objects.count())
