"""Every closed set of the wire protocol as an enum: type bytes, codes, versions, statuses."""

from __future__ import annotations

import enum


class FrontendType(enum.IntEnum):
    """Type bytes of the messages a client sends after startup (PG docs, "Message Formats")."""

    BIND = ord("B")
    CLOSE = ord("C")
    COPY_DATA = ord("d")
    COPY_DONE = ord("c")
    COPY_FAIL = ord("f")
    DESCRIBE = ord("D")
    EXECUTE = ord("E")
    FLUSH = ord("H")
    FUNCTION_CALL = ord("F")
    PARSE = ord("P")
    PASSWORD_MESSAGE = ord("p")  # also SASLInitialResponse, SASLResponse, GSSResponse
    QUERY = ord("Q")
    SYNC = ord("S")
    TERMINATE = ord("X")


class BackendType(enum.IntEnum):
    """Type bytes of the messages a server sends."""

    AUTHENTICATION = ord("R")
    BACKEND_KEY_DATA = ord("K")
    BIND_COMPLETE = ord("2")
    CLOSE_COMPLETE = ord("3")
    COMMAND_COMPLETE = ord("C")
    COPY_DATA = ord("d")
    COPY_DONE = ord("c")
    COPY_IN_RESPONSE = ord("G")
    COPY_OUT_RESPONSE = ord("H")
    COPY_BOTH_RESPONSE = ord("W")
    DATA_ROW = ord("D")
    EMPTY_QUERY_RESPONSE = ord("I")
    ERROR_RESPONSE = ord("E")
    FUNCTION_CALL_RESPONSE = ord("V")
    NEGOTIATE_PROTOCOL_VERSION = ord("v")
    NO_DATA = ord("n")
    NOTICE_RESPONSE = ord("N")
    NOTIFICATION_RESPONSE = ord("A")
    PARAMETER_DESCRIPTION = ord("t")
    PARAMETER_STATUS = ord("S")
    PARSE_COMPLETE = ord("1")
    PORTAL_SUSPENDED = ord("s")
    READY_FOR_QUERY = ord("Z")
    ROW_DESCRIPTION = ord("T")


class AuthCode(enum.IntEnum):
    """The int32 that opens every Authentication* message."""

    OK = 0
    KERBEROS_V5 = 2
    CLEARTEXT_PASSWORD = 3
    MD5_PASSWORD = 5
    GSS = 7
    GSS_CONTINUE = 8
    SSPI = 9
    SASL = 10
    SASL_CONTINUE = 11
    SASL_FINAL = 12


class TransactionStatus(enum.IntEnum):
    """The status byte of ReadyForQuery."""

    IDLE = ord("I")
    IN_TRANSACTION = ord("T")
    FAILED = ord("E")


class RequestCode(enum.IntEnum):
    """The int32 in place of a protocol version that marks a special startup packet."""

    CANCEL_REQUEST = 80877102
    SSL_REQUEST = 80877103
    GSSENC_REQUEST = 80877104


PROTOCOL_3_0 = 3 << 16
PROTOCOL_3_2 = (3 << 16) | 2
SSL_ACCEPT = b"S"
SSL_REJECT = b"N"

#: PostgreSQL's own cap on the startup packet (MAX_STARTUP_PACKET_LENGTH).
MAX_STARTUP_PACKET = 10000
#: PostgreSQL's caps on what a client sends while it authenticates, as the length field counts
#: (pq_getmessage's maxlen): a password packet or GSS/SSPI token (PG_MAX_AUTH_TOKEN_LENGTH,
#: src/include/libpq/auth.h; also OAUTHBEARER's messages), and a SCRAM message
#: (PG_MAX_SASL_MESSAGE_LENGTH, src/include/libpq/sasl.h).
MAX_AUTH_TOKEN = 65535
MAX_SASL_MESSAGE = 1024

#: Parameter name of the ParameterStatus the proxy adds, so that clients can detect it.
PROXY_PARAMETER = "pgmigrate_proxy"

FRONTEND_TYPES = frozenset(int(t) for t in FrontendType)
BACKEND_TYPES = frozenset(int(t) for t in BackendType)
