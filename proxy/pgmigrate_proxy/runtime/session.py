"""One client session: startup, TLS, the relayed authentication, then the chunk relay.

The hot path (phase RELAY) forwards every received chunk with one write, after a
FrameScanner has walked its headers: that validates what the client sends, tracks the
server's transaction status, and knows where the message boundaries are so that the proxy
can put an ErrorResponse of its own between two server messages.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from typing import TYPE_CHECKING, Protocol, cast

from pgmigrate_proxy.protocol.framing import (
    FrameScanner,
    FramingError,
    type_table,
)
from pgmigrate_proxy.protocol.handshake import ChannelBindingMismatch, Handshake, HandshakeOutcome
from pgmigrate_proxy.protocol.messages import (
    BackendKeyData,
    CancelRequest,
    DecodeError,
    GSSENCRequest,
    NegotiateProtocolVersion,
    ParameterStatus,
    ReadyForQuery,
    SSLRequest,
    StartupMessage,
    decode_startup_packet,
    fatal,
    startup_packet_length,
    terminate,
)
from pgmigrate_proxy.protocol.sqlstate import SqlState
from pgmigrate_proxy.protocol.types import (
    FRONTEND_TYPES,
    MAX_AUTH_TOKEN,
    MAX_STARTUP_PACKET,
    PROTOCOL_3_0,
    PROXY_PARAMETER,
    SSL_ACCEPT,
    SSL_REJECT,
    BackendType,
    TransactionStatus,
)
from pgmigrate_proxy.runtime import guarding
from pgmigrate_proxy.runtime.autocommit import is_migration_session
from pgmigrate_proxy.runtime.hold import (
    BACKEND_WATCH,
    FRONTEND_WATCH,
    Holder,
)
from pgmigrate_proxy.runtime.options import (
    INVALID_PARAMETER_VALUE,
    OptionError,
    applied,
    with_options,
)
from pgmigrate_proxy.runtime.upstream import (
    CLIENT_RCVBUF,
    UpstreamError,
    UpstreamProtocol,
    limit_kernel_buffering,
    open_upstream,
)

if TYPE_CHECKING:
    from pgmigrate_proxy.runtime.context import SessionSettings

log = logging.getLogger("pgmigrate_proxy.session")

_FRONTEND_VALID = type_table(FRONTEND_TYPES)
_ALL_TYPES = range(256)
_RELAY_BACKEND_WATCH = (BackendType.READY_FOR_QUERY,)
#: Bytes a client may send ahead before the proxy reads them as messages (then it pauses).
_STARTUP_BUFFER = MAX_STARTUP_PACKET + MAX_AUTH_TOKEN
#: How long a session closing on an error waits for the server to reach a message boundary.
_DRAIN_SECONDS = 5.0


class Phase(enum.Enum):
    """Where a session stands."""

    STARTUP = "startup"  # reading SSLRequest / GSSENCRequest / CancelRequest / StartupMessage
    CONNECTING = "connecting"  # opening the server connection
    AUTHENTICATING = "authenticating"  # relaying authentication, frame by frame
    RELAY = "relay"  # forwarding chunks
    DRAINING = "draining"  # waiting for a server message boundary to send our own error
    CLOSED = "closed"


class SessionHub(Protocol):
    """What a session needs from the server that owns it."""

    settings: SessionSettings
    guard: guarding.GuardServices
    guard_settings: guarding.GuardSettings | None
    migration_patterns: tuple[str, ...]

    def register(self, session: ClientSession) -> bytes: ...
    def admit(self, session: ClientSession) -> bool: ...
    def logged_in(self, session: ClientSession) -> None: ...
    def session_closed(self, session: ClientSession) -> None: ...
    def cancel(self, request: CancelRequest) -> asyncio.Future[None] | None: ...


class ServerSide(UpstreamProtocol):
    """The server connection of one session: hands everything it reads to the session."""

    __slots__ = ("session",)

    def __init__(self, session: ClientSession) -> None:
        super().__init__()
        self.session = session

    def data_received(self, data: bytes) -> None:
        if self._byte_waiter is not None:
            super().data_received(data)
        else:
            self.session.backend_data(data)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self.session.server_lost()

    def pause_writing(self) -> None:
        self.session.pause_client_reading()

    def resume_writing(self) -> None:
        self.session.resume_client_reading()


class ClientSession(asyncio.Protocol):
    """The client connection of one session, and the session itself."""

    __slots__ = (
        "__weakref__", "_be", "_broken", "_fe", "_inbuf", "_pending_error", "_server_tls", "_task",
        "_timer", "_tls", "_waiter", "client", "handshake", "holder", "hub", "parameters", "peer",
        "phase", "secret_key", "server", "server_key", "settings", "status",
    )  # fmt: skip

    def __init__(self, hub: SessionHub) -> None:
        self.hub = hub
        self.settings = hub.settings
        self.phase = Phase.STARTUP
        self.peer = "?"
        self.client: asyncio.Transport | None = None
        self.server: asyncio.Transport | None = None
        self.status = TransactionStatus.IDLE
        self.secret_key = b""
        self.handshake: Handshake | None = None  # only until the first ReadyForQuery
        self.server_key: BackendKeyData | None = None
        self.parameters: dict[str, str] = {}
        self._inbuf = bytearray()
        self._waiter: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._pending_error = b""
        self._tls = False
        self._server_tls = False
        self._broken = False
        self._fe = FrameScanner(valid=_FRONTEND_VALID, max_size=self.settings.max_message_size)
        self._be = FrameScanner(watched=_ALL_TYPES)
        self.holder: Holder | None = None  # the DDL guard's side, when the guard is on

    # --- asyncio.Protocol, client side ---------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)
        self.client = transport
        limit_kernel_buffering(transport, rcvbuf=CLIENT_RCVBUF)
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer or "unix")
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self.settings.startup_timeout, self._startup_timed_out)
        self._task = loop.create_task(self._startup())

    def data_received(self, data: bytes) -> None:
        if self.phase is Phase.RELAY:
            holder = self.holder
            try:
                if holder is None:
                    self._fe.feed(data)
                else:
                    cut = self._fe.cut(data)
            except FramingError as exc:
                if holder is None:
                    self._forward_prefix(data, exc.offset)
                self._broken = True  # the server may hold part of a header: no Terminate
                self.fail(SqlState.PROTOCOL_VIOLATION, str(exc))
                return
            if holder is not None and (not cut.plain or holder.holding):
                holder.pump(cut)
            elif self.server is not None:
                self.server.write(data)
        elif self.phase is Phase.AUTHENTICATING:
            self._auth_frontend(data)
        elif self.phase in (Phase.STARTUP, Phase.CONNECTING):
            self._inbuf += data
            if len(self._inbuf) > _STARTUP_BUFFER and self.client is not None:
                self.client.pause_reading()  # resumed once there is a reader for it
            if self._waiter is not None and not self._waiter.done():
                self._waiter.set_result(None)

    def eof_received(self) -> bool | None:
        return None  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.client = None
        if self.server is not None:
            if self.phase is Phase.RELAY and self._fe.at_boundary:
                self.server.write(terminate())
            self.server.close()
        self._close()

    def pause_writing(self) -> None:
        if self.server is not None:
            self.server.pause_reading()

    def resume_writing(self) -> None:
        if self.server is not None:
            self.server.resume_reading()

    def pause_client_reading(self) -> None:
        if self.client is not None:
            self.client.pause_reading()

    def resume_client_reading(self) -> None:
        if self.client is not None and self.phase is not Phase.DRAINING:
            self.client.resume_reading()

    # --- server side -------------------------------------------------------------------------

    def backend_data(self, data: bytes) -> None:
        client = self.client
        if client is None:
            return
        if self.phase is Phase.RELAY:
            holder = self.holder
            try:
                frames = self._be.feed(data)
                if holder is not None:
                    if holder.sinking:
                        holder.sink_frames(frames)
                        return
                    if frames:
                        holder.backend_frames(frames)
                        if holder.migration is not None:
                            data = holder.rewrite_status(frames, data)
                elif frames:
                    self.status = ReadyForQuery.decode(frames[-1].payload).status
            except (FramingError, DecodeError) as exc:
                self._server_violation(exc)
                return
            client.write(data)
        elif self.phase is Phase.AUTHENTICATING:
            self._auth_backend(data)
        elif self.phase is Phase.DRAINING:
            self._drain(data)

    def watch_backend(self, *, every: bool) -> None:
        """Which server frames the relay shows the holder: all, or those it must always see."""
        self._be.watch(_ALL_TYPES if every else BACKEND_WATCH)

    def server_lost(self) -> None:
        self.server = None
        last_words = self.holder.server_lost() if self.holder is not None else b""
        if self.phase is Phase.CONNECTING:
            return  # open_upstream fails or _connect notices: _startup tells the client why
        if self.client is not None:
            if last_words and self.phase is Phase.RELAY:
                self.client.write(last_words)  # the FATAL the guard had taken aside
            self.client.close()
        self._close()

    @property
    def relaying(self) -> bool:
        """Still passing messages both ways (not closing on an error, not closed)."""
        return self.phase is Phase.RELAY

    # --- startup -------------------------------------------------------------------------------

    async def _startup(self) -> None:
        try:
            startup = await self._negotiate()
            if startup is not None:
                await self._connect(startup)
        except DecodeError as exc:
            self.fail(exc.sqlstate, f"invalid startup packet: {exc}")
        except UpstreamError as exc:
            log.warning("session %s: %s", self.peer, exc)
            self.fail(exc.sqlstate, str(exc))
        except ConnectionError:
            self.abort()
        finally:
            self._task = None

    async def _negotiate(self) -> StartupMessage | None:
        """Answer SSLRequest / GSSENCRequest until a StartupMessage (None: a cancel was served)."""
        while True:
            packet = decode_startup_packet(await self._read_startup_packet())
            if isinstance(packet, StartupMessage):
                return self._check_startup(packet)
            if isinstance(packet, CancelRequest):
                delivery = self.hub.cancel(packet)
                if delivery is not None:
                    # Clients take our close as "delivered" and send their next query: close
                    # only once PostgreSQL has closed the connection we forwarded it on, or a
                    # late cancel lands on that next query. Shielded: a client that leaves
                    # first does not stop the delivery.
                    await asyncio.shield(delivery)
                self._finish()  # a clean close: over TLS, libpq 17+ treats an abort as failure
                return None
            if self._inbuf:  # nothing may follow these before our answer (CVE-2021-23214)
                raise DecodeError("unexpected data after an encryption request")
            if isinstance(packet, SSLRequest) and self._can_start_tls():
                if not await self._start_tls():
                    return None
            else:
                assert isinstance(packet, (SSLRequest, GSSENCRequest))
                self._write(SSL_REJECT)

    def _check_startup(self, startup: StartupMessage) -> StartupMessage | None:
        if self.settings.require_client_tls and not self._tls:
            self.fail(
                SqlState.INVALID_AUTHORIZATION_SPECIFICATION,
                "pgmigrate-proxy requires TLS: connect with sslmode=require",
            )
            return None
        if "user" not in startup.parameters:
            self.fail(
                SqlState.INVALID_AUTHORIZATION_SPECIFICATION,
                "no PostgreSQL user name specified in startup packet",
            )
            return None
        if self.hub.guard_settings is not None:  # refuse bad pgmigrate.* options at once
            try:
                with_options(self.hub.guard_settings, startup.parameters.get("options", ""))
            except OptionError as exc:
                log.info("session %s: refused: %s", self.peer, exc)
                self.fail(INVALID_PARAMETER_VALUE, str(exc))
                return None
        if not self.hub.admit(self):
            # PostgreSQL's words when it has no slot left (after the startup packet, as it does)
            log.warning("session %s: max_startup_clients reached: refused", self.peer)
            self.fail(SqlState.TOO_MANY_CONNECTIONS, "sorry, too many clients already")
            return None
        return startup

    def _can_start_tls(self) -> bool:
        return self.settings.client_tls is not None and not self._tls

    async def _start_tls(self) -> bool:
        """The TLS handshake; False when it failed (logged in one line, the session closed:
        a client that rejects the certificate, or anything but TLS after our 'S')."""
        assert self.client is not None and self.settings.client_tls is not None
        self._write(SSL_ACCEPT)
        loop = asyncio.get_running_loop()
        context = self.settings.client_tls
        try:
            transport = await loop.start_tls(self.client, self, context, server_side=True)
        except OSError as exc:  # ssl.SSLError, a reset, the handshake timeout
            reason = getattr(exc, "reason", None) or exc.strerror or type(exc).__name__
            reason = str(reason).lower().replace("_", " ")  # as PostgreSQL prints it
            log.info("session %s: TLS handshake failed: %s", self.peer, reason)
            self.abort()
            return False
        self.client = cast(asyncio.Transport, transport)
        self._tls = True
        return True

    async def _read_startup_packet(self) -> bytes:
        while True:
            length = startup_packet_length(self._inbuf)
            if length is not None and len(self._inbuf) >= length:
                packet = bytes(self._inbuf[:length])
                del self._inbuf[:length]
                return packet
            self._waiter = asyncio.get_running_loop().create_future()
            self.resume_client_reading()
            await self._waiter
            self._waiter = None

    async def _connect(self, startup: StartupMessage) -> None:
        self.phase = Phase.CONNECTING
        self.secret_key = self.hub.register(self)
        side = ServerSide(self)
        target = self.settings.upstream
        self.server = await open_upstream(target, side)
        if self.phase is not Phase.CONNECTING:  # the client went away meanwhile
            self.server.close()
            return
        if self.server.is_closing():
            raise UpstreamError(f"PostgreSQL at {target.describe()} closed the connection")
        self._server_tls = self.server.get_extra_info("sslcontext") is not None
        params = {k: v for k, v in startup.parameters.items() if not k.startswith("_pq_.")}
        self.parameters = params
        self.server.write(StartupMessage(PROTOCOL_3_0, params).encode())
        unknown = tuple(k for k in startup.parameters if k.startswith("_pq_."))
        if startup.protocol != PROTOCOL_3_0 or unknown:
            # the Int32 is a full version (major << 16 | minor), as PostgreSQL sends it
            self._write(NegotiateProtocolVersion(PROTOCOL_3_0, unknown).encode())
        self.handshake = Handshake(
            secret_key=self.secret_key,
            announce=(ParameterStatus(PROXY_PARAMETER, self.settings.proxy_version),),
            server_tls=self._server_tls,
        )
        self.phase = Phase.AUTHENTICATING
        self._fe.watch(_ALL_TYPES)
        self._limit_client_messages()
        if self._inbuf:
            pending, self._inbuf = bytes(self._inbuf), bytearray()
            self._auth_frontend(pending)
        self.resume_client_reading()

    def _limit_client_messages(self) -> None:
        """Until login, client messages are capped as PostgreSQL caps them (a few kB)."""
        assert self.handshake is not None
        limit = self.handshake.max_client_message
        self._fe.limit(self.settings.max_message_size if limit is None else limit)

    def _startup_timed_out(self) -> None:
        self._timer = None
        if self.phase in (Phase.STARTUP, Phase.CONNECTING, Phase.AUTHENTICATING):
            log.warning("session %s: startup and authentication timed out", self.peer)
            self.fail(
                SqlState.CONNECTION_FAILURE, "timeout expired during startup and authentication"
            )

    # --- authentication: frame by frame through the Handshake ----------------------------------

    def _auth_frontend(self, data: bytes) -> None:
        assert self.handshake is not None and self.server is not None
        try:
            frames = self._fe.feed(data)
            out = b"".join(self.handshake.frontend(f.type, f.payload) for f in frames)
        except FramingError as exc:
            self.fail(SqlState.PROTOCOL_VIOLATION, str(exc))
            return
        except ChannelBindingMismatch as exc:
            self.fail(
                SqlState.INVALID_AUTHORIZATION_SPECIFICATION,
                str(exc),
                hint="connect with channel_binding=disable",
            )
            return
        self.server.write(out)

    def _auth_backend(self, data: bytes) -> None:
        handshake, client = self.handshake, self.client
        assert handshake is not None and client is not None
        out = []
        try:
            frames = self._be.feed(data)
            for i, complete in enumerate(frames):
                out.append(handshake.backend(complete.type, complete.payload))
                if handshake.outcome is HandshakeOutcome.READY:
                    out.extend(f.raw for f in frames[i + 1 :])
                    out.append(self._be.release())
                    self._enter_relay(ReadyForQuery.decode(complete.payload))
                    break
        except (FramingError, DecodeError) as exc:
            client.write(b"".join(out))
            self._server_violation(exc)
            return
        if self.phase is Phase.AUTHENTICATING:
            self._limit_client_messages()
        client.write(b"".join(out))

    def _enter_relay(self, ready: ReadyForQuery) -> None:
        self.phase = Phase.RELAY
        self.hub.logged_in(self)
        self.status = ready.status
        assert self.handshake is not None
        self.server_key = self.handshake.server_key
        self.handshake = None
        self._fe.limit(self.settings.max_message_size)
        held = self._fe.release()  # a client frame begun before the server was ready
        if held and self.server is not None:
            self.server.write(held)
        guard = self.hub.guard_settings
        if guard is not None:
            options = self.parameters.get("options", "")
            migration = is_migration_session(self.parameters, self.hub.migration_patterns)
            self.holder = Holder(self, applied(guard, options), migration=migration)
            self._fe.watch(_ALL_TYPES if migration else FRONTEND_WATCH)
            self._be.watch(BACKEND_WATCH)
        else:
            self._fe.watch(())
            self._be.watch(_RELAY_BACKEND_WATCH)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        log.debug("session %s: ready as user %s", self.peer, self.parameters.get("user"))

    # --- errors and closing -------------------------------------------------------------------

    def fail(self, code: str, message: str, **extra: str) -> None:
        """Send the client a FATAL error at a message boundary, then close the session."""
        if self.phase in (Phase.CLOSED, Phase.DRAINING):
            return
        if code == SqlState.PROTOCOL_VIOLATION:
            log.warning("session %s: protocol violation: %s", self.peer, message)
        error = fatal(code, message, **extra)
        if self.client is not None:
            self.client.pause_reading()
        if self.phase is Phase.RELAY and not self._be.at_boundary and self.server is not None:
            self.phase = Phase.DRAINING
            self._pending_error = error
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(_DRAIN_SECONDS, self.abort)
            return
        self._write(error)
        self._finish()

    def _server_violation(self, exc: Exception) -> None:
        """The server broke the protocol: nothing more of it can be passed on."""
        log.error("session %s: invalid message from PostgreSQL: %s", self.peer, exc)
        self._broken = True
        self._write(fatal(SqlState.PROTOCOL_VIOLATION, f"invalid message from PostgreSQL: {exc}"))
        self._finish()

    def _drain(self, data: bytes) -> None:
        """Pass server bytes up to the next message boundary, then our error, then close."""
        assert self.client is not None
        cut = self._be.consume_to_boundary(data)
        if cut is None:
            self.client.write(data)
            return
        self.client.write(data[:cut] + self._pending_error)
        self._finish()

    def _finish(self) -> None:
        if self.server is not None:
            if self._fe.at_boundary and not self._broken and self.phase is not Phase.CONNECTING:
                self.server.write(terminate())
            self.server.close()
        if self.client is not None:
            self.client.close()
        self._close()

    def _forward_prefix(self, data: bytes, offset: int) -> None:
        if offset > 0 and self.server is not None:
            self.server.write(data[:offset])

    def abort(self) -> None:
        if self.server is not None:
            self.server.abort()
        if self.client is not None:
            self.client.abort()
        self._close()

    def _write(self, data: bytes) -> None:
        if self.client is not None:
            self.client.write(data)

    def _close(self) -> None:
        if self.phase is Phase.CLOSED:
            return
        self.phase = Phase.CLOSED
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._task is not None and self._task is not asyncio.current_task():
            self._task.cancel()
        holder = self.holder
        if holder is not None and holder.task is not None:
            holder.task.cancel()  # a held statement is dropped, never sent later
        if self._waiter is not None and not self._waiter.done():
            self._waiter.cancel()
        self.hub.session_closed(self)
