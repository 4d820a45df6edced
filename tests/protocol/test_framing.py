"""FrameScanner: golden byte streams fed whole, byte by byte and split anywhere; header errors."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pgmigrate_proxy.protocol import schema
from pgmigrate_proxy.protocol.framing import (
    HEADER_SIZE,
    Frame,
    FrameScanner,
    FramingError,
    frame,
    type_table,
)
from pgmigrate_proxy.protocol.types import (
    BACKEND_TYPES,
    FRONTEND_TYPES,
    BackendType,
    FrontendType,
    TransactionStatus,
)

# A simple-query exchange as PostgreSQL puts it on the wire ("Message Formats"), written out
# byte by byte; the schema must build exactly these bytes.
GOLDEN_FRONTEND: list[tuple[bytes, str, dict[str, object]]] = [
    (b"Q\x00\x00\x00\x0dSELECT 1\x00", "Query", {"sql": "SELECT 1"}),
    (b"X\x00\x00\x00\x04", "Terminate", {}),
]
GOLDEN_BACKEND: list[tuple[bytes, str, dict[str, object]]] = [
    (
        b"T\x00\x00\x00\x21\x00\x01?column?\x00\x00\x00\x00\x00\x00\x00"
        b"\x00\x00\x00\x17\x00\x04\xff\xff\xff\xff\x00\x00",
        "RowDescription",
        {
            "fields": [
                {
                    "name": "?column?",
                    "table_oid": 0,
                    "column_number": 0,
                    "type_oid": 23,
                    "type_size": 4,
                    "type_modifier": -1,
                    "format": 0,
                }
            ]
        },
    ),
    (b"D\x00\x00\x00\x0b\x00\x01\x00\x00\x00\x011", "DataRow", {"columns": [b"1"]}),
    (b"C\x00\x00\x00\x0dSELECT 1\x00", "CommandComplete", {"tag": "SELECT 1"}),
    (b"Z\x00\x00\x00\x05I", "ReadyForQuery", {"status": TransactionStatus.IDLE}),
]


def _stream(*frames: bytes) -> bytes:
    return b"".join(frames)


# A longer backend stream: the golden exchange, then an extended-protocol batch, a notice, a
# COPY OUT and an empty frame, so that splits land on every kind of boundary.
BACKEND_STREAM = _stream(
    *(raw for raw, _, _ in GOLDEN_BACKEND),
    schema.build("ParseComplete"),
    schema.build("BindComplete"),
    schema.build("DataRow", columns=[b"x" * 300, None, b""]),
    schema.build("NoticeResponse", fields={"S": "NOTICE", "C": "00000", "M": "hello"}),
    schema.build("CommandComplete", tag="SELECT 1"),
    schema.build("ReadyForQuery", status=TransactionStatus.IN_TRANSACTION),
    schema.build("CopyOutResponse", format=0, column_formats=[0, 0]),
    schema.build("CopyData", data=b"1\t2\n" * 50),
    schema.build("CopyDone"),
    schema.build("CommandComplete", tag="COPY 50"),
    schema.build("ReadyForQuery", status=TransactionStatus.IDLE),
)
FRONTEND_STREAM = _stream(
    schema.build("Parse", statement="", query="SELECT $1", parameter_types=[23]),
    schema.build(
        "Bind", portal="", statement="", parameter_formats=[], parameters=[b"1"], result_formats=[]
    ),
    schema.build("Describe", kind=b"P", name=""),
    schema.build("Execute", portal="", max_rows=0),
    schema.build("Sync"),
    *(raw for raw, _, _ in GOLDEN_FRONTEND),
)


@dataclass(frozen=True)
class Scan:
    frames: list[tuple[int, bytes, int]]  # type, payload, absolute end offset
    boundaries: list[tuple[int, bool]]  # after each chunk: its end offset, at_boundary


def _frames_of(stream: bytes) -> list[tuple[int, bytes, int]]:
    """Reference split of a valid stream: every frame with its absolute end."""
    out = []
    pos = 0
    while pos < len(stream):
        length = int.from_bytes(stream[pos + 1 : pos + 5], "big")
        end = pos + 1 + length
        out.append((stream[pos], stream[pos + 5 : end], end))
        pos = end
    return out


def _scan(stream: bytes, cuts: list[int], scanner: FrameScanner) -> Scan:
    frames: list[tuple[int, bytes, int]] = []
    boundaries: list[tuple[int, bool]] = []
    start = 0
    for end in [*cuts, len(stream)]:
        for f in scanner.feed(memoryview(stream)[start:end]):
            frames.append((f.type, f.payload, start + f.end))
        boundaries.append((end, scanner.at_boundary))
        start = end
    return Scan(frames, boundaries)


def _expected(stream: bytes, cuts: list[int], watched: frozenset[int]) -> Scan:
    reference = _frames_of(stream)
    ends = {0} | {end for _, _, end in reference}
    frames = [f for f in reference if f[0] in watched]
    return Scan(frames, [(end, end in ends) for end in [*cuts, len(stream)]])


ALL = frozenset(range(256))
STREAMS = {"backend": BACKEND_STREAM, "frontend": FRONTEND_STREAM}
WATCHES = {"all": ALL, "ready": frozenset({BackendType.READY_FOR_QUERY}), "none": frozenset()}


# --- golden bytes -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "name", "fields"), GOLDEN_FRONTEND + GOLDEN_BACKEND, ids=lambda v: str(v)[:20]
)
def test_schema_builds_the_golden_bytes(raw: bytes, name: str, fields: dict[str, object]) -> None:
    assert schema.build(name, **fields) == raw
    assert frame(raw[0], raw[5:]) == raw


def test_golden_exchange_whole() -> None:
    scanner = FrameScanner(watched=range(256))
    backend = _stream(*(raw for raw, _, _ in GOLDEN_BACKEND))
    frames = scanner.feed(backend)
    assert [(f.type, f.payload) for f in frames] == [
        (raw[0], raw[5:]) for raw, _, _ in GOLDEN_BACKEND
    ]
    assert [f.end for f in frames] == [end for _, _, end in _frames_of(backend)]
    assert scanner.at_boundary


@pytest.mark.parametrize("stream_name", STREAMS)
@pytest.mark.parametrize("watch_name", WATCHES)
def test_byte_at_a_time_equals_whole(stream_name: str, watch_name: str) -> None:
    stream, watched = STREAMS[stream_name], WATCHES[watch_name]
    cuts = list(range(1, len(stream)))
    assert _scan(stream, cuts, FrameScanner(watched=watched)) == _expected(stream, cuts, watched)
    assert _scan(stream, [], FrameScanner(watched=watched)) == _expected(stream, [], watched)


@given(
    stream_name=st.sampled_from(sorted(STREAMS)),
    watch_name=st.sampled_from(sorted(WATCHES)),
    data=st.data(),
)
def test_random_splits_equal_whole(stream_name: str, watch_name: str, data: st.DataObject) -> None:
    stream, watched = STREAMS[stream_name], WATCHES[watch_name]
    cuts = sorted(data.draw(st.sets(st.integers(0, len(stream)), max_size=40)))
    assert _scan(stream, cuts, FrameScanner(watched=watched)) == _expected(stream, cuts, watched)


@given(payloads=st.lists(st.binary(max_size=20), max_size=8), data=st.data())
def test_random_frames_random_splits(payloads: list[bytes], data: st.DataObject) -> None:
    types = data.draw(
        st.lists(
            st.sampled_from(sorted(BACKEND_TYPES)), min_size=len(payloads), max_size=len(payloads)
        )
    )
    stream = b"".join(frame(t, p) for t, p in zip(types, payloads, strict=True))
    cuts = sorted(data.draw(st.sets(st.integers(0, len(stream)))))
    scanner = FrameScanner(valid=type_table(BACKEND_TYPES), watched=ALL)
    assert _scan(stream, cuts, scanner) == _expected(stream, cuts, ALL)


def test_chunk_types_bytes_bytearray_memoryview() -> None:
    for convert in (bytes, bytearray, memoryview):
        scanner = FrameScanner(watched=ALL)
        frames = scanner.feed(convert(BACKEND_STREAM[:40])) + scanner.feed(
            convert(BACKEND_STREAM[40:])
        )
        assert [(f.type, f.payload) for f in frames] == [
            (t, p) for t, p, _ in _frames_of(BACKEND_STREAM)
        ]
        assert all(type(f.payload) is bytes for f in frames)


def test_watch_takes_effect_from_the_next_frame() -> None:
    first, second = (
        schema.build("DataRow", columns=[b"abc"]),
        schema.build("DataRow", columns=[b"d"]),
    )
    scanner = FrameScanner()
    assert scanner.feed(first[:7]) == []
    scanner.watch([BackendType.DATA_ROW])
    frames = scanner.feed(first[7:] + second)
    assert [f.payload for f in frames] == [second[5:]]


# --- header errors ------------------------------------------------------------------------------

FRONTEND_VALID = type_table(FRONTEND_TYPES)
GOOD = schema.build("Query", sql="SELECT 1")
BAD_HEADERS = {
    "type": (b"z\x00\x00\x00\x04", "invalid message type 'z'"),
    "length": (b"Q\x00\x00\x00\x03", "invalid message length 3"),
    "size": (b"Q\x00\x00\x01\x00", "message of 256 bytes exceeds the limit of 100 bytes"),
}


def _scanner() -> FrameScanner:
    return FrameScanner(valid=FRONTEND_VALID, max_size=100)


@pytest.mark.parametrize("kind", BAD_HEADERS)
def test_bad_header_offset(kind: str) -> None:
    header, message = BAD_HEADERS[kind]
    with pytest.raises(FramingError, match=message) as info:
        _scanner().feed(GOOD + GOOD + header + b"rest")
    assert info.value.offset == 2 * len(GOOD)


@pytest.mark.parametrize("kind", BAD_HEADERS)
def test_bad_header_first_in_chunk(kind: str) -> None:
    scanner = _scanner()
    assert scanner.feed(GOOD) == []
    with pytest.raises(FramingError) as info:
        scanner.feed(BAD_HEADERS[kind][0])
    assert info.value.offset == 0


@pytest.mark.parametrize("kind", BAD_HEADERS)
@pytest.mark.parametrize("split", range(1, HEADER_SIZE))
def test_bad_header_straddling_chunks(kind: str, split: int) -> None:
    """The frame began in the previous chunk: nothing of this chunk precedes it (offset 0)."""
    header, message = BAD_HEADERS[kind]
    scanner = _scanner()
    scanner.feed(GOOD + header[:split])
    assert not scanner.at_boundary
    with pytest.raises(FramingError, match=message) as info:
        scanner.feed(header[split:] + GOOD)
    assert info.value.offset == 0


def test_length_exactly_max_size_is_accepted() -> None:
    big = frame(FrontendType.QUERY, b"x" * 95 + b"\0")  # length 100 counts itself
    scanner = _scanner()
    scanner.feed(big)
    assert scanner.at_boundary


def test_limit_applies_from_the_next_header() -> None:
    scanner = _scanner()
    scanner.limit(20)
    with pytest.raises(FramingError, match="exceeds the limit of 20 bytes"):
        scanner.feed(frame(FrontendType.QUERY, b"x" * 16 + b"\0"))
    scanner = _scanner()
    scanner.limit(20)
    scanner.feed(frame(FrontendType.QUERY, b"x" * 15 + b"\0"))
    scanner.limit(100)
    scanner.feed(frame(FrontendType.QUERY, b"x" * 95 + b"\0"))
    assert scanner.at_boundary


@given(
    prefix=st.lists(st.binary(max_size=12), max_size=5),
    kind=st.sampled_from(sorted(BAD_HEADERS)),
    data=st.data(),
)
def test_bad_header_at_random_splits(prefix: list[bytes], kind: str, data: st.DataObject) -> None:
    """The chunk holding the header's last byte raises; offset is where the header starts in
    that chunk, or 0 when it started in an earlier one. Nothing before it raises."""
    good = b"".join(frame(FrontendType.COPY_DATA, p) for p in prefix)
    stream = good + BAD_HEADERS[kind][0] + b"trailing"
    cuts = sorted(data.draw(st.sets(st.integers(1, len(stream) - 1))))
    scanner = _scanner()
    start = 0
    header_end = len(good) + HEADER_SIZE
    for end in [*cuts, len(stream)]:
        if end < header_end:
            scanner.feed(stream[start:end])
            start = end
            continue
        with pytest.raises(FramingError) as info:
            scanner.feed(stream[start:end])
        assert info.value.offset == max(len(good) - start, 0)
        return
    raise AssertionError("no FramingError")


# --- consume_to_boundary ------------------------------------------------------------------------


def test_consume_at_boundary_takes_nothing() -> None:
    scanner = FrameScanner()
    scanner.feed(GOOD)
    assert scanner.consume_to_boundary(GOOD) == 0
    assert scanner.at_boundary


def test_consume_rest_of_a_body() -> None:
    nxt = schema.build("ReadyForQuery", status=TransactionStatus.IDLE)
    scanner = FrameScanner(watched=ALL)
    assert scanner.feed(BACKEND_STREAM[:10]) == []
    first_end = _frames_of(BACKEND_STREAM)[0][2]
    rest = BACKEND_STREAM[10:first_end]
    assert scanner.consume_to_boundary(rest + nxt) == len(rest)
    assert scanner.at_boundary
    # scanning resumes cleanly after the cut, and the half-seen frame is never reported
    assert [f.payload for f in scanner.feed(nxt)] == [b"I"]


@pytest.mark.parametrize("split", range(1, HEADER_SIZE))
def test_consume_completes_a_split_header(split: int) -> None:
    row = schema.build("DataRow", columns=[b"abc"])
    scanner = FrameScanner()
    scanner.feed(GOOD + row[:split])
    assert scanner.consume_to_boundary(row[split:] + GOOD) == len(row) - split
    assert scanner.at_boundary


def test_consume_byte_at_a_time() -> None:
    row = schema.build("DataRow", columns=[b"abcdef"])
    scanner = FrameScanner()
    scanner.feed(row[:1])
    results = [scanner.consume_to_boundary(row[i : i + 1]) for i in range(1, len(row) - 1)]
    assert results == [None] * (len(row) - 2)
    assert not scanner.at_boundary
    assert scanner.consume_to_boundary(row[-1:] + GOOD) == 1
    assert scanner.at_boundary


def test_consume_never_cuts_backwards_on_a_short_length() -> None:
    scanner = FrameScanner()
    scanner.feed(b"D\x00\x00")
    assert scanner.consume_to_boundary(b"\x00\x01" + GOOD) == 2
    assert scanner.at_boundary


# --- release --------------------------------------------------------------------------------------


def test_release_at_boundary_holds_nothing() -> None:
    scanner = FrameScanner(watched=ALL)
    scanner.feed(GOOD)
    assert scanner.release() == b""


def test_release_returns_the_partial_watched_frame_and_keeps_tracking() -> None:
    row = schema.build("DataRow", columns=[b"abcdef"])
    scanner = FrameScanner(watched=ALL)
    assert scanner.feed(row[:9]) == []
    assert scanner.release() == row[:9]
    frames = scanner.feed(row[9:] + GOOD)  # the released frame is not reported again
    assert [(f.type, f.payload, f.end) for f in frames] == [
        (GOOD[0], GOOD[5:], len(row) - 9 + len(GOOD))
    ]
    assert scanner.at_boundary


@pytest.mark.parametrize("split", range(1, HEADER_SIZE))
def test_release_returns_a_partial_header(split: int) -> None:
    scanner = FrameScanner(watched=ALL)
    scanner.feed(GOOD + GOOD[:split])
    assert scanner.release() == GOOD[:split]
    frames = scanner.feed(GOOD[split:])
    assert [(f.type, f.payload, f.end) for f in frames] == [(GOOD[0], GOOD[5:], len(GOOD) - split)]


# --- cut(): the relay's view, with watched frames withheld until complete ---------------------

_CUT_TYPES = (ord("Q"), ord("P"), ord("S"), ord("d"), ord("D"), ord("X"))


def _reassemble(scanner: FrameScanner, chunks: list[bytes]) -> tuple[bytes, list[Frame]]:
    """What a relay sends when it forwards raw bytes and re-emits each watched frame."""
    out = bytearray()
    seen: list[Frame] = []
    for chunk in chunks:
        cut = scanner.cut(chunk)
        out += cut.carry
        pos = 0
        for item in cut.frames:
            if item.start >= 0:
                out += chunk[pos : item.start]
            out += item.raw
            pos = item.end
            seen.append(item)
        out += chunk[pos : cut.tail]
    return bytes(out), seen


@given(
    bodies=st.lists(
        st.tuples(st.sampled_from(_CUT_TYPES), st.binary(max_size=40)), min_size=1, max_size=10
    ),
    data=st.data(),
)
def test_cut_at_random_splits_loses_and_reorders_nothing(
    bodies: list[tuple[int, bytes]], data: st.DataObject
) -> None:
    stream = b"".join(frame(t, body) for t, body in bodies)
    points = sorted(
        data.draw(st.sets(st.integers(min_value=1, max_value=len(stream) - 1), max_size=12))
    ) if len(stream) > 1 else []  # fmt: skip
    edges = [0, *points, len(stream)]
    chunks = [stream[a:b] for a, b in itertools.pairwise(edges)]
    watched = {ord("Q"), ord("P"), ord("S")}
    sent, seen = _reassemble(FrameScanner(watched=watched), chunks)
    assert sent == stream
    assert [(f.type, f.payload) for f in seen] == [(t, b) for t, b in bodies if t in watched]


def test_cut_withholds_an_incomplete_watched_frame() -> None:
    query = frame(ord("Q"), b"ALTER TABLE t ADD c int\0")
    scanner = FrameScanner(watched={ord("Q")})
    first = scanner.cut(frame(ord("d"), b"xy") + query[:7])
    assert first.frames == [] and first.tail == 7  # the CopyData goes, the Query waits
    second = scanner.cut(query[7:])
    assert [(f.type, f.start) for f in second.frames] == [(ord("Q"), -1)]
    assert second.frames[0].raw == query and second.tail == len(query) - 7


def test_cut_sends_a_held_header_of_an_unwatched_frame_first() -> None:
    copy = frame(ord("d"), b"payload")
    scanner = FrameScanner(watched={ord("Q")})
    assert scanner.cut(copy[:3]).tail == 0  # type unknown to the relay yet: withheld
    rest = scanner.cut(copy[3:])
    assert rest.carry == copy[:3] and rest.frames == [] and rest.tail == len(copy) - 3
    assert scanner.cut(b"").plain


# --- the relay's shortcuts (single, starts, last_watched) agree with feed ---------------------

_TYPES = st.sampled_from([ord(c) for c in "QPBDESTCZXd12n"])
_FRAMES = st.lists(st.tuples(_TYPES, st.binary(max_size=40)), min_size=1, max_size=6)


@given(frames=_FRAMES, prefix=st.binary(max_size=12), suffix=st.binary(max_size=12))
def test_shortcuts_agree_with_feed(
    frames: list[tuple[int, bytes]], prefix: bytes, suffix: bytes
) -> None:
    """For any chunk (whole frames, possibly with stray bytes before or after): single, starts
    and last_watched answer only for whole, valid frames from a boundary, leave the scanner as
    it was, and what they report is what feed finds."""
    watched = {ord("Z"), ord("E")}
    for data in (
        b"".join(frame(t, p) for t, p in frames),
        prefix + b"".join(frame(t, p) for t, p in frames),
        b"".join(frame(t, p) for t, p in frames) + suffix,
    ):
        scanner = FrameScanner(watched=watched, max_size=60)
        reference = FrameScanner(watched=range(256), max_size=60)
        try:
            every = reference.feed(data)
            whole = reference.at_boundary
        except FramingError:
            every, whole = [], False
        starts = scanner.starts(data)
        last = scanner.last_watched(data)
        single = scanner.single(data)
        assert scanner.at_boundary  # (none of them moved it)
        if starts is not None:
            assert whole and starts == [item.start for item in every]
        elif whole and every:
            pytest.fail("starts refused whole, valid frames")
        if single >= 0:
            assert whole and len(every) == 1 and every[0].type == single
        if last >= 0:
            assert whole and every[-1].start == last
            assert all(item.type not in watched for item in every[:-1])
        if whole:  # (and the scanner, left as it was, still scans the chunk the same)
            assert scanner.feed(data) == [item for item in every if item.type in watched]


def test_shortcuts_refuse_midway_through_a_frame() -> None:
    scanner = FrameScanner(watched={ord("Z")})
    query = frame(ord("Q"), b"SELECT 1\0")
    scanner.feed(query[:3])  # a header not whole yet
    assert scanner.single(query[3:]) == -1
    assert scanner.starts(query[3:]) is None
    assert scanner.last_watched(query[3:]) == -1
    scanner = FrameScanner(watched={ord("Z")})
    scanner.feed(query[:7])  # a body not whole yet
    assert scanner.single(query[7:]) == -1
    assert scanner.starts(query[7:]) is None
    assert scanner.last_watched(query[7:]) == -1
