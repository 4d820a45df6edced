"""A pool with an opener (what auth types other than passthrough give it): it opens server
connections itself when a client needs one, within its size, and for min_pool_size; here a
test opener logs in as a trust user, as the proxy's own authentication will."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from pgmigrate_proxy.protocol.messages import StartupMessage
from pgmigrate_proxy.protocol.types import PROTOCOL_3_0
from pgmigrate_proxy.runtime.backend import ServerConnection
from pgmigrate_proxy.runtime.upstream import open_upstream

from tests.fixtures.proxy import RunningProxy
from tests.integration.probes import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


class _Login:
    """A listener that waits for the login's ReadyForQuery."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def server_data(self, data: bytes) -> None:
        self.data += data
        if b"Z\x00\x00\x00\x05I" in self.data and not self.ready.done():
            self.ready.set_result(None)

    def server_violation(self, exc: Exception) -> None: ...
    def server_lost(self, last_words: bytes) -> None: ...
    def pause_client_reading(self) -> None: ...
    def resume_client_reading(self) -> None: ...


def trust_opener(proxy: RunningProxy, opened: list[int]) -> Callable[[], Any]:
    async def open_server() -> ServerConnection:
        server = ServerConnection(database="postgres")
        login = _Login()
        server.attach(login)
        await open_upstream(proxy.server.settings.upstream, server)
        params = {"user": "u_trust", "database": "postgres"}
        server.write(StartupMessage(PROTOCOL_3_0, params).encode())
        await login.ready
        server.detach()
        opened.append(1)
        return server

    return open_server


def test_pool_opens_servers_itself(proxy_factory: Callable[..., RunningProxy]) -> None:
    proxy = proxy_factory(pool_mode="transaction", default_pool_size=2)
    opened: list[int] = []

    async def install() -> None:
        proxy.server.pools.set_opener("postgres", "u_trust", trust_opener(proxy, opened))

    proxy.call(install())
    conn = psycopg.connect(proxy.conninfo("u_trust"), autocommit=True)
    conn.prepare_threshold = None

    async def close_idle() -> int:
        return proxy.server.pools.close_idle()

    proxy.call(close_idle())  # its login server gone: the next query needs a new one
    assert conn.execute("SELECT current_user").fetchone() == ("u_trust",)
    assert opened == [1]
    conn.close()


def _counts(proxy: RunningProxy) -> tuple[int, int, int]:
    async def read() -> tuple[int, int, int]:
        pool = proxy.server.pools.pool("postgres", "u_trust")
        return len(pool.leases), len(pool.idle), pool.size_opening

    return proxy.call(read())


def test_min_pool_size_opens_servers_in_the_background(
    proxy_factory: Callable[..., RunningProxy],
) -> None:
    """Once a pool has an opener it keeps min_pool_size servers, with no client at all, and
    opens new ones when they are closed."""
    proxy = proxy_factory(pool_mode="transaction", default_pool_size=4, min_pool_size=2)
    opened: list[int] = []

    async def install() -> None:
        proxy.server.pools.set_opener("postgres", "u_trust", trust_opener(proxy, opened))

    proxy.call(install())
    wait_until(lambda: _counts(proxy) == (2, 2, 0), "two idle servers opened")
    assert len(opened) == 2

    async def close_idle() -> int:
        return proxy.server.pools.close_idle()

    assert proxy.call(close_idle()) == 2
    wait_until(lambda: _counts(proxy) == (2, 2, 0), "two idle servers opened again")
    assert len(opened) == 4
    with psycopg.connect(proxy.conninfo("u_trust"), autocommit=True) as conn:
        conn.prepare_threshold = None
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_min_pool_size_respects_max_db_connections(
    proxy_factory: Callable[..., RunningProxy],
) -> None:
    proxy = proxy_factory(
        pool_mode="transaction", default_pool_size=4, min_pool_size=3, max_db_connections=1
    )
    opened: list[int] = []

    async def install() -> None:
        proxy.server.pools.set_opener("postgres", "u_trust", trust_opener(proxy, opened))

    proxy.call(install())
    # (every open is started at once by set_opener: none is pending once one is in)
    wait_until(lambda: _counts(proxy) == (1, 1, 0), "one idle server opened")
    assert opened == [1]


def _connect(proxy: RunningProxy, **kwargs: Any) -> psycopg.Connection[Any]:
    conn = psycopg.connect(proxy.conninfo("u_trust", connect_timeout="10"), **kwargs)
    conn.prepare_threshold = None
    return conn


def test_reserve_pool(proxy_factory: Callable[..., RunningProxy]) -> None:
    """A client waiting reserve_pool_timeout gets a server from the reserve; once the reserve
    is used up, the next waits and gets query_wait_timeout."""
    proxy = proxy_factory(
        pool_mode="transaction", default_pool_size=1, reserve_pool_size=1,
        reserve_pool_timeout=0.2, query_wait_timeout=1.5,
    )  # fmt: skip
    opened: list[int] = []

    async def install() -> None:
        proxy.server.pools.set_opener("postgres", "u_trust", trust_opener(proxy, opened))

    proxy.call(install())
    first, second, third = (_connect(proxy) for _ in range(3))  # (each login: a server)

    async def close_idle() -> int:
        return proxy.server.pools.close_idle()

    proxy.call(close_idle())
    assert first.execute("SELECT 1").fetchone() == (1,)  # in a transaction: holds the server
    assert second.execute("SELECT 2").fetchone() == (2,)  # from the reserve, after 0.2 s
    assert _counts(proxy)[0] == 2
    with pytest.raises(psycopg.OperationalError, match="query_wait_timeout"):
        third.execute("SELECT 3")
    first.rollback()
    second.rollback()
    first.close()
    second.close()
    third.close()


def test_server_connect_timeout(proxy_factory: Callable[..., RunningProxy]) -> None:
    """An opener that does not finish within server_connect_timeout: the waiting client gets a
    connection failure naming the setting, and the pool counts nothing for it."""
    proxy = proxy_factory(pool_mode="transaction", default_pool_size=2, server_connect_timeout=0.3)

    async def never() -> ServerConnection:
        await asyncio.get_running_loop().create_future()
        raise AssertionError("unreachable")

    async def install() -> int:
        proxy.server.pools.set_opener("postgres", "u_trust", never)
        return proxy.server.pools.close_idle()

    conn = _connect(proxy, autocommit=True)
    proxy.call(install())
    with pytest.raises(psycopg.OperationalError, match="server_connect_timeout"):
        conn.execute("SELECT 1")
    conn.close()
    assert _counts(proxy) == (0, 0, 0)


def test_max_user_connections(proxy_factory: Callable[..., RunningProxy]) -> None:
    """The pool opens no server past max_user_connections: clients take turns on one."""
    proxy = proxy_factory(pool_mode="transaction", default_pool_size=4, max_user_connections=1)
    opened: list[int] = []

    async def install() -> int:
        proxy.server.pools.set_opener("postgres", "u_trust", trust_opener(proxy, opened))
        return proxy.server.pools.close_idle()

    clients = [_connect(proxy, autocommit=True) for _ in range(3)]
    proxy.call(install())
    pids = {c.execute("SELECT pg_backend_pid()").fetchone() for c in clients for _ in range(2)}
    assert len(pids) == 1
    assert opened == [1]
    for conn in clients:
        conn.close()
