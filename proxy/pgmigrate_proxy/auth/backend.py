"""The client side of the proxy's own login to PostgreSQL, sans-IO: SCRAM-SHA-256 with a
recovered ClientKey (or a password), md5 with the stored hash (or a password), and clear text
with a password; the server's SCRAM signature is checked.

Use (the runtime, after sending the StartupMessage of a new server connection):

    login = ServerLogin(user, secret)          # secret: what ClientAuthenticator accepted
    for each Authentication message (type R) from the server:
        send(login.receive(Authentication.decode(payload)))   # b"" when nothing is due
        if login.done: break                                  # AuthenticationOk came
    # then ParameterStatus... BackendKeyData, ReadyForQuery as usual; an ErrorResponse from
    # the server ends the login as it would any other.

`receive` raises LoginFailed when the server asks for what the secret cannot answer (md5 or a
clear-text password with SCRAM keys; SCRAM with an md5 hash), when the server's salt or
iteration count differ from the keys' (the role's password changed since they were
recovered), or when the server's signature is wrong (it does not know the verifier).
`channel_binding`: the server link's tls-server-end-point hash, to use SCRAM-SHA-256-PLUS when
the server offers it; None, the login uses flag "n" over plain TCP, "y" over TLS.
"""

from __future__ import annotations

import hmac
import secrets

from pgmigrate_proxy.auth import scram
from pgmigrate_proxy.auth.credentials import LoginSecret, Md5Hash, Plain, md5_hash, md5_response
from pgmigrate_proxy.auth.scram import ScramError, ScramKeys
from pgmigrate_proxy.errors import ProxyError
from pgmigrate_proxy.protocol import schema
from pgmigrate_proxy.protocol.framing import frame
from pgmigrate_proxy.protocol.messages import Authentication
from pgmigrate_proxy.protocol.sqlstate import SqlState
from pgmigrate_proxy.protocol.types import AuthCode, FrontendType


class LoginFailed(ProxyError):
    """The proxy cannot complete its login to PostgreSQL with the secret it holds."""

    sqlstate = SqlState.SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION


def _password_message(text: str) -> bytes:
    return frame(FrontendType.PASSWORD_MESSAGE, text.encode("utf-8") + b"\0")


class ServerLogin:
    """Answers one server's Authentication requests for `user` with `secret`."""

    def __init__(
        self,
        user: str,
        secret: LoginSecret,
        *,
        tls: bool = False,
        channel_binding: bytes | None = None,
    ) -> None:
        self.user = user
        self.done = False
        self._secret = secret
        self._tls = tls
        self._channel_binding = channel_binding
        self.mechanism = ""  # the SASL mechanism chosen, once the server offered some
        self._gs2 = ""
        self._nonce = ""
        self._bare = ""
        self._expected_signature = b""
        self._verified = False

    def receive(self, auth: Authentication) -> bytes:
        """The bytes to send for this Authentication message (b"" for none)."""
        code = auth.code
        if code == AuthCode.OK:
            if self._nonce and not self._verified:
                raise LoginFailed("the server skipped SCRAM's final message")
            self.done = True
            return b""
        if code == AuthCode.SASL:
            return self._sasl_initial(auth.mechanisms)
        if code == AuthCode.SASL_CONTINUE:
            return self._sasl_continue(auth.data)
        if code == AuthCode.SASL_FINAL:
            return self._sasl_final(auth.data)
        if code == AuthCode.MD5_PASSWORD:
            return _password_message(md5_response(self._md5(), auth.data))
        if code == AuthCode.CLEARTEXT_PASSWORD and isinstance(self._secret, Plain):
            return _password_message(self._secret.password)
        raise LoginFailed(
            f"the server asks for authentication method {code}, which the "
            "proxy cannot answer with the credential it holds for this user"
        )

    def _md5(self) -> Md5Hash:
        if isinstance(self._secret, Md5Hash):
            return self._secret
        if isinstance(self._secret, Plain):
            return md5_hash(self._secret.password, self.user)
        raise LoginFailed(
            "the server asks for md5, and the proxy holds SCRAM keys for this "
            "user (its password is stored as SCRAM in one place, md5 in another)"
        )

    def _sasl_initial(self, mechanisms: list[str]) -> bytes:
        if isinstance(self._secret, Md5Hash):
            raise LoginFailed("the server asks for SCRAM, and the proxy holds an md5 hash")
        plus = scram.MECHANISM_PLUS in mechanisms and self._channel_binding is not None
        if not plus and scram.MECHANISM not in mechanisms:
            raise LoginFailed(f"the server offers no SASL mechanism the proxy speaks: {mechanisms}")
        if plus:
            mechanism, self._gs2 = scram.MECHANISM_PLUS, f"p={scram.CHANNEL_BINDING_TYPE},,"
        else:
            mechanism = scram.MECHANISM
            # "y": we could bind, but the server offered no PLUS (libpq's rule over TLS)
            self._gs2 = "y,," if self._tls and self._channel_binding is not None else "n,,"
        self.mechanism = mechanism
        self._nonce = scram.b64(secrets.token_bytes(scram.RAW_NONCE_LEN))
        self._bare = f"n=,r={self._nonce}"
        first = (self._gs2 + self._bare).encode("ascii")
        return schema.build("SASLInitialResponse", mechanism=mechanism, data=first)

    def _keys(self, salt: bytes, iterations: int) -> ScramKeys:
        if isinstance(self._secret, ScramKeys):
            if (salt, iterations) != (self._secret.salt, self._secret.iterations):
                raise LoginFailed(
                    "the server's SCRAM salt or iteration count differ from the "
                    "recovered keys': the role's password has changed"
                )
            return self._secret
        assert isinstance(self._secret, Plain)
        salted = scram.salted_password(self._secret.password, salt, iterations)
        return ScramKeys(scram.client_key(salted), scram.server_key(salted), salt, iterations)

    def _sasl_continue(self, data: bytes) -> bytes:
        if not self._nonce or self._expected_signature:
            raise LoginFailed("unexpected AuthenticationSASLContinue")
        try:
            nonce, salt, iterations = scram.parse_server_first(data, self._nonce)
        except ScramError as exc:
            raise LoginFailed(str(exc)) from exc
        keys = self._keys(salt, iterations)
        binding = self._gs2.encode("ascii")
        if self._gs2.startswith("p="):
            assert self._channel_binding is not None
            binding += self._channel_binding
        without_proof = f"c={scram.b64(binding)},r={nonce}"
        auth_message = f"{self._bare},{data.decode('ascii')},{without_proof}".encode()
        stored_key = scram.h(keys.client_key)
        proof = scram.xor(keys.client_key, scram.hmac256(stored_key, auth_message))
        self._expected_signature = scram.hmac256(keys.server_key, auth_message)
        final = f"{without_proof},p={scram.b64(proof)}".encode("ascii")
        return frame(FrontendType.PASSWORD_MESSAGE, final)

    def _sasl_final(self, data: bytes) -> bytes:
        if not self._expected_signature or self._verified:
            raise LoginFailed("unexpected AuthenticationSASLFinal")
        text = data.decode("ascii", "replace")
        try:
            signature = scram.unb64(text[2:]) if text.startswith("v=") else b""
        except ScramError:
            signature = b""
        self._verified = hmac.compare_digest(signature, self._expected_signature)
        if not self._verified:
            raise LoginFailed(
                "the server's SCRAM signature is wrong: it does not hold the "
                "verifier the proxy checked the client against"
            )
        return b""
