"""One admin console session: the client's login (who may come in and how the password is
checked), then its simple-protocol queries, answered by the proxy itself (no server behind).

How the password is checked: with auth_type auth_file, auth_query or trust, as for any client
of the proxy (runtime/clientauth.py: SCRAM or md5 against the stored credential, trust lets in).
With passthrough the proxy holds no credential, so it does what pgbouncer's auth_user login
does in spirit: it relays the client's authentication to PostgreSQL (a login as that user to
the upstream's database), and the client is in once PostgreSQL says AuthenticationOk; that
server connection is closed at once. Then the user must be in admin_users or stats_users.
"""

from __future__ import annotations

import logging

from pgmigrate_proxy import __version__
from pgmigrate_proxy.auth.backend import LoginFailed
from pgmigrate_proxy.console import commands, rows
from pgmigrate_proxy.console.host import Access, ConsoleHost, access
from pgmigrate_proxy.console.parse import CommandError, parse
from pgmigrate_proxy.poolconfig import AuthType
from pgmigrate_proxy.protocol.framing import FramingError
from pgmigrate_proxy.protocol.handshake import ChannelBindingMismatch, Handshake
from pgmigrate_proxy.protocol.messages import (
    Authentication,
    BackendKeyData,
    DecodeError,
    ParameterStatus,
    Query,
    StartupMessage,
    terminate,
)
from pgmigrate_proxy.protocol.sqlstate import SqlState
from pgmigrate_proxy.protocol.types import (
    PROTOCOL_3_0,
    PROXY_PARAMETER,
    AuthCode,
    BackendType,
    FrontendType,
)
from pgmigrate_proxy.runtime import clientauth
from pgmigrate_proxy.runtime.backend import ServerConnection
from pgmigrate_proxy.runtime.login import LoginListener
from pgmigrate_proxy.runtime.session import ClientSession, Phase
from pgmigrate_proxy.runtime.upstream import UpstreamError, open_upstream

log = logging.getLogger("pgmigrate_proxy.console")

#: The longest query the console reads (its commands are short).
MAX_QUERY = 64 * 1024
#: Extended-protocol and other messages the console refuses (until the next Sync).
_EXTENDED = frozenset(
    t.value for t in (FrontendType.PARSE, FrontendType.BIND, FrontendType.DESCRIBE,
                      FrontendType.EXECUTE, FrontendType.CLOSE, FrontendType.FLUSH)
)  # fmt: skip
_NOT_SIMPLE = (
    "the admin console speaks only the simple query protocol (psql, or psycopg with "
    "ClientCursor in autocommit)"
)


async def serve(host: ConsoleHost, session: ClientSession) -> None:
    """Log the client in, then answer its queries until it leaves."""
    user = session.parameters.get("user", "")
    if not await _log_in(host, session, user):
        return
    allowed = access(host.config, user)
    if allowed is None:
        log.info("console: user %s refused (not in admin_users or stats_users)", user)
        session.fail(
            SqlState.INSUFFICIENT_PRIVILEGE,
            f'permission denied for the admin console: user "{user}" is not in admin_users '
            "or stats_users",
        )
        return
    session.logged_in_here()
    log.info("console: user %s in (%s) from %s", user, allowed.value, session.peer)
    session.deliver_raw(_welcome(host, session))
    await _queries(host, session, user, allowed)


def _welcome(host: ConsoleHost, session: ClientSession) -> bytes:
    parameters = {
        "server_version": f"{__version__} (pgmigrate-proxy admin console)",
        "server_encoding": "UTF8",
        "client_encoding": "UTF8",
        "DateStyle": "ISO",
        "integer_datetimes": "on",
        "standard_conforming_strings": "on",
        "application_name": session.parameters.get("application_name", ""),
        PROXY_PARAMETER: host.settings.proxy_version,
    }
    out = [ParameterStatus(name, value).encode() for name, value in parameters.items()]
    out.append(BackendKeyData(0, session.secret_key).encode())
    out.append(rows.ready())
    return b"".join(out)


