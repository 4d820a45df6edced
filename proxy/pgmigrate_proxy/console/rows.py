"""The admin console's replies on the wire, sans-IO: a result set (RowDescription, DataRow,
CommandComplete), an error, a notice, ReadyForQuery; values in text format.

A column's type follows its values, as pgbouncer's do: whole numbers are int8, other numbers
float8, booleans bool, everything else text; None is NULL.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from pgmigrate_proxy.protocol.framing import frame
from pgmigrate_proxy.protocol.messages import ErrorResponse, ReadyForQuery
from pgmigrate_proxy.protocol.types import BackendType, TransactionStatus

#: PostgreSQL type OIDs (pg_type.dat) and lengths of the console's column types.
_TEXT = (25, -1)
_INT8 = (20, 8)
_FLOAT8 = (701, 8)
_BOOL = (16, 1)
_FIELD = struct.Struct("!IhIhih")
_INT16 = struct.Struct("!h")
_INT32 = struct.Struct("!i")

Value = str | int | float | bool | None


@dataclass(frozen=True)
class Table:
    """What a SHOW returns: column names and rows (one value per column)."""

    columns: tuple[str, ...]
    rows: list[tuple[Value, ...]]


def _column_type(values: Iterable[Value]) -> tuple[int, int]:
    kinds = {type(value) for value in values if value is not None}
    if kinds == {bool}:
        return _BOOL
    if kinds == {int}:
        return _INT8
    if kinds and kinds <= {int, float}:
        return _FLOAT8
    return _TEXT


def _text(value: Value) -> bytes | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return b"t" if value else b"f"
    return str(value).encode()


def row_description(columns: Sequence[str], types: Sequence[tuple[int, int]]) -> bytes:
    payload = [_INT16.pack(len(columns))]
    for name, (oid, size) in zip(columns, types, strict=True):
        payload.append(name.encode() + b"\0" + _FIELD.pack(0, 0, oid, size, -1, 0))
    return frame(BackendType.ROW_DESCRIPTION, b"".join(payload))


def data_row(values: Sequence[Value]) -> bytes:
    payload = [_INT16.pack(len(values))]
    for value in values:
        text = _text(value)
        payload.append(_INT32.pack(-1) if text is None else _INT32.pack(len(text)) + text)
    return frame(BackendType.DATA_ROW, b"".join(payload))


def command_complete(tag: str) -> bytes:
    return frame(BackendType.COMMAND_COMPLETE, tag.encode() + b"\0")


def result(table: Table, tag: str = "SHOW") -> bytes:
    """A whole result set: RowDescription, a DataRow per row, CommandComplete."""
    types = [_column_type(row[i] for row in table.rows) for i in range(len(table.columns))]
    out = [row_description(table.columns, types)]
    out.extend(data_row(row) for row in table.rows)
    out.append(command_complete(tag))
    return b"".join(out)


def error(code: str, message: str, hint: str | None = None) -> bytes:
    extra = {"hint": hint} if hint else None
    return ErrorResponse.build("ERROR", code, message, extra=extra).encode()


def notice(message: str) -> bytes:
    return ErrorResponse.build("NOTICE", "00000", message, notice=True).encode()


def empty_query() -> bytes:
    return frame(BackendType.EMPTY_QUERY_RESPONSE)


def ready() -> bytes:
    return ReadyForQuery(TransactionStatus.IDLE).encode()
