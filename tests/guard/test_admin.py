"""The admin connection against a real server: finding blockers, signalling them."""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import Iterator

import psycopg
import pytest
from pgmigrate_proxy.admin import AdminConnection
from pgmigrate_proxy.embedded_postgres import PostgresServer, resolve_bin_dir
from pgmigrate_proxy.guard.policy import (
    BackendState,
    Blocker,
    BlockingAction,
    Filters,
    Reason,
    Verdict,
    decide,
)
from pgmigrate_proxy.sql.locks import LockMode
from psycopg import sql
from psycopg.conninfo import make_conninfo

from tests.fixtures.postgres import PgInfo
from tests.guard.live import AE, SUE, Connect, admin_for, by_pid, eventually, hold, running

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]


# --- find_blockers -------------------------------------------------------------------------------


def test_holder_found_only_for_a_conflicting_need(
    pg: PgInfo, table: tuple[str, int], sessions: Connect
) -> None:
    name, oid = table
    holder = sessions(application_name="report-job")
    pid = hold(holder, f'/*pga_context={{"job": "nightly"}}*/\nSELECT * FROM "{name}"')

    async def body() -> None:
        async with admin_for(pg) as admin:
            found = by_pid(await admin.find_blockers({oid: AE}), pid)
            assert found is not None
            assert found.locks[0].mode is LockMode.AccessShareLock and found.locks[0].granted
            assert found.state is BackendState.IDLE_IN_TRANSACTION
            assert (found.backend_type, found.datname) == ("client backend", "postgres")
            assert (found.usename, found.application_name) == (pg.superuser, "report-job")
            assert found.client_addr == "127.0.0.1" and found.prepared_xact is None
            assert found.xact_age is not None and found.xact_age >= 0
            assert found.query == f'SELECT * FROM "{name}"'
            assert found.context == {"job": "nightly"}
            assert by_pid(await admin.find_blockers({oid: "AccessExclusiveLock"}), pid)
            assert by_pid(await admin.find_blockers({oid: SUE}), pid) is None
            assert by_pid(await admin.find_blockers({oid: AE}, exclude_pids=[pid]), pid) is None
            assert await admin.find_blockers({}) == []

    asyncio.run(body())


def test_waiting_lock_is_found(pg: PgInfo, table: tuple[str, int], sessions: Connect) -> None:
    name, oid = table
    holder_pid = hold(sessions(), f'SELECT * FROM "{name}"')  # ACCESS SHARE
    # ACCESS EXCLUSIVE waits behind the holder: a SHARE UPDATE EXCLUSIVE need conflicts with
    # the waiter (queued ahead of it), not with the holder's ACCESS SHARE.
    lock = f'BEGIN; LOCK TABLE "{name}" IN ACCESS EXCLUSIVE MODE'

    async def body() -> None:
        async with admin_for(pg) as admin, running(pg.direct_conninfo(), lock) as (pid, _):

            async def waiter() -> Blocker | None:
                return by_pid(await admin.find_blockers({oid: SUE}), pid)

            found = await eventually(waiter, "the waiting LOCK")
            assert [(lk.mode, lk.granted) for lk in found.locks] == [(AE, False)]
            assert found.waiting and found.state is BackendState.ACTIVE
            assert found.wait_event_type == "Lock"
            blockers = await admin.find_blockers({oid: SUE})
            assert by_pid(blockers, holder_pid) is None

    asyncio.run(body())


@pytest.fixture
def other_database(pg: PgInfo) -> Iterator[str]:
    name = f"guard_other_{secrets.token_hex(4)}"
    with pg.connect() as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        yield name
        conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


def test_session_of_another_database_is_not_found(
    pg: PgInfo, other_database: str, sessions: Connect
) -> None:
    elsewhere = sessions(dbname=other_database)
    elsewhere.execute("CREATE TABLE t (id int)")
    row = elsewhere.execute("SELECT 't'::regclass::oid").fetchone()
    assert row is not None
    oid = int(row[0])
    pid = hold(elsewhere, "SELECT * FROM t")

    async def body() -> None:
        async with admin_for(pg) as admin:  # connected to "postgres"
            assert by_pid(await admin.find_blockers({oid: AE}), pid) is None
            found = by_pid(await admin.find_blockers({oid: AE}, database=other_database), pid)
            assert found is not None and found.datname == other_database
            [decision] = decide(
                [found],
                BlockingAction.TERMINATE,
                Filters(),
                database="postgres",
                protected_pids={admin.pid},
                first_seen={},
                now=0.0,
                cancel_grace=0.0,
            )
            assert decision.reason is Reason.OTHER_DATABASE

    asyncio.run(body())


# --- signals -------------------------------------------------------------------------------------


def test_terminate_ends_an_idle_in_transaction_blocker(
    pg: PgInfo, table: tuple[str, int], sessions: Connect
) -> None:
    name, oid = table
    holder = sessions()
    pid = hold(holder, f'SELECT * FROM "{name}"')

    async def body() -> None:
        async with admin_for(pg) as admin:
            assert await admin.terminate(pid) is True

            async def gone() -> bool:
                return not await admin.activity([pid])

            await eventually(gone, "the terminated backend to exit")
            assert await admin.find_blockers({oid: AE}) == []
            assert await admin.terminate(0) is False
            assert await admin.terminate(-1) is False
            assert await admin.terminate(admin.pid) is False  # never itself
            assert await admin.terminate(os.getpid()) is False  # not a backend
            assert admin.connected

    asyncio.run(body())
    with pytest.raises(psycopg.OperationalError):  # 57P01 or "server closed the connection"
        holder.execute("SELECT 1")


