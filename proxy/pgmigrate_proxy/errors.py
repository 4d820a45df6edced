"""The proxy's exception tree: every error the proxy raises, each with the SQLSTATE it maps to."""

from __future__ import annotations


class ProxyError(Exception):
    """Base of every error the proxy raises on purpose; ``sqlstate`` is what clients are sent."""

    sqlstate: str = "XX000"


class ProtocolViolation(ProxyError):
    """A peer sent bytes that break the PostgreSQL wire protocol (malformed or oversized)."""

    sqlstate = "08P01"


class ConnectionFailure(ProxyError):
    """A connection to a client or to the server broke while in use."""

    sqlstate = "08006"


class StartupTimeout(ProxyError):
    """A client did not finish startup and authentication within ``startup_timeout``."""

    sqlstate = "08006"


class UpstreamUnavailable(ProxyError):
    """The upstream PostgreSQL server could not be reached or refused the connection."""

    sqlstate = "08001"


class TooManyConnections(ProxyError):
    """The proxy refused a client because a connection limit was reached."""

    sqlstate = "53300"
