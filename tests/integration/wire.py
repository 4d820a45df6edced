"""A raw-socket PostgreSQL frontend for the tests that must send what no real client sends."""

from __future__ import annotations

import socket
import ssl
from collections.abc import Mapping

from pgmigrate_proxy.protocol.framing import HEADER, HEADER_SIZE, frame
from pgmigrate_proxy.protocol.messages import (
    BackendKeyData,
    ErrorResponse,
    NegotiateProtocolVersion,
    SSLRequest,
    StartupMessage,
)
from pgmigrate_proxy.protocol.types import PROTOCOL_3_0, BackendType, FrontendType

#: How long any single read waits before the test fails (every wait is bounded).
READ_SECONDS = 10.0

Message = tuple[int, bytes]  # (type byte, payload)


class WireClosed(Exception):
    """The peer closed the connection while a message was expected."""


class WireClient:
    """One TCP connection speaking the frontend side by hand: send bytes, read whole messages."""

    def __init__(self, host: str, port: int, timeout: float = READ_SECONDS) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._buf = bytearray()
        self.key: BackendKeyData | None = None

    def __enter__(self) -> WireClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self, need: int) -> None:
        while len(self._buf) < need:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise WireClosed(f"connection closed with {len(self._buf)} byte(s) pending")
            self._buf += chunk

    def read_exact(self, n: int) -> bytes:
        self._fill(n)
        data = bytes(self._buf[:n])
        del self._buf[:n]
        return data

    def read_message(self) -> Message:
        """The next complete backend message."""
        self._fill(HEADER_SIZE)
        mtype, length = HEADER.unpack_from(self._buf)
        self._fill(1 + length)
        payload = bytes(self._buf[HEADER_SIZE : 1 + length])
        del self._buf[: 1 + length]
        return mtype, payload

    def read_until(self, mtype: int) -> list[Message]:
        """Messages up to and including the first of type `mtype`; an error fails the test."""
        seen: list[Message] = []
        while True:
            message = self.read_message()
            seen.append(message)
            if message[0] == mtype:
                return seen
            if message[0] == BackendType.ERROR_RESPONSE:
                raise AssertionError(f"unexpected error: {ErrorResponse.decode(message[1])}")

    def expect_error(self, skip: tuple[int, ...] = ()) -> ErrorResponse:
        """Read until an ErrorResponse and decode it; only notices, parameter statuses and
        the types in `skip` may come first."""
        allowed = (BackendType.NOTICE_RESPONSE, BackendType.PARAMETER_STATUS, *skip)
        while True:
            mtype, payload = self.read_message()
            if mtype == BackendType.ERROR_RESPONSE:
                return ErrorResponse.decode(payload)
            assert mtype in allowed, f"expected an error, got {chr(mtype)!r} {payload[:80]!r}"

    def expect_closed(self, timeout: float = READ_SECONDS) -> None:
        """The peer closes the connection without sending anything more."""
        assert not self._buf, f"unread bytes before the close: {bytes(self._buf[:80])!r}"
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(65536)
        except ConnectionResetError:
            data = b""
        assert data == b"", f"expected the connection to close, got {data[:80]!r}"

    def request_tls(self) -> bytes:
        """Send an SSLRequest; return the one-byte answer (S or N)."""
        self.send(SSLRequest().encode())
        return self.read_exact(1)

    def start_tls(self, context: ssl.SSLContext, server_hostname: str) -> None:
        """SSLRequest, then the TLS handshake on this socket."""
        assert self.request_tls() == b"S", "the proxy refused TLS"
        assert not self._buf, "bytes received before the TLS handshake"
        self.sock = context.wrap_socket(self.sock, server_hostname=server_hostname)

    def startup(
        self, user: str, protocol: int = PROTOCOL_3_0, options: Mapping[str, str] | None = None
    ) -> None:
        """Send a StartupMessage for `user` in database postgres, with extra `options`."""
        params = {"user": user, "database": "postgres", **(options or {})}
        self.send(StartupMessage(protocol, params).encode())

    def login(self, user: str = "u_trust") -> list[Message]:
        """Start up as a trust user and read up to the first ReadyForQuery."""
        self.startup(user)
        messages = self.read_until(BackendType.READY_FOR_QUERY)
        for mtype, payload in messages:
            if mtype == BackendType.BACKEND_KEY_DATA:
                self.key = BackendKeyData.decode(payload)
        return messages

    @property
    def backend_pid(self) -> int:
        assert self.key is not None, "not logged in"
        return self.key.process_id

    def query(self, sql: str) -> list[Message]:
        """Send a simple Query and read up to its ReadyForQuery."""
        self.send(frame(FrontendType.QUERY, sql.encode() + b"\0"))
        return self.read_until(BackendType.READY_FOR_QUERY)


def negotiate_protocol_version(message: Message) -> NegotiateProtocolVersion:
    assert message[0] == BackendType.NEGOTIATE_PROTOCOL_VERSION, f"got {chr(message[0])!r}"
    return NegotiateProtocolVersion.decode(message[1])
