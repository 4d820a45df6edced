"""The usual shape of an extended-protocol chunk, read from its bytes: one whole batch of the
unnamed statement and portals, ending with its Sync (pgbench -M extended, most drivers).

The relay forwards such a chunk in one step (runtime/hold.py Holder.batch) when its Parse is
one it already judged, byte for byte, or when it has none; anything else is scanned message
by message. Pure: bytes and offsets in, message types out.
"""

from __future__ import annotations

from typing import Final

from pgmigrate_proxy.protocol.framing import HEADER_SIZE
from pgmigrate_proxy.protocol.types import FrontendType

_PARSE: Final = FrontendType.PARSE.value
_BIND: Final = FrontendType.BIND.value
_DESCRIBE: Final = FrontendType.DESCRIBE.value
_CLOSE: Final = FrontendType.CLOSE.value
_EXECUTE: Final = FrontendType.EXECUTE.value
_SYNC: Final = FrontendType.SYNC.value


def unnamed_batch(data: bytes, starts: list[int], parse: bytes) -> list[int] | None:
    """The message types of `data`, whole messages starting at `starts` (framing's
    FrameScanner.starts), when it is one batch of the unnamed statement: a first Parse whose
    payload is `parse` (or no Parse), then Bind of the unnamed portal and statement, Describe
    and Close of the unnamed statement or of portals, Execute, and a final Sync without a
    body; None for anything else (a named statement or portal to bind, another Parse, a Flush,
    a Query, a Sync that is not last)."""
    end = len(data)
    last = len(starts) - 1
    types: list[int] = []
    for index, pos in enumerate(starts):
        mtype = data[pos]
        body = pos + HEADER_SIZE
        stop = starts[index + 1] if index < last else end
        if mtype == _BIND:
            if data[body : min(body + 2, stop)] != b"\0\0":
                return None
        elif mtype == _EXECUTE:
            pass
        elif mtype in (_DESCRIBE, _CLOSE):
            kind = data[body : body + 2] if body + 2 <= stop else b""
            if kind[:1] != b"P" and kind != b"S\0":
                return None  # (a named statement: the prepared-statement map reads it)
        elif mtype == _PARSE and index == 0:
            if not parse or data[body:stop] != parse:
                return None
        elif mtype != _SYNC or index != last or body != end:
            return None
        types.append(mtype)
    return types if types and types[-1] == _SYNC else None
