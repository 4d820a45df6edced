"""Server connections the proxy logs in to PostgreSQL itself (auth_type auth_query, auth_file,
trust): connect, StartupMessage, answer the server's authentication with the secret a client's
login left (auth/backend.py ServerLogin), up to the first ReadyForQuery; and the opener a pool
calls to grow with logged-in, idle server connections.

The secret is what the client's own login gave the proxy (the SCRAM keys recovered from its
proof, or the md5 hash or clear password of an auth_file line): it lives in memory only
(auth.py's SecretCache) and never reaches a log, an error or a notice.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from pgmigrate_proxy.auth.backend import LoginFailed, ServerLogin
from pgmigrate_proxy.auth.channel_binding import tls_server_end_point
from pgmigrate_proxy.auth.credentials import LoginSecret
from pgmigrate_proxy.errors import ConnectionFailure
from pgmigrate_proxy.protocol.framing import Frame, FramingError
from pgmigrate_proxy.protocol.messages import (
    Authentication,
    BackendKeyData,
    DecodeError,
    ErrorResponse,
    ParameterStatus,
    ReadyForQuery,
    StartupMessage,
)
from pgmigrate_proxy.protocol.types import PROTOCOL_3_0, AuthCode, BackendType
from pgmigrate_proxy.runtime.backend import ServerConnection
from pgmigrate_proxy.runtime.upstream import UpstreamError, UpstreamTarget, open_upstream

log = logging.getLogger("pgmigrate_proxy.login")

#: A pool's way to grow: a logged-in, idle server connection and the ParameterStatus values its
#: login reported (issue 8's pool opener).
ServerOpener = Callable[[], Awaitable[tuple[ServerConnection, dict[str, str]]]]


class ServerRefused(ConnectionFailure):
    """PostgreSQL ended the login with an ErrorResponse (`error`: its frame, for the client)."""

    def __init__(self, error: bytes, message: str, sqlstate: str) -> None:
        super().__init__(message)
        self.error = error
        self.code = sqlstate


@dataclass(frozen=True, slots=True)
class Login:
    """A logged-in server connection, detached and idle, and what its server sent after
    AuthenticationOk (ParameterStatus, BackendKeyData, notices, the ReadyForQuery last)."""

    server: ServerConnection
    frames: tuple[Frame, ...]


class LoginListener:
    """Holds the server connection while the proxy logs it in: frames go to a queue."""

    def __init__(self, server: ServerConnection) -> None:
        self.server = server
        self.queue: asyncio.Queue[list[Frame] | Exception] = asyncio.Queue()

    def server_data(self, data: bytes) -> None:
        try:
            self.queue.put_nowait(self.server.scanner.feed(data))
        except FramingError as exc:
            self.queue.put_nowait(exc)

    def server_violation(self, exc: Exception) -> None:
        self.queue.put_nowait(exc)

    def server_lost(self, last_words: bytes) -> None:
        self.queue.put_nowait(UpstreamError("PostgreSQL closed the connection during login"))

    def pause_client_reading(self) -> None:
        pass

    def resume_client_reading(self) -> None:
        pass

    async def frames(self) -> list[Frame]:
        item = await self.queue.get()
        if isinstance(item, Exception):
            raise item
        return item


def _peer_binding(transport: asyncio.BaseTransport) -> tuple[bool, bytes | None]:
    """(TLS or not, the tls-server-end-point hash of PostgreSQL's certificate if any)."""
    tls = transport.get_extra_info("ssl_object")
    if not isinstance(tls, (ssl.SSLObject, ssl.SSLSocket)):
        return False, None
    der = tls.getpeercert(binary_form=True)
    try:
        return True, tls_server_end_point(der) if der else None
    except ValueError:
        return True, None


async def login_server(
    target: UpstreamTarget,
    database: str,
    user: str,
    parameters: Mapping[str, str],
    secret: LoginSecret | None,
) -> Login:
    """A new server connection for `user` on `database`, logged in with `secret` (None: only a
    server that asks for no password lets it in). Raises UpstreamError (cannot connect),
    LoginFailed (the secret does not answer what the server asks) or ServerRefused."""
    server = ServerConnection(database=database)
    listener = LoginListener(server)
    server.attach(listener)
    try:
        return await asyncio.wait_for(
            _login(target, server, listener, user, parameters, secret), target.connect_timeout
        )
    except asyncio.TimeoutError:
        server.close()
        raise UpstreamError(f"timeout logging in to PostgreSQL at {target.describe()}") from None
    except BaseException:
        server.close()
        raise


async def _login(
    target: UpstreamTarget,
    server: ServerConnection,
    listener: LoginListener,
    user: str,
    parameters: Mapping[str, str],
    secret: LoginSecret | None,
) -> Login:
    transport = await open_upstream(target, server)
    params = {**parameters, "user": user, "database": server.database}
    server.write(StartupMessage(PROTOCOL_3_0, params).encode())
    tls, binding = _peer_binding(transport)
    answer = ServerLogin(user, secret, tls=tls, channel_binding=binding) if secret else None
    after: list[Frame] = []
    try:
        while True:
            for item in await listener.frames():
                if item.type == BackendType.AUTHENTICATION:
                    auth = Authentication.decode(item.payload)
                    if answer is not None:
                        server.write(answer.receive(auth))
                    elif auth.code != AuthCode.OK:
                        raise LoginFailed(
                            f'PostgreSQL asks for a password for user "{user}" and the proxy '
                            "holds none (log in once with a password, or list the user in "
                            "auth_file)"
                        )
                elif item.type == BackendType.ERROR_RESPONSE:
                    error = ErrorResponse.decode(item.payload)
                    code = error.fields.get("C", "08006")
                    raise ServerRefused(item.raw, error.fields.get("M", "login refused"), code)
                else:
                    after.append(item)
                    if item.type == BackendType.READY_FOR_QUERY:
                        how = answer.mechanism or "md5/password" if answer else "no password"
                        log.debug("server login as %s on %s: %s", user, server.database, how)
                        return _logged_in(server, after)
    except DecodeError as exc:
        raise UpstreamError(f"invalid message from PostgreSQL during login: {exc}") from None


def reported_parameters(frames: tuple[Frame, ...]) -> dict[str, str]:
    """The ParameterStatus values among a login's frames."""
    found = {}
    for item in frames:
        if item.type == BackendType.PARAMETER_STATUS:
            status = ParameterStatus.decode(item.payload)
            found[status.name] = status.value
    return found


def _logged_in(server: ServerConnection, after: list[Frame]) -> Login:
    server.status = ReadyForQuery.decode(after[-1].payload).status
    for item in after:
        if item.type == BackendType.BACKEND_KEY_DATA:
            server.key = BackendKeyData.decode(item.payload)
    server.detach()
    return Login(server, tuple(after))


async def open_server(
    target: UpstreamTarget,
    database: str,
    user: str,
    parameters: Mapping[str, str],
    secret: LoginSecret | None,
) -> ServerConnection:
    """A logged-in, idle server connection (login_server without what the server sent)."""
    return (await login_server(target, database, user, parameters, secret)).server


def server_opener(
    target: Callable[[], UpstreamTarget],
    secret: Callable[[str], LoginSecret | None],
    forget: Callable[[str], None],
    database: str,
    user: str,
    parameters: Mapping[str, str] | None = None,
) -> ServerOpener:
    """The pool's opener for (database, user): logs in with the user's cached secret (looked up
    at each call: the newest login's), dropping it from the cache when it no longer logs in.
    `target`: the current upstream (a reload may change it)."""
    fixed = dict(parameters or {})

    async def open_one() -> tuple[ServerConnection, dict[str, str]]:
        try:
            login = await login_server(target(), database, user, fixed, secret(user))
            return login.server, reported_parameters(login.frames)
        except (LoginFailed, ServerRefused) as exc:
            if isinstance(exc, LoginFailed) or exc.code.startswith("28"):
                forget(user)
            raise

    return open_one
