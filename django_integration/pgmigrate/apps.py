"""The AppConfig: registers the system checks (the migrate command wraps RunPython itself)."""

from __future__ import annotations

from django.apps import AppConfig


class PGMigrateConfig(AppConfig):
    """django-pgmigrate; put it in INSTALLED_APPS next to "pgactivity" and "pglock"."""

    name = "pgmigrate"
    verbose_name = "django-pgmigrate"

    def ready(self) -> None:
        from pgmigrate import checks

        checks.register()
