"""One frozen dataclass per message the proxy decodes or builds, named as in the PostgreSQL docs.

Each message has `encode()` (to a complete frame or packet) and, where the proxy reads it,
a `decode(payload)` classmethod. Pure functions of bytes: no I/O.

The codec is schema.py's construct layouts for the messages that pass a few times per
statement or per connection: ErrorResponse / NoticeResponse (decoded once per guarded
statement, built for each notice), NegotiateProtocolVersion, CancelRequest, SSLRequest,
GSSENCRequest, SASLInitialResponse and AuthenticationSASL. Struct stays where construct costs
measurable time (parsing with construct takes 50-300 us a message here, struct 5-10 us):
ReadyForQuery and Query (per statement in the relay and the migration runner), and the
messages of every login, which a pooler in transaction mode pays for each client:
StartupMessage (300 us decoded, 150 us built), ParameterStatus (about 14 a login, 58 us
each), BackendKeyData and the Authentication header (`.venv/bin/python -m timeit` figures of
2026-12, on this project's 2-core machine). tests/protocol/test_messages.py holds those to the
layouts byte for byte.
"""

from __future__ import annotations

import struct
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from construct import ConstructError

from pgmigrate_proxy.errors import ProtocolViolation
from pgmigrate_proxy.protocol import schema
from pgmigrate_proxy.protocol.framing import INT32, frame
from pgmigrate_proxy.protocol.types import (
    MAX_STARTUP_PACKET,
    PROTOCOL_3_0,
    AuthCode,
    BackendType,
    FrontendType,
    RequestCode,
    TransactionStatus,
)

_INT32_PAIR = struct.Struct("!II")
_STATUSES = frozenset(int(s) for s in TransactionStatus)


class DecodeError(ProtocolViolation, ValueError):
    """A payload that does not match its message layout."""


def _cstrings(data: bytes) -> list[bytes]:
    """Split NUL-terminated strings; the data must end with a NUL."""
    if not data.endswith(b"\0"):
        raise DecodeError("missing string terminator")
    return data[:-1].split(b"\0")


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "replace")


def _parse_payload(name: str, payload: bytes) -> Any:
    """schema.parse_payload, its errors as DecodeError."""
    try:
        return schema.parse_payload(name, payload)
    except (ConstructError, ValueError) as exc:
        raise DecodeError(f"malformed {name}") from exc


def _parse_packet(name: str, packet: bytes) -> Any:
    try:
        return schema.parse(name, packet)
    except (ConstructError, ValueError) as exc:
        raise DecodeError(f"malformed {name}") from exc


# --- startup packets (no type byte) -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StartupMessage:
    """StartupMessage: a protocol version and name/value parameters (user, database, ...)."""

    protocol: int
    parameters: Mapping[str, str] = field(default_factory=dict)

    def encode(self) -> bytes:
        body = b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in self.parameters.items())
        body = INT32.pack(self.protocol) + body + b"\0"
        return INT32.pack(len(body) + 4) + body

    @classmethod
    def decode(cls, packet: bytes) -> StartupMessage:
        if len(packet) < 8:
            raise DecodeError("startup packet too short")
        protocol = INT32.unpack_from(packet, 4)[0]
        rest = packet[8:]
        if not rest.endswith(b"\0"):
            raise DecodeError("startup packet does not end with a terminator")
        strings = _cstrings(rest[:-1]) if len(rest) > 1 else []
        if len(strings) % 2:
            raise DecodeError("startup packet has a parameter name without a value")
        params: dict[str, str] = {}
        for name, value in zip(strings[::2], strings[1::2], strict=True):
            if not name:
                raise DecodeError("startup packet has an empty parameter name")
            params[_text(name)] = _text(value)
        return cls(protocol, params)


@dataclass(frozen=True, slots=True)
class SSLRequest:
    """SSLRequest: the client asks to switch to TLS; the answer is one byte, S or N."""

    def encode(self) -> bytes:
        return schema.build("SSLRequest")


@dataclass(frozen=True, slots=True)
class GSSENCRequest:
    """GSSENCRequest: the client asks for GSSAPI encryption; the proxy always answers N."""

    def encode(self) -> bytes:
        return schema.build("GSSENCRequest")


