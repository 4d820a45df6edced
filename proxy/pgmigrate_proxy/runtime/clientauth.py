"""Logins the proxy checks itself (auth_type auth_query, auth_file, trust): where a user's stored
credential comes from, the secrets that log in server connections (memory only), and one
client's login, from the first Authentication request to a logged-in server connection.

Order of one login: look the user up (auth_query on the admin connection, or the auth_file),
run the SCRAM-SHA-256 (or md5) exchange of auth/frontend.py (a wrong password and an unknown
user get the same messages and work, then the same 28P01), send AuthenticationOk, then log in a
new server connection with the secret the client's proof left (runtime/login.py); the session
relays the server's ParameterStatus, BackendKeyData (its own key) and ReadyForQuery as for a
relayed login. In transaction pooling, once its pool knows a server's parameters, the session
answers the client from them instead and logs in no server (runtime/session.py). The secret is
remembered per user for the pool's openers, replaced by each newer login and dropped as soon
as it fails to log in; it is never logged.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from pgmigrate_proxy.admin import AdminConnection, AdminUnavailable
from pgmigrate_proxy.auth.authquery import credential_from_row
from pgmigrate_proxy.auth.backend import LoginFailed
from pgmigrate_proxy.auth.channel_binding import tls_server_end_point
from pgmigrate_proxy.auth.credentials import (
    UNKNOWN,
    LoginSecret,
    Md5Hash,
    MockVerifiers,
    Plain,
    StoredCredential,
    Unknown,
)
from pgmigrate_proxy.auth.frontend import ClientAuthenticator, Outcome
from pgmigrate_proxy.config import Config, load_auth_file
from pgmigrate_proxy.errors import ConnectionFailure
from pgmigrate_proxy.poolconfig import AuthType
from pgmigrate_proxy.protocol.framing import FramingError
from pgmigrate_proxy.protocol.messages import Authentication
from pgmigrate_proxy.protocol.sqlstate import SqlState
from pgmigrate_proxy.protocol.types import MAX_AUTH_TOKEN, MAX_SASL_MESSAGE, AuthCode
from pgmigrate_proxy.runtime.login import (
    Login,
    ServerOpener,
    ServerRefused,
    login_server,
    server_opener,
)
from pgmigrate_proxy.runtime.upstream import UpstreamTarget

log = logging.getLogger("pgmigrate_proxy.auth")


class LookupFailed(ConnectionFailure):
    """auth_query could not run (the admin connection is down or the query failed)."""


class AuthService:
    """The proxy's side of pooled clients' logins: credentials, mock verifiers, secrets."""

    def __init__(
        self,
        auth_type: AuthType,
        *,
        auth_query: str = "",
        users: dict[str, StoredCredential] | None = None,
        admin: Callable[[], AdminConnection | None] = lambda: None,
        tls_end_point: bytes | None = None,
        mocks: MockVerifiers | None = None,
    ) -> None:
        self.auth_type = auth_type
        self.auth_query = auth_query
        self.users = users or {}  # the auth_file's
        self._admin = admin
        self.tls_end_point = tls_end_point  # of the proxy's certificate (SCRAM-SHA-256-PLUS)
        self.mocks = mocks or MockVerifiers()
        self._secrets: dict[str, LoginSecret] = {}

    @classmethod
    def from_config(
        cls,
        config: Config,
        admin: Callable[[], AdminConnection | None],
        previous: AuthService | None = None,
    ) -> AuthService | None:
        """The service for `config` (None: passthrough). On a reload, `previous` is updated in
        place (the pools' openers hold it) and returned: its mock secret and cached secrets
        stay, but those of users an auth_file no longer lists are dropped. Raises ConfigError
        for an unreadable auth_file (nothing changed then)."""
        auth_type = AuthType(config.auth_type)
        if auth_type is AuthType.PASSTHROUGH:
            return None
        users = load_auth_file(config.auth_file) if config.auth_file else {}
        end_point = certificate_end_point(config.client_tls_cert_file)
        if previous is None:
            return cls(
                auth_type,
                auth_query=config.auth_query,
                users=users,
                admin=admin,
                tls_end_point=end_point,
            )
        previous.auth_type, previous.auth_query = auth_type, config.auth_query
        previous.users, previous.tls_end_point = users, end_point
        if auth_type is AuthType.AUTH_FILE:
            for user in [u for u in previous._secrets if u not in users]:
                previous.forget(user)
        return previous

    async def lookup(self, user: str) -> StoredCredential | Unknown:
        """The stored credential of `user`, or UNKNOWN. Raises LookupFailed."""
        if self.auth_type is AuthType.AUTH_FILE:
            return self.users.get(user, UNKNOWN)
        admin = self._admin()
        if admin is None:
            raise LookupFailed("the admin connection is unavailable")
        try:
            row = await admin.lookup_user(self.auth_query, user)
        except AdminUnavailable as exc:
            log.error("auth_query for user %s: %s", user, exc)
            raise LookupFailed("the admin connection is unavailable") from None
        except Exception as exc:  # psycopg.Error: a bad query, a missing function, no rights
            first = str(exc).strip().splitlines()[:1] or [type(exc).__name__]
            log.error("auth_query for user %s failed: %s", user, first[0])
            raise LookupFailed("auth_query failed") from None
        return credential_from_row(user, row)

    def secret(self, user: str) -> LoginSecret | None:
        """What logs in server connections for `user`: the last login's, else an auth_file
        md5 hash or password."""
        found = self._secrets.get(user)
        if found is None:
            stored = self.users.get(user)
            found = stored if isinstance(stored, (Md5Hash, Plain)) else None
        return found

    def remember(self, user: str, secret: LoginSecret) -> None:
        self._secrets[user] = secret

    def forget(self, user: str) -> None:
        self._secrets.pop(user, None)

    def opener(
        self,
        target: Callable[[], UpstreamTarget],
        database: str,
        user: str,
        parameters: Mapping[str, str] | None = None,
    ) -> ServerOpener:
        """The opener of the pool for (database, user): new server connections logged in with
        the user's cached secret (login.server_opener)."""
        return server_opener(target, self.secret, self.forget, database, user, parameters)


def certificate_end_point(cert_file: str | None) -> bytes | None:
    """The tls-server-end-point hash of the proxy's certificate (None: none, or unusable)."""
    if not cert_file:
        return None
    try:
        with open(cert_file, encoding="ascii") as file:
            pem = file.read()
        end = pem.index("-----END CERTIFICATE-----") + len("-----END CERTIFICATE-----")
        return tls_server_end_point(ssl.PEM_cert_to_DER_cert(pem[:end]))
    except (OSError, ValueError) as exc:
        log.warning("no SCRAM channel binding for clients: %s", exc)
        return None


class ClientLink(Protocol):
    """What a login needs of the client session."""

    @property
    def peer(self) -> str: ...
    async def read_frame(self, limit: int) -> tuple[int, bytes]: ...
    def deliver_raw(self, data: bytes) -> None: ...
    def refuse(self, error: bytes) -> None: ...
    def fail(self, code: str, message: str, **extra: str) -> None: ...


@dataclass(frozen=True, slots=True)
class Checked:
    """A client the proxy let in, and the secret that logs in its servers (None: none)."""

    user: str
    secret: LoginSecret | None


async def check(
    client: ClientLink, service: AuthService, user: str, *, tls: bool
) -> Checked | None:
    """Check the client (AuthenticationOk sent); None when it was refused (session closed)."""
    if service.auth_type is AuthType.TRUST:
        client.deliver_raw(Authentication(AuthCode.OK).encode())
        return Checked(user, service.secret(user))
    secret = await verify(client, service, user, tls=tls)
    return None if secret is None else Checked(user, secret)


def accepted(service: AuthService, checked: Checked) -> None:
    """The client's login is done: its secret logs in the pool's servers from now on."""
    if checked.secret is not None and service.auth_type is not AuthType.TRUST:
        service.remember(checked.user, checked.secret)  # (trust: from the cache or auth_file)


async def log_in_server(
    client: ClientLink,
    service: AuthService,
    target: UpstreamTarget,
    parameters: dict[str, str],
    checked: Checked,
) -> Login | None:
    """Log in the checked client's server connection; None when that failed (the client was
    told, the session is closed)."""
    user = checked.user
    database = parameters.get("database") or user
    try:
        login = await login_server(target, database, user, parameters, checked.secret)
    except LoginFailed as exc:
        service.forget(user)
        log.warning("session %s: cannot log in to PostgreSQL as %s: %s", client.peer, user, exc)
        client.fail(SqlState.SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION, str(exc))
        return None
    except ServerRefused as exc:
        if exc.code.startswith("28"):
            service.forget(user)
        client.refuse(exc.error)
        return None
    accepted(service, checked)
    return login


async def log_in(
    client: ClientLink,
    service: AuthService,
    target: UpstreamTarget,
    parameters: dict[str, str],
    *,
    tls: bool,
) -> Login | None:
    """Check the client, then log in its server connection; None when the client was refused
    (the session is then closed)."""
    checked = await check(client, service, parameters["user"], tls=tls)
    if checked is None:
        return None
    return await log_in_server(client, service, target, parameters, checked)


async def verify(
    client: ClientLink, service: AuthService, user: str, *, tls: bool
) -> LoginSecret | None:
    """The SCRAM or md5 exchange; the secret it recovered, or None (refused, session closed)."""
    try:
        credential = await service.lookup(user)
    except LookupFailed as exc:  # the details (admin host, SQL error) are in the log only
        client.fail(
            SqlState.CONNECTION_FAILURE,
            f'pgmigrate-proxy could not look up user "{user}": {exc}',
        )
        return None
    auth = ClientAuthenticator(
        user, credential, service.mocks, tls_end_point=service.tls_end_point if tls else None
    )
    first = auth.start()
    client.deliver_raw(first)
    sasl = Authentication.decode(first[5:]).code == AuthCode.SASL
    limit = MAX_SASL_MESSAGE if sasl else MAX_AUTH_TOKEN
    while True:
        try:
            mtype, payload = await client.read_frame(limit)
        except FramingError as exc:
            client.fail(SqlState.PROTOCOL_VIOLATION, str(exc))
            return None
        step = auth.receive(mtype, payload)
        if step.outcome is Outcome.REFUSED:
            log.info("session %s: login refused for user %s", client.peer, user)
            client.refuse(step.reply)
            return None
        client.deliver_raw(step.reply)
        if step.outcome is Outcome.ACCEPTED:
            return step.secret