async def _queries(host: ConsoleHost, session: ClientSession, user: str, allowed: Access) -> None:
    skipping = False  # after an extended-protocol message: until Sync
    while session.phase is not Phase.CLOSED:
        try:
            mtype, payload = await session.read_frame(MAX_QUERY)
        except FramingError as exc:
            session.fail(SqlState.PROTOCOL_VIOLATION, str(exc))
            return
        if mtype == FrontendType.TERMINATE:
            session.terminated()
            return
        if mtype == FrontendType.QUERY:
            session.deliver_raw(await _answer(host, session, payload, user, allowed))
        elif mtype == FrontendType.SYNC:
            session.deliver_raw(rows.ready())
            skipping = False
        elif mtype in _EXTENDED:
            if not skipping:
                session.deliver_raw(rows.error(SqlState.FEATURE_NOT_SUPPORTED, _NOT_SIMPLE))
                skipping = True
        elif mtype == FrontendType.FUNCTION_CALL:
            session.deliver_raw(rows.error(SqlState.FEATURE_NOT_SUPPORTED, _NOT_SIMPLE))
            session.deliver_raw(rows.ready())
        else:
            session.fail(SqlState.PROTOCOL_VIOLATION, f"unexpected message type 0x{mtype:02x}")
            return


async def _answer(
    host: ConsoleHost, session: ClientSession, payload: bytes, user: str, allowed: Access
) -> bytes:
    try:
        text = Query.decode(payload).sql
        command = parse(text)
        reply = await commands.run(host, command, user, allowed)
    except DecodeError as exc:
        reply = rows.error(SqlState.PROTOCOL_VIOLATION, str(exc))
    except CommandError as exc:
        reply = rows.error(exc.code, exc.message, exc.hint)
    except Exception:  # a bug of ours: this command fails, the console goes on
        log.exception("console: %s failed", " ".join(payload[:60].decode(errors="replace").split()))
        reply = rows.error(SqlState.INTERNAL_ERROR, "internal error (see the proxy's log)")
    return reply + rows.ready()


async def _log_in(host: ConsoleHost, session: ClientSession, user: str) -> bool:
    """Check the client's password (module docstring); False: refused (the session is closed)."""
    auth = host.auth
    if auth is None:
        return await _log_in_upstream(host, session, user)
    if auth.auth_type is AuthType.TRUST:
        session.deliver_raw(Authentication(AuthCode.OK).encode())
        return True
    secret = await clientauth.verify(session, auth, user, tls=session.tls)
    return secret is not None


async def _log_in_upstream(host: ConsoleHost, session: ClientSession, user: str) -> bool:
    """Relay the client's authentication to a login as `user` at PostgreSQL (passthrough)."""
    target = host.settings.upstream
    database = host.config.upstream_params().get("dbname") or "postgres"
    server = ServerConnection(database=database)
    listener = LoginListener(server)
    server.attach(listener)
    try:
        transport = await open_upstream(target, server)
        handshake = Handshake(
            secret_key=b"", server_tls=transport.get_extra_info("sslcontext") is not None
        )
        startup = {"user": user, "database": database, "application_name": "pgmigrate-console"}
        server.write(StartupMessage(PROTOCOL_3_0, startup).encode())
        return await _relay_authentication(session, server, listener, handshake, user)
    except (UpstreamError, LoginFailed, DecodeError) as exc:
        log.warning("console: cannot check the login of %s at PostgreSQL: %s", user, exc)
        session.fail(SqlState.CONNECTION_FAILURE, f"cannot check the login at PostgreSQL: {exc}")
        return False
    except FramingError as exc:
        session.fail(SqlState.PROTOCOL_VIOLATION, str(exc))
        return False
    except ChannelBindingMismatch as exc:
        session.fail(SqlState.INVALID_AUTHORIZATION_SPECIFICATION, str(exc))
        return False
    finally:
        if not server.gone:
            server.write(terminate())
        server.close()


async def _relay_authentication(
    session: ClientSession,
    server: ServerConnection,
    listener: LoginListener,
    handshake: Handshake,
    user: str,
) -> bool:
    while True:
        for item in await listener.frames():
            if item.type == BackendType.ERROR_RESPONSE:
                log.info("console: login of %s refused by PostgreSQL", user)
                session.refuse(item.raw)
                return False
            if item.type != BackendType.AUTHENTICATION:
                continue  # (nothing else comes before AuthenticationOk)
            code = Authentication.decode(item.payload).code
            session.deliver_raw(handshake.backend(item.type, item.payload))
            if code == AuthCode.OK:
                return True
            if code == AuthCode.SASL_FINAL:
                continue
            limit = handshake.max_client_message or MAX_QUERY
            mtype, payload = await session.read_frame(limit)
            server.write(handshake.frontend(mtype, payload))