@dataclass(frozen=True, slots=True)
class CancelRequest:
    """CancelRequest: sent on a new connection to cancel the query of (process_id, secret_key)."""

    process_id: int
    secret_key: bytes

    def encode(self) -> bytes:
        return schema.build("CancelRequest", process_id=self.process_id, secret_key=self.secret_key)

    @classmethod
    def decode(cls, packet: bytes) -> CancelRequest:
        parsed = _parse_packet("CancelRequest", packet)
        return cls(parsed.process_id, parsed.secret_key)


StartupPacket = StartupMessage | SSLRequest | GSSENCRequest | CancelRequest


def startup_packet_length(data: bytes | bytearray) -> int | None:
    """The declared length of the startup packet at the start of data (None: need more bytes)."""
    if len(data) < 4:
        return None
    length: int = INT32.unpack_from(data, 0)[0]
    if length < 8 or length > MAX_STARTUP_PACKET:
        raise DecodeError(f"invalid startup packet length {length}")
    return length


def decode_startup_packet(packet: bytes) -> StartupPacket:
    """Decode one complete startup packet (its length already checked)."""
    if len(packet) < 8:
        raise DecodeError("startup packet too short")
    code = INT32.unpack_from(packet, 4)[0]
    if code == RequestCode.SSL_REQUEST and len(packet) == 8:
        return SSLRequest()
    if code == RequestCode.GSSENC_REQUEST and len(packet) == 8:
        return GSSENCRequest()
    if code == RequestCode.CANCEL_REQUEST:
        return CancelRequest.decode(packet)
    if code >> 16 != 3:
        raise DecodeError(f"unsupported frontend protocol {code >> 16}.{code & 0xFFFF}")
    return StartupMessage.decode(packet)


# --- messages with a type byte ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Authentication:
    """Authentication*: the int32 code and what follows it (salt, SASL data, mechanisms)."""

    code: int
    data: bytes = b""

    @classmethod
    def decode(cls, payload: bytes) -> Authentication:
        if len(payload) < 4:
            raise DecodeError("authentication message too short")
        return cls(INT32.unpack_from(payload, 0)[0], payload[4:])

    def encode(self) -> bytes:
        return frame(BackendType.AUTHENTICATION, INT32.pack(self.code) + self.data)

    @property
    def mechanisms(self) -> list[str]:
        """For AuthenticationSASL: the offered SASL mechanisms, in order."""
        if self.code != AuthCode.SASL:
            return []
        payload = INT32.pack(self.code) + self.data
        return list(_parse_payload("AuthenticationSASL", payload).mechanisms)

    @classmethod
    def sasl(cls, mechanisms: list[str]) -> Authentication:
        payload = schema.build_payload("AuthenticationSASL", mechanisms=mechanisms)
        return cls(AuthCode.SASL, payload[4:])


@dataclass(frozen=True, slots=True)
class SASLInitialResponse:
    """SASLInitialResponse: the chosen mechanism and the client-first-message."""

    mechanism: str
    data: bytes

    @classmethod
    def decode(cls, payload: bytes) -> SASLInitialResponse:
        parsed = _parse_payload("SASLInitialResponse", payload)
        return cls(parsed.mechanism, parsed.data or b"")


@dataclass(frozen=True, slots=True)
class BackendKeyData:
    """BackendKeyData: the process id and secret key that a CancelRequest must present."""

    process_id: int
    secret_key: bytes

    @classmethod
    def decode(cls, payload: bytes) -> BackendKeyData:
        if len(payload) < 8:
            raise DecodeError("BackendKeyData too short")
        return cls(INT32.unpack_from(payload, 0)[0], payload[4:])

    def encode(self) -> bytes:
        return frame(BackendType.BACKEND_KEY_DATA, INT32.pack(self.process_id) + self.secret_key)


@dataclass(frozen=True, slots=True)
class ParameterStatus:
    """ParameterStatus: the server reports a run-time parameter's current value."""

    name: str
    value: str

    @classmethod
    def decode(cls, payload: bytes) -> ParameterStatus:
        parts = _cstrings(payload)
        if len(parts) != 2:
            raise DecodeError("malformed ParameterStatus")
        # interned: every session keeps what its login was told, mostly the same few strings
        return cls(sys.intern(_text(parts[0])), sys.intern(_text(parts[1])))

    def encode(self) -> bytes:
        payload = self.name.encode() + b"\0" + self.value.encode() + b"\0"
        return frame(BackendType.PARAMETER_STATUS, payload)


