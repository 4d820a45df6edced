"""Malformed input on raw sockets: each gets a FATAL 08P01 and a closed connection, while an
established session carries on; an unknown CancelRequest is dropped without a word."""

from __future__ import annotations

import random
import secrets
import threading
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from pgmigrate_proxy.protocol.framing import HEADER, INT32, frame
from pgmigrate_proxy.protocol.messages import (
    CancelRequest,
    GSSENCRequest,
    Query,
    SSLRequest,
    StartupMessage,
)
from pgmigrate_proxy.protocol.types import PROTOCOL_3_0, BackendType, FrontendType, RequestCode

from tests.fixtures.proxy import RunningProxy
from tests.integration.probes import backend_exists, wait_until
from tests.integration.wire import WireClient

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

MAX_MESSAGE = 65536
QUERY_ANSWER = (
    BackendType.ROW_DESCRIPTION,
    BackendType.DATA_ROW,
    BackendType.COMMAND_COMPLETE,
    BackendType.READY_FOR_QUERY,
)
ProxyFactory = Callable[..., RunningProxy]


@pytest.fixture
def proxy(proxy_factory: ProxyFactory) -> RunningProxy:
    """This module's proxy (and the bystander's): a small max_message_size."""
    return proxy_factory(max_message_size=MAX_MESSAGE)


def _random_bytes() -> bytes:
    data = bytearray(random.Random(20240601).randbytes(200))
    data[0] = 0xFF  # a declared length far above the startup packet limit
    return bytes(data)


BEFORE_LOGIN: dict[str, bytes] = {
    "random-bytes": _random_bytes(),
    "http-request": b"GET / HTTP/1.1\r\nHost: proxy\r\n\r\n",
    "tls-client-hello": bytes.fromhex("160301020001000000fc0303") + bytes(32),
    "startup-length-4": INT32.pack(4),
    "startup-length-7": INT32.pack(7) + b"abc",
    "startup-length-10001": INT32.pack(10001) + bytes(64),
    "typed-message-first": Query("SELECT 1").encode(),
    "protocol-2.0": StartupMessage(2 << 16, {"user": "u_trust"}).encode(),
    "unterminated-startup": (lambda body: INT32.pack(len(body) + 4) + body)(
        INT32.pack(PROTOCOL_3_0) + b"user\0u_trust\0database"
    ),
    "bytes-after-ssl-request": SSLRequest().encode()
    + StartupMessage(PROTOCOL_3_0, {"user": "u_trust"}).encode(),
    "bytes-after-gssenc-request": GSSENCRequest().encode() + b"\x16\x03\x01",
    # (built by hand: the codec refuses to build a CancelRequest without its key)
    "cancel-request-without-key": INT32.pack(12)
    + INT32.pack(RequestCode.CANCEL_REQUEST)
    + INT32.pack(1234),
}

AFTER_LOGIN: dict[str, bytes] = {
    "invalid-type": frame(ord("z"), b"hello"),
    "nul-type": bytes(8),
    "backend-only-type": frame(BackendType.ROW_DESCRIPTION, b"\0\0"),
    "length-3": HEADER.pack(FrontendType.QUERY, 3),
    "length-0": HEADER.pack(FrontendType.SYNC, 0),
    "oversize": HEADER.pack(FrontendType.QUERY, MAX_MESSAGE + 1) + b"SELECT " + bytes(1000),
    "oversize-copy-data": HEADER.pack(FrontendType.COPY_DATA, 10 * MAX_MESSAGE),
    "valid-then-invalid": Query("SELECT 1").encode() + frame(ord("z")),
}


def assert_protocol_violation(client: WireClient, skip_answers: bool = False) -> None:
    error = client.expect_error(skip=QUERY_ANSWER if skip_answers else ())
    assert (error.severity, error.code) == ("FATAL", "08P01"), error
    client.expect_closed()


@pytest.mark.parametrize("data", list(BEFORE_LOGIN.values()), ids=list(BEFORE_LOGIN))
def test_malformed_startup(
    proxy: RunningProxy, bystander: psycopg.Connection[Any], data: bytes
) -> None:
    with WireClient(proxy.host, proxy.port) as client:
        client.send(data)
        assert_protocol_violation(client)
    assert bystander.execute("SELECT 1").fetchone() == (1,)


@pytest.mark.parametrize("case", list(AFTER_LOGIN))
def test_malformed_message_after_login(
    proxy: RunningProxy,
    bystander: psycopg.Connection[Any],
    admin: psycopg.Connection[Any],
    case: str,
) -> None:
    with WireClient(proxy.host, proxy.port) as client:
        client.login()
        pid = client.backend_pid
        client.send(AFTER_LOGIN[case])
        # (after a valid query, whether its answer precedes the error is up to timing)
        assert_protocol_violation(client, skip_answers=case == "valid-then-invalid")
    wait_until(lambda: not backend_exists(admin, pid), f"backend {pid} to exit")
    assert bystander.execute("SELECT 1").fetchone() == (1,)


def test_unknown_cancel_key_is_dropped(
    proxy: RunningProxy, bystander: psycopg.Connection[Any], admin: psycopg.Connection[Any]
) -> None:
    pid = bystander.info.backend_pid
    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(bystander.execute("SELECT pg_sleep(2), 'finished'").fetchone())
        except BaseException as exc:
            outcome.append(exc)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()

    def running() -> bool:
        row = admin.execute("SELECT state FROM pg_stat_activity WHERE pid = %s", [pid]).fetchone()
        return row is not None and row[0] == "active"

    wait_until(running, "pg_sleep to run")
    for key in (secrets.token_bytes(4), secrets.token_bytes(32)):
        with WireClient(proxy.host, proxy.port) as canceller:
            canceller.send(CancelRequest(pid, key).encode())
            canceller.expect_closed()  # no reply: the proxy has dealt with the request
    still_running = running()
    worker.join(10)
    assert not worker.is_alive()
    assert outcome == [("", "finished")], outcome  # the sleep ran to its end
    assert still_running, "the statement ended before the cancel requests were dealt with"
