"""One migrate at a time per database: two `manage.py migrate` processes at once. The first is
held by the proxy (Show, behind a blocker of this test); the second says who holds the
migration lock and waits until the first is done, or stops with exit 1 after
PGMIGRATE_MIGRATE_LOCK_TIMEOUT."""

from __future__ import annotations

from collections.abc import Iterator

import pglock
import pytest
from django.db import connection

from tests.django.processes import ManagePy
from tests.django.scenario import Blocker, migrate

pytestmark = pytest.mark.django_db(transaction=True)

#: The first migrate: held under Show for as long as the test's blocker lives.
HELD = {"PGMIGRATE_BLOCKING_ACTION": "show", "PGMIGRATE_MAX_HOLD": "60s"}


@pytest.fixture
def auth_0007() -> Iterator[None]:
    migrate("auth", "0007", verbosity=0)
    yield
    migrate(verbosity=0)


def _lock_holders() -> list[int]:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted"
            " AND objid = %s AND classid = %s",
            [0x67726174, 0x70676D69],
        )
        return [int(pid) for (pid,) in cursor.fetchall()]


def _applied(name: str) -> bool:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM django_migrations WHERE app = 'auth' AND name = %s", [name]
        )
        row = cursor.fetchone()
        return bool(row and row[0])


@pytest.mark.usefixtures("auth_0007")
def test_a_second_migrate_waits_for_the_first() -> None:
    with Blocker(pglock.ACCESS_SHARE) as blocker:
        first = ManagePy("migrate", "auth", "0008", "--no-color", **HELD)
        second = None
        try:
            first.wait_for("Blocked by 1 query")
            assert len(_lock_holders()) == 1
            second = ManagePy("migrate", "auth", "0008", "--no-color")
            second.wait_for("Another migrate holds the migration lock: pid ")
            line = next(x for x in second.err if "Another migrate" in x)
            assert f"(migrate process {first.process.pid} on " in line and ", since " in line
            assert second.process.poll() is None  # waiting
            assert not _applied("0008_alter_user_username_max_length")
        finally:
            blocker.release.set()  # the blocker commits: the first goes on, then the second
            assert first.finish() == 0, first.err
            if second is not None:
                assert second.finish() == 0, second.err
    assert "  Applying auth.0008_alter_user_username_max_length..." in first.out
    assert first.out[-1].endswith("...  OK"), first.out
    assert second is not None and any("No migrations to apply." in x for x in second.out)
    assert _applied("0008_alter_user_username_max_length")


@pytest.mark.usefixtures("auth_0007")
def test_a_second_migrate_stops_after_the_lock_timeout() -> None:
    with Blocker(pglock.ACCESS_SHARE) as blocker:
        first = ManagePy("migrate", "auth", "0008", "--no-color", **HELD)
        try:
            first.wait_for("Blocked by 1 query")
            second = ManagePy(
                "migrate", "auth", "0008", "--no-color", PGMIGRATE_MIGRATE_LOCK_TIMEOUT="200ms"
            )
            assert second.finish() == 1, (second.out, second.err)
            assert any("Another migrate holds the migration lock" in x for x in second.err)
            assert second.err[-1] == (
                "Migration lock not available after 0.2 s (PGMIGRATE_MIGRATE_LOCK_TIMEOUT). "
                "Aborting..."
            )
            assert not any("Applying" in x for x in second.out)
            assert first.process.poll() is None
        finally:
            blocker.release.set()
            assert first.finish() == 0, first.err
