"""Session pooling (the default pool_mode): a server connection whose client left goes back to
its (database, user) pool after ROLLBACK and server_reset_query, and the next client of that
pool is given it; a broken or busy one is closed instead."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
from psycopg import pq

from tests.fixtures.proxy import RunningProxy
from tests.integration.probes import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


def connect(proxy: RunningProxy, user: str = "u_trust", **kwargs: Any) -> psycopg.Connection[Any]:
    return psycopg.connect(proxy.conninfo(user, connect_timeout="10"), **kwargs)


def pooled(proxy: RunningProxy) -> int:
    """How many servers sit idle in the proxy's pools."""

    async def count() -> int:
        return sum(len(pool.idle) for pool in proxy.server.pools.pools.values())

    return proxy.call(count())


def idle_pids(admin: psycopg.Connection[Any], user: str = "u_trust") -> set[int]:
    rows = admin.execute(
        "SELECT pid FROM pg_stat_activity WHERE usename = %s AND state = 'idle'", [user]
    ).fetchall()
    return {row[0] for row in rows}


def test_next_client_gets_the_server_reset(
    proxy: RunningProxy, admin: psycopg.Connection[Any]
) -> None:
    with connect(proxy, autocommit=True) as first:
        pid = first.execute("SELECT pg_backend_pid()").fetchone()
        first.execute("CREATE TEMP TABLE scratch (x int)")
        first.execute("SET work_mem = '7MB'")
    assert pid is not None
    wait_until(lambda: pooled(proxy) == 1, "the server back in the pool")
    with connect(proxy, autocommit=True) as second:
        assert second.execute("SELECT pg_backend_pid()").fetchone() == pid
        # the process id the client was told at login is that of the server it got
        assert (second.info.backend_pid,) == pid
        assert second.execute("SHOW work_mem").fetchone() != ("7MB",)  # DISCARD ALL ran
        assert second.execute("SELECT to_regclass('pg_temp.scratch')").fetchone() == (None,)


def test_client_gone_mid_transaction_is_rolled_back(
    proxy: RunningProxy, admin: psycopg.Connection[Any]
) -> None:
    admin.execute("DROP TABLE IF EXISTS pool_rollback")
    admin.execute("CREATE TABLE pool_rollback (x int)")
    admin.execute("GRANT ALL ON pool_rollback TO PUBLIC")
    first = connect(proxy)
    first.execute("INSERT INTO pool_rollback VALUES (1)")
    assert first.info.transaction_status is pq.TransactionStatus.INTRANS
    first.pgconn.finish()  # gone without COMMIT or ROLLBACK
    wait_until(lambda: any(p for p in idle_pids(admin)), "the server back in the pool")
    with connect(proxy, autocommit=True) as second:
        row = second.execute("SELECT pg_backend_pid(), count(*) FROM pool_rollback").fetchone()
        assert row is not None and row[1] == 0
    assert admin.execute("SELECT count(*) FROM pool_rollback").fetchone() == (0,)


def test_pools_are_per_user(proxy: RunningProxy, admin: psycopg.Connection[Any]) -> None:
    with connect(proxy, autocommit=True) as first:
        pid = first.execute("SELECT pg_backend_pid()").fetchone()
    assert pid is not None
    wait_until(lambda: pooled(proxy) == 1, "the server back in the pool")
    with connect(proxy, "u_scram", autocommit=True) as other:
        row = other.execute("SELECT pg_backend_pid(), current_user").fetchone()
        assert row is not None and row[0] != pid[0] and row[1] == "u_scram"


def test_server_reset_query_can_be_turned_off(
    proxy_factory: Any, admin: psycopg.Connection[Any]
) -> None:
    proxy = proxy_factory(server_reset_query="")
    with connect(proxy, autocommit=True) as first:
        pid = first.execute("SELECT pg_backend_pid()").fetchone()
        first.execute("SET work_mem = '7MB'")
    assert pid is not None
    wait_until(lambda: pooled(proxy) == 1, "the server back in the pool")
    with connect(proxy, autocommit=True) as second:
        assert second.execute("SELECT pg_backend_pid()").fetchone() == pid
        assert second.execute("SHOW work_mem").fetchone() == ("7MB",)


def test_reuse_with_the_guard_off(proxy_factory: Any) -> None:
    proxy = proxy_factory(guard=False)
    with connect(proxy, autocommit=True) as first:
        pid = first.execute("SELECT pg_backend_pid()").fetchone()
        first.execute("SET work_mem = '7MB'")
    wait_until(lambda: pooled(proxy) == 1, "the server back in the pool")
    with connect(proxy, autocommit=True) as second:
        assert second.execute("SELECT pg_backend_pid()").fetchone() == pid
        assert second.execute("SHOW work_mem").fetchone() != ("7MB",)


def test_client_gone_mid_query_closes_its_server(
    proxy: RunningProxy, admin: psycopg.Connection[Any]
) -> None:
    conn = connect(proxy, autocommit=True, application_name="pool-mid-query")
    conn.pgconn.send_query(b"SELECT pg_sleep(0.3)")
    conn.pgconn.finish()  # gone while its statement runs: replies are owed
    wait_until(
        lambda: not admin.execute(
            "SELECT 1 FROM pg_stat_activity WHERE application_name = 'pool-mid-query'"
        ).fetchone(),
        "its server closed",
    )
    assert pooled(proxy) == 0


def test_no_swap_onto_another_clients_startup_values(
    proxy: RunningProxy, admin: psycopg.Connection[Any]
) -> None:
    """DISCARD ALL returns a server to its login client's startup values: a client that did
    not set them (or set other options) keeps its own login server."""
    first = psycopg.connect(
        proxy.conninfo("u_trust", options="-c work_mem=7MB", application_name="first"),
        autocommit=True,
    )
    pid = first.execute("SELECT pg_backend_pid()").fetchone()
    first.close()
    wait_until(lambda: pooled(proxy) == 1, "the server back in the pool")
    with connect(proxy, autocommit=True) as second:
        assert second.execute("SELECT pg_backend_pid()").fetchone() != pid
        assert second.execute("SHOW work_mem").fetchone() != ("7MB",)
        assert second.execute("SHOW application_name").fetchone() != ("first",)
