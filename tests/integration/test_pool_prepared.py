"""Named prepared statements in transaction pooling, with real clients: more clients than
server connections, so that statements prepared on one server are bound on another; psycopg
(prepare_threshold=0, sync and async), asyncpg (its statement cache, and a pool), DEALLOCATE
ALL / DISCARD ALL, the LRU per server, and a column type changed under a prepared statement."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

import asyncpg
import psycopg
import pytest

from tests.fixtures.proxy import RunningProxy
from tests.integration.probes import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

Factory = Callable[..., RunningProxy]
USER = "u_trust"


def pooled(proxy_factory: Factory, size: int, **overrides: Any) -> RunningProxy:
    return proxy_factory(pool_mode="transaction", default_pool_size=size, **overrides)


def connect(proxy: RunningProxy, **kwargs: Any) -> psycopg.Connection[Any]:
    conn = psycopg.connect(proxy.conninfo(USER, connect_timeout="10"), autocommit=True, **kwargs)
    conn.prepare_threshold = 0  # every statement prepared (a named Parse), from the first
    return conn


def server_pids(admin: psycopg.Connection[Any]) -> set[int]:
    rows = admin.execute(
        "SELECT pid FROM pg_stat_activity WHERE usename = %s AND backend_type = 'client backend'",
        [USER],
    ).fetchall()
    return {row[0] for row in rows}


def proxy_statements(admin: psycopg.Connection[Any]) -> None:
    """(pg_prepared_statements is per backend: the tests look through the clients instead.)"""


def test_psycopg_threads_prepare_everywhere(
    proxy_factory: Factory, admin: psycopg.Connection[Any]
) -> None:
    proxy = pooled(proxy_factory, 3)
    clients = [connect(proxy) for _ in range(10)]
    wait_until(lambda: len(server_pids(admin)) <= 3, "the pool to shrink to its size")
    seen: set[int] = set()
    failures: list[BaseException] = []

    def work(n: int, conn: psycopg.Connection[Any]) -> None:
        try:
            for i in range(30):
                row = conn.execute("SELECT %s::int * 2, pg_backend_pid()", [n * 100 + i])
                found = row.fetchone()
                assert found is not None and found[0] == (n * 100 + i) * 2
                seen.add(found[1])
                with conn.transaction():
                    found = conn.execute("SELECT %s::text || 'x'", [str(i)]).fetchone()
                    assert found == (f"{i}x",)
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=work, args=(n, c)) for n, c in enumerate(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures[:3]
    # not pinned: the clients' statements ran on every server of the pool, never more than 3
    assert len(seen) == 3 and len(server_pids(admin)) <= 3
    rows = [c.execute("SELECT name FROM pg_prepared_statements").fetchall() for c in clients[:3]]
    assert all(name.startswith("PGMIGRATE_") for found in rows for (name,) in found), rows
    for conn in clients:
        conn.close()


def test_psycopg_async_prepares_everywhere(proxy_factory: Factory) -> None:
    proxy = pooled(proxy_factory, 2)
    conninfo = proxy.conninfo(USER, connect_timeout="10")

    async def one(n: int, pids: set[int]) -> None:
        async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as aconn:
            aconn.prepare_threshold = 0
            for i in range(20):
                cursor = await aconn.execute("SELECT %s::int + 1, pg_backend_pid()", [n + i])
                row = await cursor.fetchone()
                assert row is not None and row[0] == n + i + 1
                pids.add(row[1])

    async def main() -> set[int]:
        pids: set[int] = set()
        await asyncio.wait_for(asyncio.gather(*(one(n, pids) for n in range(8))), 60)
        return pids

    assert len(asyncio.run(main())) == 2
