"""Malformed and hostile input where the guard holds statements: migration sessions (every
statement is held) and ordinary ones with a guarded statement in the same write. Each ends in
a correct answer or an ErrorResponse and a closed connection: never a hang, never a reply
paired with the wrong query, never an exception escaping a task (issue 9, findings 2 and 3).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from pgmigrate_proxy.protocol.framing import frame
from pgmigrate_proxy.protocol.messages import BackendKeyData, ErrorResponse, Query
from pgmigrate_proxy.protocol.types import BackendType, FrontendType

from tests.fixtures.proxy import RunningProxy
from tests.integration.probes import (
    active_sessions,
    backend_exists,
    close_idle_servers,
    proxy_tasks,
    wait_until,
)
from tests.integration.wire import Message, WireClient, WireClosed

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

MIGRATE = "-c pgmigrate.role=migrate"
USER = "u_trust"
#: A bound for reads that must be answered at once (a hang fails the test, not the suite).
ANSWER_SECONDS = 10.0

Conn = psycopg.Connection[Any]


def nested(depth: int) -> str:
    return "abs(" * depth + "1" + ")" * depth


def query_without_nul(sql: str) -> bytes:
    return frame(FrontendType.QUERY, sql.encode())


def parse_unterminated() -> bytes:
    """A Parse whose query string has no terminator (the rest of the message is the text)."""
    return frame(FrontendType.PARSE, b"\0SELECT 1")


def bind_execute_sync() -> bytes:
    bind = b"\0\0" + b"\0\0" + b"\0\0" + b"\0\0"
    return (
        frame(FrontendType.BIND, bind)
        + frame(FrontendType.EXECUTE, b"\0" + bytes(4))
        + frame(FrontendType.SYNC)
    )


MALFORMED: dict[str, bytes] = {
    "query-without-nul": query_without_nul("SELECT 1"),
    "ddl-query-without-nul": query_without_nul("ALTER TABLE t ADD COLUMN x int"),
    "parse-unterminated": parse_unterminated() + frame(FrontendType.SYNC),
    "parse-unterminated-execute": parse_unterminated() + bind_execute_sync(),
    "parse-unterminated-flush": parse_unterminated() + frame(FrontendType.FLUSH),
    "parse-without-name-end": frame(FrontendType.PARSE, b"stmt") + frame(FrontendType.SYNC),
    "bind-unterminated": frame(FrontendType.BIND, b"portal") + frame(FrontendType.SYNC),
}


@pytest.fixture
def table(admin: Conn) -> Iterator[str]:
    name = f"bad_{secrets.token_hex(4)}"
    admin.execute(f"CREATE TABLE {name} (id int, c int)")
    admin.execute(f"ALTER TABLE {name} OWNER TO {USER}")
    yield name
    admin.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE usename = %s AND pid <> pg_backend_pid()",
        [USER],
    )
    admin.execute(f"DROP TABLE IF EXISTS {name}")


def login(client: WireClient, options: str | None = MIGRATE) -> list[Message]:
    client.startup(USER, options={"options": options} if options else None)
    messages = client.read_until(BackendType.READY_FOR_QUERY)
    for mtype, payload in messages:
        if mtype == BackendType.BACKEND_KEY_DATA:
            client.key = BackendKeyData.decode(payload)
    return messages


def read_all(client: WireClient) -> list[Message]:
    """Every message until the proxy closes the connection (a silence fails the test)."""
    seen: list[Message] = []
    client.sock.settimeout(ANSWER_SECONDS)
    while True:
        try:
            seen.append(client.read_message())
        except (WireClosed, ConnectionResetError):
            return seen


def types(messages: list[Message]) -> str:
    return "".join(chr(m[0]) for m in messages)


def final_error(messages: list[Message]) -> ErrorResponse:
    assert messages and messages[-1][0] == BackendType.ERROR_RESPONSE, types(messages)
    return ErrorResponse.decode(messages[-1][1])


def assert_settled(proxy: RunningProxy, admin: Conn, pid: int, log: list[str]) -> None:
    wait_until(lambda: active_sessions(proxy) == 0, "the session to close")
    wait_until(
        lambda: close_idle_servers(proxy) and not backend_exists(admin, pid),
        f"backend {pid} to exit",
    )
    wait_until(lambda: not proxy_tasks(proxy), "the proxy's tasks to finish")
    tracebacks = [line for line in log if "Traceback" in line or "never retrieved" in line]
    assert not tracebacks, tracebacks


@pytest.mark.parametrize("case", list(MALFORMED))
@pytest.mark.parametrize("behind", ["alone", "behind-begin"])
def test_migration_session_malformed_message(
    proxy: RunningProxy, admin: Conn, proxy_log: list[str], case: str, behind: str
) -> None:
    """08P01 and a close, as an ordinary session (PostgreSQL itself) answers; behind a BEGIN
    sent in the same write, BEGIN's answer comes first."""
    with WireClient(proxy.host, proxy.port) as client:
        login(client)
        pid = client.backend_pid
        lead = Query("BEGIN").encode() if behind == "behind-begin" else b""
        client.send(lead + MALFORMED[case])
        messages = read_all(client)
    if lead:
        assert types(messages[:2]) == "CZ", types(messages)
        assert messages[1][1] == b"T"
        messages = messages[2:]
    error = final_error(messages)
    assert (error.severity, error.code) == ("FATAL", "08P01"), error
    assert_settled(proxy, admin, pid, proxy_log)


