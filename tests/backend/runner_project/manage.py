#!/usr/bin/env python
"""A small project whose own tests run under Django's test runner with the pooled ENGINE."""

import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "runner_settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)
