"""Prepared statements under transaction pooling: client names mapped to proxy-wide names,
Parse injected where a server lacks the statement, an LRU per server, invalidation after DDL.
Byte-level checks against the construct layouts; a property test over random sequences of
Parse/Bind/Describe/Close by several clients on several servers, with failures."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pgmigrate_proxy.protocol import schema
from pgmigrate_proxy.protocol.framing import frame
from pgmigrate_proxy.protocol.prepared import (
    CLOSE_COMPLETE,
    PARSE_COMPLETE,
    ClientStatements,
    Expect,
    QueryAction,
    Registry,
    Reply,
    ServerStatements,
    Step,
)
from pgmigrate_proxy.protocol.types import FrontendType

F = FrontendType


def parse_payload(name: str, query: str, types: tuple[int, ...] = ()) -> bytes:
    return schema.build_payload("Parse", statement=name, query=query, parameter_types=list(types))


def bind_payload(statement: str, params: tuple[bytes | None, ...] = (), portal: str = "") -> bytes:
    return schema.build_payload(
        "Bind",
        portal=portal,
        statement=statement,
        parameter_formats=[0] * len(params),
        parameters=list(params),
        result_formats=[1],
    )


def close_payload(name: str, kind: bytes = b"S") -> bytes:
    return schema.build_payload("Close", kind=kind, name=name)


def describe_payload(name: str, kind: bytes = b"S") -> bytes:
    return schema.build_payload("Describe", kind=kind, name=name)


def types_of(step: Step) -> list[str]:
    return [chr(f[0]) for f in step.frames]


def no_relations(query: str) -> frozenset[str]:
    return frozenset()


@pytest.fixture
def registry() -> Registry:
    return Registry()


# --- bytes --------------------------------------------------------------------------------


def test_a_rewritten_parse_is_the_layout_with_the_proxy_name(registry: Registry) -> None:
    client, server = ClientStatements(registry), ServerStatements(registry, 10)
    step = client.parse(parse_payload("s1", "SELECT $1::int", (23,)), server)
    assert step is not None
    assert step.frames == (
        schema.build(
            "Parse", statement="PGMIGRATE_1", query="SELECT $1::int", parameter_types=[23]
        ),
    )
    assert [e.reply for e in step.expect] == [Reply.FORWARD]
    assert server.names() == [b"PGMIGRATE_1"]


def test_a_rewritten_bind_keeps_everything_but_the_name(registry: Registry) -> None:
    client, server = ClientStatements(registry), ServerStatements(registry, 10)
    client.parse(parse_payload("s1", "SELECT $1::int, $2::text", (23, 25)), server)
    step = client.bind(bind_payload("s1", (b"41", None), portal="p"), server)
    assert step is not None
    parsed = schema.parse("Bind", step.frames[-1])
    assert parsed.statement == "PGMIGRATE_1"
    assert (parsed.portal, list(parsed.parameters), list(parsed.result_formats)) == (
        "p",
        [b"41", None],
        [1],
    )
    assert step.frames[-1] == schema.build(
        "Bind",
        portal="p",
        statement="PGMIGRATE_1",
        parameter_formats=[0, 0],
        parameters=[b"41", None],
        result_formats=[1],
    )


def test_describe_and_close_of_a_statement(registry: Registry) -> None:
    client, server = ClientStatements(registry), ServerStatements(registry, 10)
    client.parse(parse_payload("s1", "SELECT 1"), server)
    step = client.describe(describe_payload("s1"), server)
    assert step is not None and step.frames == (
        schema.build("Describe", kind=b"S", name="PGMIGRATE_1"),
    )
    assert client.describe(describe_payload("", b"P"), server) is None
    closed = client.close(close_payload("s1"), server)
    assert closed is not None and closed.frames == ()
    assert [(e.reply, e.frame) for e in closed.expect] == [(Reply.ANSWER, CLOSE_COMPLETE)]
    assert server.names() == [b"PGMIGRATE_1"]  # kept for other clients
    assert client.close(close_payload("portal", b"P"), server) is None


def test_unnamed_and_unknown_statements_pass_through(registry: Registry) -> None:
    client, server = ClientStatements(registry), ServerStatements(registry, 10)
    assert client.parse(parse_payload("", "SELECT 1"), server) is None
    assert client.bind(bind_payload(""), server) is None
    assert client.bind(bind_payload("never_parsed"), server) is None
    assert client.message(F.EXECUTE, b"\0\0\0\0\0", server) is None
    assert client.message(F.SYNC, b"", server) is None


# --- sharing, injection, eviction ---------------------------------------------------------


def test_clients_share_a_statement_and_the_proxy_answers_the_second_parse(
    registry: Registry,
) -> None:
    server = ServerStatements(registry, 10)
    first, second = ClientStatements(registry), ClientStatements(registry)
    first.parse(parse_payload("a", "SELECT 1"), server)
    step = second.parse(parse_payload("b", "SELECT 1"), server)
    assert step is not None and step.frames == ()
    assert step.expect == (
        Expect(Reply.ANSWER, PARSE_COMPLETE, key=first.key(b"a"), client_name=b"b"),
    )
    bind = second.bind(bind_payload("b"), server)
    assert bind is not None and schema.parse("Bind", bind.frames[0]).statement == "PGMIGRATE_1"


def test_same_text_other_parameter_types_is_another_statement(registry: Registry) -> None:
    client, server = ClientStatements(registry), ServerStatements(registry, 10)
    client.parse(parse_payload("a", "SELECT $1"), server)
    client.parse(parse_payload("b", "SELECT $1", (23,)), server)
    assert server.names() == [b"PGMIGRATE_1", b"PGMIGRATE_2"]


def test_a_bind_on_another_server_injects_the_parse_and_swallows_its_reply(
    registry: Registry,
) -> None:
    client = ClientStatements(registry)
    one, two = ServerStatements(registry, 10), ServerStatements(registry, 10)
    client.parse(parse_payload("s", "SELECT $1::int", (23,)), one)
    step = client.bind(bind_payload("s", (b"1",)), two)
    assert step is not None
    assert types_of(step) == ["P", "B"]
    assert step.frames[0] == schema.build(
        "Parse", statement="PGMIGRATE_1", query="SELECT $1::int", parameter_types=[23]
    )
    assert [e.reply for e in step.expect] == [Reply.SWALLOW, Reply.FORWARD]
    again = client.bind(bind_payload("s", (b"2",)), two)
    assert again is not None and types_of(again) == ["B"]


def test_the_lru_closes_the_least_recently_used(registry: Registry) -> None:
    client, server = ClientStatements(registry), ServerStatements(registry, 2)
    for name in ("a", "b"):
        client.parse(parse_payload(name, f"SELECT '{name}'"), server)
    client.bind(bind_payload("a"), server)  # a is now the most recent
    step = client.parse(parse_payload("c", "SELECT 'c'"), server)
    assert step is not None and types_of(step) == ["C", "P"]
    assert schema.parse("Close", step.frames[0]).name == "PGMIGRATE_2"
    assert [e.reply for e in step.expect] == [Reply.SWALLOW, Reply.FORWARD]
    assert server.names() == [b"PGMIGRATE_1", b"PGMIGRATE_3"]
    back = client.bind(bind_payload("b"), server)  # b again: re-prepared, a evicted
    assert back is not None and types_of(back) == ["C", "P", "B"]


def test_a_duplicate_parse_is_postgresqls_error(registry: Registry) -> None:
    client, server = ClientStatements(registry), ServerStatements(registry, 10)
    client.parse(parse_payload("s", "SELECT 1"), server)
    step = client.parse(parse_payload("s", "SELECT 2"), server)
    assert step is not None and step.frames == () and step.error
    error = schema.parse("ErrorResponse", step.error)
    assert dict(error.fields)["C"] == "42P05"
    assert dict(error.fields)["M"] == 'prepared statement "s" already exists'


def test_a_failed_parse_is_undone_on_both_sides(registry: Registry) -> None:
    client, server = ClientStatements(registry), ServerStatements(registry, 1)
    client.parse(parse_payload("a", "SELECT 1"), server)
    step = client.parse(parse_payload("b", "SELECT nosuchcolumn"), server)
    assert step is not None and types_of(step) == ["C", "P"]
    for expect in step.expect[1:]:  # the Parse failed; the Close before it ran
        server.undo(expect)
        client.undo(expect)
    assert server.names() == [] and client.key(b"b") is None
    assert client.key(b"a") is not None
    assert len(registry) == 1  # only a, held by its client


def test_a_skipped_close_is_undone(registry: Registry) -> None:
    client, server = ClientStatements(registry), ServerStatements(registry, 1)
    client.parse(parse_payload("a", "SELECT 1"), server)
    step = client.parse(parse_payload("b", "SELECT 2"), server)
    assert step is not None
    for expect in step.expect:  # an error earlier in the batch: both skipped
        server.undo(expect)
        client.undo(expect)
    assert server.names() == [b"PGMIGRATE_1"]
    closing = client.close(close_payload("a"), server)
    assert closing is not None
    client.undo(closing.expect[0])
    assert client.key(b"a") is not None


# --- DEALLOCATE, DISCARD ALL, a client leaving -----------------------------------------------


@pytest.mark.parametrize(
    ("sql", "action", "left"),
    [
        ("DEALLOCATE s1", QueryAction.ANSWER_DEALLOCATE, {b"S2"}),
        ('deallocate prepare "S2";', QueryAction.ANSWER_DEALLOCATE, {b"s1"}),
        ("DEALLOCATE other", QueryAction.FORWARD, {b"s1", b"S2"}),
        ("DEALLOCATE ALL", QueryAction.FORWARD_THEN_CLEAR, set()),
        (" discard all ; ", QueryAction.FORWARD_THEN_CLEAR, set()),
        ("DISCARD PLANS", QueryAction.FORWARD, {b"s1", b"S2"}),
        ("SELECT 1; DEALLOCATE s1", QueryAction.FORWARD, {b"s1", b"S2"}),
    ],
)
def test_deallocate_and_discard_all(
    registry: Registry, sql: str, action: QueryAction, left: set[bytes]
) -> None:
    client, server = ClientStatements(registry), ServerStatements(registry, 10)
    client.parse(parse_payload("s1", "SELECT 1"), server)
    client.parse(parse_payload("S2", "SELECT 2"), server)
    assert client.query(sql) is action
    assert {name for name in (b"s1", b"S2") if client.key(name)} == left


def test_everything_is_released_when_clients_and_servers_go(registry: Registry) -> None:
    client, server = ClientStatements(registry), ServerStatements(registry, 10)
    client.parse(parse_payload("s1", "SELECT 1"), server)
    client.release_all()
    assert len(registry) == 1  # the server still has it
    server.clear()
    assert len(registry) == 0


# --- invalidation after DDL ---------------------------------------------------------------


def test_ddl_retires_the_statements_naming_the_table(registry: Registry) -> None:
    client = ClientStatements(registry)
    one, two = ServerStatements(registry, 10), ServerStatements(registry, 10)
    client.parse(parse_payload("items", 'SELECT * FROM public."app_item" WHERE id = $1'), one)
    client.parse(parse_payload("other", "SELECT * FROM app_owner"), one)
    client.bind(bind_payload("items", (b"1",)), two)
    assert registry.invalidate(["app_item"]) == {b"PGMIGRATE_1"}
    for server in (one, two):
        step = server.checkout()
        assert types_of(step) == ["C", "S"]
        assert schema.parse("Close", step.frames[0]).name == "PGMIGRATE_1"
        assert all(e.reply is Reply.SWALLOW for e in step.expect) and len(step.expect) == 2
        assert server.checkout() == Step()
    assert one.names() == [b"PGMIGRATE_2"]
    again = client.bind(bind_payload("items", (b"1",)), one)
    assert again is not None and types_of(again) == ["P", "B"]
    assert schema.parse("Parse", again.frames[0]).statement == "PGMIGRATE_3"


def test_unknown_relations_are_retired_by_any_ddl() -> None:
    registry = Registry(relations_of=lambda query: None)
    client, server = ClientStatements(registry), ServerStatements(registry, 10)
    client.parse(parse_payload("s", "SELECT f()"), server)
    assert registry.invalidate(["anything"]) == {b"PGMIGRATE_1"}


def test_a_server_behind_the_kept_history_closes_everything() -> None:
    registry = Registry(history=1)
    client, server = ClientStatements(registry), ServerStatements(registry, 10)
    client.parse(parse_payload("a", "SELECT * FROM a"), server)
    client.parse(parse_payload("b", "SELECT * FROM b"), server)
    registry.invalidate(["a"])
    registry.invalidate(["zzz_unrelated"])  # retires nothing: no new epoch
    client.parse(parse_payload("c", "SELECT * FROM c"), server)
    registry.invalidate(["c"])
    # Two epochs passed and the registry keeps one: the server cannot tell, so all go.
    assert types_of(server.checkout()) == ["C", "C", "C", "S"]
    assert server.names() == []


# --- property: random traffic never binds what a server lacks -----------------------------

QUERIES = [f"SELECT {n} FROM t{n % 3}" for n in range(6)]
NAMES = ["s0", "s1", "s2"]


@dataclass
class FakePostgres:
    """What PostgreSQL keeps of named statements, and its errors for what it lacks."""

    prepared: set[bytes] = field(default_factory=set)

    def run(self, frames: tuple[bytes, ...], fail_at: int | None) -> int | None:
        """Apply the frames up to the failing one; return the index that failed or None."""
        for index, data in enumerate(frames):
            mtype, payload = data[0], data[5:]
            name = payload.split(b"\0", 1)[0]
            if index == fail_at:
                return index
            if mtype == F.PARSE:
                assert name not in self.prepared, "42P05: already exists"
                self.prepared.add(name)
            elif mtype == F.CLOSE:
                self.prepared.discard(payload[1:-1])
            elif mtype == F.BIND:
                statement = payload.split(b"\0")[1]
                assert statement in self.prepared, f"26000: {statement!r} does not exist"
            elif mtype == F.DESCRIBE:
                assert payload[1:-1] in self.prepared, "26000"
        return None


OPS = st.tuples(
    st.integers(0, 2),  # client
    st.integers(0, 2),  # server
    st.sampled_from(["parse", "bind", "describe", "close", "deallocate_all", "ddl"]),
    st.integers(0, len(NAMES) - 1),
    st.integers(0, len(QUERIES) - 1),
    st.one_of(st.none(), st.integers(0, 3)),  # the frame at which PostgreSQL fails, if any
)


@settings(max_examples=300, deadline=None)
@given(capacity=st.integers(1, 4), ops=st.lists(OPS, max_size=60))
def test_random_traffic(
    capacity: int, ops: list[tuple[int, int, str, int, int, int | None]]
) -> None:
    registry = Registry(relations_of=lambda q: frozenset({q.rsplit(" ", 1)[-1]}))
    clients = [ClientStatements(registry) for _ in range(3)]
    servers = [ServerStatements(registry, capacity) for _ in range(3)]
    pgs = [FakePostgres() for _ in range(3)]
    for c, s, op, n, q, fail in ops:
        client, server, pg = clients[c], servers[s], pgs[s]
        checkout = server.checkout()  # the pooler hands the server out
        assert pg.run(checkout.frames, None) is None
        name = NAMES[n]
        if op == "parse":
            step = client.message(F.PARSE, parse_payload(name, QUERIES[q]), server)
        elif op == "bind":
            step = client.message(F.BIND, bind_payload(name), server)
        elif op == "describe":
            step = client.message(F.DESCRIBE, describe_payload(name), server)
        elif op == "close":
            step = client.message(F.CLOSE, close_payload(name), server)
        elif op == "deallocate_all":
            assert client.query("DEALLOCATE ALL") is QueryAction.FORWARD_THEN_CLEAR
            pg.prepared.clear()
            server.clear()
            continue
        else:
            registry.invalidate([f"t{q % 3}"])
            continue
        if step is None or step.error:
            continue
        failed = pg.run(step.frames, fail)
        if failed is not None:  # the failed message and every later one: undone
            sent = [e for e in step.expect if e.reply is not Reply.ANSWER]
            skipped = sent[failed:] + [e for e in step.expect if e.reply is Reply.ANSWER]
            for expect in skipped:
                server.undo(expect)
                client.undo(expect)
        for other, other_pg in zip(servers, pgs, strict=True):
            assert set(other.names()) == other_pg.prepared
            assert len(other) <= capacity
    for client in clients:
        client.release_all()
    for server in servers:
        server.clear()
    assert len(registry) == 0


def test_parse_complete_and_close_complete_frames() -> None:
    assert PARSE_COMPLETE == schema.build("ParseComplete") == frame(ord("1"))
    assert schema.build("CloseComplete") == CLOSE_COMPLETE
    assert struct.unpack("!cI", PARSE_COMPLETE) == (b"1", 4)
