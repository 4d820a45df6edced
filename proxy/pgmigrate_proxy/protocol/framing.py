"""Message boundaries in a byte stream: 5-byte header peeks across chunks, size limits, no copies.

The relay forwards whole received chunks; a FrameScanner walks the headers inside each chunk
to know where every frame starts and ends, validates them, and hands back only the frames the
caller watches (complete, even when they straddle chunks). Everything else is skipped by
length, never copied.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator
from typing import Final, NamedTuple

from pgmigrate_proxy.errors import ProtocolViolation

HEADER: Final = struct.Struct("!BI")
HEADER_SIZE: Final = 5  # type byte + int32 length (which counts itself); a literal: compiled,
# it is inlined (setup.py)
assert HEADER.size == HEADER_SIZE
INT32: Final = struct.Struct("!I")


class Frame(NamedTuple):
    """One complete watched message: its type byte, its payload, where it ends in the chunk.

    `start` is where it begins in the chunk; -1 when it began in an earlier chunk. A tuple:
    the relay makes one per watched frame, and a tuple is the cheapest object to make.
    """

    type: int
    payload: bytes
    end: int
    start: int = -1

    @property
    def raw(self) -> bytes:
        """The whole frame, header included, as it travels."""
        return frame(self.type, self.payload)


class FramingError(ProtocolViolation):
    """The peer sent a header that is not a valid message; offset is where it starts."""

    def __init__(self, message: str, offset: int) -> None:
        super().__init__(message)
        self.offset = offset


_TABLES: Final[dict[frozenset[int], bytes]] = {}


def type_table(types: Iterable[int]) -> bytes:
    """A 256-byte lookup table: table[t] is 1 when type byte t is in types (shared, cached)."""
    key = frozenset(types)
    table = _TABLES.get(key)
    if table is None:
        raw = bytearray(256)
        for t in key:
            raw[t] = 1
        table = _TABLES[key] = bytes(raw)
    return table


ANY_TYPE: Final = bytes([1] * 256)


class FrameScanner:
    """Tracks frame boundaries in one direction of a connection, fed chunk by chunk."""

    __slots__ = (
        "_body", "_header", "_max_size", "_need", "_start", "_type", "_valid", "_watched",
    )  # fmt: skip

    def __init__(
        self, *, valid: bytes = ANY_TYPE, watched: Iterable[int] = (), max_size: int = 1 << 30
    ) -> None:
        self._valid = valid
        self._watched = type_table(watched)
        self._max_size = max_size
        self._header = b""  # an incomplete header carried over from the previous chunk
        self._need = 0  # body bytes of the current frame not seen yet
        self._type = 0
        self._body: bytearray | None = None  # the watched frame being assembled
        self._start = -1  # where that frame began in the last chunk (-1: in an earlier one)

    @property
    def at_boundary(self) -> bool:
        """True when the bytes seen so far end exactly at a frame boundary."""
        return self._need == 0 and not self._header

    def watch(self, types: Iterable[int]) -> None:
        """Replace the set of watched types (takes effect from the next frame)."""
        self._watched = type_table(types)

    def limit(self, max_size: int) -> None:
        """Replace the largest length a header may declare (takes effect from the next frame)."""
        self._max_size = max_size

    def feed(self, data: bytes | bytearray | memoryview) -> list[Frame]:
        """Scan one chunk; return the watched frames completed in it. Raises FramingError."""
        frames: list[Frame] = []
        n = len(data)
        pos = 0
        if self._header:
            pos = self._complete_header(data)
            if self._header:
                return frames
        if self._need or self._body is not None:
            pos = self._continue_body(data, pos, frames)
        unpack = HEADER.unpack_from
        valid = self._valid
        watched = self._watched
        while pos < n:
            if n - pos < HEADER_SIZE:
                self._header = bytes(data[pos:])
                break
            mtype, length = unpack(data, pos)
            if not valid[mtype] or length < 4 or length > self._max_size:
                raise FramingError(self._describe(mtype, length), pos)
            end = pos + 1 + length
            if end <= n:
                if watched[mtype]:
                    frames.append(Frame(mtype, bytes(data[pos + HEADER_SIZE : end]), end, pos))
                pos = end
                continue
            self._type = mtype
            self._need = end - n
            if watched[mtype]:
                self._body = bytearray(data[pos + HEADER_SIZE :])
                self._start = pos
            break
        return frames

    def single(self, data: bytes) -> int:
        """The type byte of `data` when it is exactly one whole, valid frame and the scanner is
        at a boundary (scanning it would leave the scanner as it is: the relay's shortcut for
        a chunk of one message); -1 otherwise (scan it with feed or cut)."""
        n = len(data)
        if self._need or self._header or n < HEADER_SIZE:
            return -1
        mtype = data[0]
        length = (data[1] << 24) | (data[2] << 16) | (data[3] << 8) | data[4]  # (HEADER,
        # by hand: compiled, these are native reads, where unpack_from builds a tuple)
        if length + 1 != n or not self._valid[mtype] or length < 4 or length > self._max_size:
            return -1
        return mtype

    def starts(self, data: bytes) -> list[int] | None:
        """Where each frame of `data` starts, when `data` is whole, valid frames from a
        boundary (scanning it would leave the scanner as it is: the relay's shortcut for a
        batch); None otherwise (scan it with cut)."""
        if self._need or self._header:
            return None
        n = len(data)
        pos = 0
        valid = self._valid
        limit = self._max_size
        found: list[int] = []
        while pos < n:
            if n - pos < HEADER_SIZE:
                return None
            mtype = data[pos]
            length = (
                (data[pos + 1] << 24) | (data[pos + 2] << 16) | (data[pos + 3] << 8) | data[pos + 4]
            )
            if not valid[mtype] or length < 4 or length > limit:
                return None
            found.append(pos)
            pos += 1 + length
        return found if pos == n else None

    def last_watched(self, data: bytes) -> int:
        """Where the last frame of `data` starts, when `data` is whole, valid frames from a
        boundary and no frame but the last is watched (scanning it would leave the scanner as
        it is, and show at most that frame: the relay's shortcut for a reply that ends with
        its ReadyForQuery); -1 otherwise (scan it with feed)."""
        if self._need or self._header:
            return -1
        n = len(data)
        pos = 0
        valid = self._valid
        watched = self._watched
        limit = self._max_size
        while n - pos >= HEADER_SIZE:
            mtype = data[pos]
            length = (
                (data[pos + 1] << 24) | (data[pos + 2] << 16) | (data[pos + 3] << 8) | data[pos + 4]
            )
            if not valid[mtype] or length < 4 or length > limit:
                return -1
            end = pos + 1 + length
            if end >= n:
                return pos if end == n else -1
            if watched[mtype]:
                return -1
            pos = end
        return -1

    def watches(self, mtype: int) -> bool:
        """Whether frames of this type are watched now."""
        return bool(self._watched[mtype])

    def cut(self, data: bytes) -> Cut:
        """Scan one chunk for a relay that forwards raw bytes around the watched frames.

        Unlike feed(), nothing that may belong to a watched frame leaves before the frame
        is complete: an incomplete header and the start of an incomplete watched frame are
        withheld (see Cut). Raises FramingError.
        """
        held = self._header
        if held and len(held) + len(data) < HEADER_SIZE:
            self._header += bytes(data)  # the header is still not whole: keep it all
            return Cut(data, [], b"", 0)
        self._start = -1
        frames = self.feed(data)
        # A header withheld earlier that began an unwatched frame goes out first.
        carry = held if held and not self._watched[held[0]] else b""
        if self._header:
            tail = len(data) - len(self._header)
        elif self._body is not None:
            tail = max(self._start, 0)  # -1: the frame began earlier, all of data is its
        else:
            tail = len(data)
        return Cut(data, frames, carry, tail)

    def release(self) -> bytes:
        """Stop assembling the unfinished watched frame; return its bytes as received so far.

        Used when the caller switches from forwarding whole frames to forwarding raw
        chunks: what the scanner held must go out first. Boundaries stay tracked.
        """
        if self._header:
            return self._header
        if self._body is None:
            return b""
        held = HEADER.pack(self._type, len(self._body) + self._need + 4) + bytes(self._body)
        self._body = None
        return held

    def consume_to_boundary(self, data: bytes | bytearray | memoryview) -> int | None:
        """Take bytes up to the next frame boundary, unchecked and unwatched.

        Returns how many bytes of data end the current frame (0 when already at a
        boundary), or None when the whole chunk belongs to a frame not finished yet.
        """
        pos = 0
        if self._header:
            take = min(HEADER_SIZE - len(self._header), len(data))
            self._header += bytes(data[:take])
            pos = take
            if len(self._header) < HEADER_SIZE:
                return None
            self._need = max(HEADER.unpack(self._header)[1] - 4, 0)  # unchecked, never negative
            self._header = b""
        self._body = None
        if self._need > len(data) - pos:
            self._need -= len(data) - pos
            return None
        pos += self._need
        self._need = 0
        return pos

    def _complete_header(self, data: bytes | bytearray | memoryview) -> int:
        """Top up a header split across chunks; when whole, start its frame. Returns the offset."""
        take = HEADER_SIZE - len(self._header)
        self._header += bytes(data[:take])
        if len(self._header) < HEADER_SIZE:
            return len(data)
        mtype, length = HEADER.unpack(self._header)
        offset = -(HEADER_SIZE - take)  # the frame started in the previous chunk
        self._header = b""
        if not self._valid[mtype] or length < 4 or length > self._max_size:
            raise FramingError(self._describe(mtype, length), max(offset, 0))
        self._type = mtype
        self._need = length - 4
        self._body = bytearray() if self._watched[mtype] else None
        return take

    def _continue_body(
        self, data: bytes | bytearray | memoryview, pos: int, frames: list[Frame]
    ) -> int:
        """Consume the rest of a frame begun earlier; record it if watched and now complete."""
        take = min(self._need, len(data) - pos)
        if self._body is not None:
            self._body += data[pos : pos + take]
        self._need -= take
        pos += take
        if self._need == 0 and self._body is not None:
            frames.append(Frame(self._type, bytes(self._body), pos))
            self._body = None
        return pos

    def _describe(self, mtype: int, length: int) -> str:
        if not self._valid[mtype]:
            return f"invalid message type {chr(mtype)!r}"
        if length < 4:
            return f"invalid message length {length}"
        return f"message of {length} bytes exceeds the limit of {self._max_size} bytes"


class Cut:
    """A scanned chunk: watched frames, bytes withheld earlier to send first, where it stops.

    Raw bytes to forward are `carry`, then `data` up to `tail` except the watched frames;
    `data[tail:]` is withheld (it belongs to a frame not complete yet). A frame with
    start == -1 was withheld in earlier chunks: send `frame.raw`, and skip data up to its end.

    A plain class, not a dataclass: compiled (setup.py), a dataclass's __init__ is the one
    the dataclasses module generates, run as Python; one is made per chunk the relay holds.
    """

    __slots__ = ("carry", "data", "frames", "tail")

    def __init__(self, data: bytes, frames: list[Frame], carry: bytes, tail: int) -> None:
        self.data = data
        self.frames = frames
        self.carry = carry
        self.tail = tail

    def __repr__(self) -> str:
        fields = f"data={self.data!r}, frames={self.frames!r}, carry={self.carry!r}"
        return f"Cut({fields}, tail={self.tail})"

    @property
    def plain(self) -> bool:
        """Nothing watched, nothing withheld: the chunk goes out as it is."""
        return not self.frames and not self.carry and self.tail == len(self.data)


def frame(mtype: int, payload: bytes = b"") -> bytes:
    """Build one frame from a type byte and its payload."""
    return HEADER.pack(mtype, len(payload) + 4) + payload


def message_types(data: bytes) -> Iterator[int]:
    """The type bytes of the whole frames in `data` (the proxy's own, or a held unit's)."""
    pos, end = 0, len(data)
    while pos + HEADER_SIZE <= end:
        mtype, length = HEADER.unpack_from(data, pos)
        yield mtype
        pos += 1 + length
