"""The system checks, each compared by equality, and which command `migrate` is."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
from pathlib import Path

import pgmigrate
import pytest
from django.core import checks as django_checks
from django.core.management import get_commands, load_command_class
from django.core.management.commands import migrate as django_migrate
from pgmigrate import checks, filters, guard
from pgmigrate.management.commands import pgmigrate as pgmigrate_command
from pytest_django.fixtures import Settings as SettingsWrapper

ALL_APPS = [
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "pgactivity",
    "pglock",
    "pgmigrate",
    "tests.django.testapp",
]
NOT_POSTGRESQL = django_checks.Warning(
    "database 'other' is not PostgreSQL (sqlite): migrate runs as plain Django for it",
    id="pgmigrate.W001",
)


def _ours() -> list[django_checks.CheckMessage]:
    """This app's messages, by id: the order Django runs registered checks in is not ours.
    No databases: Django 6.1 would otherwise run the model checks against each (SQLite's
    JSONField support is probed on a connection, not allowed in these tests)."""
    ours = [m for m in django_checks.run_checks(databases=[]) if str(m.id).startswith("pgmigrate.")]
    return sorted(ours, key=lambda m: str(m.id))


def test_defaults() -> None:
    assert _ours() == [NOT_POSTGRESQL]


@pytest.mark.parametrize(
    ("missing", "check_id"), [("pgactivity", "pgmigrate.E001"), ("pglock", "pgmigrate.E002")]
)
def test_required_apps(settings: SettingsWrapper, missing: str, check_id: str) -> None:
    settings.INSTALLED_APPS = [app for app in ALL_APPS if app != missing]
    assert checks.required_apps() == [
        django_checks.Error(
            f'"{missing}" must be in INSTALLED_APPS for django-pgmigrate',
            hint='INSTALLED_APPS = [..., "pgactivity", "pglock", "pgmigrate"]',
            id=check_id,
        )
    ]


DURATION = "must be a datetime.timedelta, a number of seconds or a duration such as '5s'"
PATTERNS = "must be a list of non-empty glob patterns without commas"
BLOCKING_ACTION = (
    "must be None, pgmigrate.Terminate, pgmigrate.Show, pgmigrate.Cancel, pgmigrate.Drain, a "
    "pgmigrate.BlockingAction subclass or instance, or one of 'terminate', 'cancel', 'show', "
    "'drain', 'none' (got "
)


@pytest.mark.parametrize(
    ("setting", "value", "check_id", "message"),
    [
        ("PGMIGRATE_BLOCKING_ACTION", "kill", "pgmigrate.E003", BLOCKING_ACTION + "'kill')"),
        ("PGMIGRATE_BLOCKING_ACTION", 3, "pgmigrate.E003", BLOCKING_ACTION + "3)"),
        ("PGMIGRATE_BLOCKING_ACTION_INTERVAL", None, "pgmigrate.E005", DURATION),
        ("PGMIGRATE_BLOCKING_ACTION_INTERVAL", 0, "pgmigrate.E005", "must be from 1ms to 1d"),
        ("PGMIGRATE_LOCK_TIMEOUT", "soon", "pgmigrate.E006", DURATION),
        ("PGMIGRATE_LOCK_TIMEOUT", dt.timedelta(0), "pgmigrate.E006", "must be from 1ms to 7d"),
        ("PGMIGRATE_LOCK_TIMEOUT", float("nan"), "pgmigrate.E006", DURATION),
        ("PGMIGRATE_LOCK_TIMEOUT", 1e308, "pgmigrate.E006", "must be from 1ms to 7d"),
        (
            "PGMIGRATE_LOCK_TIMEOUT",
            dt.timedelta(days=30),
            "pgmigrate.E006",
            "must be from 1ms to 7d",
        ),
        ("PGMIGRATE_PATCH_MIGRATE", "yes", "pgmigrate.E007", "must be True or False"),
        (
            "PGMIGRATE_PROXY",
            "sidecar",
            "pgmigrate.E008",
            "must be one of 'auto', 'embedded', 'external'",
        ),
        ("PGMIGRATE_AUTOCOMMIT", 1, "pgmigrate.E009", "must be True or False"),
        ("PGMIGRATE_ATTEMPT_TIMEOUT", -1, "pgmigrate.E010", "must be from 1ms to 7d"),
        ("PGMIGRATE_ATTEMPT_TIMEOUT", "1e308", "pgmigrate.E010", "must be from 1ms to 7d"),
        ("PGMIGRATE_RETRY_DELAY", True, "pgmigrate.E011", DURATION),
        ("PGMIGRATE_RETRY_MAX_DELAY", [], "pgmigrate.E012", DURATION),
        ("PGMIGRATE_MAX_HOLD", 0.0, "pgmigrate.E013", "must be from 1ms to 1d"),
        ("PGMIGRATE_MIN_TRANSACTION_AGE", -0.5, "pgmigrate.E014", "must be from 0 to 7d"),
        ("PGMIGRATE_RETRY_MAX_DELAY", "2h", "pgmigrate.E012", "must be from 0 to 1h"),
        ("PGMIGRATE_USERS", "alice", "pgmigrate.E015", "must be a list of glob patterns"),
        ("PGMIGRATE_EXCLUDE_USERS", ["a,b"], "pgmigrate.E016", PATTERNS),
        ("PGMIGRATE_EXCLUDE_APPLICATION_NAMES", [""], "pgmigrate.E017", PATTERNS),
    ],
)
def test_setting_errors(
    settings: SettingsWrapper, setting: str, value: object, check_id: str, message: str
) -> None:
    setattr(settings, setting, value)
    assert checks.settings() == [django_checks.Error(f"{setting} {message}", id=check_id)]
    assert checks.SETTING_IDS[setting] == check_id


@pytest.mark.parametrize(
    ("value", "proxy_action"),
    [
        ("terminate", "terminate"),
        ("cancel", "cancel"),
        ("show", "show"),
        ("none", "none"),
        ("drain", "drain"),
        (pgmigrate.Drain(timeout=1), "drain"),
        ("Terminate", "terminate"),
        ("pgmigrate.Show", "show"),
        (pgmigrate.Cancel, "cancel"),
        (pgmigrate.Show(), "show"),
        (None, "none"),
    ],
)
def test_blocking_action_names(
    settings: SettingsWrapper, value: object, proxy_action: str
) -> None:
    """The proxy's own spelling is accepted as well as the objects, and means the same."""
    settings.PGMIGRATE_BLOCKING_ACTION = value
    assert checks.settings() == []
    assert guard.plan().guard["blocking_action"] == proxy_action


