"""The session state machine: golden conversations, the table as a spec, random valid traffic."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pgmigrate_proxy.protocol import schema
from pgmigrate_proxy.protocol.state import (
    BACKEND_TRANSITIONS,
    FRONTEND_TRANSITIONS,
    ClientState,
    Conversation,
    ProtocolViolation,
    ServerState,
    Side,
)
from pgmigrate_proxy.protocol.types import BackendType, FrontendType, TransactionStatus

Event = tuple[Side, int, bytes]
S = ServerState
Cl = ClientState
Be = BackendType
Fe = FrontendType


def fe(name: str, /, **fields: object) -> Event:
    return (Side.FRONTEND, schema.TYPES[name], schema.build_payload(name, **fields))


def be(name: str, /, **fields: object) -> Event:
    return (Side.BACKEND, schema.TYPES[name], schema.build_payload(name, **fields))


def raw(mtype: BackendType, payload: bytes) -> Event:
    """A backend message with a payload the schema would refuse to build."""
    return (Side.BACKEND, mtype, payload)


def query(sql: str) -> Event:
    return fe("Query", sql=sql)


def ready(status: str = "I") -> Event:
    return be("ReadyForQuery", status=ord(status))


def error(code: str = "42601", severity: str = "ERROR") -> Event:
    fields = {"S": severity, "V": severity, "C": code, "M": "boom"}
    return be("ErrorResponse", fields=fields)


def notice(message: str = "note") -> Event:
    return be("NoticeResponse", fields={"S": "NOTICE", "V": "NOTICE", "C": "00000", "M": message})


def complete(tag: str) -> Event:
    return be("CommandComplete", tag=tag)


def row(*columns: bytes | None) -> Event:
    return be("DataRow", columns=list(columns))


def copy_data(data: bytes, side: Side = Side.FRONTEND) -> Event:
    return (fe if side is Side.FRONTEND else be)("CopyData", data=data)


COLUMN = {
    "name": "n", "table_oid": 0, "column_number": 0, "type_oid": 23, "type_size": 4,
    "type_modifier": -1, "format": 0,
}  # fmt: skip
ROW_DESCRIPTION = be("RowDescription", fields=[COLUMN])
PARSE = fe("Parse", statement="", query="SELECT $1", parameter_types=[23])
BIND = fe(
    "Bind", portal="", statement="", parameter_formats=[0], parameters=[b"1"], result_formats=[0]
)
DESCRIBE_PORTAL = fe("Describe", kind=b"P", name="")
DESCRIBE_STATEMENT = fe("Describe", kind=b"S", name="")
EXECUTE = fe("Execute", portal="", max_rows=0)
CLOSE = fe("Close", kind=b"S", name="s1")
SYNC = fe("Sync")
FLUSH = fe("Flush")
TERMINATE = fe("Terminate")
COPY_DONE_FE = fe("CopyDone")
COPY_DONE_BE = be("CopyDone")
COPY_FAIL = fe("CopyFail", message="client gave up")
PARSE_COMPLETE = be("ParseComplete")
BIND_COMPLETE = be("BindComplete")
CLOSE_COMPLETE = be("CloseComplete")
NO_DATA = be("NoData")
PARAMETER_DESCRIPTION = be("ParameterDescription", type_oids=[23])
PORTAL_SUSPENDED = be("PortalSuspended")
EMPTY_QUERY = be("EmptyQueryResponse")
COPY_IN = be("CopyInResponse", format=0, column_formats=[0, 0])
COPY_OUT = be("CopyOutResponse", format=0, column_formats=[0])
COPY_BOTH = be("CopyBothResponse", format=0, column_formats=[])
FUNCTION_CALL = fe(
    "FunctionCall", function_oid=1598, argument_formats=[], arguments=[], result_format=0
)
FUNCTION_RESULT = be("FunctionCallResponse", result=b"0.5")
NOTIFICATION = be("NotificationResponse", process_id=77, channel="jobs", payload="42")
PARAMETER_STATUS = be("ParameterStatus", name="TimeZone", value="UTC")
ASYNC = (notice(), NOTIFICATION, PARAMETER_STATUS)


@dataclass(frozen=True)
class At:
    """A checkpoint: the conversation's view at this point of a script."""

    server: ServerState | None = None
    client: ClientState | None = None
    pending: int | None = None
    idle: bool | None = None
    in_copy: bool | None = None
    status: str | None = None


Step = Event | At


def send(conversation: Conversation, event: Event) -> None:
    side, mtype, payload = event
    if side is Side.FRONTEND:
        conversation.frontend(mtype, payload)
    else:
        conversation.backend(mtype, payload)


