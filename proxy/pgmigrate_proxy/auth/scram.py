"""SCRAM-SHA-256 as PostgreSQL does it (RFC 5802, RFC 7677): the key arithmetic, the stored
verifier, SASLprep, and the attribute syntax of the four SCRAM messages. Pure functions.

A verifier, as `pg_authid.rolpassword` stores it, is
`SCRAM-SHA-256$<iterations>:<salt b64>$<StoredKey b64>:<ServerKey b64>`, where
SaltedPassword = PBKDF2-HMAC-SHA-256(SASLprep(password), salt, iterations),
ClientKey = HMAC(SaltedPassword, "Client Key"), StoredKey = H(ClientKey),
ServerKey = HMAC(SaltedPassword, "Server Key"). A client proves it knows ClientKey:
ClientProof = ClientKey XOR HMAC(StoredKey, AuthMessage). The server, which holds StoredKey,
recovers ClientKey from the proof and checks H(ClientKey) == StoredKey; with that ClientKey
(and ServerKey) the proxy can log in to PostgreSQL as the same user without the password.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import stringprep
import unicodedata
from dataclasses import dataclass, field

MECHANISM = "SCRAM-SHA-256"
MECHANISM_PLUS = "SCRAM-SHA-256-PLUS"
#: The only channel binding type PostgreSQL supports (RFC 5929).
CHANNEL_BINDING_TYPE = "tls-server-end-point"
#: PostgreSQL's default scram_iterations (and pgbouncer's scram_iterations).
DEFAULT_ITERATIONS = 4096
#: Random bytes in a nonce and in a salt, as PostgreSQL makes them (SCRAM_RAW_NONCE_LEN,
#: SCRAM_DEFAULT_SALT_LEN).
RAW_NONCE_LEN = 18
SALT_LEN = 16
KEY_LEN = 32


class ScramError(ValueError):
    """A SCRAM message or verifier that does not follow the syntax."""


def h(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def hmac256(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha256).digest()


def xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b, strict=True))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: str) -> bytes:
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise ScramError("invalid base64") from exc


# --- SASLprep (RFC 4013), as pg_saslprep applies it ------------------------------------------

_PROHIBITED = (
    stringprep.in_table_c12, stringprep.in_table_c21, stringprep.in_table_c22,
    stringprep.in_table_c3, stringprep.in_table_c4, stringprep.in_table_c5,
    stringprep.in_table_c6, stringprep.in_table_c7, stringprep.in_table_c8,
    stringprep.in_table_c9, stringprep.in_table_a1,
)  # fmt: skip


def saslprep(password: str) -> bytes:
    """The password as SCRAM hashes it: SASLprep'd, or as given when SASLprep refuses it
    (PostgreSQL's rule, so that any password stays usable)."""
    raw = password.encode("utf-8")
    if password.isascii():
        return raw  # pg_saslprep's shortcut: pure ASCII passes unchanged
    mapped = "".join(
        " " if stringprep.in_table_c12(c) else c for c in password if not stringprep.in_table_b1(c)
    )
    text = unicodedata.normalize("NFKC", mapped)
    if not text or any(check(c) for c in text for check in _PROHIBITED):
        return raw
    if any(stringprep.in_table_d1(c) for c in text):
        if any(stringprep.in_table_d2(c) for c in text):
            return raw
        if not (stringprep.in_table_d1(text[0]) and stringprep.in_table_d1(text[-1])):
            return raw
    return text.encode("utf-8")


# --- keys and verifiers ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ScramKeys:
    """What logs in as a SCRAM user without the password: ClientKey and the verifier's rest.

    ServerKey lets the login check the server's signature; salt and iterations must match what
    the server sends (they do while the role's password is unchanged).
    """

    client_key: bytes = field(repr=False)
    server_key: bytes = field(repr=False)
    salt: bytes
    iterations: int


@dataclass(frozen=True, slots=True)
class ScramVerifier:
    """A parsed `SCRAM-SHA-256$...` verifier (pg_authid.rolpassword)."""

    iterations: int
    salt: bytes
    stored_key: bytes = field(repr=False)
    server_key: bytes = field(repr=False)

    @classmethod
    def parse(cls, text: str) -> ScramVerifier:
        """Raises ScramError unless text is a well-formed SCRAM-SHA-256 verifier."""
        scheme, _, rest = text.partition("$")
        params, _, keys = rest.partition("$")
        iterations, _, salt = params.partition(":")
        stored, _, server = keys.partition(":")
        if scheme != MECHANISM or not iterations.isdigit() or not salt or not server:
            raise ScramError("not a SCRAM-SHA-256 verifier")
        verifier = cls(int(iterations), unb64(salt), unb64(stored), unb64(server))
        if verifier.iterations < 1 or len(verifier.stored_key) != KEY_LEN:
            raise ScramError("not a SCRAM-SHA-256 verifier")
        if len(verifier.server_key) != KEY_LEN:
            raise ScramError("not a SCRAM-SHA-256 verifier")
        return verifier

    def text(self) -> str:
        """The verifier as pg_authid stores it."""
        return (
            f"{MECHANISM}${self.iterations}:{b64(self.salt)}"
            f"${b64(self.stored_key)}:{b64(self.server_key)}"
        )

    def keys(self, client_key: bytes) -> ScramKeys:
        return ScramKeys(client_key, self.server_key, self.salt, self.iterations)


def salted_password(password: str, salt: bytes, iterations: int) -> bytes:
    return hashlib.pbkdf2_hmac("sha256", saslprep(password), salt, iterations)


def client_key(salted: bytes) -> bytes:
    return hmac256(salted, b"Client Key")


def server_key(salted: bytes) -> bytes:
    return hmac256(salted, b"Server Key")


def make_verifier(
    password: str, salt: bytes, iterations: int = DEFAULT_ITERATIONS
) -> ScramVerifier:
    """The verifier PostgreSQL would store for this password, salt and iteration count."""
    salted = salted_password(password, salt, iterations)
    return ScramVerifier(iterations, salt, h(client_key(salted)), server_key(salted))


# --- message syntax ----------------------------------------------------------------------------


def attributes(message: str) -> list[tuple[str, str]]:
    """`a=value,b=value,...` as (name, value) pairs; every part must have the form."""
    pairs = []
    for part in message.split(","):
        if len(part) < 2 or part[1] != "=" or not part[0].isalpha():
            raise ScramError("malformed SCRAM message")
        pairs.append((part[0], part[2:]))
    return pairs


def valid_nonce(nonce: str) -> bool:
    """RFC 5802's printable: ASCII 0x21-0x7E without the comma."""
    return bool(nonce) and all(0x21 <= ord(c) <= 0x7E and c != "," for c in nonce)


@dataclass(frozen=True, slots=True)
class ClientFirst:
    """client-first-message: the GS2 header (channel binding flag, no authzid) and the bare part."""

    gs2_header: str  # "n,,", "y,," or "p=tls-server-end-point,,"
    cbind_flag: str  # "n", "y" or "p"
    cbind_type: str  # the type after "p=", else ""
    bare: str  # "n=<user>,r=<nonce>[,extensions]"
    nonce: str

    @classmethod
    def parse(cls, data: bytes) -> ClientFirst:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ScramError("malformed SCRAM message") from exc
        parts = text.split(",", 2)
        if len(parts) != 3:
            raise ScramError("malformed SCRAM message")
        flag, authzid, bare = parts
        if authzid:
            raise ScramError("client uses authorization identity, but it is not supported")
        cbind_type = ""
        if flag.startswith("p="):
            cbind_type, flag = flag[2:], "p"
        elif flag not in ("n", "y"):
            raise ScramError("malformed SCRAM message")
        attrs = attributes(bare)
        if len(attrs) < 2 or attrs[0][0] != "n" or attrs[1][0] != "r":
            raise ScramError("malformed SCRAM message")
        if not valid_nonce(attrs[1][1]):
            raise ScramError("malformed SCRAM message")
        return cls(f"{parts[0]},,", flag, cbind_type, bare, attrs[1][1])


@dataclass(frozen=True, slots=True)
class ClientFinal:
    """client-final-message: channel binding, nonce, proof, and the part the AuthMessage signs."""

    channel_binding: bytes
    nonce: str
    proof: bytes = field(repr=False)
    without_proof: str

    @classmethod
    def parse(cls, data: bytes) -> ClientFinal:
        try:
            text = data.decode("ascii")
        except UnicodeDecodeError as exc:
            raise ScramError("malformed SCRAM message") from exc
        without_proof, sep, proof = text.rpartition(",p=")
        if not sep:
            raise ScramError("malformed SCRAM message")
        attrs = attributes(without_proof)
        if len(attrs) < 2 or attrs[0][0] != "c" or attrs[1][0] != "r":
            raise ScramError("malformed SCRAM message")
        decoded = unb64(proof)
        if len(decoded) != KEY_LEN:
            raise ScramError("malformed SCRAM message")
        return cls(unb64(attrs[0][1]), attrs[1][1], decoded, without_proof)


def server_first(nonce: str, salt: bytes, iterations: int) -> str:
    return f"r={nonce},s={b64(salt)},i={iterations}"


def parse_server_first(data: bytes, client_nonce: str) -> tuple[str, bytes, int]:
    """(combined nonce, salt, iterations) of a server-first-message, checked against ours."""
    try:
        attrs = dict(attributes(data.decode("ascii")))
        nonce, salt, iterations = attrs["r"], unb64(attrs["s"]), int(attrs["i"])
    except (UnicodeDecodeError, KeyError, ValueError) as exc:
        raise ScramError("malformed SCRAM server-first-message") from exc
    if not nonce.startswith(client_nonce) or len(nonce) == len(client_nonce):
        raise ScramError("the server's SCRAM nonce does not extend the client's")
    if not valid_nonce(nonce) or iterations < 1 or not salt:
        raise ScramError("malformed SCRAM server-first-message")
    return nonce, salt, iterations