@dataclass(frozen=True, slots=True)
class ReadyForQuery:
    """ReadyForQuery: the server is idle; the byte is the transaction status."""

    status: TransactionStatus

    @classmethod
    def decode(cls, payload: bytes) -> ReadyForQuery:
        if len(payload) != 1 or payload[0] not in _STATUSES:
            raise DecodeError("malformed ReadyForQuery")
        return cls(TransactionStatus(payload[0]))

    def encode(self) -> bytes:
        return frame(BackendType.READY_FOR_QUERY, bytes([self.status]))


@dataclass(frozen=True, slots=True)
class NegotiateProtocolVersion:
    """NegotiateProtocolVersion: the newest minor version supported and the unknown options."""

    newest_minor: int
    unrecognized: tuple[str, ...] = ()

    def encode(self) -> bytes:
        return schema.build(
            "NegotiateProtocolVersion",
            newest_minor=self.newest_minor,
            unrecognized=list(self.unrecognized),
        )

    @classmethod
    def decode(cls, payload: bytes) -> NegotiateProtocolVersion:
        parsed = _parse_payload("NegotiateProtocolVersion", payload)
        return cls(parsed.newest_minor, tuple(parsed.unrecognized))


#: ErrorResponse / NoticeResponse field codes (PG docs, "Error and Notice Message Fields").
FIELD_NAMES = {
    "S": "severity_localized", "V": "severity", "C": "code", "M": "message", "D": "detail",
    "H": "hint", "P": "position", "p": "internal_position", "q": "internal_query",
    "W": "where", "s": "schema_name", "t": "table_name", "c": "column_name",
    "d": "data_type_name", "n": "constraint_name", "F": "file", "L": "line", "R": "routine",
}  # fmt: skip
_LETTERS = {name: letter for letter, name in FIELD_NAMES.items()}


@dataclass(frozen=True, slots=True)
class ErrorResponse:
    """ErrorResponse (or, with notice=True, NoticeResponse): fields keyed by their code letter."""

    fields: Mapping[str, str]
    notice: bool = False

    @classmethod
    def decode(cls, payload: bytes, notice: bool = False) -> ErrorResponse:
        name = "NoticeResponse" if notice else "ErrorResponse"
        return cls(dict(_parse_payload(name, payload).fields), notice)

    @classmethod
    def build(
        cls,
        severity: str,
        code: str,
        message: str,
        *,
        notice: bool = False,
        extra: Mapping[str, str] | None = None,
    ) -> ErrorResponse:
        """Build from S/V, C, M and further fields by name (FIELD_NAMES values: hint, ...)."""
        fields = {"S": severity, "V": severity, "C": code, "M": message}
        for name, value in (extra or {}).items():
            fields[_LETTERS[name]] = value
        return cls(fields, notice)

    @property
    def code(self) -> str:
        return self.fields.get("C", "")

    @property
    def message(self) -> str:
        return self.fields.get("M", "")

    @property
    def severity(self) -> str:
        return self.fields.get("V", self.fields.get("S", ""))

    def encode(self) -> bytes:
        name = "NoticeResponse" if self.notice else "ErrorResponse"
        return schema.build(name, fields=dict(self.fields))


@dataclass(frozen=True, slots=True)
class Query:
    """Query: one simple-protocol query string (possibly several statements)."""

    sql: str

    @classmethod
    def decode(cls, payload: bytes) -> Query:
        if not payload.endswith(b"\0"):
            raise DecodeError("query string not terminated")
        return cls(_text(payload[:-1]))

    def encode(self) -> bytes:
        return frame(FrontendType.QUERY, self.sql.encode() + b"\0")


def terminate() -> bytes:
    """The Terminate frame."""
    return frame(FrontendType.TERMINATE)


def fatal(code: str, message: str, **extra: str) -> bytes:
    """A FATAL ErrorResponse frame, as the proxy sends before closing a connection."""
    return ErrorResponse.build("FATAL", code, message, extra=extra).encode()


__all__ = [
    "PROTOCOL_3_0",
    "Authentication",
    "BackendKeyData",
    "CancelRequest",
    "DecodeError",
    "ErrorResponse",
    "GSSENCRequest",
    "NegotiateProtocolVersion",
    "ParameterStatus",
    "Query",
    "ReadyForQuery",
    "SASLInitialResponse",
    "SSLRequest",
    "StartupMessage",
    "StartupPacket",
    "decode_startup_packet",
    "fatal",
    "startup_packet_length",
    "terminate",
]
