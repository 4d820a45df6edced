"""`manage.py migrate`: django-pgmigrate's command, or Django's own when
PGMIGRATE_PATCH_MIGRATE is False (read each time the command is loaded)."""

from __future__ import annotations

from django.core.management.commands import migrate

from pgmigrate import conf
from pgmigrate.management.commands import pgmigrate


def __getattr__(name: str) -> type[migrate.Command]:
    if name == "Command":
        return pgmigrate.Command if conf.patch_migrate() is not False else migrate.Command
    raise AttributeError(name)
