"""One client session: startup, TLS, the relayed authentication, then the chunk relay, and
closing; the server connection it is given (runtime/backend.py) is a separate object.

The hot path (phase RELAY) forwards every received chunk with one write, after a
FrameScanner has walked its headers: that validates what the client sends and knows where
the message boundaries are. The server's chunks go from the server connection straight to
the client transport (it tracks the status and the replies owed, and knows the server's
message boundaries, so that the proxy can put an ErrorResponse of its own between two).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import secrets
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Final, Protocol, cast

from pgmigrate_proxy.errors import ServerBusy
from pgmigrate_proxy.protocol.framing import (
    HEADER,
    Frame,
    FrameScanner,
    FramingError,
    type_table,
)
from pgmigrate_proxy.protocol.handshake import ChannelBindingMismatch, Handshake, HandshakeOutcome
from pgmigrate_proxy.protocol.messages import (
    BackendKeyData,
    CancelRequest,
    DecodeError,
    ErrorResponse,
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
    FrontendType,
    TransactionStatus,
)
from pgmigrate_proxy.runtime import clientauth, guarding
from pgmigrate_proxy.runtime.autocommit import is_migration_session
from pgmigrate_proxy.runtime.backend import ALL_TYPES, ServerConnection
from pgmigrate_proxy.runtime.context import CONSOLE_DATABASES
from pgmigrate_proxy.runtime.hold import FRONTEND_WATCH, NO_SERVER, Holder
from pgmigrate_proxy.runtime.login import Login
from pgmigrate_proxy.runtime.options import (
    INVALID_PARAMETER_VALUE,
    OptionError,
    applied,
    with_options,
)
from pgmigrate_proxy.runtime.pool import welcome_for
from pgmigrate_proxy.runtime.pooling import OPTIONS_HINT, PoolLink, options_refusal
from pgmigrate_proxy.runtime.roundwrites import RoundWrites
from pgmigrate_proxy.runtime.stats import UNPOOLED
from pgmigrate_proxy.runtime.upstream import (
    CLIENT_RCVBUF,
    UpstreamError,
    limit_kernel_buffering,
    open_upstream,
)

if TYPE_CHECKING:
    from pgmigrate_proxy.runtime.context import SessionSettings
    from pgmigrate_proxy.runtime.pool import Pool, PoolRegistry

log = logging.getLogger("pgmigrate_proxy.session")

_FRONTEND_VALID: Final = type_table(FRONTEND_TYPES)
#: Bytes a client may send ahead before the proxy reads them as messages (then it pauses).
_STARTUP_BUFFER: Final = MAX_STARTUP_PACKET + MAX_AUTH_TOKEN
_QUERY: Final = FrontendType.QUERY.value
_PARSE: Final = FrontendType.PARSE.value
_BIND: Final = FrontendType.BIND.value
#: How long a session closing on an error waits for the server to reach a message boundary.
_DRAIN_SECONDS: Final = 5.0


def _unasked(data: bytes) -> None:
    """Where a lent server's unasked messages go (notices, a FATAL: dropped)."""


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
    pools: PoolRegistry
    auth: clientauth.AuthService | None  # None: passthrough (logins relayed)
    writes: RoundWrites  # relayed bytes go out at the end of the loop's round

    def register(self, session: ClientSession) -> bytes: ...
    def admit(self, session: ClientSession) -> bool: ...
    def logged_in(self, session: ClientSession) -> None: ...
    def session_closed(self, session: ClientSession) -> None: ...
    def cancel(self, request: CancelRequest) -> asyncio.Future[None] | None: ...
    def client_limit_reached(self) -> bool: ...
    async def serve_console(self, session: ClientSession) -> None: ...


