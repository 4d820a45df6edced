"""Extended-query messages: the names and SQL the proxy reads, the queries it injects."""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

from pgmigrate_proxy.protocol.framing import Frame, frame
from pgmigrate_proxy.protocol.messages import DecodeError
from pgmigrate_proxy.protocol.types import BackendType, FrontendType

_INT16 = struct.Struct("!h")
_INT32 = struct.Struct("!i")


def _cstring(payload: bytes, start: int = 0) -> tuple[str, int]:
    end = payload.find(b"\0", start)
    if end < 0:
        raise DecodeError("string not terminated")
    return payload[start:end].decode("utf-8", "replace"), end + 1


def parse_statement(payload: bytes) -> tuple[str, str]:
    """Parse: (statement name, query text)."""
    name, pos = _cstring(payload)
    query, _ = _cstring(payload, pos)
    return name, query


def bind_names(payload: bytes) -> tuple[str, str]:
    """Bind: (portal name, statement name)."""
    portal, pos = _cstring(payload)
    statement, _ = _cstring(payload, pos)
    return portal, statement


def query_text(payload: bytes) -> str:
    """Query: the text."""
    return _cstring(payload)[0]


def build_query(name: str, sql: str, params: Sequence[str | None] = ()) -> bytes:
    """Parse, Bind, Execute and Close of one statement under our own names, without Sync.

    Our statement and portal are named, so the client's unnamed statement and portal survive;
    parameters travel as text. Replies: ParseComplete, BindComplete, DataRow*, CommandComplete
    (or an ErrorResponse), CloseComplete twice. Portal and statement are both closed: inside a
    transaction block a portal outlives its Execute.
    """
    encoded = name.encode()
    parse = encoded + b"\0" + sql.encode() + b"\0" + _INT16.pack(0)
    values = b"".join(
        _INT32.pack(-1) if p is None else _INT32.pack(len(p.encode())) + p.encode() for p in params
    )
    bind = encoded + b"\0" + encoded + b"\0" + _INT16.pack(0)
    bind += _INT16.pack(len(params)) + values + _INT16.pack(0)
    return b"".join(
        (
            frame(FrontendType.PARSE, parse),
            frame(FrontendType.BIND, bind),
            frame(FrontendType.EXECUTE, encoded + b"\0" + _INT32.pack(0)),
            frame(FrontendType.CLOSE, b"P" + encoded + b"\0"),
            frame(FrontendType.CLOSE, b"S" + encoded + b"\0"),
        )
    )


def sync() -> bytes:
    return frame(FrontendType.SYNC)


@dataclass
class QueryResult:
    """What came back for one injected query."""

    rows: list[tuple[str | None, ...]]
    error: dict[str, str] | None = None
    #: NoticeResponse, ParameterStatus, NotificationResponse that came amid its replies: the
    #: client's to see (whoever ran the query passes them on)
    asynchronous: list[Frame] = field(default_factory=list)


def data_row(payload: bytes) -> tuple[str | None, ...]:
    """DataRow in text format."""
    (count,) = _INT16.unpack_from(payload, 0)
    pos = 2
    values: list[str | None] = []
    for _ in range(count):
        (length,) = _INT32.unpack_from(payload, pos)
        pos += 4
        if length < 0:
            values.append(None)
            continue
        values.append(payload[pos : pos + length].decode("utf-8", "replace"))
        pos += length
    return tuple(values)


#: Backend replies that belong to an injected query and are never shown to the client.
INJECTED_REPLIES = frozenset(
    {
        BackendType.PARSE_COMPLETE,
        BackendType.BIND_COMPLETE,
        BackendType.CLOSE_COMPLETE,
        BackendType.DATA_ROW,
        BackendType.COMMAND_COMPLETE,
        BackendType.ROW_DESCRIPTION,
        BackendType.NO_DATA,
    }
)
