"""The proxy's exception tree: the errors it raises on purpose, each with the SQLSTATE that a
client is sent when one ends its session."""

from __future__ import annotations

from typing import ClassVar

from pgmigrate_proxy.protocol.sqlstate import SqlState


class ProxyError(Exception):
    """Base of every error the proxy raises on purpose; `sqlstate` is what clients are sent."""

    sqlstate: ClassVar[SqlState] = SqlState.INTERNAL_ERROR


class ConnectionFailure(ProxyError):
    """A connection to PostgreSQL could not be opened or broke while in use."""

    sqlstate = SqlState.CONNECTION_FAILURE


class ProtocolViolation(ProxyError):
    """A peer sent bytes that break the wire protocol (malformed, oversized, out of place)."""

    sqlstate = SqlState.PROTOCOL_VIOLATION


class ServerBusy(ProxyError):
    """A server connection was to change hands while it still owed replies or was held."""


class ServerLost(ServerBusy):
    """The server connection was to change hands, but PostgreSQL had closed it (terminated,
    restarted): the client is told as a direct client would be, a connection failure."""

    sqlstate = SqlState.CONNECTION_FAILURE