def test_cancel_stops_a_query_but_not_an_idle_transaction(
    pg: PgInfo, table: tuple[str, int], sessions: Connect
) -> None:
    name, oid = table
    idle = sessions()
    idle_pid = hold(idle, f'SELECT * FROM "{name}"')

    async def body() -> None:
        async with (
            admin_for(pg) as admin,
            running(pg.direct_conninfo(), "SELECT pg_sleep(60)") as (pid, task),
        ):

            async def sleeping() -> bool:
                b = by_pid(await admin.activity([pid]), pid)
                return b is not None and b.state is BackendState.ACTIVE and "pg_sleep" in b.query

            await eventually(sleeping, "pg_sleep to run")
            assert await admin.cancel(pid) is True
            with pytest.raises(psycopg.errors.QueryCanceled):
                await asyncio.wait_for(task, 15)
            assert await admin.cancel(idle_pid) is True  # delivered, and ignored
            assert by_pid(await admin.find_blockers({oid: AE}), idle_pid) is not None

    asyncio.run(body())
    # Still in its transaction: the next statement runs, and COMMIT ends the transaction.
    assert idle.execute("SELECT 1").fetchone() == (1,)
    assert idle.info.transaction_status is psycopg.pq.TransactionStatus.INTRANS
    idle.execute("COMMIT")


def test_blocking_pids_of_a_waiting_alter(
    pg: PgInfo, table: tuple[str, int], sessions: Connect
) -> None:
    name, _ = table
    holder_pid = hold(sessions(), f'SELECT * FROM "{name}"')
    alter = f'ALTER TABLE "{name}" ADD COLUMN extra int'

    async def body() -> None:
        async with admin_for(pg) as admin, running(pg.direct_conninfo(), alter) as (pid, task):

            async def blocked() -> list[int]:
                return await admin.blocking_pids(pid)

            assert await eventually(blocked, "the ALTER to wait") == [holder_pid]
            assert await admin.blocking_pids(holder_pid) == []
            assert await admin.terminate(holder_pid)
            await asyncio.wait_for(task, 15)  # granted once the blocker is gone

    asyncio.run(body())


# --- prepared transactions -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def prepared_conninfo(pg: PgInfo) -> Iterator[str]:
    """A superuser conninfo to a server with max_prepared_transactions > 0: `pg` if it has it,
    else a server of our own (same binaries)."""
    with pg.connect() as conn:
        row = conn.execute("SELECT current_setting('max_prepared_transactions')::int").fetchone()
    if row is not None and row[0] > 0:
        yield pg.direct_conninfo()
        return
    server = PostgresServer(
        bin_dir=resolve_bin_dir(),
        password=secrets.token_urlsafe(16),
        settings={"max_prepared_transactions": "5"},
    )
    with server:
        yield make_conninfo(server.url())


def test_prepared_transaction_is_reported_with_pid_0(prepared_conninfo: str) -> None:
    name, gid = f"guard_{secrets.token_hex(4)}", f"guard_gid_{secrets.token_hex(4)}"
    with psycopg.connect(prepared_conninfo, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE TABLE {} (id int)").format(sql.Identifier(name)))
        row = conn.execute("SELECT %s::regclass::oid", (name,)).fetchone()
        assert row is not None
        oid = int(row[0])
        hold(conn, f'INSERT INTO "{name}" VALUES (1)')  # ROW EXCLUSIVE
        conn.execute(sql.SQL("PREPARE TRANSACTION {}").format(sql.Literal(gid)))
        try:
            asyncio.run(_check_prepared(prepared_conninfo, name, oid, gid))
        finally:
            conn.execute(sql.SQL("ROLLBACK PREPARED {}").format(sql.Literal(gid)))
            conn.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier(name)))


async def _check_prepared(conninfo: str, name: str, oid: int, gid: str) -> None:
    async with AdminConnection(conninfo) as admin:
        [found] = await admin.find_blockers({oid: AE})
        assert (found.pid, found.prepared_xact, found.backend_type) == (0, gid, None)
        assert found.datname == "postgres" and found.usename is not None
        assert found.xact_age is not None and found.xact_age >= 0
        assert [(lk.mode, lk.granted) for lk in found.locks] == [(LockMode.RowExclusiveLock, True)]
        assert await admin.find_blockers({oid: LockMode.ShareUpdateExclusiveLock}) == []
        [decision] = decide(
            [found],
            BlockingAction.TERMINATE,
            Filters(),
            database="postgres",
            protected_pids={admin.pid},
            first_seen={},
            now=0.0,
            cancel_grace=0.0,
        )
        assert (decision.verdict, decision.reason) == (Verdict.REPORT, Reason.PREPARED)
        assert await admin.terminate(0) is False
        alter = f'ALTER TABLE "{name}" ADD COLUMN extra int'
        async with running(conninfo, alter) as (pid, _):

            async def blocked() -> list[int]:
                return await admin.blocking_pids(pid)

            assert await eventually(blocked, "the ALTER to wait") == [0]
            assert await admin.activity([0]) == []
