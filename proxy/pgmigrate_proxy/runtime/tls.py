"""TLS contexts: the proxy as a server to its clients, and as a libpq-like client to PostgreSQL."""

from __future__ import annotations

import ssl
from dataclasses import dataclass

#: sslmode values (libpq) and whether each sends an SSLRequest / needs TLS / checks what.
SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")


def client_side_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    """The context for TLS connections from clients to the proxy."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert_file, key_file)
    return ctx


@dataclass(frozen=True)
class UpstreamTLS:
    """How the proxy uses TLS towards PostgreSQL, from the upstream's libpq parameters."""

    sslmode: str = "prefer"
    rootcert: str | None = None
    cert: str | None = None
    key: str | None = None

    @property
    def request(self) -> bool:
        """Whether to send an SSLRequest ("allow" starts without TLS, as libpq first tries)."""
        return self.sslmode not in ("disable", "allow")

    @property
    def required(self) -> bool:
        """Whether a server that answers N to the SSLRequest must be refused."""
        return self.sslmode in ("require", "verify-ca", "verify-full")

    def context(self) -> ssl.SSLContext:
        """An SSLContext that checks what the sslmode asks for, as libpq does."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.sslmode in ("verify-ca", "verify-full"):
            if self.rootcert and self.rootcert != "system":
                ctx.load_verify_locations(self.rootcert)
            else:
                ctx.load_default_certs()
            ctx.check_hostname = self.sslmode == "verify-full"
            ctx.verify_mode = ssl.CERT_REQUIRED
        else:
            # libpq: with require (and a root cert file present) it verifies the CA; without
            # one it only encrypts. We follow the common reading: require = encrypt only.
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        if self.cert and self.key:
            ctx.load_cert_chain(self.cert, self.key)
        return ctx

    @classmethod
    def from_params(cls, params: dict[str, str]) -> UpstreamTLS:
        return cls(
            sslmode=params.get("sslmode", "prefer"),
            rootcert=params.get("sslrootcert"),
            cert=params.get("sslcert"),
            key=params.get("sslkey"),
        )
