"""Helpers of the integration tests of the guard: sessions that hold or wait for locks, polling."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import psycopg
from pgmigrate_proxy.admin import AdminConnection
from pgmigrate_proxy.guard.blockers import Blocker
from pgmigrate_proxy.sql.locks import LockMode

from tests.fixtures.postgres import PgInfo

T = TypeVar("T")
AE, SUE = LockMode.AccessExclusiveLock, LockMode.ShareUpdateExclusiveLock
Connect = Callable[..., psycopg.Connection[Any]]


async def eventually(
    probe: Callable[[], Awaitable[T | None]], what: str, timeout: float = 15.0
) -> T:
    """Poll `probe` until it returns something truthy."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = await probe()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def hold(conn: psycopg.Connection[Any], statement: str) -> int:
    """Open a transaction on `conn`, run `statement` in it, leave it idle; the backend pid."""
    conn.execute("BEGIN")
    conn.execute(statement)
    return conn.info.backend_pid


@contextlib.asynccontextmanager
async def running(conninfo: str, statement: str) -> AsyncIterator[tuple[int, asyncio.Task[Any]]]:
    """`statement` in flight on a new session: (its pid, the task); terminated if still running."""
    conn = await psycopg.AsyncConnection.connect(conninfo, autocommit=True)
    task = asyncio.create_task(conn.execute(statement))
    try:
        yield conn.info.backend_pid, task
    finally:
        if not task.done():
            with psycopg.connect(conninfo, autocommit=True) as killer:
                killer.execute("SELECT pg_terminate_backend(%s)", (conn.info.backend_pid,))
        await asyncio.wait([task], timeout=15)
        if task.done() and not task.cancelled():
            task.exception()  # retrieved: the failure is expected
        await conn.close()


def by_pid(blockers: list[Blocker], pid: int) -> Blocker | None:
    return next((b for b in blockers if b.pid == pid), None)


def admin_for(pg: PgInfo, **options: Any) -> AdminConnection:
    return AdminConnection(pg.direct_conninfo(), **options)