def test_migration_session_malformed_between_queries(
    proxy: RunningProxy, admin: Conn, proxy_log: list[str]
) -> None:
    """A pipelining client: the queries before the bad message are answered in order, none
    after it, and the connection ends at once (not 30 s later, not answering a later query)."""
    with WireClient(proxy.host, proxy.port) as client:
        login(client)
        pid = client.backend_pid
        client.send(
            Query("BEGIN").encode()
            + Query("SELECT 41").encode()
            + query_without_nul("SELECT 42")
            + Query("SELECT 43").encode()
        )
        messages = read_all(client)
    rows = [payload for mtype, payload in messages if mtype == BackendType.DATA_ROW]
    assert rows == [b"\0\x01\0\0\0\x0241"], types(messages)
    error = final_error(messages)
    assert (error.severity, error.code) == ("FATAL", "08P01"), error
    assert_settled(proxy, admin, pid, proxy_log)


def test_guarded_alter_then_deeply_nested_one(
    proxy: RunningProxy, admin: Conn, proxy_log: list[str], table: str
) -> None:
    """An ordinary session: a guarded ALTER, then in the same write one whose default is
    nested 600 deep (which classification could not take), then a query: all answered."""
    deep = f"ALTER TABLE {table} ALTER COLUMN c SET DEFAULT {nested(600)}"
    with WireClient(proxy.host, proxy.port) as client:
        login(client, options=None)
        pid = client.backend_pid
        client.send(
            Query(f"ALTER TABLE {table} ADD COLUMN x int").encode()
            + Query(deep).encode()
            + Query("SELECT 7").encode()
        )
        first = client.read_until(BackendType.READY_FOR_QUERY)
        second = client.read_until(BackendType.READY_FOR_QUERY)
        third = client.read_until(BackendType.READY_FOR_QUERY)
    assert (BackendType.COMMAND_COMPLETE, b"ALTER TABLE\0") in first
    assert (BackendType.COMMAND_COMPLETE, b"ALTER TABLE\0") in second
    assert (BackendType.DATA_ROW, b"\0\x01\0\0\0\x017") in third
    default = admin.execute(
        "SELECT pg_get_expr(adbin, adrelid) FROM pg_attrdef WHERE adrelid = %s::regclass",
        [table],
    ).fetchone()
    assert default is not None and default[0].startswith("abs(abs(")
    assert_settled(proxy, admin, pid, proxy_log)


@pytest.mark.parametrize("depth", [600, 5000])
@pytest.mark.parametrize("options", [None, MIGRATE], ids=["ordinary", "migration"])
def test_deeply_nested_ddl_is_answered(
    proxy: RunningProxy, admin: Conn, proxy_log: list[str], table: str,
    depth: int, options: str | None,
) -> None:  # fmt: skip
    """PostgreSQL's own answer (applied, or its error for a tree past its stack limit), and
    the session goes on."""
    conninfo = proxy.conninfo(USER, connect_timeout="10")
    with psycopg.connect(conninfo, autocommit=True, options=options or "") as conn:
        deep = f"ALTER TABLE {table} ALTER COLUMN c SET DEFAULT {nested(depth)}"
        try:
            conn.execute(deep)
        except (psycopg.errors.StatementTooComplex, psycopg.errors.SyntaxError) as exc:
            assert depth == 5000, exc  # "memory exhausted" or "stack depth limit exceeded"
        else:
            assert depth == 600
        assert conn.execute("SELECT 1").fetchone() == (1,)
    wait_until(lambda: active_sessions(proxy) == 0, "the session to close")
    tracebacks = [line for line in proxy_log if "Traceback" in line]
    assert not tracebacks, tracebacks