def check(conversation: Conversation, at: At) -> None:
    view = {
        "server": conversation.server,
        "client": conversation.client,
        "pending": conversation.pending,
        "idle": conversation.idle,
        "in_copy": conversation.in_copy,
        "status": chr(conversation.transaction_status),
    }
    wanted = {k: v for k, v in vars(at).items() if v is not None}
    assert {k: view[k] for k in wanted} == wanted


def play(conversation: Conversation, script: list[Step]) -> Conversation:
    for number, step in enumerate(script):
        if isinstance(step, At):
            try:
                check(conversation, step)
            except AssertionError as exc:
                raise AssertionError(f"at step {number}: {exc}") from None
        else:
            send(conversation, step)
    return conversation


IDLE = At(server=S.IDLE, client=Cl.READY, pending=0, idle=True, in_copy=False)

# --- golden conversations -----------------------------------------------------------------------

GOLDEN: dict[str, list[Step]] = {
    "simple query": [
        query("SELECT 1"),
        At(server=S.QUERY, pending=1, idle=False),
        ROW_DESCRIPTION, row(b"1"), complete("SELECT 1"),
        At(server=S.QUERY, pending=1),
        ready("I"),
        IDLE,
    ],
    "empty query": [query(""), EMPTY_QUERY, ready(), IDLE],
    "multi-statement query, error in the middle": [
        query("SELECT 1; SELECT 1/0; SELECT 3"),
        ROW_DESCRIPTION, row(b"1"), complete("SELECT 1"),
        ROW_DESCRIPTION, error("22012"),
        At(server=S.READY, pending=1),  # the rest of the query string is skipped
        ready("I"),
        IDLE,
    ],
    "transaction status": [
        query("BEGIN"), complete("BEGIN"), ready("T"), At(status="T", idle=True),
        query("SELECT nope"), error("42703"), ready("E"), At(status="E", idle=True),
        query("ROLLBACK"), complete("ROLLBACK"), ready("I"), At(status="I", idle=True),
    ],
    "extended pipeline": [
        *[PARSE, BIND, DESCRIBE_PORTAL, EXECUTE, SYNC] * 3,
        At(server=S.PARSE, client=Cl.READY, pending=3, idle=False),
        *[PARSE_COMPLETE, BIND_COMPLETE, ROW_DESCRIPTION, row(b"1"), complete("SELECT 1")] * 1,
        At(server=S.SYNC, pending=3),
        ready(),
        *[PARSE_COMPLETE, BIND_COMPLETE, ROW_DESCRIPTION, row(b"1"), complete("SELECT 1")],
        ready(),
        *[PARSE_COMPLETE, BIND_COMPLETE, ROW_DESCRIPTION, row(b"1"), complete("SELECT 1")],
        ready(),
        IDLE,
    ],
    "extended batch open until Sync": [
        PARSE, At(client=Cl.BATCH, server=S.PARSE, pending=0, idle=False),
        BIND, EXECUTE, FLUSH,
        PARSE_COMPLETE, BIND_COMPLETE, complete("INSERT 0 1"),
        At(server=S.IDLE, client=Cl.BATCH, pending=0, idle=False),  # answered, batch still open
        SYNC, At(server=S.SYNC, client=Cl.READY, pending=1),
        ready("I"), IDLE,
    ],
    "extended pipeline, error skips to Sync": [
        PARSE, BIND, EXECUTE, SYNC,
        PARSE, BIND, EXECUTE, SYNC,
        PARSE, BIND, EXECUTE, SYNC,
        PARSE_COMPLETE, BIND_COMPLETE, complete("INSERT 0 1"), ready(),
        PARSE_COMPLETE, error("23505"),
        At(server=S.SYNC, pending=2, client=Cl.READY),  # Bind and Execute of batch 2 skipped
        ready("I"),
        PARSE_COMPLETE, BIND_COMPLETE, complete("INSERT 0 1"), ready(),
        IDLE,
    ],
    "error before the Sync is sent: skipping": [
        PARSE, BIND, EXECUTE, FLUSH,
        PARSE_COMPLETE, error("42P01"),
        At(server=S.IDLE, client=Cl.SKIPPING, pending=0, idle=False),
        BIND, EXECUTE, FLUSH, query("SELECT 1"),  # all discarded by the server
        At(server=S.IDLE, client=Cl.SKIPPING, pending=0),
        SYNC, At(server=S.SYNC, client=Cl.READY, pending=1),
        ready("I"), IDLE,
    ],
    "a Query pipelined behind a failing batch is skipped": [
        PARSE, BIND, EXECUTE, query("SELECT 2"),
        At(pending=1, client=Cl.READY),
        PARSE_COMPLETE, error("42P01"),
        At(server=S.IDLE, client=Cl.SKIPPING, pending=0),
        SYNC, ready(), IDLE,
    ],
    "Sync fails to commit": [
        PARSE, BIND, EXECUTE, SYNC,
        PARSE_COMPLETE, BIND_COMPLETE, complete("INSERT 0 1"),
        error("40001"), At(server=S.SYNC, pending=1),
        ready("I"), IDLE,
    ],
    "describe statement, close, portal suspended": [
        fe("Parse", statement="s1", query="SELECT 1", parameter_types=[]),
        DESCRIBE_STATEMENT, SYNC,
        PARSE_COMPLETE, At(server=S.DESCRIBE_STATEMENT),
        PARAMETER_DESCRIPTION, At(server=S.DESCRIBE_ROWS),
        ROW_DESCRIPTION, ready(),
        fe("Describe", kind=b"S", name="s2"), SYNC, PARAMETER_DESCRIPTION, NO_DATA, ready(),
        BIND, fe("Execute", portal="", max_rows=1), SYNC,
        BIND_COMPLETE, row(b"1"), PORTAL_SUSPENDED, ready("T"),
        CLOSE, SYNC, CLOSE_COMPLETE, ready("T"),
        IDLE,
    ],
    "COPY FROM STDIN": [
        query("COPY t FROM STDIN"),
        COPY_IN,
        At(server=S.COPY_IN, client=Cl.COPY, in_copy=True, pending=1, idle=False),
        copy_data(b"1\t2\n"), copy_data(b"3\t4\n"),
        COPY_DONE_FE,
        At(server=S.QUERY, client=Cl.READY, in_copy=False, pending=1),
        complete("COPY 2"), ready(), IDLE,
    ],
    "COPY FROM STDIN, extended (libpq sends Sync before and after)": [
        PARSE, BIND, DESCRIBE_PORTAL, EXECUTE, SYNC,
        PARSE_COMPLETE, BIND_COMPLETE, NO_DATA, COPY_IN,
        At(server=S.COPY_IN, client=Cl.COPY, pending=0),  # that Sync is ignored in copy-in
        copy_data(b"1\n"), FLUSH, SYNC, copy_data(b"2\n"),
        COPY_DONE_FE,
        At(server=S.EXECUTE, client=Cl.BATCH, idle=False),
        SYNC, complete("COPY 2"), At(server=S.SYNC, pending=1),
        ready(), IDLE,
    ],
    "COPY FROM STDIN, the server fails it": [
        query("COPY t FROM STDIN"), COPY_IN,
        copy_data(b"bad\n"),
        error("22P02"),
        At(server=S.READY, client=Cl.READY, in_copy=False, pending=1),
        copy_data(b"more\n"), COPY_DONE_FE,  # still in flight: PostgreSQL drops them
        ready("I"), IDLE,
    ],
    "COPY FROM STDIN, extended, the server fails it": [
        PARSE, BIND, EXECUTE, SYNC,
        PARSE_COMPLETE, BIND_COMPLETE, COPY_IN, copy_data(b"bad\n"),
        error("22P02"),
        At(server=S.IDLE, client=Cl.SKIPPING, in_copy=False, pending=0),
        copy_data(b"more\n"), COPY_DONE_FE, SYNC,
        ready(), IDLE,
    ],
    "COPY FROM STDIN, CopyFail": [
        query("COPY t FROM STDIN"), COPY_IN, copy_data(b"1\n"),
        COPY_FAIL, At(server=S.QUERY, client=Cl.READY, in_copy=False),
        error("57014"), ready(), IDLE,
    ],
    "COPY TO STDOUT": [
        query("COPY t TO STDOUT"), COPY_OUT,
        At(server=S.COPY_OUT, client=Cl.READY, in_copy=True),
        copy_data(b"1\n", Side.BACKEND),
        query("SELECT 1"),  # the client may queue its next query meanwhile
        copy_data(b"2\n", Side.BACKEND), COPY_DONE_BE,
        At(server=S.QUERY, pending=2, in_copy=False),
        complete("COPY 2"), ready(),
        ROW_DESCRIPTION, row(b"1"), complete("SELECT 1"), ready(),
        IDLE,
    ],
    "COPY TO STDOUT, extended": [
        PARSE, BIND, EXECUTE, SYNC,
        PARSE_COMPLETE, BIND_COMPLETE, COPY_OUT, copy_data(b"1\n", Side.BACKEND), COPY_DONE_BE,
        At(server=S.EXECUTE), complete("COPY 1"), ready(), IDLE,
    ],
    "COPY BOTH, the client ends first (replication)": [
        query("START_REPLICATION SLOT s LOGICAL 0/0"),
        COPY_BOTH,
        At(server=S.COPY_BOTH, client=Cl.COPY, in_copy=True),
        copy_data(b"w...", Side.BACKEND), copy_data(b"r..."), copy_data(b"k...", Side.BACKEND),
        COPY_DONE_FE,
        At(server=S.COPY_OUT, client=Cl.READY, in_copy=True),
        copy_data(b"w...", Side.BACKEND), COPY_DONE_BE,
        At(server=S.QUERY, in_copy=False),
        complete("START_REPLICATION"), ready(), IDLE,
    ],
    "COPY BOTH, the server ends first (end of timeline)": [
        query("START_REPLICATION 0/0 TIMELINE 1"), COPY_BOTH,
        copy_data(b"w...", Side.BACKEND), COPY_DONE_BE,
        At(server=S.COPY_IN, client=Cl.COPY, in_copy=True),
        copy_data(b"r..."), COPY_DONE_FE,
        At(server=S.QUERY, in_copy=False),
        ROW_DESCRIPTION, row(b"2", b"0/3000000"), complete("SELECT"),
        complete("START_STREAMING"), ready(), IDLE,
    ],
    "COPY BOTH, the server fails it": [
        query("START_REPLICATION 0/0"), COPY_BOTH, copy_data(b"w", Side.BACKEND),
        error("58P01"), At(server=S.READY, client=Cl.READY, in_copy=False),
        ready(), IDLE,
    ],
    "LISTEN / NOTIFY while idle": [
        query("LISTEN jobs"), complete("LISTEN"), ready(), IDLE,
        NOTIFICATION, IDLE,
        NOTIFICATION, PARAMETER_STATUS, notice(), IDLE,
        query("SELECT 1"), NOTIFICATION, ROW_DESCRIPTION, row(b"1"), complete("SELECT 1"),
        ready(), IDLE,
    ],
    "FunctionCall": [
        FUNCTION_CALL,
        At(server=S.FUNCTION_CALL, pending=1, idle=False),
        FUNCTION_RESULT, At(server=S.READY, pending=1),
        ready(), IDLE,
        FUNCTION_CALL, error("42883"), At(server=S.READY, pending=1), ready(), IDLE,
    ],
    "a FunctionCall pipelined behind a failing batch is skipped": [
        PARSE, BIND, EXECUTE, FUNCTION_CALL,
        At(pending=1, client=Cl.READY),
        PARSE_COMPLETE, error("42P01"),
        At(server=S.IDLE, client=Cl.SKIPPING, pending=0),
        SYNC, ready(), IDLE,
    ],
    "asynchronous messages anywhere": [
        *ASYNC,
        PARSE, BIND, EXECUTE, SYNC, *ASYNC,
        PARSE_COMPLETE, *ASYNC, BIND_COMPLETE, *ASYNC, row(b"1"), *ASYNC,
        complete("SELECT 1"), *ASYNC, ready(), *ASYNC,
        query("COPY t FROM STDIN"), COPY_IN, *ASYNC, COPY_DONE_FE, *ASYNC,
        complete("COPY 0"), ready(),
        query("COPY t TO STDOUT"), COPY_OUT, *ASYNC, COPY_DONE_BE, complete("COPY 0"), ready(),
        IDLE,
    ],
    "pipelined simple queries": [
        query("SELECT 1"), query("SELECT 2"), At(pending=2),
        complete("SELECT 1"), ready(), At(pending=1, idle=False),
        complete("SELECT 2"), ready(), IDLE,
    ],
}  # fmt: skip

