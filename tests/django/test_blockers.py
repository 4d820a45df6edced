"""`manage.py pgmigrate_blockers` in another process: it finds the blocker of a migration held
under Show (embedded proxy in this process, or an external one), lists it, ends it with
--terminate --yes, and the migration completes; a role without rights sees and ends nothing."""

from __future__ import annotations

import datetime as dt
import subprocess
from collections.abc import Iterator

import pglock
import pgmigrate
import pytest
from pgmigrate import blockers
from pytest_django.fixtures import Settings as SettingsWrapper

from tests.django import processes
from tests.django.conftest import DRIVER
from tests.django.scenario import Blocker, Migrate, migrate
from tests.fixtures.postgres import PgInfo

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(params=["embedded", "external"])
def mode(request: pytest.FixtureRequest) -> str:
    if request.param == "external":
        request.getfixturevalue("external_proxy")
    return str(request.param)


@pytest.fixture
def auth_0007(mode: str) -> Iterator[None]:
    migrate("auth", "0007", verbosity=0)
    yield
    migrate(verbosity=0)


def blockers_command(*args: str, user: str | None = None) -> subprocess.CompletedProcess[str]:
    """`manage.py pgmigrate_blockers ARGS` in a subprocess, on this test's database."""
    return processes.run("pgmigrate_blockers", "--database", "default", *args, user=user)


def held_migration(settings: SettingsWrapper, blocker: Blocker) -> Migrate:
    """migrate auth 0008 under Show, held (out of the lock queue) behind `blocker`."""
    settings.PGMIGRATE_BLOCKING_ACTION = pgmigrate.Show
    settings.PGMIGRATE_MAX_HOLD = dt.timedelta(seconds=60)
    run = Migrate("auth", "0008")
    run.start()
    if DRIVER != "psycopg2":  # psycopg2 hands notices over when the statement ends
        run.wait_for(f"Blocked by 1 query: {blocker.pid}...")
    return run


def listed(pid: int, **kwargs: str) -> subprocess.CompletedProcess[str]:
    """The command's listing, once it shows `pid` (the statement may not be held yet)."""
    for _ in range(20):
        done = blockers_command(**kwargs)
        assert done.returncode == 0, done.stderr
        if f"pid {pid}," in done.stdout:
            return done
    raise AssertionError(f"pid {pid} never listed: {done.stdout}")


@pytest.mark.usefixtures("auth_0007")
def test_lists_and_terminates_the_blocker_of_a_held_migration(
    mode: str, settings: SettingsWrapper
) -> None:
    with Blocker(pglock.ACCESS_SHARE) as blocker:
        run = held_migration(settings, blocker)
        listing = listed(blocker.pid).stdout
        print(listing)
        assert 'ALTER TABLE "auth_user"' in listing
        assert "idle in transaction" in listing and "transaction " in listing
        assert "pglock" not in listing or "query:" in listing
        assert run.is_alive()
        ended = blockers_command("--terminate", "--yes")
        assert ended.returncode == 0, ended.stderr
        assert "Terminated 1 blocking query" in ended.stdout
        run.finish()
    assert blocker.error is not None and "terminat" in str(blocker.error)
    assert f"Blocked by 1 query: {blocker.pid}...  OK" in run.out.getvalue()


@pytest.mark.usefixtures("auth_0007")
def test_a_role_without_rights_sees_and_ends_only_what_it_may(
    mode: str, settings: SettingsWrapper
) -> None:
    if mode == "external":
        pytest.skip("u_trust has no password the external proxy's auth could check")
    with Blocker(pglock.ACCESS_SHARE) as blocker:
        run = held_migration(settings, blocker)
        listing = listed(blocker.pid, user="u_trust").stdout
        assert "query: <insufficient privilege>" in listing
        assert "idle in transaction" not in listing  # state hidden from it, as PostgreSQL does
        refused = blockers_command("--terminate", "--yes", user="u_trust")
        assert "Terminated 0 blocking queries" in refused.stdout
        assert f"Could not terminate pid {blocker.pid}: " in refused.stderr
        assert run.is_alive() and blocker.error is None
        blocker.release.set()  # it commits: the held migration goes on
        run.finish()
    assert blocker.error is None


@pytest.mark.parametrize("driver", ["psycopg", "psycopg2"])
def test_notifications_are_read_with_either_driver(pg: PgInfo, driver: str) -> None:
    module = pytest.importorskip(driver)
    raw = module.connect(pg.direct_conninfo())
    raw.autocommit = True
    try:
        raw.cursor().execute("LISTEN pgmigrate_test")
        with pg.connect() as other:
            other.execute("NOTIFY pgmigrate_test, 'hello'")
        got: list[str] = []
        for _ in range(100):
            got += blockers._notifies(raw, 0.1)
            if got:
                break
        assert got == ["hello"]
    finally:
        raw.close()
