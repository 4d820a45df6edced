#!/usr/bin/env python
"""manage.py of the stall benchmark's Django project (bench/stall.py runs it in its own venv)."""

import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)