def _describe_unnamed() -> bytes:
    return frame(FrontendType.DESCRIBE, b"S\0")


def _execute_unnamed() -> bytes:
    return frame(FrontendType.EXECUTE, b"\0" + bytes(4))


#: Extended-query batches left open (no Sync) with a simple Query behind them: after an error
#: PostgreSQL discards everything up to the Sync, that Query included; without an error it
#: runs it (asyncpg's prepare ends with a Flush, then a simple Query may come).
UNSYNCED: dict[str, bytes] = {
    "execute-error-query-flush": _execute_unnamed()
    + Query("SET pgmigrate.atomic = on").encode()
    + frame(FrontendType.FLUSH),
    "describe-error-query": _describe_unnamed() + Query("bogus").encode(),
    "parse-execute-error-flush-query": frame(FrontendType.PARSE, b"\0SELECT 1/0\0\0\0")
    + bind_execute_sync()[:-5]
    + frame(FrontendType.FLUSH)
    + Query("SELECT 2").encode(),
    "prepare-flush-then-query": frame(FrontendType.PARSE, b"\0SELECT 1\0\0\0")
    + _describe_unnamed()
    + frame(FrontendType.FLUSH)
    + Query("SELECT 2").encode(),
}


def _exchange(host: str, port: int, options: str | None, data: bytes, replies: int) -> str:
    """The types of the messages answering `data`, up to its `replies`-th ReadyForQuery."""
    with WireClient(host, port) as client:
        login(client, options)
        client.send(data)
        seen: list[Message] = []
        while sum(1 for m in seen if m[0] == BackendType.READY_FOR_QUERY) < replies:
            seen.append(client.read_message())
    return types(seen)


@pytest.mark.parametrize("case", list(UNSYNCED))
def test_migration_session_query_behind_an_unsynced_batch(
    proxy: RunningProxy, pg: Any, proxy_log: list[str], case: str
) -> None:
    """The same replies as PostgreSQL gives (before: the client's Sync went past the runner
    while it skipped, the next query was dropped, and the client waited forever)."""
    data = UNSYNCED[case] + frame(FrontendType.SYNC) + Query("SELECT 'end'").encode()
    direct = _exchange(pg.host, pg.port, None, data, 2 + (case == "prepare-flush-then-query"))
    through = _exchange(proxy.host, proxy.port, MIGRATE, data, direct.count("Z"))
    assert through == direct
    assert not [line for line in proxy_log if "Traceback" in line]


# --- a held unit that enters COPY FROM STDIN --------------------------------------------------


@pytest.fixture
def copy_table(pg: Any) -> Iterator[str]:
    name = f"copy_{secrets.token_hex(4)}"
    with pg.connect() as conn:
        conn.execute(f"CREATE TABLE {name} (v text)")
        conn.execute(f"ALTER TABLE {name} OWNER TO {USER}")
    yield name
    with pg.connect() as conn:
        conn.execute(f"DROP TABLE IF EXISTS {name}")


def test_a_guarded_query_ending_in_copy_from_stdin(
    proxy: RunningProxy, pg: Any, copy_table: str, proxy_log: list[str]
) -> None:
    """The Query is held by the guard (a DROP in it), and its COPY waits for the client's data,
    which waits behind the held Query: the unit ends at CopyInResponse and the client finishes
    the COPY (before: a hang; found by the socket fuzzer, replay 1:1695)."""
    sql = f"DROP TABLE IF EXISTS {copy_table}_gone; COPY {copy_table} FROM STDIN"
    data = (
        Query(sql).encode()
        + frame(FrontendType.COPY_DATA, b"a\nb\n")
        + frame(FrontendType.COPY_DONE)
        + Query(f"SELECT count(*) FROM {copy_table}").encode()
    )
    direct = _exchange(pg.host, pg.port, None, data, 2)
    with pg.connect() as conn:
        conn.execute(f"TRUNCATE {copy_table}")
    through = _exchange(proxy.host, proxy.port, None, data, 2)
    assert through == direct and "G" in through, through
    with pg.connect() as conn:
        assert conn.execute(f"SELECT count(*) FROM {copy_table}").fetchone() == (2,)
    assert not [line for line in proxy_log if "Traceback" in line]


