"""asyncpg through the proxy: its binary extended protocol, COPY, notifications, and the
CancelRequest it sends when a query times out."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import asyncpg
import psycopg
import pytest
from pgmigrate_proxy import __version__

from tests.fixtures.proxy import RunningProxy
from tests.integration.probes import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

T = TypeVar("T")
SECONDS = 30.0


def run(proxy: RunningProxy, body: Callable[[Any], Awaitable[T]], user: str = "u_trust") -> T:
    """Connect asyncpg through the proxy, run `body(conn)` with a deadline, close."""

    async def main() -> T:
        conn = await asyncpg.connect(proxy.url(user), timeout=10)
        try:
            return await body(conn)
        finally:
            await asyncio.wait_for(conn.close(), 10)

    return asyncio.run(asyncio.wait_for(main(), SECONDS))


def test_fetch_and_server_settings(proxy: RunningProxy) -> None:
    async def body(conn: Any) -> None:
        rows = await conn.fetch("SELECT g, g::text AS t FROM generate_series(1, 1000) g")
        assert [(r["g"], r["t"]) for r in rows[:2]] == [(1, "1"), (2, "2")]
        assert len(rows) == 1000
        assert await conn.fetchval("SELECT pg_backend_pid()") == conn.get_server_pid()
        assert conn.get_settings().pgmigrate_proxy == __version__
        assert await conn.fetchval("SELECT $1::jsonb ->> 'a'", '{"a": "b"}') == "b"

    run(proxy, body)


def test_prepared_statements_and_executemany(proxy: RunningProxy) -> None:
    async def body(conn: Any) -> None:
        stmt = await conn.prepare("SELECT $1::int * $2::int")
        assert [await stmt.fetchval(i, 3) for i in range(5)] == [0, 3, 6, 9, 12]
        await conn.execute("CREATE TEMP TABLE em (id int PRIMARY KEY, v text)")
        await conn.executemany(
            "INSERT INTO em VALUES ($1, $2)", [(i, f"v{i}") for i in range(2000)]
        )
        assert await conn.fetchval("SELECT count(*) FROM em") == 2000
        with pytest.raises(asyncpg.UniqueViolationError):
            await conn.executemany("INSERT INTO em VALUES ($1, $2)", [(5000, "a"), (1, "b")])
        assert await conn.fetchval("SELECT count(*) FROM em") == 2000  # all or nothing
        async with conn.transaction():
            await conn.execute("UPDATE em SET v = 'x' WHERE id < 10")
        assert await conn.fetchval("SELECT count(*) FROM em WHERE v = 'x'") == 10

    run(proxy, body)


def test_copy_records_to_table_and_copy_from_query(proxy: RunningProxy) -> None:
    async def body(conn: Any) -> None:
        await conn.execute("CREATE TEMP TABLE cr (id int, body text)")
        records = [(i, "r" * (i % 100)) for i in range(20_000)]
        status = await conn.copy_records_to_table("cr", records=records)
        assert status == "COPY 20000"
        chunks: list[bytes] = []

        async def collect(data: bytes) -> None:
            chunks.append(data)

        status = await conn.copy_from_query(
            "SELECT id, body FROM cr ORDER BY id", output=collect, format="csv"
        )
        assert status == "COPY 20000"
        lines = b"".join(chunks).decode().splitlines()
        assert lines[:3] == ['0,""', "1,r", "2,rr"]
        assert len(lines) == 20_000

    run(proxy, body)


def test_add_listener_receives_notifications(proxy: RunningProxy) -> None:
    async def body(conn: Any) -> None:
        received: asyncio.Queue[tuple[int, str, str]] = asyncio.Queue()

        def on_note(_conn: Any, pid: int, channel: str, payload: str) -> None:
            received.put_nowait((pid, channel, payload))

        await conn.add_listener("pgm_async", on_note)
        other = await asyncpg.connect(proxy.url("u_trust"), timeout=10)
        try:
            await other.execute("NOTIFY pgm_async, 'hello'")
            note = await asyncio.wait_for(received.get(), 10)
            assert note == (other.get_server_pid(), "pgm_async", "hello")
        finally:
            await other.close()
        await conn.remove_listener("pgm_async", on_note)

    run(proxy, body)


def test_query_timeout_cancels_the_statement(
    proxy: RunningProxy, admin: psycopg.Connection[Any]
) -> None:
    def state(pid: int) -> str | None:
        row = admin.execute("SELECT state FROM pg_stat_activity WHERE pid = %s", [pid]).fetchone()
        return str(row[0]) if row else None

    async def body(conn: Any) -> float:
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(asyncio.TimeoutError):
            await conn.fetchval("SELECT pg_sleep(30)", timeout=0.5)
        # asyncpg sent a CancelRequest through the proxy and waited for the statement to end
        assert await conn.fetchval("SELECT 42", timeout=5) == 42
        elapsed = loop.time() - started
        pid = conn.get_server_pid()
        await asyncio.to_thread(wait_until, lambda: state(pid) == "idle", "the backend to idle")
        return elapsed

    elapsed = run(proxy, body)
    assert elapsed < 5, f"the cancelled statement held the connection for {elapsed:.1f} s"
