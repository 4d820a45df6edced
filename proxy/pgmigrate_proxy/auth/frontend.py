"""The server side of a client's login, sans-IO: SCRAM-SHA-256 (with -PLUS when given the TLS
certificate hash) or md5 against a stored credential, and the same SCRAM exchange against a
fake verifier for users the proxy does not know.

Use (the runtime, once it has the startup packet and looked the user up):

    auth = ClientAuthenticator(user, credential_or_UNKNOWN, mocks)
    send(auth.start())                          # AuthenticationSASL or AuthenticationMD5Password
    while True:
        mtype, payload = <next client frame>    # cap it at MAX_SASL_MESSAGE / MAX_AUTH_TOKEN
        step = auth.receive(mtype, payload)
        send(step.reply)
        if step.outcome is not Outcome.PENDING:
            break
    # ACCEPTED: step.reply ended with AuthenticationOk; step.secret logs in server connections
    #           (auth.backend.ServerLogin); go on with ParameterStatus/BackendKeyData/ReadyForQuery.
    # REFUSED: step.reply is a FATAL ErrorResponse; close the connection.

Which method: a SCRAM verifier or a clear-text password gets SCRAM (a verifier is derived once
from the password, with the user's stable mock salt); an md5 hash gets md5 when `allow_md5`,
else SCRAM against a fake verifier, which fails (PostgreSQL's rule under scram-sha-256);
UNKNOWN gets SCRAM against `mocks.verifier(user)`, which fails.

What is equalized between a wrong password and an unknown user (no enumeration): the messages
(the same AuthenticationSASL offer, a server-first-message with a salt that is stable for the
name and the same iteration count as real verifiers, then the same FATAL 28P01 text) and the
work after the client's proof (one HMAC, one SHA-256 and a constant-time comparison, run in
full for a fake verifier too); the fake verifier (three HMACs) is derived for every login,
real users' too. Measured in memory, both sides of a failed login: 230-275 us for a wrong
password and for an unknown user alike, run to run (timeit, best of 7 runs of 3000 exchanges).
Not equalized, and small next to a network round trip: the runtime's lookup (auth_query's
round trip is paid by both, returning a row or none). A user with a clear-text auth_file
password pays PBKDF2 once per process, at its first login. One thing tells: a user with an
md5 hash is asked for md5, so asking shows that such a user exists, as PostgreSQL shows it
under an md5 pg_hba line; `allow_md5=False` (SCRAM only) closes that too.
"""

from __future__ import annotations

import enum
import functools
import hmac
import secrets
from dataclasses import dataclass, field

from pgmigrate_proxy.auth import scram
from pgmigrate_proxy.auth.credentials import (
    LoginSecret,
    Md5Hash,
    MockVerifiers,
    Plain,
    StoredCredential,
    Unknown,
    auth_failed,
    md5_response,
)
from pgmigrate_proxy.auth.scram import ClientFinal, ClientFirst, ScramError, ScramVerifier
from pgmigrate_proxy.protocol.messages import (
    Authentication,
    DecodeError,
    SASLInitialResponse,
    fatal,
)
from pgmigrate_proxy.protocol.sqlstate import SqlState
from pgmigrate_proxy.protocol.types import AuthCode, FrontendType


class Outcome(enum.Enum):
    PENDING = "pending"  # send the reply, wait for the client's next message
    ACCEPTED = "accepted"  # the reply ends with AuthenticationOk
    REFUSED = "refused"  # the reply is a FATAL ErrorResponse: close


class _Await(enum.Enum):
    SASL_INITIAL = "SASLInitialResponse"
    SASL_FINAL = "SASLResponse"
    MD5_PASSWORD = "PasswordMessage"
    NOTHING = "nothing"


@dataclass(frozen=True, slots=True)
class AuthStep:
    """What to send the client, and where the login stands."""

    reply: bytes
    outcome: Outcome
    secret: LoginSecret | None = field(default=None, repr=False)  # ACCEPTED only


@functools.lru_cache(maxsize=1024)
def _plain_verifier(password: str, salt: bytes, iterations: int) -> ScramVerifier:
    return scram.make_verifier(password, salt, iterations)


def _violation(message: str, detail: str = "") -> AuthStep:
    extra = {"detail": detail} if detail else {}
    return AuthStep(fatal(SqlState.PROTOCOL_VIOLATION, message, **extra), Outcome.REFUSED)