def test_retry_max_delay_below_retry_delay(settings: SettingsWrapper) -> None:
    settings.PGMIGRATE_RETRY_DELAY = dt.timedelta(seconds=2)
    settings.PGMIGRATE_RETRY_MAX_DELAY = dt.timedelta(seconds=1)
    assert checks.settings() == [
        django_checks.Error(
            "PGMIGRATE_RETRY_MAX_DELAY must not be less than PGMIGRATE_RETRY_DELAY",
            id="pgmigrate.E012",
        )
    ]


def test_good_settings(settings: SettingsWrapper) -> None:
    settings.PGMIGRATE_BLOCKING_ACTION = pgmigrate.Show(blocking_activity__state="ACTIVE")
    settings.PGMIGRATE_BLOCKING_ACTION_INTERVAL = 0.5
    settings.PGMIGRATE_LOCK_TIMEOUT = dt.timedelta(seconds=10)
    settings.PGMIGRATE_PATCH_MIGRATE = True
    settings.PGMIGRATE_PROXY = "external"
    settings.PGMIGRATE_AUTOCOMMIT = False
    settings.PGMIGRATE_ATTEMPT_TIMEOUT = dt.timedelta(milliseconds=200)
    settings.PGMIGRATE_RETRY_DELAY = 0
    settings.PGMIGRATE_RETRY_MAX_DELAY = 1
    settings.PGMIGRATE_MAX_HOLD = 3
    settings.PGMIGRATE_MIN_TRANSACTION_AGE = dt.timedelta(seconds=1)
    settings.PGMIGRATE_USERS = ["app_*"]
    settings.PGMIGRATE_EXCLUDE_USERS = ("replicator",)
    settings.PGMIGRATE_EXCLUDE_APPLICATION_NAMES = ["pg_dump"]
    assert checks.settings() == []