STARTUP_GOLDEN: dict[str, list[Step]] = {
    "SCRAM authentication": [
        At(server=S.STARTUP, client=Cl.STARTUP, pending=1, idle=False),
        be("AuthenticationSASL", mechanisms=["SCRAM-SHA-256"]),
        fe("SASLInitialResponse", mechanism="SCRAM-SHA-256", data=b"n,,n=,r=abc"),
        be("AuthenticationSASLContinue", data=b"r=abcdef,s=c2FsdA==,i=4096"),
        fe("SASLResponse", data=b"c=biws,r=abcdef,p=proof"),
        be("AuthenticationSASLFinal", data=b"v=sig"),
        be("AuthenticationOk"),
        PARAMETER_STATUS, be("BackendKeyData", process_id=9, secret_key=b"abcd"),
        notice(),
        ready("I"),
        IDLE,
    ],
    "protocol negotiation": [
        be("NegotiateProtocolVersion", newest_minor=0, unrecognized=["_pq_.x"]),
        be("AuthenticationOk"), ready("I"), IDLE,
    ],
    "authentication fails": [
        be("AuthenticationMD5Password", salt=b"salt"),
        fe("PasswordMessage", password="md5..."),
        error("28P01", "FATAL"),
        At(server=S.CLOSED, idle=False, pending=0),
    ],
    "client gives up during authentication": [
        be("AuthenticationCleartextPassword"), TERMINATE, At(client=Cl.CLOSED, idle=False),
    ],
}  # fmt: skip

