"""Connections to PostgreSQL: where the upstream is, TCP or Unix socket, TLS negotiation, cancel."""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass
from typing import Final, cast

from pgmigrate_proxy.errors import ConnectionFailure
from pgmigrate_proxy.protocol.messages import CancelRequest, SSLRequest
from pgmigrate_proxy.protocol.types import SSL_ACCEPT, SSL_REJECT
from pgmigrate_proxy.runtime.tls import UpstreamTLS

#: Unsent bytes a relay socket queues in the kernel beyond those in flight (TCP_NOTSENT_LOWAT):
#: past that, writes stay in the transport, which pauses reading the other side at its
#: high-water mark. Without it the kernel takes up to tcp_wmem's maximum (4 MB) whatever the
#: peer reads, and a stalled client or server lets that much more pile up in the proxy.
RELAY_NOTSENT_LOWAT: Final = 16 * 1024
#: SO_RCVBUF of a TCP server connection (the kernel doubles it): a paused relay holds at most
#: this much of the server's output, where autotuning grows it to tcp_rmem's maximum. Enough
#: for full speed on loopback and a LAN (window / round trip); the proxy sits next to PostgreSQL.
SERVER_RCVBUF: Final = 64 * 1024
#: The same for a client connection, larger: clients may be farther away.
CLIENT_RCVBUF: Final = 128 * 1024
#: (not Final: mypyc miscompiles the test of a Final `int | None` for None)
_TCP_NOTSENT_LOWAT: int | None = getattr(socket, "TCP_NOTSENT_LOWAT", None)
_INET: Final = (socket.AF_INET, socket.AF_INET6)


class UpstreamError(ConnectionFailure):
    """The proxy could not open a usable connection to PostgreSQL; the text is safe to show."""


@dataclass(frozen=True)
class UpstreamTarget:
    """Where the proxy's server connections go: from the upstream's libpq parameters."""

    host: str
    port: int
    tls: UpstreamTLS
    connect_timeout: float = 10.0

    @classmethod
    def from_params(cls, params: dict[str, str]) -> UpstreamTarget:
        host = params.get("host") or params.get("hostaddr") or "localhost"
        host = host.split(",")[0]
        port = int((params.get("port") or "5432").split(",")[0])
        timeout = float(params.get("connect_timeout") or 10) or 10.0
        return cls(host, port, UpstreamTLS.from_params(params), timeout)

    @property
    def unix_socket(self) -> str | None:
        """The socket path when host is a directory, as libpq reads it."""
        return f"{self.host}/.s.PGSQL.{self.port}" if self.host.startswith("/") else None

    def describe(self) -> str:
        return self.unix_socket or f"{self.host}:{self.port}"


class UpstreamProtocol(asyncio.Protocol):
    """Base protocol for a server connection: answers the one-byte SSLRequest reply."""

    __slots__ = ("_byte_waiter", "_lost", "transport")

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._byte_waiter: asyncio.Future[bytes] | None = None
        self._lost: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        waiter = self._byte_waiter
        if waiter is not None and not waiter.done():
            self._byte_waiter = None
            waiter.set_result(data)

    def connection_lost(self, exc: Exception | None) -> None:
        waiter = self._byte_waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(UpstreamError("PostgreSQL closed the connection"))
        if self._lost is not None and not self._lost.done():
            self._lost.set_result(None)

    def expect_reply(self) -> asyncio.Future[bytes]:
        self._byte_waiter = asyncio.get_running_loop().create_future()
        return self._byte_waiter

    def closed(self) -> asyncio.Future[None]:
        if self._lost is None:
            self._lost = asyncio.get_running_loop().create_future()
        return self._lost


def limit_kernel_buffering(transport: asyncio.BaseTransport, rcvbuf: int | None = None) -> None:
    """Bound what the kernel queues for a relay's TCP socket, so that backpressure reaches the
    sender about as soon as it would without the proxy (pgbouncer relays with one 4 kB packet
    buffer and stops reading the server while the client socket is full)."""
    sock = transport.get_extra_info("socket")
    if sock is None or sock.family not in _INET:
        return
    try:
        if _TCP_NOTSENT_LOWAT is not None:
            sock.setsockopt(socket.IPPROTO_TCP, _TCP_NOTSENT_LOWAT, RELAY_NOTSENT_LOWAT)
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    except OSError:
        pass  # a platform without these options keeps its defaults


async def open_upstream(target: UpstreamTarget, protocol: UpstreamProtocol) -> asyncio.Transport:
    """Connect, negotiate TLS as the sslmode says, and return the transport to speak on."""
    try:
        transport = await asyncio.wait_for(_connect(target, protocol), target.connect_timeout)
    except BaseException as exc:
        # Failed, timed out or cancelled (the client left) after the TCP connection was made,
        # e.g. while waiting for the SSLRequest answer: close it, or it lingers until
        # PostgreSQL's authentication_timeout.
        if protocol.transport is not None:
            protocol.transport.close()
        if isinstance(exc, asyncio.TimeoutError):
            raise UpstreamError(
                f"timeout connecting to PostgreSQL at {target.describe()}"
            ) from None
        if isinstance(exc, OSError):
            raise UpstreamError(
                f"could not connect to PostgreSQL at {target.describe()}: {exc.strerror or exc}"
            ) from None
        raise
    protocol.transport = transport
    return transport


async def _connect(target: UpstreamTarget, protocol: UpstreamProtocol) -> asyncio.Transport:
    loop = asyncio.get_running_loop()
    if target.unix_socket:
        transport, _ = await loop.create_unix_connection(lambda: protocol, target.unix_socket)
    else:
        transport, _ = await loop.create_connection(lambda: protocol, target.host, target.port)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        limit_kernel_buffering(transport, rcvbuf=SERVER_RCVBUF)
    if target.tls.request and not target.unix_socket:
        transport = await _negotiate_tls(target, protocol, transport)
    return transport


async def _negotiate_tls(
    target: UpstreamTarget, protocol: UpstreamProtocol, transport: asyncio.Transport
) -> asyncio.Transport:
    reply = protocol.expect_reply()
    transport.write(SSLRequest().encode())
    answer = await reply
    if answer == SSL_ACCEPT:
        loop = asyncio.get_running_loop()
        try:
            tls = await loop.start_tls(
                transport, protocol, target.tls.context(), server_hostname=target.host
            )
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            transport.close()
            raise UpstreamError(f"TLS handshake with PostgreSQL failed: {exc}") from None
        tls = cast(asyncio.Transport, tls)
        return tls
    if answer == SSL_REJECT and not target.tls.required:
        return transport
    transport.close()
    if answer == SSL_REJECT:
        raise UpstreamError(f"PostgreSQL does not support TLS (sslmode={target.tls.sslmode})")
    raise UpstreamError("PostgreSQL answered the SSLRequest with an unexpected message")


async def send_cancel(target: UpstreamTarget, request: CancelRequest) -> None:
    """Deliver a CancelRequest to PostgreSQL and wait for it to close the connection."""
    protocol = UpstreamProtocol()
    transport = await open_upstream(target, protocol)
    closed = protocol.closed()
    transport.write(request.encode())
    try:
        await asyncio.wait_for(closed, target.connect_timeout)
    except asyncio.TimeoutError:
        pass
    finally:
        transport.close()
