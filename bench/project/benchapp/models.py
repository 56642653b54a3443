from django.db import models

# The table is created by bench/run.py from schema.py (no migrations to run).

class Item(models.Model):
    name = models.TextField()
    value = models.IntegerField()

    class Meta:
        db_table = "bench_item"
