from django.db import models


class Note(models.Model):
    title = models.CharField(max_length=100)
    slug = models.SlugField(max_length=100, default="")


class MigrationRun(models.Model):
    """What the data migration saw of its connection (read by the tests)."""

    alias = models.CharField(max_length=30)
    engine = models.CharField(max_length=200)
    backend_pid = models.IntegerField()
    pool_checkouts = models.IntegerField()
