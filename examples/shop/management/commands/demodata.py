"""``manage.py demodata``: load the sample products once, and an ``admin`` user for the demo."""

from __future__ import annotations

from typing import Any

from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import BaseCommand

from shop.models import Product

ADMIN_USER = "admin"
ADMIN_PASSWORD = "admin"  # a local demo's admin, never a database password


class Command(BaseCommand):
    help = "Load the sample products if the shop is empty, and create the demo's admin user."

    def handle(self, *args: Any, **options: Any) -> None:
        if Product.objects.exists():
            self.stdout.write(f"Sample data: kept the {Product.objects.count()} existing products.")
        else:
            call_command("loaddata", "sample", verbosity=0)
            self.stdout.write(f"Sample data: loaded {Product.objects.count()} products.")
        users = get_user_model()._default_manager
        if not users.filter(username=ADMIN_USER).exists():
            users.create_superuser(ADMIN_USER, "admin@example.com", ADMIN_PASSWORD)
            self.stdout.write(f"Admin: created user {ADMIN_USER!r} (password {ADMIN_PASSWORD!r}).")
