"""PAUSE / RESUME with clients mid-transaction (pgbouncer's semantics), and RECONNECT."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import psycopg
import pytest
from psycopg import errors

from tests.console.conftest import client, console, show
from tests.fixtures.postgres import PgInfo
from tests.fixtures.proxy import RunningProxy
from tests.guard.scenarios import stays, wait_for

pytestmark = pytest.mark.integration

Keep = Callable[[psycopg.Connection[Any]], psycopg.Connection[Any]]
#: How long a test watches something that must not happen (a bounded poll, not a sleep).
WATCH = 0.5


@pytest.fixture
def pool() -> Any:
    """Threads for the calls that block; not waited for at the end (a failed test may leave one
    blocked until the proxy stops)."""
    executor = ThreadPoolExecutor(4)
    yield executor
    executor.shutdown(wait=False, cancel_futures=True)


def _paused(conn: psycopg.Connection[Any], database: str) -> bool:
    rows = {row["name"]: row for row in show(conn, "DATABASES")[1]}
    return bool(rows[database]["paused"])


@pytest.mark.parametrize("pool_mode", ["session", "transaction"])
def test_pause_waits_for_transactions_and_holds_new_ones_until_resume(
    proxy_factory: Callable[..., RunningProxy],
    pg: PgInfo,
    opened: Keep,
    pool: ThreadPoolExecutor,
    pool_mode: str,
) -> None:
    proxy = proxy_factory(admin_users=(pg.superuser,), pool_mode=pool_mode)
    busy = opened(client(proxy, application_name="mid-transaction"))
    idle = opened(client(proxy, application_name="between-transactions"))
    busy.execute("BEGIN")
    busy.execute("SELECT 1")
    admin = opened(console(proxy, pg.superuser))
    watcher = opened(console(proxy, pg.superuser))

    pausing = pool.submit(admin.execute, "PAUSE")
    wait_for(lambda: show(watcher, "STATE")[1][1]["value"] == "yes", "PAUSE to begin")
    stays(lambda: not pausing.done(), "PAUSE waits for the open transaction", WATCH)
    # the open transaction goes on while PAUSE waits
    assert busy.execute("SELECT 2").fetchone() == (2,)
    busy.execute("COMMIT")
    wait_for(pausing.done, "PAUSE to return once the transaction ended")
    pausing.result()

    # new transactions wait (an idle client, and the one that just committed)
    waiting: list[Future[Any]] = [
        pool.submit(lambda: idle.execute("SELECT 'after resume'").fetchone()),
        pool.submit(lambda: busy.execute("SELECT 3").fetchone()),
    ]
    stays(lambda: not any(w.done() for w in waiting), "new transactions wait", WATCH)
    with pytest.raises(errors.ObjectNotInPrerequisiteState, match="already paused"):
        watcher.execute("PAUSE")
    watcher.execute("RESUME")
    assert waiting[0].result(timeout=15) == ("after resume",)
    assert waiting[1].result(timeout=15) == (3,)
    with pytest.raises(errors.ObjectNotInPrerequisiteState, match="not paused"):
        watcher.execute("RESUME")


def test_pause_one_database_and_new_clients_wait_too(
    proxy_factory: Callable[..., RunningProxy], pg: PgInfo, opened: Keep, pool: ThreadPoolExecutor
) -> None:
    proxy = proxy_factory(admin_users=(pg.superuser,))
    other = opened(client(proxy))  # database postgres: not paused
    admin = opened(console(proxy, pg.superuser))
    with pg.connect() as direct:
        direct.execute("DROP DATABASE IF EXISTS console_paused")
        direct.execute("CREATE DATABASE console_paused")
    try:
        admin.execute("PAUSE console_paused")
        state = {row["key"]: row["value"] for row in show(admin, "STATE")[1]}
        assert (state["paused"], state["paused_databases"]) == ("no", "console_paused")
        assert other.execute("SELECT 1").fetchone() == (1,)
        done = threading.Event()

        def late_client() -> Any:
            with client(proxy, dbname="console_paused") as conn:
                row = conn.execute("SELECT current_database()").fetchone()
            done.set()
            return row

        late = pool.submit(late_client)
        stays(lambda: not done.is_set(), "a client of the paused database waits", WATCH)
        assert _paused(admin, "console_paused")  # (its pool exists now: the client logged in)
        admin.execute("RESUME console_paused")
        assert late.result(timeout=15) == ("console_paused",)
    finally:
        with pg.connect() as direct:
            direct.execute("DROP DATABASE IF EXISTS console_paused WITH (FORCE)")


def _alive(pg: PgInfo, pid: int) -> bool:
    with pg.connect() as conn:
        row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,))
        found = row.fetchone()
    return found is not None and found[0] == 1


def test_reconnect_closes_servers_once_free(
    console_proxy: RunningProxy, pg: PgInfo, opened: Keep
) -> None:
    busy = opened(client(console_proxy))
    busy_pid = busy.info.backend_pid
    with client(console_proxy) as gone:  # leaves an idle pooled server behind
        idle_pid = gone.info.backend_pid
    admin = opened(console(console_proxy, pg.superuser))

    def idle_state() -> bool:
        servers = {row["remote_pid"]: row for row in show(admin, "SERVERS")[1]}
        states = (servers[idle_pid]["state"], servers[busy_pid]["state"])
        return bool(states == ("idle", "active"))

    wait_for(idle_state, "the left client's server to be checked in")
    admin.execute("RECONNECT")
    wait_for(lambda: not _alive(pg, idle_pid), "the idle server to be closed")
    servers = {row["remote_pid"]: row for row in show(admin, "SERVERS")[1]}
    assert servers[busy_pid]["close_needed"] == 1
    assert busy.execute("SELECT 1").fetchone() == (1,)  # its client goes on meanwhile
    busy.close()
    wait_for(lambda: not _alive(pg, busy_pid), "the used server to be closed once free")
    with client(console_proxy) as fresh:
        assert fresh.info.backend_pid not in (idle_pid, busy_pid)
