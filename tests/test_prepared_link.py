"""The transaction-mode prepared-statement link (runtime/statements.py) on unnamed statements:
they go as they are without touching the map (the hot path of most drivers)."""

from __future__ import annotations

from pgmigrate_proxy.protocol.framing import Frame
from pgmigrate_proxy.protocol.prepared import Registry
from pgmigrate_proxy.protocol.types import FrontendType
from pgmigrate_proxy.runtime.backend import ServerConnection
from pgmigrate_proxy.runtime.statements import PreparedLink

SELECT = b"SELECT abalance FROM pgbench_accounts WHERE aid = $1\0"
UNNAMED = [
    Frame(FrontendType.PARSE.value, b"\0" + SELECT + b"\0\x01\0\0\0\x17", 0),
    Frame(FrontendType.BIND.value, b"\0\0\0\0\0\x01\0\0\0\x011\0\0", 0),
    Frame(FrontendType.BIND.value, b"portal\0\0\0\0\0\x01\0\0\0\x011\0\0", 0),
    Frame(FrontendType.DESCRIBE.value, b"P\0", 0),
    Frame(FrontendType.DESCRIBE.value, b"S\0", 0),
    Frame(FrontendType.CLOSE.value, b"S\0", 0),
    Frame(FrontendType.CLOSE.value, b"Pportal\0", 0),
    Frame(FrontendType.QUERY.value, b"SELECT 1\0", 0),
    Frame(FrontendType.PARSE.value, b"\0SELECT 1\0\0\0", 0),
]


def test_unnamed_statements_skip_the_map() -> None:
    link = PreparedLink(Registry(), 200)
    server = ServerConnection()
    for item in UNNAMED:
        assert link.plan(item, server) is None, item
    assert link._client is None  # the client's map never made
    assert server.statements is None  # nor the server's


def test_named_statements_still_mapped() -> None:
    link = PreparedLink(Registry(), 200)
    server = ServerConnection()
    parse = link.plan(Frame(FrontendType.PARSE.value, b"s1\0" + SELECT + b"\0\0", 0), server)
    assert parse is not None and b"PGMIGRATE_1\0SELECT" in parse.proxy
    bind = link.plan(Frame(FrontendType.BIND.value, b"\0s1\0\0\0\0\0\0\0", 0), server)
    assert bind is not None and bind.rename_only and b"PGMIGRATE_1\0" in bind.inline
    describe = link.plan(Frame(FrontendType.DESCRIBE.value, b"Ss1\0", 0), server)
    assert describe is not None and b"PGMIGRATE_1\0" in describe.inline
    close = link.plan(Frame(FrontendType.CLOSE.value, b"Ss1\0", 0), server)
    assert close is not None and close.answer.startswith(b"3")
