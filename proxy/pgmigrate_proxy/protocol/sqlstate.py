"""The SQLSTATE codes the proxy sends or reads, named as PostgreSQL's errcodes.txt names them."""

from __future__ import annotations

import enum


class SqlState(str, enum.Enum):
    """A SQLSTATE (PostgreSQL docs, Appendix A); the value is the five-character code."""

    SUCCESSFUL_COMPLETION = "00000"
    WARNING = "01000"
    SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION = "08001"
    CONNECTION_FAILURE = "08006"
    PROTOCOL_VIOLATION = "08P01"
    INVALID_PARAMETER_VALUE = "22023"
    NO_ACTIVE_SQL_TRANSACTION = "25P01"
    IN_FAILED_SQL_TRANSACTION = "25P02"
    FEATURE_NOT_SUPPORTED = "0A000"
    INVALID_AUTHORIZATION_SPECIFICATION = "28000"
    INVALID_PASSWORD = "28P01"
    INVALID_SAVEPOINT_SPECIFICATION = "3B001"
    DEADLOCK_DETECTED = "40P01"
    INSUFFICIENT_PRIVILEGE = "42501"
    TOO_MANY_CONNECTIONS = "53300"
    PROGRAM_LIMIT_EXCEEDED = "54000"
    LOCK_NOT_AVAILABLE = "55P03"
    QUERY_CANCELED = "57014"
    ADMIN_SHUTDOWN = "57P01"
    INTERNAL_ERROR = "XX000"

    def __str__(self) -> str:
        return self.value
