from django.db import migrations, models


class Migration(migrations.Migration):
    initial = True
    dependencies = []

    operations = [
        migrations.CreateModel(
            name="Note",
            fields=[
                ("id", models.AutoField(primary_key=True, serialize=False)),
                ("title", models.CharField(max_length=100)),
            ],
        ),
        migrations.CreateModel(
            name="MigrationRun",
            fields=[
                ("id", models.AutoField(primary_key=True, serialize=False)),
                ("alias", models.CharField(max_length=30)),
                ("engine", models.CharField(max_length=200)),
                ("backend_pid", models.IntegerField()),
                ("pool_checkouts", models.IntegerField()),
            ],
        ),
    ]
