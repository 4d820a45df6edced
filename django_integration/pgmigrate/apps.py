"""The AppConfig: registers the system checks and wraps RunPython for autocommit sessions."""

from __future__ import annotations

from django.apps import AppConfig


class PGMigrateConfig(AppConfig):
    """django-pgmigrate; put it in INSTALLED_APPS next to "pgactivity" and "pglock"."""

    name = "pgmigrate"
    verbose_name = "django-pgmigrate"

    def ready(self) -> None:
        from pgmigrate import atomic, checks

        checks.register()
        atomic.install()
