"""A transaction-mode client that leaves right after its guarded DDL's reply, while the guard
still restores its server's lock_timeout: the server goes back to the pool once restored (a
passthrough pool never opens servers itself: closing it would shrink the pool for good)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from pgmigrate_proxy.protocol.framing import frame
from pgmigrate_proxy.protocol.types import BackendType, FrontendType

from tests.fixtures.postgres import PgInfo
from tests.fixtures.proxy import RunningProxy
from tests.fixtures.tunnel import Direction, Tunnel
from tests.integration.probes import wait_until
from tests.integration.wire import WireClient

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

Factory = Callable[..., RunningProxy]
USER = "u_trust"
RESTORE = "SELECT set_config('lock_timeout', $1, false)"
#: PostgreSQL's replies held this long on their way to the proxy, so that the client's close
#: reaches the proxy before the reply to the guard's restore does (the case this is about;
#: were the close later, the test would pass without the fix, never fail with it)
DELAY = 0.2


def _state(admin: psycopg.Connection[Any], pid: int) -> tuple[str, str] | None:
    sql = "SELECT state, query FROM pg_stat_activity WHERE pid = %s"
    row = admin.execute(sql, [pid]).fetchone()
    return None if row is None else (row[0], row[1])


def test_server_back_in_pool_after_client_leaves_during_restore(
    proxy_factory: Factory, admin: psycopg.Connection[Any], pg: PgInfo, tunnel: Tunnel
) -> None:
    admin.execute("DROP TABLE IF EXISTS leave_t")
    admin.execute("CREATE TABLE leave_t (id int)")
    admin.execute("ALTER TABLE leave_t OWNER TO u_trust")
    proxy = proxy_factory(
        tunnel.url(pg), admin_upstream=pg.url(), pool_mode="transaction", default_pool_size=1
    )
    for n in range(2):
        with WireClient(proxy.host, proxy.port) as client:
            client.login(USER)
            replies = client.query("SELECT pg_backend_pid()")
            pid = int(next(p for t, p in replies if t == BackendType.DATA_ROW)[6:])
            tunnel.delay(DELAY, Direction.TO_CLIENT)
            ddl = f"ALTER TABLE leave_t ADD COLUMN c{n} int".encode()
            client.send(frame(FrontendType.QUERY, ddl + b"\0"))
            client.read_until(BackendType.READY_FOR_QUERY)
        # (closed at once, without Terminate)
        wait_until(
            lambda pid=pid: _state(admin, pid) in (None, ("idle", RESTORE)),  # type: ignore[misc]
            "the guard's restore to end, or the server to be closed",
        )
        tunnel.delay(0, Direction.TO_CLIENT)
        assert _state(admin, pid) == ("idle", RESTORE), "the pooled server was closed"
        # the next client gets that server (its own login server: the pool is full, closed)
        with psycopg.connect(proxy.conninfo(USER, connect_timeout="10"), autocommit=True) as conn:
            row = conn.execute("SELECT pg_backend_pid(), current_setting('lock_timeout')")
            assert row.fetchone() == (pid, "0")
    admin.execute("DROP TABLE leave_t")