ENDINGS: dict[str, list[Step]] = {
    "terminated by an administrator while idle": [
        error("57P01", "FATAL"), At(server=S.CLOSED, idle=False, pending=0),
    ],
    "FATAL in the middle of a query": [
        query("SELECT pg_sleep(10)"), error("57P01", "FATAL"),
        At(server=S.CLOSED, pending=0, idle=False),
    ],
    "Terminate": [TERMINATE, At(client=Cl.CLOSED, server=S.IDLE, idle=False)],
    "Terminate after a pipelined query: the server still answers it": [
        query("SELECT 1"), TERMINATE, At(client=Cl.CLOSED, server=S.QUERY),
        complete("SELECT 1"), ready(), At(client=Cl.CLOSED, server=S.IDLE, idle=False),
    ],
}  # fmt: skip


@pytest.mark.parametrize("name", GOLDEN)
def test_golden_conversation(name: str) -> None:
    play(Conversation.ready(), GOLDEN[name])


@pytest.mark.parametrize("name", STARTUP_GOLDEN)
def test_golden_startup(name: str) -> None:
    play(Conversation(), STARTUP_GOLDEN[name])


@pytest.mark.parametrize("name", ENDINGS)
def test_golden_endings(name: str) -> None:
    play(Conversation.ready(), ENDINGS[name])


