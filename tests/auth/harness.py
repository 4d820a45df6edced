"""A small asyncio server that speaks only the startup and authentication phase, with the
proxy's ClientAuthenticator, so that real clients (libpq through psycopg) log in to it; and a
raw-socket login to PostgreSQL with ServerLogin. Test scaffolding: the runtime wires the same
modules into the proxy's sessions."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from pgmigrate_proxy.auth.backend import ServerLogin
from pgmigrate_proxy.auth.channel_binding import tls_server_end_point
from pgmigrate_proxy.auth.credentials import LoginSecret, MockVerifiers, StoredCredential, Unknown
from pgmigrate_proxy.auth.frontend import ClientAuthenticator, Outcome
from pgmigrate_proxy.protocol import schema
from pgmigrate_proxy.protocol.framing import HEADER, HEADER_SIZE
from pgmigrate_proxy.protocol.messages import (
    Authentication,
    BackendKeyData,
    ErrorResponse,
    ParameterStatus,
    Query,
    ReadyForQuery,
    SSLRequest,
    StartupMessage,
    decode_startup_packet,
)
from pgmigrate_proxy.protocol.types import (
    MAX_AUTH_TOKEN,
    PROTOCOL_3_0,
    BackendType,
    FrontendType,
    TransactionStatus,
)

from tests.integration.wire import WireClient

Lookup = Callable[[str], StoredCredential | Unknown]
_PARAMETERS = {
    "server_version": "18.0",
    "server_encoding": "UTF8",
    "client_encoding": "UTF8",
    "DateStyle": "ISO, MDY",
    "integer_datetimes": "on",
    "standard_conforming_strings": "on",
}


@dataclass
class Login:
    """One client's login as the harness saw it."""

    user: str
    outcome: Outcome
    secret: LoginSecret | None = field(repr=False)
    messages: int  # the client's authentication messages the exchange went through
    method: int  # the AuthCode the harness asked for first


@dataclass
class AuthHarness:
    """Accepts logins checked by ClientAuthenticator against `lookup`; records each."""

    lookup: Lookup
    mocks: MockVerifiers = field(default_factory=MockVerifiers)
    logins: list[Login] = field(default_factory=list)
    port: int = 0
    tls: ssl.SSLContext | None = None  # answers SSLRequest with S and this context
    tls_end_point: bytes | None = None  # given: SCRAM-SHA-256-PLUS is offered too

    async def _startup(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> str:
        while True:
            head = await reader.readexactly(4)
            packet = head + await reader.readexactly(int.from_bytes(head, "big") - 4)
            startup = decode_startup_packet(packet)
            if isinstance(startup, StartupMessage):
                return startup.parameters["user"]
            if isinstance(startup, SSLRequest) and self.tls is not None:
                writer.write(b"S")
                await writer.drain()
                await writer.start_tls(self.tls)
            else:
                writer.write(b"N")

    async def _frame(self, reader: asyncio.StreamReader) -> tuple[int, bytes]:
        header = await reader.readexactly(HEADER_SIZE)
        mtype, length = HEADER.unpack(header)
        assert 4 <= length <= MAX_AUTH_TOKEN
        return mtype, await reader.readexactly(length - 4)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            user = await self._startup(reader, writer)
            auth = ClientAuthenticator(
                user, self.lookup(user), self.mocks, tls_end_point=self.tls_end_point
            )
            first = auth.start()
            method = Authentication.decode(first[HEADER_SIZE:]).code
            writer.write(first)
            messages = 0
            while True:
                step = auth.receive(*await self._frame(reader))
                messages += 1
                writer.write(step.reply)
                if step.outcome is not Outcome.PENDING:
                    break
            self.logins.append(Login(user, step.outcome, step.secret, messages, method))
            if step.outcome is Outcome.ACCEPTED:
                writer.write(b"".join(ParameterStatus(*p).encode() for p in _PARAMETERS.items()))
                writer.write(BackendKeyData(4242, b"\0\0\0\1").encode())
                writer.write(ReadyForQuery(TransactionStatus.IDLE).encode())
                while (await self._frame(reader))[0] != FrontendType.TERMINATE:
                    pass
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[AuthHarness]:
        server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        async with server:
            yield self


def login_raw(
    host: str, port: int, user: str, secret: LoginSecret, tls: ssl.SSLContext | None = None
) -> tuple[str, str]:
    """Log in to PostgreSQL over a raw socket with ServerLogin (over TLS with channel binding
    when given a context); return the SASL mechanism used and `SELECT current_user`."""
    with WireClient(host, port) as wire:
        end_point = None
        if tls is not None:
            wire.start_tls(tls, host)
            assert isinstance(wire.sock, ssl.SSLSocket)
            certificate = wire.sock.getpeercert(binary_form=True)
            assert certificate is not None
            end_point = tls_server_end_point(certificate)
        wire.send(StartupMessage(PROTOCOL_3_0, {"user": user, "database": "postgres"}).encode())
        login = ServerLogin(user, secret, tls=tls is not None, channel_binding=end_point)
        while not login.done:
            mtype, payload = wire.read_message()
            if mtype == BackendType.ERROR_RESPONSE:
                raise AssertionError(ErrorResponse.decode(payload).message)
            assert mtype == BackendType.AUTHENTICATION, f"got {chr(mtype)!r}"
            wire.send(login.receive(Authentication.decode(payload)))
        wire.read_until(BackendType.READY_FOR_QUERY)
        wire.send(Query("SELECT current_user").encode())
        rows = [p for t, p in wire.read_until(BackendType.READY_FOR_QUERY) if t == ord("D")]
        (column,) = schema.parse_payload("DataRow", rows[0]).columns
        assert isinstance(column, bytes)
        wire.send(schema.build("Terminate"))
        return login.mechanism, column.decode()
