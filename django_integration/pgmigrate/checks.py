"""System checks: required apps, every PGMIGRATE_* setting, the databases, the migrate command."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from django.apps import AppConfig, apps
from django.core import checks
from django.db import connections

from pgmigrate import conf, filters, guard

PGACTIVITY_MISSING = "pgmigrate.E001"
PGLOCK_MISSING = "pgmigrate.E002"
NOT_POSTGRESQL = "pgmigrate.W001"
MIGRATE_IS_DJANGOS = "pgmigrate.I001"
#: One id per setting (guard.SETTINGS) and E004 for filters the proxy cannot apply.
SETTING_IDS = {setting.name: setting.check_id for setting in guard.SETTINGS}
UNMAPPABLE_FILTER = guard.UNMAPPABLE_FILTER

_INSTALLED_APPS_HINT = 'INSTALLED_APPS = [..., "pgactivity", "pglock", "pgmigrate"]'


def required_apps(app_configs: Sequence[AppConfig] | None = None, **kwargs: Any) -> list[Any]:
    """django-pgactivity and django-pglock must be installed apps (their models and commands)."""
    errors: list[Any] = []
    for label, check_id in (("pgactivity", PGACTIVITY_MISSING), ("pglock", PGLOCK_MISSING)):
        if not apps.is_installed(label):
            errors.append(
                checks.Error(
                    f'"{label}" must be in INSTALLED_APPS for django-pgmigrate',
                    hint=_INSTALLED_APPS_HINT,
                    id=check_id,
                )
            )
    return errors


def settings(app_configs: Sequence[AppConfig] | None = None, **kwargs: Any) -> list[Any]:
    """Each PGMIGRATE_* setting with a type or value that is not allowed."""
    _, problems = guard.read()
    return [
        checks.Error(f"{problem.setting} {problem.message}", id=problem.check_id)
        if problem.check_id != UNMAPPABLE_FILTER
        else checks.Error(
            f"PGMIGRATE_BLOCKING_ACTION filter {problem.message}",
            hint="the proxy applies: "
            + ", ".join(filters.SUPPORTED)
            + "; see also PGMIGRATE_MIN_TRANSACTION_AGE, PGMIGRATE_USERS, "
            "PGMIGRATE_EXCLUDE_USERS, PGMIGRATE_EXCLUDE_APPLICATION_NAMES",
            id=UNMAPPABLE_FILTER,
        )
        for problem in problems
    ]


def databases(app_configs: Sequence[AppConfig] | None = None, **kwargs: Any) -> list[Any]:
    """A database that is not PostgreSQL is migrated by plain Django."""
    warnings: list[Any] = []
    for alias in connections:
        connection = connections[alias]
        if connection.vendor not in ("postgresql", "unknown"):  # "unknown": the dummy backend
            warnings.append(
                checks.Warning(
                    f"database '{alias}' is not PostgreSQL ({connection.vendor}): migrate "
                    "runs as plain Django for it",
                    id=NOT_POSTGRESQL,
                )
            )
    return warnings


def migrate_command(app_configs: Sequence[AppConfig] | None = None, **kwargs: Any) -> list[Any]:
    """A reminder when `manage.py migrate` is Django's own; nothing when it is ours (the default:
    a correct setup reports no issue)."""
    if conf.patch_migrate() is False:
        return [
            checks.Info(
                "`manage.py migrate` is Django's own (PGMIGRATE_PATCH_MIGRATE = False): "
                "run `manage.py pgmigrate` to migrate through pgmigrate-proxy",
                id=MIGRATE_IS_DJANGOS,
            )
        ]
    return []  # ours, or not a bool (reported by settings())


def register() -> None:
    """Register the checks (from AppConfig.ready)."""
    for check in (required_apps, settings, databases, migrate_command):
        checks.register(check)
