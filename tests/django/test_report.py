"""`manage.py migrate --report FILE.html`: a real migration through the embedded proxy with a
blocker, its report opened in chromium; the report of a run that gave up, through the embedded
proxy and through an external one (the events come as notices from either)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import pglock
import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from pytest_django.fixtures import Settings as SettingsWrapper

from tests.django.scenario import Blocker, Migrate, migrate
from tests.report_browser import open_report, screenshot_path

pytestmark = pytest.mark.django_db(transaction=True)

#: auth 0007 -> the latest: ALTER TABLEs on auth_user and auth_group, each its migration's.
AUTH_ALTERS = {
    "auth.0008_alter_user_username_max_length": 'ALTER TABLE "auth_user" ALTER COLUMN "username"',
    "auth.0009_alter_user_last_name_max_length": 'ALTER TABLE "auth_user" ALTER COLUMN "last_name"',
    "auth.0010_alter_group_name_max_length": 'ALTER TABLE "auth_group" ALTER COLUMN "name"',
    "auth.0012_alter_user_first_name_max_length": (
        'ALTER TABLE "auth_user" ALTER COLUMN "first_name"'
    ),
}


@pytest.fixture
def auth_0007() -> Iterator[None]:
    """auth at 0007, so that migrating forward alters auth_user; all migrated afterwards."""
    migrate("auth", "0007", verbosity=0)
    yield
    migrate(verbosity=0)


@pytest.mark.usefixtures("auth_0007")
def test_report_of_a_migration_with_a_terminated_blocker(tmp_path: Path) -> None:
    page = tmp_path / "migrate.html"
    with Blocker(pglock.ACCESS_SHARE):
        run = Migrate("auth", report=str(page))
        run.start()
        run.finish()
    assert f"Migration report: {page}" in run.out.getvalue()
    opened = open_report(page, screenshot_path(tmp_path, "report-migrate.png"))
    assert opened.errors == []
    assert opened.dialogs == []
    assert opened.requests == [page.resolve().as_uri()]  # nothing but the file itself
    shown = {s["label"]: s for s in opened.sections}
    for migration, statement in AUTH_ALTERS.items():
        assert shown[migration]["sql"].startswith(statement), shown
        assert shown[migration]["outcome"] == "applied"
    first = shown["auth.0008_alter_user_username_max_length"]
    assert "terminated" in first["blockers"] and "idle in transaction" in first["blockers"]
    assert all(s["visible"] for s in opened.sections)


@pytest.fixture(params=["embedded", "external"])
def mode(request: pytest.FixtureRequest) -> str:
    if request.param == "external":
        request.getfixturevalue("external_proxy")
    return str(request.param)


@pytest.mark.usefixtures("mode", "auth_0007")
def test_report_is_written_when_migrate_gives_up(tmp_path: Path, settings: SettingsWrapper) -> None:
    settings.PGMIGRATE_BLOCKING_ACTION = None
    settings.PGMIGRATE_LOCK_TIMEOUT = dt.timedelta(milliseconds=300)
    page = tmp_path / "gave_up.html"
    with Blocker(pglock.ACCESS_SHARE):
        run = Migrate("auth", "0008", report=str(page))
        run.start()
        with pytest.raises(SystemExit):
            run.finish()
    text = page.read_text()
    assert "auth.0008_alter_user_username_max_length" in text
    assert "gave up (55P03 lock_not_available)" in text
    assert "<td>55P03</td>" in text  # an attempt that ended waiting for the lock
    assert "blocked by" in text  # its blocker, reported (the action is None)


def test_report_into_a_missing_directory_is_refused_before_migrating(tmp_path: Path) -> None:
    with pytest.raises(CommandError, match="--report: no directory"):
        call_command("migrate", verbosity=0, report=str(tmp_path / "no" / "r.html"))