class ClientSession(asyncio.Protocol):
    """The client connection of one session, and the session itself."""

    __slots__ = (
        "__weakref__", "_broken", "_deferred", "_fe", "_inbuf", "_pending_error",
        "_relay_later", "_server_tls", "_task", "_timer", "_tls", "_to_server", "_waiter",
        "_writes", "chunks", "client", "client_id", "client_pid", "gated", "handshake",
        "holder", "hub", "link", "parameters", "peer", "phase", "secret_key", "server",
        "settings", "started", "stats",
    )  # fmt: skip

    def __init__(self, hub: SessionHub) -> None:
        self.hub = hub
        self.settings = hub.settings
        self.client_id = 0  # the admin console's id for it (set by the hub)
        self.phase = Phase.STARTUP
        self.peer = "?"
        self.client: asyncio.Transport | None = None
        self.server: ServerConnection | None = None  # attached (see attach)
        self._to_server: Callable[[bytes], object] | None = None  # its transport's write
        self.secret_key = b""
        self.client_pid = 0  # the process id its BackendKeyData gave (its login server's)
        self.handshake: Handshake | None = None  # only until the first ReadyForQuery
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
        self._writes = hub.writes
        self._deferred: bytes | None = None  # relayed, to send when the round ends
        self._relay_later = self.relay_later  # (made once: the relay's writer at each attach)
        self.holder: Holder | None = None  # the DDL guard's side (and the reply tracking)
        self.link: PoolLink | None = None  # its pool, once logged in
        self.chunks = 0  # chunks received while relaying (the idle timeouts read it)
        self.stats = UNPOOLED  # its pool's counters, once it has a pool
        self.gated = False  # paused by the admin console (PAUSE): its messages are not read
        self.started = time.time()  # when it connected (the admin console shows it)

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
            self.chunks += 1
            self.stats.bytes_received += len(data)
            holder = self.holder
            if holder is not None:  # (the usual chunks: Holder.query and Holder.batch)
                first = data[0]
                if first == _QUERY:
                    if self._fe.single(data) == _QUERY and holder.query(data):
                        return
                elif (first == _PARSE and data[5:6] == b"\0") or (
                    first == _BIND and data[5:7] == b"\0\0"
                ):  # (the unnamed statement; named ones go to the prepared-statement map)
                    starts = self._fe.starts(data)
                    if starts is not None and holder.batch(data, starts):
                        return
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
            elif self._to_server is not None:
                server = self.server
                if server is not None and not server.sent_at:
                    server.sending()
                self._to_server(data)
            elif holder is not None:
                holder.pump(cut)  # (its server is lent: the holder takes it back first)
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
        server = self.server
        if server is not None:
            server.unrelay()
            clean = self.phase is Phase.RELAY and self._fe.at_boundary
            if self.link is None or not self.link.client_left(clean=clean and not self._broken):
                if clean:
                    server.write(terminate())
                server.close()
        self._close()

    def pause_writing(self) -> None:
        if self.server is not None and self.server.transport is not None:
            self.server.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.server is not None and self.server.transport is not None:
            self.server.transport.resume_reading()

    def pause_client_reading(self) -> None:
        if self.client is not None:
            self.client.pause_reading()

    def resume_client_reading(self) -> None:
        if self.client is not None and self.phase is not Phase.DRAINING and not self.gated:
            self.client.resume_reading()

    # --- the server connection (ServerListener) ----------------------------------------------

    def attach(self, server: ServerConnection) -> None:
        """Take a server connection: a logged-in session relays through it at once."""
        server.attach(self)
        self.server = server
        self._to_server = server.transport.write if server.transport is not None else None
        if self.holder is not None:
            self.holder.attach(server)
        if self.phase is Phase.RELAY and self.client is not None:
            holder = self.holder
            server.relay(
                self._relay_later,
                tracking=holder is not None,
                observer=holder.migration if holder is not None else None,
            )

    def lend_server(self, take_back: Callable[[], None] | None) -> None:
        """Transaction pooling: the attached server is lent to the pool, idle (`take_back`:
        what the client's next data calls first), or its own again (None)."""
        holder = self.holder
        assert holder is not None
        holder.take_back = take_back
        server = self.server
        if server is None:
            self._to_server = None
        elif take_back is not None:  # (what a lent server sends unasked is dropped, as a
            self._to_server = None  # parked one's)
            server.redirect(_unasked)
        else:
            transport = server.transport
            self._to_server = transport.write if transport is not None else None
            client = self.client
            server.redirect(self._relay_later if client is not None else _unasked)

    def detach(self) -> ServerConnection:
        """Hand the server connection back (refused with ServerBusy unless it owes nothing
        and no unit of this session is held)."""
        server = self.server
        assert server is not None, "no server connection attached"
        if self.holder is not None and (self.holder.holding or self.holder.task is not None):
            raise ServerBusy("cannot detach the server connection: a statement is held")
        server.detach()
        self.server = None
        self._to_server = None
        return server

    def drop_server(self) -> None:
        """Transaction pooling's hand-over (PoolLink._pass_on), the giver's side: detach
        without the checks (its link made them: the server owes nothing, nothing is held)."""
        self.server = None
        self._to_server = None

    def take_server(self, server: ServerConnection) -> None:
        """The taker's side: attach as `attach` would, to a server that is relaying with its
        replies tracked (a pooled session's, which the giver just dropped)."""
        self.server = server
        self._to_server = server.transport.write if server.transport is not None else None
        holder = self.holder
        assert holder is not None and self.client is not None
        holder.server = server  # (Holder.attach: a pooled session runs no migration)
        server.listener = self
        server.redirect(self._relay_later)

    def server_data(self, data: bytes) -> None:
        if self.client is None:
            return
        if self.phase is Phase.AUTHENTICATING:
            self._auth_backend(data)
        elif self.phase is Phase.DRAINING:
            self._drain(data)

    def server_violation(self, exc: Exception) -> None:
        self._server_violation(exc)

    def server_lost(self, last_words: bytes) -> None:
        self.server = None
        self._to_server = None
        if self.link is not None and self.link.lent and self.holder is not None:
            self.holder.take_back = None
            self.link.lent_lost()  # an idle pooled server: the client carries on
            return
        if self.phase is Phase.CONNECTING:
            return  # open_upstream fails or _connect notices: _startup tells the client why
        if self.client is not None:
            if last_words and self.phase is Phase.RELAY:
                self._write(last_words)  # the FATAL the guard had taken aside
            self._close_client()
        self._close()

    @property
    def at_boundary(self) -> bool:
        """The client's messages so far are whole (none half sent)."""
        return self._fe.at_boundary

    def units_done(self) -> None:
        """The holder ran what it held: in transaction mode the server may go back now."""
        if self.link is not None and self.phase is Phase.RELAY:
            self.link.server_idle()

    def terminated(self) -> None:
        """The client sent Terminate: close its side (connection_lost checks its server in)."""
        self._close_client()

    @property
    def server_key(self) -> BackendKeyData | None:
        """The attached server's own key (cancel requests are forwarded with it)."""
        return self.server.key if self.server is not None else None

    @property
    def status(self) -> TransactionStatus:
        """The attached server's transaction status."""
        return self.server.status if self.server is not None else TransactionStatus.IDLE

    # --- writing to the client (ClientWriter, for the unit runners) -----------------------------

    @property
    def gone(self) -> bool:
        return self.client is None

    def deliver(self, frames: Iterable[Frame]) -> None:
        self.deliver_raw(b"".join(f.raw for f in frames))

    def deliver_raw(self, data: bytes) -> None:
        if data:
            self._write(data)

    def notice(self, severity: str, message: str, detail: str | None = None) -> None:
        client = self.client
        if client is None:
            return
        extra = {"detail": detail} if detail else None
        code = SqlState.WARNING if severity == "WARNING" else SqlState.SUCCESSFUL_COMPLETION
        notice = ErrorResponse.build(severity, code, message, notice=True, extra=extra)
        self._write(notice.encode())

    @property
    def tls(self) -> bool:
        """The client's link is TLS."""
        return self._tls

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
        except UpstreamError as failed:  # (a name per type: mypyc types each name once)
            log.warning("session %s: %s", self.peer, failed)
            self.fail(failed.sqlstate, str(failed))
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
        refusal = options_refusal(startup.parameters, self.hub.pools, self.hub.migration_patterns)
        if refusal is not None:
            log.info("session %s: refused: startup options in transaction pooling", self.peer)
            self.fail(SqlState.FEATURE_NOT_SUPPORTED, refusal, hint=OPTIONS_HINT)
            return None
        if self.hub.client_limit_reached():
            log.warning("session %s: max_client_conn reached: refused", self.peer)
            message = "no more connections allowed (max_client_conn)"
            self.fail(SqlState.TOO_MANY_CONNECTIONS, message)
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
        params = {k: v for k, v in startup.parameters.items() if not k.startswith("_pq_.")}
        if (params.get("database") or params.get("user")) in CONSOLE_DATABASES:
            self._negotiate_version(startup)
            self.parameters = params
            await self.hub.serve_console(self)  # the admin console (console/)
            return
        if self.hub.auth is not None:  # the proxy checks the client itself (clientauth.py)
            self._negotiate_version(startup)
            await self._log_in_here(self.hub.auth, params)
            return
        server = ServerConnection(database=params.get("database") or params.get("user", ""))
        server.attach(self)
        target = self.settings.upstream
        transport = await open_upstream(target, server)
        if self._left_meanwhile():
            transport.close()
            return
        if transport.is_closing():
            raise UpstreamError(f"PostgreSQL at {target.describe()} closed the connection")
        self.attach(server)
        self._server_tls = transport.get_extra_info("sslcontext") is not None
        self.parameters = params
        server.write(StartupMessage(PROTOCOL_3_0, params).encode())
        self._negotiate_version(startup)
        self.handshake = Handshake(
            secret_key=self.secret_key,
            announce=(ParameterStatus(PROXY_PARAMETER, self.settings.proxy_version),),
            server_tls=self._server_tls,
        )
        self.phase = Phase.AUTHENTICATING
        self._fe.watch(ALL_TYPES)
        self._limit_client_messages()
        if self._inbuf:
            pending, self._inbuf = bytes(self._inbuf), bytearray()
            self._auth_frontend(pending)
        self.resume_client_reading()

    def _negotiate_version(self, startup: StartupMessage) -> None:
        unknown = tuple(k for k in startup.parameters if k.startswith("_pq_."))
        if startup.protocol != PROTOCOL_3_0 or unknown:
            # the Int32 is a full version (major << 16 | minor), as PostgreSQL sends it
            self._write(NegotiateProtocolVersion(PROTOCOL_3_0, unknown).encode())

    async def _log_in_here(self, auth: clientauth.AuthService, params: dict[str, str]) -> None:
        """Check the client (clientauth.py), then log its server connection in and relay; in
        transaction pooling, once the pool knows its servers' parameters, answer the client
        from them and log in no server (it gets one at its first message)."""
        self.parameters = params
        checked = await clientauth.check(self, auth, params["user"], tls=self._tls)
        if checked is None or self._left_meanwhile():
            return
        pool = self._pooled_login()
        learning: asyncio.Future[None] | None = None
        if pool is not None:
            while pool.welcome is None and pool.learning is not None:
                await asyncio.shield(pool.learning)  # another login is learning it
                if self._left_meanwhile():
                    return
            if pool.welcome is not None:
                clientauth.accepted(auth, checked)
                self._enter_relay_pooled(welcome_for(pool.welcome, params))
                return
            learning = pool.learning = asyncio.get_running_loop().create_future()
        try:
            done: Login | None = await clientauth.log_in_server(
                self, auth, self.settings.upstream, params, checked
            )
            if done is None or self._left_meanwhile():
                if done is not None:
                    done.server.close()
                return
            self.attach(done.server)
            self.handshake = Handshake(
                secret_key=self.secret_key,
                announce=(ParameterStatus(PROXY_PARAMETER, self.settings.proxy_version),),
            )
            self.handshake.announced_pid = self._pool_link().reserve()
            self._write(b"".join(self.handshake.backend(f.type, f.payload) for f in done.frames))
            self._enter_relay(ReadyForQuery.decode(done.frames[-1].payload))
        finally:
            if learning is not None and pool is not None:
                pool.learning = None
                learning.set_result(None)
        self._relay_pending()

    def _left_meanwhile(self) -> bool:
        """After an await of the login: the client went away (or the session failed) meanwhile.
        (A method: mypy keeps `phase` narrowed across awaits, and mypyc trusts it.)"""
        return self.phase is not Phase.CONNECTING

    def _pooled_login(self) -> Pool | None:
        """The pool of a client that may log in without a server: transaction pooling, not a
        migration session (it keeps its login server)."""
        if is_migration_session(self.parameters, self.hub.migration_patterns):
            return None
        link = self._pool_link()
        return link.pool if link.transaction else None

    def _enter_relay_pooled(self, told: dict[str, str]) -> None:
        """Log the client in without a server: its pool's parameters (`told`), a BackendKeyData
        of the proxy's (cancel requests go to the server it holds at that moment), relaying."""
        self.client_pid = 1 + secrets.randbelow(0x7FFFFFFE)
        out = [ParameterStatus(name, value).encode() for name, value in told.items()]
        out.append(BackendKeyData(self.client_pid, self.secret_key).encode())
        out.append(ParameterStatus(PROXY_PARAMETER, self.settings.proxy_version).encode())
        out.append(ReadyForQuery(TransactionStatus.IDLE).encode())
        self._write(b"".join(out))
        self.phase = Phase.RELAY
        self.hub.logged_in(self)
        self._fe.limit(self.settings.max_message_size)
        guard = self.hub.guard_settings
        options = self.parameters.get("options", "")
        self.holder = Holder(
            self, NO_SERVER, self.hub.guard, applied(guard, options) if guard is not None else None
        )
        self._fe.watch(FRONTEND_WATCH)
        self._pool_link().logged_in_without_server(told)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        user = self.parameters.get("user")
        log.debug("session %s: ready as user %s (no server)", self.peer, user)
        self._relay_pending()

    def _relay_pending(self) -> None:
        if self.phase is not Phase.RELAY:
            return
        if self._inbuf:  # what the client sent after its login, before the relay began
            pending, self._inbuf = bytes(self._inbuf), bytearray()
            self.data_received(pending)
        self.resume_client_reading()

    async def read_frame(self, limit: int) -> tuple[int, bytes]:
        """The client's next message while the proxy checks its login (at most `limit` bytes,
        as PostgreSQL caps them). Raises FramingError."""
        while True:
            if len(self._inbuf) >= HEADER.size:
                mtype, length = HEADER.unpack_from(self._inbuf)
                if length < 4 or length > limit:
                    raise FramingError(f"invalid message length {length} during login", 0)
                if len(self._inbuf) > length:
                    payload = bytes(self._inbuf[HEADER.size : 1 + length])
                    del self._inbuf[: 1 + length]
                    return mtype, payload
            self._waiter = asyncio.get_running_loop().create_future()
            self.resume_client_reading()
            await self._waiter
            self._waiter = None

    def refuse(self, error: bytes) -> None:
        """Send the client this FATAL ErrorResponse frame and close the session."""
        self._write(error)
        self._finish()

    def _limit_client_messages(self) -> None:
        """Until login, client messages are capped as PostgreSQL caps them (a few kB)."""
        assert self.handshake is not None
        limit = self.handshake.max_client_message
        self._fe.limit(self.settings.max_message_size if limit is None else limit)

    def logged_in_here(self) -> None:
        """The admin console let its client in: no startup timeout from now on."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

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
        except ChannelBindingMismatch as mismatch:  # (a name per type: mypyc)
            self.fail(
                SqlState.INVALID_AUTHORIZATION_SPECIFICATION,
                str(mismatch),
                hint="connect with channel_binding=disable",
            )
            return
        self.server.write(out)

    def _auth_backend(self, data: bytes) -> None:
        handshake, client = self.handshake, self.client
        assert handshake is not None and client is not None
        out = []
        try:
            assert self.server is not None
            scanner = self.server.scanner
            frames = scanner.feed(data)
            for i, complete in enumerate(frames):
                if complete.type == BackendType.READY_FOR_QUERY:  # the client's server, now
                    handshake.announced_pid = self._pool_link().reserve()
                out.append(handshake.backend(complete.type, complete.payload))
                if handshake.outcome is HandshakeOutcome.READY:
                    out.extend(f.raw for f in frames[i + 1 :])
                    out.append(scanner.release())
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
        server = self.server
        assert self.handshake is not None and server is not None
        told = self.handshake.server_parameters  # (ParameterStatus: what the client was told)
        server.status = ready.status
        server.key = self.handshake.server_key
        self.client_pid = self.handshake.announced_pid or server.server_pid
        self.hub.logged_in(self)
        self.handshake = None
        self._fe.limit(self.settings.max_message_size)
        held = self._fe.release()  # a client frame begun before the server was ready
        if held:
            server.write(held)
        guard = self.hub.guard_settings
        options = self.parameters.get("options", "")
        keep = is_migration_session(self.parameters, self.hub.migration_patterns)
        migration = keep and guard is not None
        self.holder = Holder(
            self,
            server,
            self.hub.guard,
            applied(guard, options) if guard is not None else None,
            migration=migration,
        )
        self._fe.watch(ALL_TYPES if migration else FRONTEND_WATCH)
        self.attach(server)  # (again: now the relay starts)
        self._pool_link().logged_in(server, self.parameters, told)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        log.debug("session %s: ready as user %s", self.peer, self.parameters.get("user"))

    def _pool_link(self) -> PoolLink:
        """This client's side of its pool, made once its login is known to succeed."""
        if self.link is None:
            database = self.parameters.get("database") or self.parameters.get("user", "")
            pool = self.hub.pools.pool(database, self.parameters.get("user", ""))
            keep = is_migration_session(self.parameters, self.hub.migration_patterns)
            self.link = PoolLink(self, pool, self.parameters, keep=keep)
            self.stats = pool.stats
        return self.link

    # --- errors and closing -------------------------------------------------------------------

    def fail(self, code: str, message: str, **extra: str) -> None:
        """Send the client a FATAL error at a message boundary, then close the session."""
        if self.phase in (Phase.CLOSED, Phase.DRAINING):
            return
        if self.link is not None and self.link.lent:
            self.link.return_lent()  # (between transactions: the pool keeps the server)
        if code == SqlState.PROTOCOL_VIOLATION:
            log.warning("session %s: protocol violation: %s", self.peer, message)
        error = fatal(code, message, **extra)
        if self.client is not None:
            self.client.pause_reading()
        server = self.server
        if self.phase is Phase.RELAY and server is not None and not server.scanner.at_boundary:
            server.unrelay()  # its bytes come to _drain now
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
        assert self.server is not None
        cut = self.server.scanner.consume_to_boundary(data)
        if cut is None:
            self._write(data)
            return
        self._write(data[:cut] + self._pending_error)
        self._finish()

    def _finish(self) -> None:
        if self.server is not None:
            if self._fe.at_boundary and not self._broken and self.phase is not Phase.CONNECTING:
                self.server.write(terminate())
            self.server.close()
        self._close_client()
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
        """Write to the client now, after what the relay deferred."""
        self.send_deferred()
        if self.client is not None:
            self.client.write(data)

    def _close_client(self) -> None:
        """Close the client's side, after sending what the relay deferred."""
        self.send_deferred()
        if self.client is not None:
            self.client.close()

    def relay_later(self, data: bytes) -> None:
        """The relay's writer to the client (ServerConnection.relay, redirect): the bytes go
        out when the loop's round of callbacks ends (runtime/roundwrites.py). Bytes, not a
        list: a client's server sends it one chunk a round, nearly always."""
        deferred = self._deferred
        if deferred is None:
            self._deferred = data
            self._writes.due(self)
        else:
            self._deferred = deferred + data

    def send_deferred(self) -> None:
        """Send what the relay deferred (the round ended, or the session writes itself)."""
        deferred = self._deferred
        if deferred is None:
            return
        self._deferred = None
        client = self.client
        if client is not None and not client.is_closing():
            client.write(deferred)

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
        leaving = self.link is not None and self.link.leaving  # (the unit ran: it may finish)
        if holder is not None and holder.task is not None and not leaving:
            holder.task.cancel()  # a held statement is dropped, never sent later
        if holder is not None:
            holder.closed()
        if self.link is not None:
            self.link.closed()
        if self._waiter is not None and not self._waiter.done():
            self._waiter.cancel()
        self.hub.session_closed(self)