def test_ready_with_a_status() -> None:
    conversation = Conversation.ready(TransactionStatus.IN_TRANSACTION)
    assert conversation.transaction_status is TransactionStatus.IN_TRANSACTION
    assert conversation.idle


def test_expected_queue() -> None:
    conversation = play(Conversation.ready(), [PARSE, BIND, DESCRIBE_STATEMENT, EXECUTE, SYNC])
    assert conversation.expected == (S.PARSE, S.BIND, S.DESCRIBE_STATEMENT, S.EXECUTE, S.SYNC)


# --- violations ---------------------------------------------------------------------------------

VIOLATIONS: dict[str, tuple[list[Step], Event, Side]] = {
    "rows after an error in a Query": ([query("x"), error()], row(b"1"), Side.BACKEND),
    "a ReadyForQuery nobody asked for": ([], ready(), Side.BACKEND),
    "ParseComplete where BindComplete is due": ([BIND], PARSE_COMPLETE, Side.BACKEND),
    "a non-fatal error while idle": ([], error(), Side.BACKEND),
    "anything after the server's FATAL": ([error("57P01", "FATAL")], notice(), Side.BACKEND),
    "a bad ReadyForQuery status": ([query("x")], raw(Be.READY_FOR_QUERY, b"X"), Side.BACKEND),
    "an empty ReadyForQuery": ([query("x")], raw(Be.READY_FOR_QUERY, b""), Side.BACKEND),
    "a malformed ErrorResponse": ([query("x")], raw(Be.ERROR_RESPONSE, b"Mno end"), Side.BACKEND),
    "a Describe of neither kind": ([], (Side.FRONTEND, Fe.DESCRIBE, b"Xname\0"), Side.FRONTEND),
    "an empty Describe": ([], (Side.FRONTEND, Fe.DESCRIBE, b""), Side.FRONTEND),
    "a Query during copy-in": ([query("COPY t FROM STDIN"), COPY_IN], query("x"), Side.FRONTEND),
    "a Parse pipelined behind a COPY": (
        [query("COPY t FROM STDIN"), PARSE], COPY_IN, Side.FRONTEND,
    ),
    "CopyData from the server in copy-in": (
        [query("COPY t FROM STDIN"), COPY_IN], copy_data(b"x", Side.BACKEND), Side.BACKEND,
    ),
    "a message after Terminate": ([TERMINATE], query("x"), Side.FRONTEND),
    "a PasswordMessage after authentication": (
        [], fe("PasswordMessage", password="x"), Side.FRONTEND,
    ),
    "an unknown type byte": ([], (Side.FRONTEND, ord("z"), b""), Side.FRONTEND),
}  # fmt: skip


