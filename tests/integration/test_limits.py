"""Limits that bound what one client can take before it has logged in: the size of
authentication messages, and how many clients may be logging in at once."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from pgmigrate_proxy.config import ConfigError, load_config
from pgmigrate_proxy.protocol.framing import HEADER
from pgmigrate_proxy.protocol.messages import Authentication
from pgmigrate_proxy.protocol.types import AuthCode, BackendType, FrontendType

from tests.fixtures.proxy import RunningProxy
from tests.integration.probes import wait_until
from tests.integration.wire import WireClient

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

ProxyFactory = Callable[..., RunningProxy]
#: Long enough never to fire while a test runs as it should; short enough that a proxy that
#: waits for the whole declared message fails the test without hanging it.
STARTUP_TIMEOUT = 8.0
DECLARED = 200 * 1024 * 1024
MB = 1024 * 1024


def rss_bytes() -> int:
    """This process's resident set (the proxy under test runs in it, on its own thread)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def _send_until_refused(client: WireClient, total: int) -> int:
    """Send up to `total` body bytes; return how many went out before the proxy hung up."""
    chunk = bytes(MB)
    sent = 0
    client.sock.settimeout(2.0)
    try:
        while sent < total:
            client.sock.sendall(chunk)
            sent += len(chunk)
    except (BrokenPipeError, ConnectionResetError, TimeoutError):
        pass
    return sent


def _password_request(client: WireClient, user: str) -> Authentication:
    client.startup(user)
    mtype, payload = client.read_message()
    assert mtype == BackendType.AUTHENTICATION
    return Authentication.decode(payload)


def test_huge_password_message_is_refused_at_once(proxy_factory: ProxyFactory) -> None:
    """Ten clients each declare a 200 MB PasswordMessage: each gets 08P01 as soon as the
    header arrives, the proxy buffers none of it, and a normal login still works."""
    proxy = proxy_factory(startup_timeout=STARTUP_TIMEOUT)
    before = rss_bytes()
    for _ in range(10):
        with WireClient(proxy.host, proxy.port) as client:
            assert _password_request(client, "u_password").code == AuthCode.CLEARTEXT_PASSWORD
            client.send(HEADER.pack(FrontendType.PASSWORD_MESSAGE, DECLARED + 4) + bytes(1000))
            error = client.expect_error()
            assert (error.severity, error.code) == ("FATAL", "08P01"), error
            sent = _send_until_refused(client, 32 * MB)
        assert sent < 32 * MB, "the proxy kept reading the declared message"
    assert rss_bytes() - before < 16 * MB
    with WireClient(proxy.host, proxy.port) as client:
        assert _password_request(client, "u_password").code == AuthCode.CLEARTEXT_PASSWORD


def test_password_message_sent_before_the_request_is_refused(
    proxy_factory: ProxyFactory,
) -> None:
    """The same header pipelined behind the StartupMessage (before PostgreSQL asks)."""
    proxy = proxy_factory(startup_timeout=STARTUP_TIMEOUT)
    with WireClient(proxy.host, proxy.port) as client:
        client.startup("u_password")
        client.send(HEADER.pack(FrontendType.PASSWORD_MESSAGE, DECLARED + 4))
        error = client.expect_error(skip=(BackendType.AUTHENTICATION,))
        assert (error.severity, error.code) == ("FATAL", "08P01"), error


def test_sasl_message_above_postgres_limit_is_refused(proxy_factory: ProxyFactory) -> None:
    """SCRAM messages: PostgreSQL takes at most 1024 bytes (PG_MAX_SASL_MESSAGE_LENGTH)."""
    proxy = proxy_factory(startup_timeout=STARTUP_TIMEOUT)
    with WireClient(proxy.host, proxy.port) as client:
        assert _password_request(client, "u_scram").code == AuthCode.SASL
        client.send(HEADER.pack(FrontendType.PASSWORD_MESSAGE, 1025) + bytes(100))
        error = client.expect_error()
        assert (error.severity, error.code) == ("FATAL", "08P01"), error
        client.expect_closed()


