"""Sessions that end badly leave nothing behind (sessions, backends, tasks, fds); the startup
timeout; shutdown with and without sessions."""

from __future__ import annotations

import gc
import time
import warnings
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from pgmigrate_proxy.protocol.framing import HEADER
from pgmigrate_proxy.protocol.messages import Authentication, Query
from pgmigrate_proxy.protocol.types import AuthCode, BackendType, FrontendType
from psycopg.conninfo import make_conninfo

from tests.fixtures.postgres import PgInfo
from tests.fixtures.proxy import RunningProxy
from tests.integration.probes import (
    active_sessions,
    assert_proxy_settles,
    backend_exists,
    open_fds,
    wait_until,
)
from tests.integration.wire import WireClient

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

ProxyFactory = Callable[..., RunningProxy]
STARTUP_TIMEOUT = 1.0


QUERY_BODY = b"SELECT 'the rest never comes'\0"
LARGE_RESULT = b"SELECT g, repeat('x', 2000) FROM generate_series(1, 10000000) g\0"


@pytest.mark.parametrize(
    "sent",
    [
        HEADER.pack(FrontendType.QUERY, 4 + len(QUERY_BODY)) + QUERY_BODY[:10],
        HEADER.pack(FrontendType.QUERY, 4 + len(LARGE_RESULT)) + LARGE_RESULT,
    ],
    ids=["half-a-query", "while-a-large-result-streams"],
)
def test_client_closes_mid_message(
    proxy: RunningProxy, admin: psycopg.Connection[Any], sent: bytes
) -> None:
    baseline = open_fds()
    client = WireClient(proxy.host, proxy.port)
    client.login()
    pid = client.backend_pid
    assert active_sessions(proxy) == 1
    client.send(sent)
    if sent.endswith(b"\0"):  # a whole query: wait until the rows flow, then leave mid-result
        client.read_exact(100_000)
    client.close()
    assert_proxy_settles(proxy, admin, pid, baseline)


def test_a_migration_client_gone_before_its_unit_starts(proxy: RunningProxy) -> None:
    """A Query and the client's reset in one loop iteration: the runner's task for the Query
    is created, then the session closes and cancels it before its first step. The held
    statement is dropped without a "coroutine ... was never awaited" RuntimeWarning (84 of
    them in the proxy's log after a socket fuzz run of 40,000 inputs)."""
    client = WireClient(proxy.host, proxy.port)
    client.startup("u_trust", options={"options": "-c pgmigrate.role=migrate"})
    client.read_until(BackendType.READY_FOR_QUERY)

    async def query_then_reset() -> None:
        (session,) = proxy.server._sessions  # (the test's only session)
        session.data_received(Query("SELECT 1").encode())  # as read from the client...
        session.connection_lost(ConnectionResetError())  # ...with its reset, in one callback

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        proxy.call(query_then_reset())
        client.close()  # (its transport still holds the session until then)

        def unawaited() -> list[str]:
            return [str(w.message) for w in caught if "never awaited" in str(w.message)]

        # (a warning recorded keeps the coroutine, and so the session, alive)
        wait_until(lambda: unawaited() or not proxy.call(_sessions_alive()), "the session freed")
    assert not unawaited(), unawaited()


async def _sessions_alive() -> int:
    """ClientSession objects still alive on the proxy's loop, after a garbage collection."""
    gc.collect()
    return sum(1 for o in gc.get_objects() if type(o).__name__ == "ClientSession")


def test_server_closes_mid_message(proxy: RunningProxy, admin: psycopg.Connection[Any]) -> None:
    baseline = open_fds()
    conn = psycopg.connect(proxy.conninfo("u_trust", connect_timeout="10"), autocommit=True)
    pid = conn.info.backend_pid
    rows = conn.cursor().stream(
        "SELECT g, repeat('x', 2000) FROM generate_series(1, 10000000) g"
    )  # ~20 GB if it ran to the end; the server blocks on the socket meanwhile
    seen = 0
    with pytest.raises(psycopg.OperationalError):
        for _ in rows:
            seen += 1
            if seen == 1000:
                terminated = admin.execute("SELECT pg_terminate_backend(%s)", [pid]).fetchone()
                assert terminated == (True,)
    assert seen >= 1000
    conn.close()
    assert_proxy_settles(proxy, admin, pid, baseline)