@pytest.mark.parametrize("name", VIOLATIONS)
def test_violation(name: str) -> None:
    setup, event, side = VIOLATIONS[name]
    conversation = play(Conversation.ready(), setup)
    before = (conversation.expected, conversation.client)
    with pytest.raises(ProtocolViolation) as info:
        send(conversation, event)
    assert info.value.side is side
    assert (conversation.expected, conversation.client) == before  # nothing half-done


def test_copy_data_from_the_client_in_copy_out_is_dropped_not_a_violation() -> None:
    """PostgreSQL ignores frontend copy messages outside copy-in (postgres.c)."""
    conversation = play(Conversation.ready(), [query("COPY t TO STDOUT"), COPY_OUT])
    send(conversation, copy_data(b"x"))
    assert conversation.server is S.COPY_OUT


# --- the tables are the spec: every missing pair is a violation -----------------------------------

SERVER_REACH: dict[ServerState, tuple[bool, list[Event]]] = {
    S.STARTUP: (True, []),
    S.IDLE: (False, []),
    S.QUERY: (False, [query("x")]),
    S.FUNCTION_CALL: (False, [FUNCTION_CALL]),
    S.PARSE: (False, [PARSE]),
    S.BIND: (False, [BIND]),
    S.DESCRIBE_STATEMENT: (False, [DESCRIBE_STATEMENT]),
    S.DESCRIBE_ROWS: (False, [DESCRIBE_PORTAL]),
    S.EXECUTE: (False, [EXECUTE]),
    S.CLOSE: (False, [CLOSE]),
    S.SYNC: (False, [SYNC]),
    S.READY: (False, [FUNCTION_CALL, FUNCTION_RESULT]),
    S.COPY_IN: (False, [query("x"), COPY_IN]),
    S.COPY_OUT: (False, [query("x"), COPY_OUT]),
    S.COPY_BOTH: (False, [query("x"), COPY_BOTH]),
    S.CLOSED: (False, [error("57P01", "FATAL")]),
}
CLIENT_REACH: dict[ClientState, tuple[bool, list[Event]]] = {
    Cl.STARTUP: (True, []),
    Cl.READY: (False, []),
    Cl.BATCH: (False, [PARSE]),
    Cl.SKIPPING: (False, [PARSE, error()]),
    Cl.COPY: (False, [query("x"), COPY_IN]),
    Cl.CLOSED: (False, [TERMINATE]),
}


def _reach(startup: bool, events: list[Event]) -> Conversation:
    return play(Conversation() if startup else Conversation.ready(), list(events))


def test_every_state_is_reachable() -> None:
    assert set(SERVER_REACH) == set(ServerState)
    assert set(CLIENT_REACH) == set(ClientState)
    for state, (startup, events) in SERVER_REACH.items():
        assert _reach(startup, events).server is state
    for client, (startup, events) in CLIENT_REACH.items():
        assert _reach(startup, events).client is client


@pytest.mark.parametrize("state", list(ServerState), ids=lambda s: s.value)
def test_backend_pairs_missing_from_the_table_are_violations(state: ServerState) -> None:
    startup, events = SERVER_REACH[state]
    for mtype in range(256):
        if (state, mtype) in BACKEND_TRANSITIONS:
            continue
        conversation = _reach(startup, events)
        before = (conversation.expected, conversation.client)
        with pytest.raises(ProtocolViolation) as info:
            conversation.backend(mtype, b"")
        assert info.value.side is Side.BACKEND
        assert (conversation.expected, conversation.client) == before


@pytest.mark.parametrize("client", list(ClientState), ids=lambda s: s.value)
def test_frontend_pairs_missing_from_the_table_are_violations(client: ClientState) -> None:
    startup, events = CLIENT_REACH[client]
    for mtype in range(256):
        if (client, mtype) in FRONTEND_TRANSITIONS:
            continue
        conversation = _reach(startup, events)
        before = (conversation.expected, conversation.client)
        with pytest.raises(ProtocolViolation) as info:
            conversation.frontend(mtype, b"")
        assert info.value.side is Side.FRONTEND
        assert (conversation.expected, conversation.client) == before


#: A valid payload for each type byte the tables name (most handlers never read it).
_PAYLOADS: dict[int, bytes] = {
    BackendType.READY_FOR_QUERY: b"I",
    BackendType.ERROR_RESPONSE: error()[2],
    FrontendType.DESCRIBE: b"P\0",
}


