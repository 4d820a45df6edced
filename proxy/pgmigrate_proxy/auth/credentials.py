"""What the proxy knows of a user's password: the stored credential it checks clients against,
the secret it logs in to PostgreSQL with, the fake verifier of users it does not know, and
the one error every failed login gets.

Stored credentials come from `pg_authid.rolpassword` (through auth_query) or an auth_file line:
a SCRAM verifier, an md5 hash (`md5` + 32 hex digits) or, in an auth_file only, the password
in clear text. `UNKNOWN` stands for "no usable credential": no such role, a role that cannot
log in, has no password or whose `VALID UNTIL` has passed. A client that logs in as an
UNKNOWN user goes through a SCRAM exchange against a fake verifier (`MockVerifiers`) and gets
exactly the error of a wrong password (`auth_failed`), as PostgreSQL does.
"""

from __future__ import annotations

import enum
import hashlib
import secrets
from dataclasses import dataclass, field

from pgmigrate_proxy.auth.scram import (
    DEFAULT_ITERATIONS,
    SALT_LEN,
    ScramError,
    ScramKeys,
    ScramVerifier,
    hmac256,
)
from pgmigrate_proxy.protocol.messages import fatal
from pgmigrate_proxy.protocol.sqlstate import SqlState

MD5_PREFIX = "md5"
MD5_LEN = 35  # "md5" + 32 hex digits


class Unknown(enum.Enum):
    """The marker of a user without a usable credential (one value: UNKNOWN)."""

    UNKNOWN = "unknown"


UNKNOWN = Unknown.UNKNOWN


@dataclass(frozen=True, slots=True)
class Md5Hash:
    """A stored md5 hash: `md5` + md5hex(password + user). Also logs in (md5 method only)."""

    text: str = field(repr=False)

    @property
    def hex(self) -> str:
        return self.text[len(MD5_PREFIX) :]


@dataclass(frozen=True, slots=True)
class Plain:
    """A password in clear text (an auth_file line that is neither a hash nor a verifier)."""

    password: str = field(repr=False)


#: What a client is checked against.
StoredCredential = ScramVerifier | Md5Hash | Plain
#: What a new server connection logs in with, once the client proved who it is.
LoginSecret = ScramKeys | Md5Hash | Plain


def is_md5_hash(text: str) -> bool:
    return (
        len(text) == MD5_LEN
        and text.startswith(MD5_PREFIX)
        and all(c in "0123456789abcdef" for c in text[3:])
    )


def parse_stored(text: str) -> StoredCredential:
    """An auth_file password field or a rolpassword: verifier, md5 hash, else clear text.

    A value that starts like a SCRAM verifier but does not parse is an error (ScramError), not
    a password that happens to begin with `SCRAM-SHA-256$`: pgbouncer reads it the same way.
    """
    if text.startswith("SCRAM-SHA-256$"):
        return ScramVerifier.parse(text)
    if is_md5_hash(text):
        return Md5Hash(text)
    return Plain(text)


def md5_hash(password: str, user: str) -> Md5Hash:
    """The md5 hash PostgreSQL stores for this password (password_encryption = md5)."""
    digest = hashlib.md5((password + user).encode("utf-8")).hexdigest()
    return Md5Hash(MD5_PREFIX + digest)


def md5_response(stored: Md5Hash, salt: bytes) -> str:
    """The PasswordMessage text of the md5 method: `md5` + md5hex(stored hex + salt).

    Both sides compute it from the stored hash, so the hash alone logs in (md5's known flaw,
    and what lets the proxy log in md5 users without their password)."""
    return MD5_PREFIX + hashlib.md5(stored.hex.encode("ascii") + salt).hexdigest()


def auth_failed(user: str) -> bytes:
    """The FATAL frame of every failed password login, worded as PostgreSQL words it."""
    return fatal(SqlState.INVALID_PASSWORD, f'password authentication failed for user "{user}"')


@dataclass(frozen=True)
class MockVerifiers:
    """Fake SCRAM verifiers for users without a credential, stable for a given name.

    The salt and keys are HMACs of the name under a per-process random secret: one name always
    gets the same salt (a client that asks twice cannot tell a real user from a fake one by a
    changing salt), different names get unrelated ones, and no one can compute them without the
    secret. The iteration count is the one real verifiers have (4096 unless configured).
    PostgreSQL's scram_mock_salt() works the same way with its mock_auth_nonce.
    """

    iterations: int = DEFAULT_ITERATIONS
    secret: bytes = field(default_factory=lambda: secrets.token_bytes(32), repr=False)

    def verifier(self, user: str) -> ScramVerifier:
        name = user.encode("utf-8")
        salt = hmac256(self.secret, b"salt\0" + name)[:SALT_LEN]
        stored = hmac256(self.secret, b"stored\0" + name)
        server = hmac256(self.secret, b"server\0" + name)
        return ScramVerifier(self.iterations, salt, stored, server)


__all__ = [
    "MD5_PREFIX",
    "UNKNOWN",
    "LoginSecret",
    "Md5Hash",
    "MockVerifiers",
    "Plain",
    "ScramError",
    "ScramKeys",
    "ScramVerifier",
    "StoredCredential",
    "Unknown",
    "auth_failed",
    "is_md5_hash",
    "md5_hash",
    "md5_response",
    "parse_stored",
]
