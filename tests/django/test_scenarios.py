"""django-pgmigrate 1.x's scenarios, through the embedded proxy and through an external one:
migrate auth 0007 -> 0008 (ALTER TABLE auth_user) while another thread holds a lock on it."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterator
from typing import Any

import pglock
import pgmigrate
import pytest
from django.core.management import call_command
from django.db.utils import OperationalError
from pytest_django.fixtures import Settings as SettingsWrapper

from tests.django.conftest import DRIVER
from tests.django.scenario import WAIT, Background, Blocker, Migrate, migrate

pytestmark = pytest.mark.django_db(transaction=True)
LIVE_NOTICES = DRIVER != "psycopg2"


@pytest.fixture(params=["embedded", "external"])
def mode(request: pytest.FixtureRequest) -> str:
    """Each scenario runs with the embedded proxy and with an external one."""
    if request.param == "external":
        request.getfixturevalue("external_proxy")
    return str(request.param)


@pytest.fixture
def auth_0007(mode: str) -> Iterator[None]:
    """auth at 0007, so that migrating to 0008 alters auth_user; all migrated afterwards."""
    migrate("auth", "0007", verbosity=0)
    yield
    migrate(verbosity=0)


def _terminated(error: BaseException | None) -> bool:
    return isinstance(error, OperationalError) and "terminat" in str(error)


@pytest.mark.usefixtures("auth_0007")
def test_terminate(mode: str) -> None:
    with Blocker(pglock.ACCESS_SHARE) as blocker:
        run = Migrate("auth", "0008")
        run.start()
        run.finish()
    lines = run.out.getvalue().splitlines()
    assert lines[0] == f"Postgres process ID: {lines[0].split(': ')[1]}"
    assert "  Terminated 1 blocking query...  OK" in lines
    assert _terminated(blocker.error), blocker.error


@pytest.mark.usefixtures("auth_0007")
def test_terminate_says_nothing_at_verbosity_0(mode: str) -> None:
    with Blocker(pglock.ACCESS_EXCLUSIVE) as blocker:
        run = Migrate("auth", "0008", verbosity=0)
        run.start()
        run.finish()
    assert run.out.getvalue() == ""
    assert _terminated(blocker.error), blocker.error


def _terminate_blockers() -> str:
    """`pglock --blocking --terminate --yes` until it terminates something."""
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        out = Migrate("--blocking", "--terminate", "--yes", command="pglock")
        out.run()  # in this thread
        if out.error is None:
            return out.out.getvalue()
        assert isinstance(out.error, SystemExit), out.error  # "No blocking queries"
        time.sleep(0.05)
    raise AssertionError("pglock found no blocking query to terminate")


@pytest.mark.usefixtures("auth_0007")
def test_show(mode: str, settings: SettingsWrapper) -> None:
    settings.PGMIGRATE_BLOCKING_ACTION = pgmigrate.Show
    settings.PGMIGRATE_MAX_HOLD = dt.timedelta(milliseconds=300)
    with Blocker(pglock.ACCESS_SHARE) as blocker:
        run = Migrate("auth", "0008")
        run.start()
        if LIVE_NOTICES:  # psycopg2 hands notices over when the statement ends
            run.wait_for(f"Blocked by 1 query: {blocker.pid}...")
        assert run.is_alive()
        assert _terminate_blockers() == "Terminated 1 blocking query\n"
        run.finish()
    assert _terminated(blocker.error), blocker.error
    output = run.out.getvalue()
    assert f"  Blocked by 1 query: {blocker.pid}...  OK\n" in output
    assert "Terminated" not in output


@pytest.mark.usefixtures("auth_0007")
def test_lock_timeout(mode: str, settings: SettingsWrapper) -> None:
    settings.PGMIGRATE_BLOCKING_ACTION = None
    # a budget with room for a retry on a loaded machine (100 ms was spent by one attempt)
    settings.PGMIGRATE_LOCK_TIMEOUT = dt.timedelta(seconds=1)
    with Blocker(pglock.ACCESS_SHARE) as blocker:
        run = Migrate("auth", "0008")
        run.start()
        with pytest.raises(SystemExit) as exit_info:
            run.finish()
    assert exit_info.value.code == 1
    output = run.out.getvalue()
    assert "Lock not available, retrying in" in output
    assert output.endswith("\nLock timeout expired. Aborting...\n")
    assert blocker.error is None  # left alone: its transaction committed


@pytest.mark.usefixtures("auth_0007")
def test_filters_spare_young_blockers(mode: str, settings: SettingsWrapper) -> None:
    settings.PGMIGRATE_BLOCKING_ACTION = pgmigrate.Terminate(
        blocking_activity__duration__gte="1 minute"
    )
    settings.PGMIGRATE_LOCK_TIMEOUT = dt.timedelta(milliseconds=300)
    with Blocker(pglock.ACCESS_SHARE) as blocker:
        run = Migrate("auth", "0008")
        run.start()
        with pytest.raises(SystemExit):
            run.finish()
    assert "Terminated" not in run.out.getvalue()
    assert "Lock timeout expired. Aborting..." in run.out.getvalue()
    assert blocker.error is None


class Recording(pgmigrate.BlockingAction):
    """A custom action, run by 1.x's polling thread: terminates and remembers the querysets."""

    calls: list[list[int]] = []

    def worker(self, cmd: Any, blocking_locks: Any) -> list[int]:
        pids = list(blocking_locks.values_list("blocking_activity_id", flat=True).distinct())
        Recording.calls.append(pids)
        if pids:
            cmd.stdout.write(f"\n  custom action: {len(pids)} blocker(s)", ending=" ")
        return list(blocking_locks.terminate_blocking_activity())


@pytest.mark.usefixtures("auth_0007")
def test_custom_action(mode: str, settings: SettingsWrapper) -> None:
    settings.PGMIGRATE_BLOCKING_ACTION = Recording()
    settings.PGMIGRATE_BLOCKING_ACTION_INTERVAL = dt.timedelta(milliseconds=100)
    Recording.calls = []
    with Blocker(pglock.ACCESS_SHARE) as blocker:
        run = Migrate("auth", "0008")
        run.start()
        run.finish()
    # (the migration's output in the message: a run whose action saw no blocker was once
    # recorded, intermittently, in the external mode)
    assert [blocker.pid] in Recording.calls, (Recording.calls, run.out.getvalue())
    assert "  custom action: 1 blocker(s)  OK" in run.out.getvalue()
    assert "Blocked by" not in run.out.getvalue()  # the worker does its own printing
    assert _terminated(blocker.error), blocker.error


@pytest.mark.usefixtures("auth_0007")
def test_cancel_ends_idle_in_transaction_blockers(mode: str, settings: SettingsWrapper) -> None:
    settings.PGMIGRATE_BLOCKING_ACTION = pgmigrate.Cancel
    with Blocker(pglock.ACCESS_SHARE) as blocker:
        run = Background(lambda: migrate("auth", "0008"))
        run.start()
        output = run.finish()
    # pg_cancel_backend cannot end an idle transaction: the proxy terminates it after
    # cancel_grace (2 s) and says so.
    assert "  Terminated 1 blocking query...  OK" in output
    assert _terminated(blocker.error), blocker.error


def test_migrate_everything_at_verbosity_0(mode: str) -> None:
    assert migrate(verbosity=0) == ""
    call_command("check", databases=[])  # Django 6.1 checks all databases by default