class ClientAuthenticator:
    """One client's login against one stored credential (or UNKNOWN)."""

    def __init__(
        self,
        user: str,
        credential: StoredCredential | Unknown,
        mocks: MockVerifiers,
        *,
        allow_md5: bool = True,
        tls_end_point: bytes | None = None,
    ) -> None:
        """`tls_end_point`: the client link's tls-server-end-point hash (RFC 5929: the proxy's
        certificate hashed with its signature's hash, SHA-256 for MD5/SHA-1); given, the proxy
        offers SCRAM-SHA-256-PLUS too."""
        self.user = user
        self._tls_end_point = tls_end_point
        self._secret: LoginSecret | None = None
        self._doomed = False
        self._md5: Md5Hash | None = None
        self._verifier = mocks.verifier(user)
        if isinstance(credential, ScramVerifier):
            self._verifier, self._secret = credential, None
        elif isinstance(credential, Plain):
            salt = self._verifier.salt  # stable per name, like a stored verifier's
            self._verifier = _plain_verifier(credential.password, salt, mocks.iterations)
            self._secret = credential
        elif isinstance(credential, Md5Hash) and allow_md5:
            self._md5 = self._secret = credential
        else:
            self._doomed = True  # UNKNOWN, or an md5 hash where only SCRAM is allowed
        self._await = _Await.NOTHING
        self._first: ClientFirst | None = None
        self._server_first = ""
        self._salt = b""

    def start(self) -> bytes:
        """The first Authentication message to send the client."""
        if self._md5 is not None:
            self._salt = secrets.token_bytes(4)
            self._await = _Await.MD5_PASSWORD
            return Authentication(AuthCode.MD5_PASSWORD, self._salt).encode()
        self._await = _Await.SASL_INITIAL
        mechanisms = [scram.MECHANISM]
        if self._tls_end_point is not None:
            mechanisms.insert(0, scram.MECHANISM_PLUS)  # PostgreSQL lists it first
        return Authentication.sasl(mechanisms).encode()

    def receive(self, mtype: int, payload: bytes) -> AuthStep:
        """The client's next frame (type byte and payload)."""
        expected, self._await = self._await, _Await.NOTHING
        if expected is _Await.NOTHING:
            return _violation("unexpected authentication message")
        if mtype != FrontendType.PASSWORD_MESSAGE:
            what = "password" if expected is _Await.MD5_PASSWORD else "SASL"
            return _violation(f"expected {what} response, got message type {mtype}")
        try:
            if expected is _Await.MD5_PASSWORD:
                return self._md5_password(payload)
            if expected is _Await.SASL_INITIAL:
                return self._sasl_initial(payload)
            return self._sasl_final(payload)
        except (ScramError, DecodeError) as exc:
            return _violation(str(exc) if isinstance(exc, ScramError) else "malformed message")

    # --- md5 ---------------------------------------------------------------------------------

    def _md5_password(self, payload: bytes) -> AuthStep:
        if not payload.endswith(b"\0"):
            raise DecodeError("malformed PasswordMessage")
        assert self._md5 is not None
        expected = md5_response(self._md5, self._salt).encode("ascii")
        if hmac.compare_digest(payload[:-1], expected):
            return self._accepted(b"")
        return AuthStep(auth_failed(self.user), Outcome.REFUSED)

    # --- SCRAM -------------------------------------------------------------------------------

    def _sasl_initial(self, payload: bytes) -> AuthStep:
        initial = SASLInitialResponse.decode(payload)
        plus = initial.mechanism == scram.MECHANISM_PLUS and self._tls_end_point is not None
        if initial.mechanism != scram.MECHANISM and not plus:
            return _violation("client selected an invalid SASL authentication mechanism")
        first = ClientFirst.parse(initial.data)
        if problem := self._channel_binding_problem(first, plus):
            return _violation("SCRAM channel binding negotiation error", problem)
        nonce = first.nonce + scram.b64(secrets.token_bytes(scram.RAW_NONCE_LEN))
        v = self._verifier
        self._first = first
        self._server_first = scram.server_first(nonce, v.salt, v.iterations)
        self._await = _Await.SASL_FINAL
        data = self._server_first.encode("ascii")
        return AuthStep(Authentication(AuthCode.SASL_CONTINUE, data).encode(), Outcome.PENDING)

    def _channel_binding_problem(self, first: ClientFirst, plus: bool) -> str:
        if plus and first.cbind_flag != "p":
            return (
                "The client selected SCRAM-SHA-256-PLUS, but the SCRAM message does not "
                "include channel binding data."
            )
        if not plus and first.cbind_flag == "p":
            return (
                "The client selected SCRAM-SHA-256 without channel binding, but the SCRAM "
                "message includes channel binding data."
            )
        if plus and first.cbind_type != scram.CHANNEL_BINDING_TYPE:
            return f'Unsupported SCRAM channel-binding type "{first.cbind_type}".'
        if first.cbind_flag == "y" and self._tls_end_point is not None:
            return (
                "The client supports SCRAM channel binding but thinks the server does not. "
                "However, this server does support channel binding."
            )
        return ""

    def _sasl_final(self, payload: bytes) -> AuthStep:
        assert self._first is not None
        final = ClientFinal.parse(payload)
        binding = self._first.gs2_header.encode("ascii")
        if self._first.cbind_flag == "p":
            assert self._tls_end_point is not None
            binding += self._tls_end_point
        if not hmac.compare_digest(final.channel_binding, binding):
            return _violation("SCRAM channel binding check failed")
        if final.nonce != self._server_first[2:].split(",", 1)[0]:
            return _violation("malformed SCRAM message", "Unexpected SCRAM nonce.")
        auth_message = ",".join((self._first.bare, self._server_first, final.without_proof))
        v = self._verifier
        signature = scram.hmac256(v.stored_key, auth_message.encode("utf-8"))
        client_key = scram.xor(final.proof, signature)
        proven = hmac.compare_digest(scram.h(client_key), v.stored_key)
        if not proven or self._doomed:
            return AuthStep(auth_failed(self.user), Outcome.REFUSED)
        if self._secret is None:
            self._secret = v.keys(client_key)
        server_signature = scram.hmac256(v.server_key, auth_message.encode("utf-8"))
        final_data = ("v=" + scram.b64(server_signature)).encode("ascii")
        return self._accepted(Authentication(AuthCode.SASL_FINAL, final_data).encode())

    def _accepted(self, before_ok: bytes) -> AuthStep:
        assert self._secret is not None
        reply = before_ok + Authentication(AuthCode.OK).encode()
        return AuthStep(reply, Outcome.ACCEPTED, self._secret)
