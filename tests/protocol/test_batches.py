"""protocol/batches.py: which chunks are one whole batch of the unnamed statement."""

from __future__ import annotations

import struct

import pytest
from pgmigrate_proxy.protocol.batches import unnamed_batch
from pgmigrate_proxy.protocol.framing import FrameScanner, frame
from pgmigrate_proxy.protocol.types import FrontendType as F

SQL = b"SELECT abalance FROM pgbench_accounts WHERE aid = $1"
PARSE = b"\0" + SQL + b"\0" + struct.pack("!hI", 1, 23)


def bind(portal: bytes = b"", statement: bytes = b"") -> bytes:
    values = struct.pack("!hhi", 0, 1, 1) + b"7" + struct.pack("!h", 0)  # one text value: 7
    return frame(F.BIND, portal + b"\0" + statement + b"\0" + values)


def describe(kind: bytes, name: bytes = b"") -> bytes:
    return frame(F.DESCRIBE, kind + name + b"\0")


EXECUTE = frame(F.EXECUTE, b"\0" + struct.pack("!i", 0))
SYNC = frame(F.SYNC)
PGBENCH = frame(F.PARSE, PARSE) + bind() + describe(b"P") + EXECUTE + SYNC


def types(data: bytes, parse: bytes = PARSE) -> list[int] | None:
    starts = FrameScanner().starts(data)
    assert starts is not None
    return unnamed_batch(data, starts, parse)


def test_pgbench_extended_batch() -> None:
    assert types(PGBENCH) == [F.PARSE, F.BIND, F.DESCRIBE, F.EXECUTE, F.SYNC]


def test_without_its_parse() -> None:
    chunk = bind() + describe(b"S") + EXECUTE + frame(F.CLOSE, b"P\0") + SYNC
    assert types(chunk) == [F.BIND, F.DESCRIBE, F.EXECUTE, F.CLOSE, F.SYNC]


@pytest.mark.parametrize(
    "chunk",
    [
        pytest.param(frame(F.PARSE, PARSE.replace(b"$1", b"$2")) + bind() + EXECUTE + SYNC,
                     id="another Parse"),
        pytest.param(frame(F.PARSE, b"s1\0" + SQL + b"\0\0\0") + bind() + EXECUTE + SYNC,
                     id="a named Parse"),
        pytest.param(bind(statement=b"s1") + EXECUTE + SYNC, id="a named statement bound"),
        pytest.param(bind(portal=b"c1") + EXECUTE + SYNC, id="a named portal"),
        pytest.param(bind() + describe(b"S", b"s1") + EXECUTE + SYNC, id="Describe of a name"),
        pytest.param(bind() + frame(F.CLOSE, b"S\0") + EXECUTE + SYNC + SYNC,
                     id="a Sync that is not last"),
        pytest.param(bind() + EXECUTE + frame(F.FLUSH), id="ends with Flush"),
        pytest.param(bind() + EXECUTE + frame(F.SYNC, b"x"), id="a Sync with a body"),
        pytest.param(bind() + frame(F.DESCRIBE) + EXECUTE + SYNC, id="Describe without a body"),
        pytest.param(bind() + frame(F.QUERY, b"SELECT 1\0") + SYNC, id="a Query inside"),
        pytest.param(frame(F.PARSE, PARSE) + frame(F.PARSE, PARSE) + SYNC, id="two Parses"),
        pytest.param(bind() + EXECUTE, id="no Sync"),
    ],
)  # fmt: skip
def test_not_that_shape(chunk: bytes) -> None:
    assert types(chunk) is None


def test_no_parse_remembered_yet() -> None:
    assert types(PGBENCH, parse=b"") is None


def test_starts_refuses_partial_and_invalid_chunks() -> None:
    scanner = FrameScanner()
    assert scanner.starts(PGBENCH[:-1]) is None  # the Sync is not whole
    assert scanner.starts(PGBENCH[:3]) is None
    assert FrameScanner(max_size=8).starts(PGBENCH) is None
    pieces = [frame(F.PARSE, PARSE), bind(), describe(b"P"), EXECUTE, SYNC]
    expected = [sum(len(p) for p in pieces[:i]) for i in range(len(pieces))]
    assert scanner.starts(PGBENCH) == expected
