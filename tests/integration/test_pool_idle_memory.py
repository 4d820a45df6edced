"""What an idle client costs in transaction mode: it keeps no server connection object alive
(the one it gave back, e.g. its closed login server), so idle clients cost their own session
only (bench/pooler.py --idle-only measures the bytes: 4.9 kB a client with the closed login
servers kept, 3.3 kB without)."""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from pgmigrate_proxy.runtime.backend import ServerConnection

from tests.fixtures.proxy import RunningProxy
from tests.integration.probes import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

#: bytes the proxy's own code may allocate for one idle client (measured: 2.1 kB; 2.9 kB
#: when the holder kept a deque for its backlog, 4.2 kB when it also kept its closed login server)
BUDGET = 2_400


def server_count(admin: psycopg.Connection[Any]) -> int:
    row = admin.execute(
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE usename = 'u_trust' AND backend_type = 'client backend'"
    ).fetchone()
    assert row is not None
    return int(row[0])


async def dead_servers_kept(proxy: RunningProxy) -> list[ServerConnection]:
    """Servers that logged in, are no longer pooled, and are still referenced by a session."""
    pooled = {server for pool in proxy.server.pools.pools.values() for server in pool.leases}
    kept = []
    for session in proxy.server._sessions:
        for server in (session.server, session.holder.server if session.holder else None):
            if server is not None and server.key is not None and server not in pooled:
                kept.append(server)
    return kept


def test_idle_clients_keep_no_server_they_gave_back(
    proxy_factory: Callable[..., RunningProxy], admin: psycopg.Connection[Any]
) -> None:
    proxy = proxy_factory(pool_mode="transaction", default_pool_size=1)
    # logged in, idle, never a query: the first login's server stays pooled; the other
    # logins' servers are closed (the pool is full)
    clients = [psycopg.connect(proxy.conninfo("u_trust"), autocommit=True) for _ in range(4)]
    wait_until(lambda: server_count(admin) <= 1, "the pool to shrink to its size")
    assert proxy.call(dead_servers_kept(proxy)) == []
    for conn in clients:
        conn.execute("SELECT 1")  # they still get the pooled server
        conn.close()


def test_idle_clients_memory_budget(
    proxy_factory: Callable[..., RunningProxy], admin: psycopg.Connection[Any]
) -> None:
    """What the proxy's own code allocates for an idle, logged-in client in transaction mode
    (tracemalloc, filtered to pgmigrate_proxy; the event loop's transports come on top)."""
    proxy = proxy_factory(pool_mode="transaction", default_pool_size=1, max_client_conn=400)
    psycopg.connect(proxy.conninfo("u_trust")).close()  # the pool and the caches exist
    wait_until(lambda: server_count(admin) <= 1, "the pool to shrink to its size")
    count = 300  # (enough that the few shared structures that grow by steps weigh little)
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        clients = [psycopg.connect(proxy.conninfo("u_trust")) for _ in range(count)]
        wait_until(lambda: server_count(admin) <= 1, "the pool to shrink to its size")
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    ours = [tracemalloc.Filter(True, "*/pgmigrate_proxy/*")]
    stats = after.filter_traces(ours).compare_to(before.filter_traces(ours), "lineno")
    per_client = sum(stat.size_diff for stat in stats) / count
    top = "\n".join(str(stat) for stat in stats[:8])
    for conn in clients:
        conn.close()
    assert per_client <= BUDGET, f"{per_client:.0f} bytes a client:\n{top}"