def test_every_pair_in_the_tables_accepts_a_valid_message() -> None:
    for (state, mtype), _ in BACKEND_TRANSITIONS.items():
        startup, events = SERVER_REACH[state]
        payload = _PAYLOADS.get(mtype, b"")
        if mtype == BackendType.ERROR_RESPONSE and state in (S.IDLE, S.STARTUP):
            payload = error("57P01", "FATAL")[2]  # only a FATAL error can come then
        _reach(startup, events).backend(mtype, payload)
    for (client, mtype), _ in FRONTEND_TRANSITIONS.items():
        startup, events = CLIENT_REACH[client]
        _reach(startup, events).frontend(mtype, _PAYLOADS.get(mtype, b""))


# --- random valid conversations -----------------------------------------------------------------


@dataclass
class Exchange:
    """One request and its replies, in the order each side sends them."""

    steps: list[Event]
    barrier: bool = False  # a COPY: nothing may be pipelined past it
    statuses: list[str] = field(default_factory=list)


STATUS = st.sampled_from("ITE")


@st.composite
def simple_query(draw: st.DrawFn) -> Exchange:
    status = draw(STATUS)
    results: list[Event] = []
    for _ in range(draw(st.integers(0, 3))):
        rows = draw(st.integers(0, 3))
        results += [ROW_DESCRIPTION, *[row(b"1", None)] * rows, complete(f"SELECT {rows}")]
    if draw(st.booleans()):
        results.append(error())
    elif not results:
        results.append(EMPTY_QUERY)
    return Exchange([query("..."), *results, ready(status)], statuses=[status])


@st.composite
def function_call(draw: st.DrawFn) -> Exchange:
    reply = FUNCTION_RESULT if draw(st.booleans()) else error("42883")
    return Exchange([FUNCTION_CALL, reply, ready()], statuses=["I"])


@st.composite
def extended_batch(draw: st.DrawFn) -> Exchange:
    """Several Parse/Bind/(Describe)/Execute, then Sync; maybe an error at any reply."""
    requests: list[Event] = []
    replies: list[list[Event]] = []
    for _ in range(draw(st.integers(1, 4))):
        requests += [PARSE, BIND]
        replies += [[PARSE_COMPLETE], [BIND_COMPLETE]]
        if draw(st.booleans()):
            requests.append(DESCRIBE_STATEMENT)
            replies.append(
                [PARAMETER_DESCRIPTION, draw(st.sampled_from([ROW_DESCRIPTION, NO_DATA]))]
            )
        rows = [row(b"x")] * draw(st.integers(0, 3))
        end = draw(st.sampled_from([complete("SELECT 1"), EMPTY_QUERY, PORTAL_SUSPENDED]))
        requests.append(EXECUTE)
        replies.append([*rows, end])
        if draw(st.booleans()):
            requests.append(FLUSH)
    fail_at = draw(st.one_of(st.none(), st.integers(0, len(replies) - 1)))
    backend = [e for reply in replies[:fail_at] for e in reply]
    if fail_at is not None:
        backend += [*replies[fail_at][:-1], error()]
    status = draw(STATUS)
    return Exchange([*requests, SYNC, *backend, ready(status)], statuses=[status])


@st.composite
def skipping_batch(draw: st.DrawFn) -> Exchange:
    """An error before the client has sent its Sync: what it sends until then is discarded."""
    discarded = draw(
        st.lists(
            st.sampled_from([PARSE, BIND, EXECUTE, FLUSH, query("x"), FUNCTION_CALL]), max_size=3
        )
    )
    steps = [PARSE, BIND, EXECUTE, FLUSH, PARSE_COMPLETE, error(), *discarded, SYNC, ready()]
    return Exchange(steps, statuses=["I"])


@st.composite
def copy_in(draw: st.DrawFn) -> Exchange:
    extended = draw(st.booleans())
    opening = [PARSE, BIND, EXECUTE, SYNC] if extended else [query("COPY t FROM STDIN")]
    server_open = [PARSE_COMPLETE, BIND_COMPLETE, COPY_IN] if extended else [COPY_IN]
    data = [copy_data(b"1\n")] * draw(st.integers(0, 3))
    after = [SYNC] if extended else []
    outcome = draw(st.sampled_from(["done", "fail", "server error"]))
    if outcome == "done":
        tail = [COPY_DONE_FE, *after, complete("COPY 1"), ready()]
    elif outcome == "fail":
        tail = [COPY_FAIL, *after, error("57014"), ready()]
    else:
        tail = [error("22P02"), COPY_DONE_FE, *after, ready()]
    return Exchange([*opening, *server_open, *data, *tail], barrier=True, statuses=["I"])


