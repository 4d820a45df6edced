"""Failed TLS handshakes from clients (issue 9, finding 7): each logs one line, without a
traceback, and closes; the proxy keeps serving, with no session, task or fd left behind."""

from __future__ import annotations

import logging
import secrets
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
import trustme

from tests.fixtures.proxy import RunningProxy
from tests.integration.probes import active_sessions, open_fds, proxy_tasks, wait_until
from tests.integration.wire import WireClient

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

ProxyFactory = Callable[..., RunningProxy]
BAD_HANDSHAKES = 50
FAILED_LINE = "TLS handshake failed"


@dataclass(frozen=True)
class Certs:
    ca_file: Path
    other_ca_file: Path  # signed nothing the proxy serves
    cert_file: Path
    key_file: Path


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    files = tmp_path_factory.mktemp("tls-failures")
    ca, other = trustme.CA(), trustme.CA()
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    found = Certs(files / "ca.pem", files / "other.pem", files / "proxy.crt", files / "proxy.key")
    ca.cert_pem.write_to_path(str(found.ca_file))
    other.cert_pem.write_to_path(str(found.other_ca_file))
    found.cert_file.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(found.key_file))
    return found


def garbage_after_accept(proxy: RunningProxy) -> None:
    """SSLRequest, the proxy's 'S', then bytes that are not a TLS ClientHello."""
    with WireClient(proxy.host, proxy.port) as client:
        assert client.request_tls() == b"S"
        client.send(b"GET / HTTP/1.1\r\n\r\n" + secrets.token_bytes(64))
        drain(client.sock)


def rejecting_client(proxy: RunningProxy, certs: Certs) -> None:
    """A client that trusts another CA: it aborts the handshake on the proxy's certificate."""
    context = ssl.create_default_context(cafile=str(certs.other_ca_file))
    with WireClient(proxy.host, proxy.port) as client, pytest.raises(ssl.SSLCertVerificationError):
        client.start_tls(context, "127.0.0.1")


def drain(sock: socket.socket) -> None:
    """Read until the proxy closes the connection (bounded by the socket's timeout)."""
    try:
        while sock.recv(65536):
            pass
    except (ConnectionResetError, BrokenPipeError):
        pass


def test_bad_handshakes_log_one_line_each(
    proxy_factory: ProxyFactory,
    certs: Certs,
    proxy_log: list[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    proxy = proxy_factory(
        client_tls_cert_file=str(certs.cert_file), client_tls_key_file=str(certs.key_file)
    )
    caplog.set_level(logging.DEBUG)
    baseline = open_fds()
    for index in range(BAD_HANDSHAKES):
        if index % 2:
            rejecting_client(proxy, certs)
        else:
            garbage_after_accept(proxy)
    wait_until(lambda: active_sessions(proxy) == 0, "the sessions to close")
    wait_until(lambda: not proxy_tasks(proxy), "the proxy's tasks to finish")
    wait_until(lambda: open_fds() <= baseline, f"open fds to return to {baseline}")
    # one line per failed handshake, and no traceback anywhere (the proxy's log, asyncio's)
    failed = [line for line in proxy_log if FAILED_LINE in line]
    assert len(failed) == BAD_HANDSHAKES, failed[:3]
    tracebacks = [line for line in proxy_log if "Traceback" in line]
    assert not tracebacks, tracebacks[:1]
    with_traces = [r.getMessage() for r in caplog.records if r.exc_info or r.exc_text]
    assert not with_traces, with_traces[:3]
    # the proxy goes on serving TLS clients
    conninfo = proxy.conninfo(
        "u_trust", connect_timeout="10", sslmode="verify-full", sslrootcert=str(certs.ca_file)
    )
    with psycopg.connect(conninfo, autocommit=True) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
