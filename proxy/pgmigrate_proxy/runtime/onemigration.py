"""A migration session's hold on the database's migration lock (session option
`migration_lock`): taken before its first statement on a connection of its own (the admin
connection's role, the session's database), kept until the session ends."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import psycopg

from pgmigrate_proxy import migrationlock, notices
from pgmigrate_proxy.admin import AdminConnection
from pgmigrate_proxy.protocol.sqlstate import SqlState
from pgmigrate_proxy.runtime.ports import ClientWriter

log = logging.getLogger("pgmigrate_proxy.session")


class LockFailed(Exception):
    """The lock could not be had: `code` (SQLSTATE) and `message` for the client."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class MigrationLock:
    """Taken once per session (`ensure`), released when the session ends (`release`)."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.conn: psycopg.AsyncConnection[Any] | None = None
        self._closing: set[asyncio.Task[None]] = set()

    async def ensure(
        self, admin: AdminConnection | None, database: str, client: ClientWriter
    ) -> None:
        """Hold the lock (a no-op once held); raises LockFailed."""
        if self.conn is not None:
            return
        if admin is None:
            raise LockFailed(
                SqlState.CONNECTION_FAILURE, notices.migration_lock_failed("no admin connection")
            )

        def say(holder: str) -> None:
            client.notice("NOTICE", notices.migration_lock_wait(holder))

        try:
            self.conn = await migrationlock.acquire(admin.conninfo, database, self.timeout, say)
        except migrationlock.Busy:
            raise LockFailed(
                SqlState.LOCK_NOT_AVAILABLE, notices.migration_lock_busy(self.timeout)
            ) from None
        except (psycopg.Error, OSError) as exc:
            reason = " ".join(str(exc).split()) or type(exc).__name__
            raise LockFailed(
                SqlState.CONNECTION_FAILURE, notices.migration_lock_failed(reason)
            ) from None

    def release(self) -> None:
        """Let the lock go (closing its connection ends its session)."""
        conn, self.conn = self.conn, None
        if conn is not None and not conn.closed:
            task = asyncio.get_running_loop().create_task(conn.close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
