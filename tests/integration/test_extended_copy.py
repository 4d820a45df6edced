"""COPY FROM STDIN started by an Execute, whose data fails: the server skips the client's
messages up to its next Sync (the Sync sent behind the Execute was ignored during COPY IN), and
the proxy's reply queue must follow it (found by the in-process fuzzer of the reply queue)."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from pgmigrate_proxy.protocol.framing import frame
from pgmigrate_proxy.protocol.messages import ErrorResponse
from pgmigrate_proxy.protocol.types import BackendType, FrontendType

from tests.fixtures.proxy import RunningProxy
from tests.integration.wire import WireClient

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

F = FrontendType
B = BackendType


@pytest.fixture
def table(admin: psycopg.Connection[Any]) -> Iterator[str]:
    name = f"xcopy_{secrets.token_hex(4)}"
    admin.execute(f"CREATE TABLE {name} (id int)")
    admin.execute(f"GRANT ALL ON {name} TO u_trust")
    yield name
    admin.execute(f"DROP TABLE IF EXISTS {name}")


def extended(sql: str) -> bytes:
    bind = b"\0\0" + b"\0\0" + b"\0\0" + b"\0\0"
    return (
        frame(F.PARSE, b"\0" + sql.encode() + b"\0\0\0")
        + frame(F.BIND, bind)
        + frame(F.EXECUTE, b"\0" + bytes(4))
        + frame(F.SYNC)
    )


@pytest.mark.parametrize("ending", ["copy-done", "copy-fail", "error-first"])
def test_an_extended_copy_whose_data_fails(proxy: RunningProxy, table: str, ending: str) -> None:
    with WireClient(proxy.host, proxy.port) as client:
        client.login()
        client.send(extended(f"COPY {table} (id) FROM STDIN"))
        got = client.read_until(B.COPY_IN_RESPONSE)
        assert [m[0] for m in got] == [B.PARSE_COMPLETE, B.BIND_COMPLETE, B.COPY_IN_RESPONSE]
        client.send(frame(F.COPY_DATA, b"not a number\n"))
        if ending == "error-first":  # the server's error comes before the client ends the COPY
            error = client.expect_error()
            client.send(frame(F.COPY_DONE) + frame(F.SYNC))  # discarded up to the Sync
        else:
            end = frame(F.COPY_DONE) if ending == "copy-done" else frame(F.COPY_FAIL, b"stop\0")
            client.send(end + frame(F.SYNC))
            error = client.expect_error()
        assert error.fields["C"] == "22P02"  # invalid input syntax for type integer
        ready = client.read_message()
        assert ready == (B.READY_FOR_QUERY, b"I")
        # the connection is in step: an extended statement and a simple one answer at once
        client.send(extended("SELECT 41 + 1"))
        replies = client.read_until(B.READY_FOR_QUERY)
        assert [m[0] for m in replies] == [
            B.PARSE_COMPLETE, B.BIND_COMPLETE, B.DATA_ROW, B.COMMAND_COMPLETE,
            B.READY_FOR_QUERY,
        ]  # fmt: skip
        rows = client.query("SELECT count(*) FROM " + table)
        assert any(m[0] == B.DATA_ROW and m[1].endswith(b"0") for m in rows)
        assert not [m for m in rows if m[0] == B.ERROR_RESPONSE], [
            ErrorResponse.decode(m[1]).fields for m in rows if m[0] == B.ERROR_RESPONSE
        ]
