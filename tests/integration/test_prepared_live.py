"""The prepared-statement mapping's messages, sent over raw sockets to a real PostgreSQL: two
connections stand for two pooled servers; a client prepares on one and binds on the other."""

from __future__ import annotations

from typing import Any

from pgmigrate_proxy.protocol import schema
from pgmigrate_proxy.protocol.framing import frame
from pgmigrate_proxy.protocol.messages import ErrorResponse
from pgmigrate_proxy.protocol.prepared import (
    ClientStatements,
    Registry,
    Reply,
    ServerStatements,
    Step,
)
from pgmigrate_proxy.protocol.types import BackendType, FrontendType

from tests.integration.wire import Message, WireClient

SYNC = frame(FrontendType.SYNC)
EXECUTE = schema.build("Execute", portal="", max_rows=0)


def run(server: WireClient, step: Step | None, *after: bytes) -> list[Message]:
    """Send the Step's frames, then `after` and a Sync; return the replies the client sees
    (SWALLOWed ones dropped, ANSWERs put in place; the rest as PostgreSQL sent them). A
    Step ending with its own Sync (checkout) gets no other."""
    assert step is not None and not step.error
    data = b"".join(step.frames) + b"".join(after)
    server.send(data if data.endswith(SYNC) else data + SYNC)
    got = server.read_until(BackendType.READY_FOR_QUERY)
    seen: list[Message] = []
    replies = iter(got)
    for expect in step.expect:
        if expect.reply is Reply.ANSWER:
            seen.append((expect.frame[0], expect.frame[5:]))
            continue
        message = next(replies)
        if expect.reply is Reply.FORWARD:
            seen.append(message)
    return seen + list(replies)


def types(messages: list[Message]) -> str:
    return "".join(chr(m[0]) for m in messages)


def prepared_on(server: WireClient) -> dict[str, str]:
    rows = server.query(
        "SELECT name, parameter_types::text FROM pg_prepared_statements ORDER BY name"
    )
    found = {}
    for mtype, payload in rows:
        if mtype == BackendType.DATA_ROW:
            columns = schema.parse_payload("DataRow", payload).columns
            found[columns[0].decode()] = columns[1].decode()
    return found


def bind(statement: str, *params: bytes) -> bytes:
    return schema.build_payload(
        "Bind",
        portal="",
        statement=statement,
        parameter_formats=[],
        parameters=list(params),
        result_formats=[],
    )


def value(messages: list[Message]) -> list[bytes]:
    rows = [m for m in messages if m[0] == BackendType.DATA_ROW]
    return [c for row in rows for c in schema.parse_payload("DataRow", row[1]).columns]


def test_parse_on_one_server_bind_on_another(pg: Any) -> None:
    registry = Registry()
    client = ClientStatements(registry)
    with WireClient(pg.host, pg.port) as a, WireClient(pg.host, pg.port) as b:
        a.login()
        b.login()
        one, two = ServerStatements(registry, 10), ServerStatements(registry, 1)
        parse = schema.build_payload(
            "Parse", statement="add", query="SELECT $1::int + 1", parameter_types=[23]
        )
        assert types(run(a, client.parse(parse, one))) == "1Z"
        assert prepared_on(a) == {"PGMIGRATE_1": "{integer}"}

        # On b the statement is missing: a Parse is injected and its ParseComplete swallowed.
        seen = run(b, client.bind(bind("add", b"41"), two), EXECUTE)
        assert types(seen) == "2DCZ" and value(seen) == [b"42"]
        assert prepared_on(b) == {"PGMIGRATE_1": "{integer}"}
        seen = run(b, client.describe(schema.build_payload("Describe", kind=b"S", name="add"), two))
        assert types(seen) == "tTZ"

        # b keeps one statement: a second one closes the first (CloseComplete swallowed).
        other = schema.build_payload(
            "Parse", statement="hi", query="SELECT 'hi'", parameter_types=[]
        )
        assert types(run(b, client.parse(other, two))) == "1Z"
        assert prepared_on(b) == {"PGMIGRATE_2": "{}"}
        seen = run(b, client.bind(bind("add", b"1"), two), EXECUTE)
        assert types(seen) == "2DCZ" and value(seen) == [b"2"]
        assert prepared_on(b) == {"PGMIGRATE_1": "{integer}"}

        # A second client preparing the same query on a: the proxy answers its Parse.
        second = ClientStatements(registry)
        parse_again = schema.build_payload(
            "Parse", statement="mine", query="SELECT $1::int + 1", parameter_types=[23]
        )
        step = second.parse(parse_again, one)
        assert step is not None and step.frames == ()
        bound = second.bind(bind("mine", b"9"), one)
        assert bound is not None and len(bound.frames) == 1  # one has it: no injection
        seen = run(a, step, *bound.frames, EXECUTE)
        assert types(seen) == "12DCZ" and value(seen) == [b"10"]


def test_ddl_invalidation_avoids_the_cached_plan_error(pg: Any) -> None:
    """After ALTER TABLE, the old statement fails with 0A000 "cached plan must not change
    result type"; invalidate + checkout closes it and the next Bind re-prepares it."""
    registry = Registry()
    client = ClientStatements(registry)
    with WireClient(pg.host, pg.port) as a:
        a.login()
        server = ServerStatements(registry, 10)
        a.query("CREATE TEMP TABLE pp_item (a int); INSERT INTO pp_item VALUES (1)")
        parse = schema.build_payload(
            "Parse", statement="all", query="SELECT * FROM pp_item", parameter_types=[]
        )
        assert types(run(a, client.parse(parse, server))) == "1Z"
        a.query("ALTER TABLE pp_item ADD COLUMN b int DEFAULT 2")

        stale = client.bind(bind("all"), server)
        assert stale is not None
        a.send(b"".join(stale.frames) + EXECUTE + SYNC)
        error = a.expect_error()
        assert (error.code, error.message) == ("0A000", "cached plan must not change result type")
        a.read_until(BackendType.READY_FOR_QUERY)

        assert registry.invalidate(["pp_item"]) == {b"PGMIGRATE_1"}
        checkout = server.checkout()
        assert types(run(a, checkout)) == ""  # CloseComplete and ReadyForQuery swallowed
        assert prepared_on(a) == {}
        seen = run(a, client.bind(bind("all"), server), EXECUTE)
        assert types(seen) == "2DCZ" and value(seen) == [b"1", b"2"]
        assert prepared_on(a) == {"PGMIGRATE_2": "{}"}


def test_an_injected_parse_that_fails_is_undone(pg: Any) -> None:
    registry = Registry()
    client = ClientStatements(registry)
    with WireClient(pg.host, pg.port) as a, WireClient(pg.host, pg.port) as b:
        a.login()
        b.login()
        one, two = ServerStatements(registry, 10), ServerStatements(registry, 10)
        a.query("CREATE TEMP TABLE pp_only_here (a int)")
        parse = schema.build_payload(
            "Parse", statement="q", query="SELECT * FROM pp_only_here", parameter_types=[]
        )
        assert types(run(a, client.parse(parse, one))) == "1Z"
        step = client.bind(bind("q"), two)
        assert step is not None
        b.send(b"".join(step.frames) + SYNC)
        assert ErrorResponse.decode(b.read_until(BackendType.ERROR_RESPONSE)[-1][1]).code == "42P01"
        b.read_until(BackendType.READY_FOR_QUERY)
        for expect in step.expect:  # the injected Parse failed, the Bind was skipped
            two.undo(expect)
            client.undo(expect)
        assert two.names() == [] and prepared_on(b) == {}