@st.composite
def copy_out(draw: st.DrawFn) -> Exchange:
    data = [copy_data(b"1\n", Side.BACKEND)] * draw(st.integers(0, 3))
    end = [COPY_DONE_BE, complete("COPY 1")] if draw(st.booleans()) else [error("57014")]
    steps = [query("COPY t TO STDOUT"), COPY_OUT, *data, *end, ready()]
    return Exchange(steps, statuses=["I"])


@st.composite
def copy_both(draw: st.DrawFn) -> Exchange:
    streams = [copy_data(b"w", Side.BACKEND), copy_data(b"r")] * draw(st.integers(0, 2))
    if draw(st.booleans()):
        ending = [COPY_DONE_FE, copy_data(b"w", Side.BACKEND), COPY_DONE_BE]
    else:
        ending = [COPY_DONE_BE, copy_data(b"r"), COPY_DONE_FE]
    steps = [query("START_REPLICATION"), COPY_BOTH, *streams, *ending, complete("X"), ready()]
    return Exchange(steps, barrier=True, statuses=["I"])


EXCHANGES = st.one_of(
    simple_query(), function_call(), extended_batch(), skipping_batch(),
    copy_in(), copy_out(), copy_both(),
)  # fmt: skip


@dataclass
class Timed:
    event: Event
    after: int  # how many messages of the other side must have been sent first


def _schedule(exchanges: list[Exchange]) -> tuple[list[Timed], list[Timed]]:
    """Both sides' streams, each message with what it must wait for: the other side's earlier
    messages of its own exchange, and (past a COPY) all of the COPY's."""
    frontend: list[Timed] = []
    backend: list[Timed] = []
    barrier_backend = 0
    for exchange in exchanges:
        be_before = len(backend)
        for event in exchange.steps:
            if event[0] is Side.FRONTEND:
                seen = len(backend) - be_before
                frontend.append(Timed(event, be_before + seen if seen else barrier_backend))
            else:
                backend.append(Timed(event, len(frontend)))
        if exchange.barrier:
            barrier_backend = len(backend)
    return frontend, backend


@st.composite
def conversations(draw: st.DrawFn) -> tuple[list[Event], list[str]]:
    exchanges = draw(st.lists(EXCHANGES, max_size=8))
    frontend, backend = _schedule(exchanges)
    events: list[Event] = []
    i = j = 0
    while i < len(frontend) or j < len(backend):
        can_fe = i < len(frontend) and frontend[i].after <= j
        can_be = j < len(backend) and backend[j].after <= i
        assert can_fe or can_be, "inconsistent schedule"
        if can_fe and (not can_be or draw(st.booleans())):
            events.append(frontend[i].event)
            i += 1
        else:
            events.append(backend[j].event)
            j += 1
    for _ in range(draw(st.integers(0, 5))):
        events.insert(draw(st.integers(0, len(events))), draw(st.sampled_from(ASYNC)))
    statuses = [s for exchange in exchanges for s in exchange.statuses]
    return events, statuses


@settings(max_examples=300)
@given(conversation=conversations())
def test_random_valid_conversations_end_idle(conversation: tuple[list[Event], list[str]]) -> None:
    events, statuses = conversation
    machine = Conversation.ready()
    for event in events:
        send(machine, event)
        assert machine.pending >= 0
        if machine.idle:
            assert not machine.in_copy and machine.pending == 0
    check(machine, IDLE)
    assert chr(machine.transaction_status) == (statuses[-1] if statuses else "I")


@given(conversation=conversations())
def test_random_valid_conversations_after_startup(
    conversation: tuple[list[Event], list[str]],
) -> None:
    events, _ = conversation
    machine = play(Conversation(), [be("AuthenticationOk"), PARAMETER_STATUS, ready("I")])
    for event in events:
        send(machine, event)
    check(machine, IDLE)


def test_schedule_pipelines_and_waits_for_copies() -> None:
    plain = Exchange([query("a"), ready()])
    copy = Exchange([query("c"), COPY_IN, COPY_DONE_FE, ready()], barrier=True)
    frontend, backend = _schedule([plain, copy, plain])
    # Query "c" is pipelined, CopyDone waits for CopyInResponse, the last Query for the COPY
    assert [t.after for t in frontend] == [0, 0, 2, 3]
    assert [t.after for t in backend] == [1, 2, 3, 4]
