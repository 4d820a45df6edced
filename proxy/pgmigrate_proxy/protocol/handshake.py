"""The authentication phase, sans-IO: what the proxy forwards, rewrites or refuses between the
startup packet and the first ReadyForQuery.

The proxy relays authentication and never needs the password. It rewrites three things:
- AuthenticationSASL loses SCRAM-SHA-256-PLUS: channel binding ties the proof to one TLS
  channel, and client-to-proxy and proxy-to-server are two different channels;
- BackendKeyData carries the proxy's own secret key (the process id stays the server's, so
  that `pg_backend_pid()` and the client's idea of its pid agree);
- the first ReadyForQuery is preceded by a ParameterStatus that identifies the proxy.

It also says how long a client message may be at each step (`max_client_message`), as
PostgreSQL caps them, so that nobody can make the proxy buffer a huge message before login.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from pgmigrate_proxy.protocol.framing import frame
from pgmigrate_proxy.protocol.messages import (
    Authentication,
    BackendKeyData,
    DecodeError,
    ParameterStatus,
    SASLInitialResponse,
)
from pgmigrate_proxy.protocol.types import (
    MAX_AUTH_TOKEN,
    MAX_SASL_MESSAGE,
    AuthCode,
    BackendType,
    FrontendType,
)

SCRAM_PLUS = "SCRAM-SHA-256-PLUS"


class HandshakeOutcome(enum.Enum):
    """Where the authentication phase stands."""

    AUTHENTICATING = "authenticating"
    READY = "ready"  # the first ReadyForQuery went to the client
    FAILED = "failed"  # the server sent an ErrorResponse: it closes the connection


class ChannelBindingMismatch(Exception):
    """The client insists on channel binding that cannot span the proxy's two TLS links."""


@dataclass
class Handshake:
    """Fed each frame of the authentication phase; returns the bytes to pass on."""

    secret_key: bytes
    announce: tuple[ParameterStatus, ...] = ()
    server_tls: bool = False
    outcome: HandshakeOutcome = HandshakeOutcome.AUTHENTICATING
    server_key: BackendKeyData | None = None
    #: The process id the client is told (a pooled server it gets instead of the login's).
    announced_pid: int | None = None
    server_parameters: dict[str, str] = field(default_factory=dict)
    #: The longest client message PostgreSQL accepts now (None: authenticated, no such cap).
    max_client_message: int | None = MAX_AUTH_TOKEN
    _sasl_started: bool = False
    _expect_initial_response: bool = False

    def backend(self, mtype: int, payload: bytes) -> bytes:
        """A frame from the server: the bytes to send the client instead."""
        if mtype == BackendType.AUTHENTICATION:
            return self._authentication(payload)
        if mtype == BackendType.BACKEND_KEY_DATA:
            self.server_key = BackendKeyData.decode(payload)
            return b""  # sent with ReadyForQuery, when the client's server is known
        if mtype == BackendType.PARAMETER_STATUS:
            status = ParameterStatus.decode(payload)
            self.server_parameters[status.name] = status.value
        elif mtype == BackendType.READY_FOR_QUERY:
            self.outcome = HandshakeOutcome.READY
            key = b""
            if self.server_key is not None:
                pid = self.announced_pid or self.server_key.process_id
                key = BackendKeyData(pid, self.secret_key).encode()
            return key + b"".join(p.encode() for p in self.announce) + frame(mtype, payload)
        elif mtype == BackendType.ERROR_RESPONSE:
            self.outcome = HandshakeOutcome.FAILED
        return frame(mtype, payload)

    def frontend(self, mtype: int, payload: bytes) -> bytes:
        """A frame from the client: the bytes to send the server. Raises ChannelBindingMismatch."""
        if mtype == FrontendType.PASSWORD_MESSAGE and self._expect_initial_response:
            self._expect_initial_response = False
            self._check_channel_binding(payload)
        return frame(mtype, payload)

    def _authentication(self, payload: bytes) -> bytes:
        auth = Authentication.decode(payload)
        if auth.code == AuthCode.OK:
            self.max_client_message = None
        elif auth.code == AuthCode.SASL:
            self._expect_initial_response = True
            offered = [m for m in auth.mechanisms if m != SCRAM_PLUS]
            scram = all(m.startswith("SCRAM-") for m in offered)
            self.max_client_message = MAX_SASL_MESSAGE if scram else MAX_AUTH_TOKEN
            return Authentication.sasl(offered).encode()
        return auth.encode()

    def _check_channel_binding(self, payload: bytes) -> None:
        try:
            initial = SASLInitialResponse.decode(payload)
        except DecodeError:
            return  # the server will reject it in its own words
        # gs2 flag "y": the client could bind but believes the server cannot. PostgreSQL
        # rejects that when its own link is TLS; say why instead of its generic error.
        if self.server_tls and initial.data.startswith(b"y,"):
            raise ChannelBindingMismatch(
                "SCRAM channel binding cannot span the proxy: the client's TLS link ends at the "
                "proxy and the proxy's link to PostgreSQL is another TLS channel"
            )
