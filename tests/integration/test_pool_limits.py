"""The pool's limits and timeouts with pgbouncer's meanings, and cancel requests under
transaction pooling (they reach the server the client holds at that moment, or nothing)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from psycopg import errors

from tests.fixtures.proxy import RunningProxy
from tests.integration.probes import active_sessions, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

Factory = Callable[..., RunningProxy]


def connect(proxy: RunningProxy, **kwargs: Any) -> psycopg.Connection[Any]:
    conn = psycopg.connect(proxy.conninfo("u_trust", connect_timeout="10"), **kwargs)
    conn.prepare_threshold = None
    return conn


def pids(admin: psycopg.Connection[Any]) -> set[int]:
    rows = admin.execute(
        "SELECT pid FROM pg_stat_activity WHERE usename = 'u_trust'"
        " AND backend_type = 'client backend'"
    ).fetchall()
    return {row[0] for row in rows}


def test_cancel_reaches_the_server_of_the_moment(proxy_factory: Factory) -> None:
    proxy = proxy_factory(pool_mode="transaction", default_pool_size=2)
    conn = connect(proxy, autocommit=True)
    other = connect(proxy, autocommit=True)
    assert other.execute("SELECT 1").fetchone() == (1,)
    timer = threading.Timer(0.3, conn.cancel_safe)
    timer.start()
    with pytest.raises(errors.QueryCanceled):
        conn.execute("SELECT pg_sleep(20)")
    timer.join()
    assert conn.execute("SELECT 2").fetchone() == (2,)
    conn.close()
    other.close()


def test_cancel_of_a_detached_client_reaches_nobody(proxy_factory: Factory) -> None:
    proxy = proxy_factory(pool_mode="transaction", default_pool_size=1)
    idle = connect(proxy, autocommit=True)
    assert idle.execute("SELECT 1").fetchone() == (1,)  # then it gives its server back
    busy = connect(proxy, autocommit=True)
    started = threading.Event()

    def cancel_later() -> None:
        started.wait(10)
        idle.cancel_safe()

    thread = threading.Thread(target=cancel_later)
    thread.start()
    started.set()
    assert busy.execute("SELECT pg_sleep(0.5), 3").fetchone() == ("", 3)  # not cancelled
    thread.join()
    idle.close()
    busy.close()


def test_idle_transaction_timeout(proxy_factory: Factory) -> None:
    proxy = proxy_factory(pool_mode="transaction", idle_transaction_timeout=0.3)
    conn = connect(proxy)
    conn.execute("SELECT 1")  # BEGIN, then nothing
    wait_until(lambda: active_sessions(proxy) == 0, "the idle transaction's client closed")
    with pytest.raises(psycopg.errors.IdleInTransactionSessionTimeout):
        conn.execute("SELECT 1")
    with connect(proxy, autocommit=True) as fine:
        assert fine.execute("SELECT 1").fetchone() == (1,)


def test_client_idle_timeout(proxy_factory: Factory) -> None:
    proxy = proxy_factory(client_idle_timeout=0.3)
    conn = connect(proxy, autocommit=True)
    assert conn.execute("SELECT 1").fetchone() == (1,)
    wait_until(lambda: active_sessions(proxy) == 0, "the idle client closed")
    with pytest.raises(psycopg.OperationalError):
        conn.execute("SELECT 1")


def test_client_idle_timeout_keeps_the_server_in_the_pool(
    proxy_factory: Factory, admin: psycopg.Connection[Any]
) -> None:
    """Transaction mode: a client closed for idling between transactions leaves its server
    (lent to the pool, still attached to it) in the pool, not closed with it."""
    proxy = proxy_factory(pool_mode="transaction", default_pool_size=1, client_idle_timeout=0.3)
    conn = connect(proxy, autocommit=True)
    row = conn.execute("SELECT pg_backend_pid()").fetchone()
    assert row is not None
    wait_until(lambda: active_sessions(proxy) == 0, "the idle client closed")
    assert row[0] in pids(admin)
    with connect(proxy, autocommit=True) as again:
        assert again.execute("SELECT pg_backend_pid()").fetchone() == row
    conn.close()


def test_server_lifetime_zero_uses_a_server_once(
    proxy_factory: Factory, admin: psycopg.Connection[Any]
) -> None:
    proxy = proxy_factory(server_lifetime=0)
    with connect(proxy, autocommit=True) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    wait_until(lambda: not pids(admin), "the server closed when its client left")


def test_server_idle_timeout_closes_idle_servers(
    proxy_factory: Factory, admin: psycopg.Connection[Any]
) -> None:
    proxy = proxy_factory(server_idle_timeout=0.2)
    with connect(proxy, autocommit=True) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    wait_until(lambda: not pids(admin), "the idle server closed")


def test_broken_idle_server_is_never_handed_out(
    proxy_factory: Factory, admin: psycopg.Connection[Any]
) -> None:
    proxy = proxy_factory(pool_mode="transaction", default_pool_size=1, server_check_delay=0)
    conn = connect(proxy, autocommit=True)
    pid = conn.execute("SELECT pg_backend_pid()").fetchone()
    assert pid is not None
    admin.execute("SELECT pg_terminate_backend(%s)", pid)
    wait_until(lambda: pid[0] not in pids(admin), "the server gone")
    # the pool can open none itself (passthrough): a new login brings it a server
    with connect(proxy, autocommit=True) as newcomer:
        assert newcomer.execute("SELECT 4").fetchone() == (4,)
    assert conn.execute("SELECT pg_backend_pid()").fetchone() != pid
    conn.close()


def test_max_db_connections(proxy_factory: Factory, admin: psycopg.Connection[Any]) -> None:
    proxy = proxy_factory(pool_mode="transaction", default_pool_size=5, max_db_connections=1)
    clients = [connect(proxy, autocommit=True) for _ in range(4)]
    for conn in clients:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    wait_until(lambda: len(pids(admin)) == 1, "one server for the database")
    for conn in clients:
        conn.close()


def test_no_server_is_handed_out_while_a_cancel_for_it_is_in_flight(
    proxy_factory: Factory,
) -> None:
    """pgbouncer's rule: a server with a cancel request in flight (counted on its lease while
    the proxy delivers it) waits in the pool; the client waiting for it gets it once the
    cancel is delivered, so a late cancel never lands on that client's query."""
    proxy = proxy_factory(pool_mode="transaction", default_pool_size=1)
    waiting = connect(proxy, autocommit=True)  # (its login server: one too many, closed)
    first = connect(proxy, autocommit=True)
    assert first.execute("SELECT 1").fetchone() == (1,)

    async def lease_in_flight() -> Any:
        pool = proxy.server.pools.pool("postgres", "u_trust")
        assert len(pool.idle) == 1
        lease = pool.idle[0]
        lease.cancels += 1  # as ProxyServer.cancel counts one it is delivering
        return lease

    lease = proxy.call(lease_in_flight())
    result: list[object] = []
    thread = threading.Thread(target=lambda: result.append(waiting.execute("SELECT 2").fetchone()))
    thread.start()

    async def waiters() -> int:
        return len(proxy.server.pools.pool("postgres", "u_trust").waiters)

    wait_until(lambda: proxy.call(waiters()) == 1, "the client waiting for the server")
    assert not result

    async def delivered() -> None:
        lease.pool.cancel_done(lease)

    proxy.call(delivered())
    thread.join(10)
    assert result == [(2,)]
    waiting.close()
    first.close()
