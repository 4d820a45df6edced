"""Protocol versions, encryption requests and FunctionCall: 3.2 clients negotiated down to
3.0, `_pq_.` options reported back, GSSENCRequest and SSLRequest refused with 'N'."""

from __future__ import annotations

import struct
from typing import Any

import psycopg
import pytest
from pgmigrate_proxy.protocol.framing import frame
from pgmigrate_proxy.protocol.messages import GSSENCRequest, ParameterStatus
from pgmigrate_proxy.protocol.types import PROTOCOL_3_0, PROTOCOL_3_2, BackendType, FrontendType
from psycopg import pq

from tests.fixtures.postgres import PgInfo
from tests.fixtures.proxy import RunningProxy
from tests.integration.wire import WireClient, negotiate_protocol_version

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

needs_libpq_18 = pytest.mark.skipif(
    pq.version() < 180000, reason=f"libpq {pq.version()} has no max_protocol_version (needs 18)"
)


def connect(proxy: RunningProxy, **params: str) -> psycopg.Connection[Any]:
    return psycopg.connect(proxy.conninfo("u_trust", connect_timeout="10", **params))


@needs_libpq_18
def test_libpq_asking_for_3_2_gets_3_0(proxy: RunningProxy, pg: PgInfo) -> None:
    with connect(proxy, max_protocol_version="3.2") as conn:
        assert conn.info.full_protocol_version == 30000
        assert conn.execute("SELECT 40 + %s", [2]).fetchone() == (42,)
        assert conn.execute("SELECT pg_backend_pid()").fetchone() == (conn.info.backend_pid,)
    if pg.server.major_version >= 18:  # the server itself would have spoken 3.2
        with pg.connect(max_protocol_version="3.2") as direct:
            assert direct.info.full_protocol_version == 30002


@pytest.mark.parametrize(
    ("protocol", "options", "expected"),
    [
        (PROTOCOL_3_2, {"_pq_.foo": "1"}, ("_pq_.foo",)),
        (PROTOCOL_3_2, {}, ()),
        (PROTOCOL_3_0, {"_pq_.foo": "1", "_pq_.bar": "x"}, ("_pq_.foo", "_pq_.bar")),
    ],
    ids=["3.2-with-option", "3.2", "3.0-with-options"],
)
def test_negotiate_protocol_version_comes_first(
    proxy: RunningProxy, protocol: int, options: dict[str, str], expected: tuple[str, ...]
) -> None:
    with WireClient(proxy.host, proxy.port) as client:
        client.startup("u_trust", protocol, options)
        negotiated = negotiate_protocol_version(client.read_message())
        # the Int32 is a whole version, as PostgreSQL sends it: 3.0 = 0x00030000 (minor 0)
        version = negotiated.newest_minor
        assert (version >> 16, version & 0xFFFF, negotiated.unrecognized) == (3, 0, expected)
        rest = client.read_until(BackendType.READY_FOR_QUERY)
        assert BackendType.NEGOTIATE_PROTOCOL_VERSION not in [m for m, _ in rest]
        statuses = [ParameterStatus.decode(p) for m, p in rest if m == BackendType.PARAMETER_STATUS]
        assert "pgmigrate_proxy" in {s.name for s in statuses}
        kinds = [m for m, _ in client.query("SELECT 1")]
        assert kinds == [
            BackendType.ROW_DESCRIPTION,
            BackendType.DATA_ROW,
            BackendType.COMMAND_COMPLETE,
            BackendType.READY_FOR_QUERY,
        ]


def test_plain_3_0_startup_gets_no_negotiation(proxy: RunningProxy) -> None:
    with WireClient(proxy.host, proxy.port) as client:
        messages = client.login()
    assert messages[0][0] == BackendType.AUTHENTICATION
    assert BackendType.NEGOTIATE_PROTOCOL_VERSION not in [m for m, _ in messages]


def test_gssenc_request_is_answered_n(proxy: RunningProxy) -> None:
    with WireClient(proxy.host, proxy.port) as client:
        client.send(GSSENCRequest().encode())
        assert client.read_exact(1) == b"N"
        client.login()  # the same connection goes on to a normal startup
        assert [m for m, _ in client.query("SELECT 1")][-1] == BackendType.READY_FOR_QUERY
    with connect(proxy, gssencmode="prefer") as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_ssl_request_answered_n_without_a_certificate(proxy: RunningProxy) -> None:
    with WireClient(proxy.host, proxy.port) as client:
        assert client.request_tls() == b"N"
        client.login()
    with connect(proxy, sslmode="prefer") as conn:
        assert not conn.pgconn.ssl_in_use
    with pytest.raises(psycopg.OperationalError, match="server does not support SSL"):
        connect(proxy, sslmode="require")


def _function_call(oid: int, *args: bytes) -> bytes:
    """FunctionCall: the function's OID, text format for every argument and the result."""
    body = struct.pack("!IHHH", oid, 1, 0, len(args))
    body += b"".join(struct.pack("!i", len(a)) + a for a in args)
    return frame(FrontendType.FUNCTION_CALL, body + struct.pack("!H", 0))


def test_function_call_goes_through(proxy: RunningProxy, pg: PgInfo) -> None:
    with psycopg.connect(pg.url()) as direct:
        row = direct.execute("SELECT 'int4pl'::regproc::oid").fetchone()
    assert row is not None
    with WireClient(proxy.host, proxy.port) as wire:
        wire.login()
        wire.send(_function_call(int(row[0]), b"40", b"2"))
        (mtype, payload), *rest = wire.read_until(BackendType.READY_FOR_QUERY)
        assert mtype == BackendType.FUNCTION_CALL_RESPONSE
        (length,) = struct.unpack_from("!i", payload)
        assert payload[4 : 4 + length] == b"42"
        assert rest[-1] == (BackendType.READY_FOR_QUERY, b"I")
        # the session goes on normally afterwards
        assert wire.query("SELECT 1")[-1] == (BackendType.READY_FOR_QUERY, b"I")
