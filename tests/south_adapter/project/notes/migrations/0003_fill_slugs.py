from django.db import migrations
from django.utils.text import slugify


def fill_slugs(apps, schema_editor):
    """Write notes, fill their slugs, and record the connection this ran on."""
    from django_postgrespool import pool_stats

    alias = schema_editor.connection.alias
    Note = apps.get_model("notes", "Note")
    for title in ("First Note", "Second note", "A third one"):
        Note.objects.using(alias).create(title=title)
    for note in Note.objects.using(alias).order_by("id"):
        note.slug = slugify(note.title)
        note.save(update_fields=["slug"])
    with schema_editor.connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        (pid,) = cursor.fetchone()
    (stats,) = pool_stats(alias=alias)
    apps.get_model("notes", "MigrationRun").objects.using(alias).create(
        alias=alias,
        engine=type(schema_editor.connection).__module__,
        backend_pid=pid,
        pool_checkouts=stats["checkouts"],
    )


class Migration(migrations.Migration):
    dependencies = [("notes", "0002_note_slug")]

    operations = [migrations.RunPython(fill_slugs, migrations.RunPython.noop)]