def test_unmappable_filters(settings: SettingsWrapper) -> None:
    settings.PGMIGRATE_BLOCKING_ACTION = pgmigrate.Terminate(
        blocking_activity__duration__lt="5 seconds",
        blocking_activity__state="WAITING",
        mode="ACCESS_SHARE",
    )
    hint = (
        "the proxy applies: "
        + ", ".join(filters.SUPPORTED)
        + "; see also PGMIGRATE_MIN_TRANSACTION_AGE, PGMIGRATE_USERS, "
        "PGMIGRATE_EXCLUDE_USERS, PGMIGRATE_EXCLUDE_APPLICATION_NAMES"
    )
    assert checks.settings() == [
        django_checks.Error(
            "PGMIGRATE_BLOCKING_ACTION filter "
            "blocking_activity__duration__lt: the proxy has no equivalent filter",
            hint=hint,
            id="pgmigrate.E004",
        ),
        django_checks.Error(
            "PGMIGRATE_BLOCKING_ACTION filter blocking_activity__state: unknown state 'WAITING'",
            hint=hint,
            id="pgmigrate.E004",
        ),
        django_checks.Error(
            "PGMIGRATE_BLOCKING_ACTION filter mode: the proxy has no equivalent filter",
            hint=hint,
            id="pgmigrate.E004",
        ),
    ]


def test_custom_actions_keep_their_filters(settings: SettingsWrapper) -> None:
    class Custom(pgmigrate.BlockingAction):
        def worker(self, cmd: object, blocking_locks: object) -> list[int]:
            return []

    settings.PGMIGRATE_BLOCKING_ACTION = Custom(mode="ACCESS_SHARE")  # for the queryset
    assert checks.settings() == []


def test_patch_migrate(settings: SettingsWrapper) -> None:
    assert get_commands()["migrate"] == "pgmigrate"
    assert type(load_command_class("pgmigrate", "migrate")) is pgmigrate_command.Command
    assert checks.migrate_command() == []
    settings.PGMIGRATE_PATCH_MIGRATE = False
    assert type(load_command_class("pgmigrate", "migrate")) is django_migrate.Command
    assert checks.migrate_command() == [
        django_checks.Info(
            "`manage.py migrate` is Django's own (PGMIGRATE_PATCH_MIGRATE = False): "
            "run `manage.py pgmigrate` to migrate through pgmigrate-proxy",
            id="pgmigrate.I001",
        )
    ]


MANAGE_PY = Path(__file__).with_name("manage.py")


@pytest.mark.parametrize(
    ("settings_module", "output"),
    [
        ("tests.django.settings_postgres", "System check identified no issues (0 silenced).\n"),
        (
            "tests.django.settings",
            "System check identified some issues:\n\nWARNINGS:\n?: (pgmigrate.W001) database "
            "'other' is not PostgreSQL (sqlite): migrate runs as plain Django for it\n\n"
            "System check identified 1 issue (0 silenced).\n",
        ),
    ],
)
def test_manage_py_check(settings_module: str, output: str) -> None:
    """A real `manage.py check`: a correct setup prints no issue, only problems are reported."""
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": settings_module}
    done = subprocess.run(
        [sys.executable, str(MANAGE_PY), "check"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert (done.returncode, done.stdout + done.stderr) == (0, output)
