"""The session option migration_lock: migration sessions of any tool through the proxy take the
migration lock of their database (the advisory lock `manage.py migrate` takes) before their
first statement; a second one is told who holds it and waits, or ends with 55P03 after
migration_lock_timeout."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import psycopg
import pytest
from pgmigrate_proxy import migrationlock
from psycopg import errors

from tests.fixtures.postgres import PgInfo
from tests.fixtures.proxy import RunningProxy
from tests.guard.scenarios import BOUND, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

LOCKED = "-c pgmigrate.role=migrate -c pgmigrate.migration_lock=on"


def session(
    proxy: RunningProxy, pg: PgInfo, options: str
) -> tuple[psycopg.Connection[Any], list[str]]:
    conn = psycopg.connect(
        proxy.conninfo(pg.superuser, options=options, application_name="tool"), autocommit=True
    )
    notices: list[str] = []
    lock = threading.Lock()

    def keep(diag: psycopg.errors.Diagnostic) -> None:
        with lock:
            notices.append(diag.message_primary or "")

    conn.add_notice_handler(keep)
    return conn, notices


def holders(pg: PgInfo) -> list[int]:
    with pg.connect() as conn:
        rows = conn.execute(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted"
            " AND classid = %s AND objid = %s",
            (migrationlock.CLASSID, migrationlock.OBJID),
        ).fetchall()
    return [int(pid) for (pid,) in rows]


def waiting(pg: PgInfo) -> bool:
    with pg.connect() as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
            " AND classid = %s AND objid = %s",
            (migrationlock.CLASSID, migrationlock.OBJID),
        ).fetchone()
    return bool(row and row[0])


def test_a_second_migration_session_waits_for_the_first(
    pg: PgInfo, proxy_factory: Callable[..., RunningProxy]
) -> None:
    proxy = proxy_factory()
    first, _ = session(proxy, pg, LOCKED)
    first.execute("SELECT 1")  # its first statement: it holds the lock from now on
    assert len(holders(pg)) == 1
    second, said = session(proxy, pg, LOCKED)
    with ThreadPoolExecutor(1) as pool:
        answer: Future[Any] = pool.submit(lambda: second.execute("SELECT 2").fetchone())
        wait_for(lambda: waiting(pg), "the second session to wait for the lock")
        wait_for(lambda: said, "the notice")
        assert not answer.done()
        assert said[0].startswith("pgmigrate: another migration holds the migration lock: pid ")
        assert f"(pgmigrate-proxy process {os.getpid()} on " in said[0]
        first.close()  # the first session ends: its lock goes
        assert answer.result(BOUND) == (2,)
    assert len(holders(pg)) == 1
    second.close()
    wait_for(lambda: not holders(pg), "the lock to be released")


def test_a_migrate_s_lock_is_seen_and_the_timeout_ends_the_session(
    pg: PgInfo, proxy_factory: Callable[..., RunningProxy]
) -> None:
    """A session outside the proxy holds the lock as `manage.py migrate` does; a migration
    session with migration_lock_timeout=200ms names it, then ends with 55P03."""
    proxy = proxy_factory()
    with pg.connect(application_name="deploy job 7") as other:
        other.execute("SELECT pg_advisory_lock(%s)", (migrationlock.KEY,))
        second, said = session(proxy, pg, LOCKED + " -c pgmigrate.migration_lock_timeout=200ms")
        with pytest.raises(errors.LockNotAvailable) as info:
            second.execute("ALTER TABLE IF EXISTS nothing_here ADD COLUMN x int")
        assert "migration lock not available after 0.2 s" in str(info.value)
        assert said and f"pid {other.info.backend_pid}, " in said[0]
        assert "application_name 'deploy job 7'" in said[0]
        assert second.closed or second.broken or _fails(second)
    assert not holders(pg)


def test_without_the_option_nothing_is_locked(
    pg: PgInfo, proxy_factory: Callable[..., RunningProxy]
) -> None:
    proxy = proxy_factory()
    conn, _ = session(proxy, pg, "-c pgmigrate.role=migrate")
    conn.execute("SELECT 1")
    assert not holders(pg)
    conn.close()


def _fails(conn: psycopg.Connection[Any]) -> bool:
    try:
        conn.execute("SELECT 1")
    except psycopg.OperationalError:
        return True
    return False