def test_startup_timeout_with_a_silent_client(proxy_factory: ProxyFactory) -> None:
    proxy = proxy_factory(startup_timeout=STARTUP_TIMEOUT)
    with WireClient(proxy.host, proxy.port) as client:
        started = time.monotonic()
        error = client.expect_error()
        elapsed = time.monotonic() - started
        client.expect_closed()
    assert (error.severity, error.code) == ("FATAL", "08006")
    assert "timeout" in error.message
    assert STARTUP_TIMEOUT * 0.9 <= elapsed < STARTUP_TIMEOUT + 3


def test_startup_timeout_during_authentication(
    proxy_factory: ProxyFactory, admin: psycopg.Connection[Any]
) -> None:
    proxy = proxy_factory(startup_timeout=STARTUP_TIMEOUT)
    with WireClient(proxy.host, proxy.port) as client:
        client.startup("u_password")
        mtype, payload = client.read_message()  # then never answer the password request
        assert mtype == BackendType.AUTHENTICATION
        assert Authentication.decode(payload).code == AuthCode.CLEARTEXT_PASSWORD
        error = client.expect_error()
        client.expect_closed()
    assert error.code == "08006"
    wait_until(lambda: active_sessions(proxy) == 0, "the session to close")
    row = admin.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE usename = 'u_password'"
    ).fetchone()
    assert row == (0,)


def test_shutdown_terminates_idle_sessions_after_the_grace(
    proxy_factory: ProxyFactory, admin: psycopg.Connection[Any]
) -> None:
    proxy = proxy_factory()
    conn = psycopg.connect(proxy.conninfo("u_trust", connect_timeout="10"), autocommit=True)
    raw = WireClient(proxy.host, proxy.port)
    raw.login()
    pids = [conn.info.backend_pid, raw.backend_pid]
    grace = 1.0
    started = time.monotonic()
    proxy.call(proxy.server.shutdown(grace), timeout=grace + 10)
    elapsed = time.monotonic() - started
    assert grace <= elapsed < grace + 3, f"shutdown took {elapsed:.2f} s"

    error = raw.expect_error()
    raw.expect_closed()
    raw.close()
    assert (error.severity, error.code) == ("FATAL", "57P01")
    assert error.message == "terminating connection due to administrator command"
    with pytest.raises(psycopg.errors.AdminShutdown) as broken:  # libpq kept the FATAL
        conn.execute("SELECT 1")
    assert broken.value.sqlstate == "57P01"
    conn.close()
    assert active_sessions(proxy) == 0
    wait_until(
        lambda: not any(backend_exists(admin, pid) for pid in pids), f"backends {pids} to exit"
    )
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(proxy.conninfo("u_trust", connect_timeout="5"))


def test_shutdown_without_sessions_returns_at_once(proxy_factory: ProxyFactory) -> None:
    proxy = proxy_factory()
    with psycopg.connect(proxy.conninfo("u_trust", connect_timeout="10")) as conn:
        conn.execute("SELECT 1")
    wait_until(lambda: active_sessions(proxy) == 0, "the session to close")
    started = time.monotonic()
    proxy.call(proxy.server.shutdown(30), timeout=10)
    assert time.monotonic() - started < 1


def test_client_gone_while_the_proxy_connects(proxy_factory: ProxyFactory, pg_tls: PgInfo) -> None:
    """Clients that leave at varied moments of the proxy's SSLRequest and TLS handshake with
    the server (the widest window of the connecting phase) leave no server connection."""
    proxy = proxy_factory(make_conninfo(pg_tls.url(), sslmode="require"), target=pg_tls)
    with pg_tls.connect() as admin:
        baseline = open_fds()
        for i in range(60):
            client = WireClient(proxy.host, proxy.port)
            client.startup("u_trust")
            leave_at = time.monotonic() + i * 0.0002  # 0 to 12 ms: the workload, not a wait
            while time.monotonic() < leave_at:
                pass
            client.close()
        assert_proxy_settles(proxy, admin, None, baseline)
        row = admin.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = 'u_trust'"
        ).fetchone()
        assert row == (0,)