def test_sasl_message_at_the_limit_reaches_postgres(proxy_factory: ProxyFactory) -> None:
    """A SASLInitialResponse of exactly 1024 bytes goes through: PostgreSQL answers it."""
    proxy = proxy_factory(startup_timeout=STARTUP_TIMEOUT)
    with WireClient(proxy.host, proxy.port) as client:
        assert _password_request(client, "u_scram").code == AuthCode.SASL
        mechanism = b"SCRAM-SHA-256\0"
        data = b"n,,n=,r=" + b"x" * (1024 - 4 - len(mechanism) - 4 - 8)
        payload = mechanism + len(data).to_bytes(4, "big") + data
        assert len(payload) + 4 == 1024
        client.send(HEADER.pack(FrontendType.PASSWORD_MESSAGE, len(payload) + 4) + payload)
        mtype, answer = client.read_message()
        assert mtype == BackendType.AUTHENTICATION
        assert Authentication.decode(answer).code == AuthCode.SASL_CONTINUE


def _scram_started(client: WireClient) -> None:
    """Log in as u_scram up to the server's first SCRAM challenge, then go quiet."""
    assert _password_request(client, "u_scram").code == AuthCode.SASL
    data = b"n,,n=,r=" + b"abcdefghijklmnopqrstuvwx"
    payload = b"SCRAM-SHA-256\0" + len(data).to_bytes(4, "big") + data
    client.send(HEADER.pack(FrontendType.PASSWORD_MESSAGE, len(payload) + 4) + payload)
    mtype, answer = client.read_message()
    assert mtype == BackendType.AUTHENTICATION
    assert Authentication.decode(answer).code == AuthCode.SASL_CONTINUE


def _starting(proxy: RunningProxy) -> int:
    async def read() -> int:
        return len(proxy.server._starting)

    return proxy.call(read())


def test_max_startup_clients(proxy_factory: ProxyFactory) -> None:
    """Clients stalled mid-SCRAM fill max_startup_clients; the next one gets PostgreSQL's
    53300 and the connection closes; once one of them leaves, a login works again."""
    proxy = proxy_factory(startup_timeout=60, max_startup_clients=3)
    stalled = [WireClient(proxy.host, proxy.port) for _ in range(3)]
    try:
        for client in stalled:
            _scram_started(client)
        for user in ("u_scram", "u_trust"):
            with WireClient(proxy.host, proxy.port) as refused:
                refused.startup(user)
                error = refused.expect_error()
                refused.expect_closed()
            assert (error.severity, error.code) == ("FATAL", "53300")
            assert error.message == "sorry, too many clients already"
        stalled.pop().close()
        wait_until(lambda: _starting(proxy) < 3, "the stalled client's slot to be freed")
        with WireClient(proxy.host, proxy.port) as client:
            client.login("u_trust")
            client.query("SELECT 1")
        assert _starting(proxy) == 2  # logged in: no longer counted
    finally:
        for client in stalled:
            client.close()


def _server_ports(proxy: RunningProxy) -> list[int]:
    """The local ports of the proxy's server connections (client_port in pg_stat_activity)."""

    async def read() -> list[int]:
        ports = []
        for session in proxy.server._sessions:
            if session.server is not None and session.server.transport is not None:
                ports.append(session.server.transport.get_extra_info("sockname")[1])
        return ports

    return proxy.call(read())


def test_stalled_scram_frees_its_postgres_slot_at_the_startup_timeout(
    proxy_factory: ProxyFactory, admin: psycopg.Connection[Any]
) -> None:
    proxy = proxy_factory(startup_timeout=1.0)
    with WireClient(proxy.host, proxy.port) as client:
        _scram_started(client)
        (port,) = _server_ports(proxy)
        query = "SELECT count(*) FROM pg_stat_activity WHERE client_port = %s"
        if admin.info.server_version >= 170000:  # before 17 a backend still logging in is unseen
            assert admin.execute(query, [port]).fetchone() == (1,)
        error = client.expect_error()
        client.expect_closed()
    assert error.code == "08006"
    wait_until(lambda: admin.execute(query, [port]).fetchone() == (0,), "the backend to end")
    assert _starting(proxy) == 0


@pytest.mark.parametrize("value", ["0", "-1", "many", "1.5"])
def test_max_startup_clients_rejects_bad_values(value: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(["--max-startup-clients", value], {})
    assert str(info.value).startswith(f"invalid max_startup_clients: {value!r} (allowed: ")
    assert load_config([], {"PGMIGRATE_PROXY_MAX_STARTUP_CLIENTS": "7"}).max_startup_clients == 7