def test_copy_among_several_statements_is_refused_in_a_migration_session(
    proxy: RunningProxy, copy_table: str
) -> None:
    """The runner sends a migration session's statements one by one: a COPY among them would
    leave the server reading data the runner cannot give it. Refused, the block fails."""
    data = Query(f"SELECT 1; COPY {copy_table} FROM STDIN").encode() + Query("ROLLBACK").encode()
    with WireClient(proxy.host, proxy.port) as client:
        login(client)
        client.send(data)
        seen: list[Message] = []
        while sum(1 for m in seen if m[0] == BackendType.READY_FOR_QUERY) < 2:
            seen.append(client.read_message())
    errors = [ErrorResponse.decode(p) for t, p in seen if t == BackendType.ERROR_RESPONSE]
    assert [e.code for e in errors] == ["0A000"], seen
    assert types(seen).startswith("TDC")  # SELECT 1 ran


def test_migration_session_malformed_message_in_the_batch_after_a_unit(
    proxy: RunningProxy, admin: Conn, proxy_log: list[str]
) -> None:
    """A unit, then (in the same write) a batch whose later message cannot be read: the
    batch's collection resumes when the first unit is done, and the bad message ends the
    session there with 08P01 (before: the DecodeError escaped the unit's task; found by the
    socket fuzzer's long run)."""
    with WireClient(proxy.host, proxy.port) as client:
        login(client)
        pid = client.backend_pid
        # two writes while the first unit runs: the batch waits as two chunks behind it
        client.send(
            Query("SELECT pg_sleep(0.5)").encode() + frame(FrontendType.PARSE, b"\0SELECT 2\0\0\0")
        )
        time.sleep(0.2)
        client.send(frame(FrontendType.QUERY, b"SELECT 3") + frame(FrontendType.SYNC))  # no NUL
        messages = read_all(client)
    assert types(messages).startswith("TDCZ"), types(messages)
    error = final_error(messages)
    assert (error.severity, error.code) == ("FATAL", "08P01"), error
    assert_settled(proxy, admin, pid, proxy_log)


@pytest.mark.parametrize("options", [None, MIGRATE])
@pytest.mark.parametrize("kind", [FrontendType.FLUSH, FrontendType.SYNC])
def test_a_flush_or_sync_with_a_body_is_a_protocol_violation(
    proxy: RunningProxy, admin: Conn, proxy_log: list[str], kind: int, options: str | None
) -> None:
    """PostgreSQL answers a Flush with a body with an error that skips to the next Sync, a
    Query included, so the Query's ReadyForQuery never comes (before: the guard then waited
    for it forever; found by the socket fuzzer, replay 1:1430): 08P01 and a close."""
    with WireClient(proxy.host, proxy.port) as client:
        login(client, options)
        pid = client.backend_pid
        client.send(frame(kind, b"p1\0") + Query("SELECT 1").encode())
        messages = read_all(client)
    error = final_error(messages)
    assert (error.severity, error.code) == ("FATAL", "08P01"), error
    assert_settled(proxy, admin, pid, proxy_log)


def test_migration_session_query_inside_a_batch_is_a_statement_of_its_own(
    proxy: RunningProxy, pg: Any, proxy_log: list[str]
) -> None:
    """Parse, then a Query before the batch's Sync: the Query went to the server inside the
    runner's group for the Parse, so a START TRANSACTION in it opened a real transaction the
    virtual one knew nothing of, and the session's later statements got 25P02 (socket fuzzer,
    replay 1:428:m). Now the batch so far is ended first, as PostgreSQL ends it."""
    data = (
        frame(FrontendType.PARSE, b"s1\0SELECT 1\0\0\0")
        + Query("START TRANSACTION").encode()
        + frame(FrontendType.SYNC)
        + Query("ROLLBACK").encode()
        + Query("SELECT 'end'").encode()
    )
    through = _exchange(proxy.host, proxy.port, MIGRATE, data, 4)
    assert "E" not in through, through
    assert through.endswith("TDCZ"), through
    assert not [line for line in proxy_log if "Traceback" in line]
