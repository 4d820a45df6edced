"""The session state machine of one server connection: everything that decides when it is idle.

Fed every message in both directions (type byte and payload, as the proxy relays them), a
Conversation knows what the server still owes, where an extended-protocol batch ends, whether a
COPY is under way and the transaction status. It mirrors PostgreSQL's own rules (postgres.c,
copyfromparse.c and the docs' "Message Flow"):

- each message that gets a reply queues what it expects (pgdog style): Query, Sync and
  FunctionCall one ReadyForQuery each (FunctionCall a FunctionCallResponse first), Parse /
  Bind / Describe / Execute / Close their own replies; the head of the queue is the state;
- after an ErrorResponse to an extended-protocol message the server discards everything up
  to the next Sync (Query and FunctionCall included); after one in a Query, a FunctionCall
  or a Sync only ReadyForQuery follows;
- CopyInResponse / CopyBothResponse put the client in copy mode until its CopyDone or
  CopyFail (the server ignores Flush and Sync meanwhile, and CopyData, CopyDone and
  CopyFail outside copy mode); CopyOutResponse until the server's CopyDone;
- NoticeResponse, ParameterStatus and NotificationResponse may arrive in any state (but
  CLOSED); a FATAL or PANIC ErrorResponse closes the server side.

The two transition tables are the spec: a (state, type byte) pair missing from them is a
ProtocolViolation that names the side at fault.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable

from pgmigrate_proxy.protocol.messages import DecodeError, ErrorResponse
from pgmigrate_proxy.protocol.types import BackendType, FrontendType, TransactionStatus

B = BackendType
F = FrontendType


class ServerState(enum.Enum):
    """What the server owes next: the head of the queue, or one of its modes."""

    STARTUP = "startup"  # authentication, until the first ReadyForQuery
    IDLE = "idle"  # nothing owed
    QUERY = "query"  # a Query's results, then ReadyForQuery
    FUNCTION_CALL = "function_call"  # FunctionCallResponse
    PARSE = "parse"  # ParseComplete
    BIND = "bind"  # BindComplete
    DESCRIBE_STATEMENT = "describe_statement"  # ParameterDescription, then DESCRIBE_ROWS
    DESCRIBE_ROWS = "describe_rows"  # RowDescription or NoData
    EXECUTE = "execute"  # DataRows, then CommandComplete / EmptyQueryResponse / PortalSuspended
    CLOSE = "close"  # CloseComplete
    SYNC = "sync"  # a Sync's ReadyForQuery: where skipping after an error stops
    READY = "ready"  # ReadyForQuery only: after a FunctionCallResponse or a Query's error
    COPY_IN = "copy_in"  # the server reads the client's CopyData
    COPY_OUT = "copy_out"  # the server streams CopyData until its CopyDone
    COPY_BOTH = "copy_both"  # both stream CopyData
    CLOSED = "closed"  # the server ended the session (FATAL): nothing more may come


class ClientState(enum.Enum):
    """What the client may send, and how the server will take it."""

    STARTUP = "startup"  # password and SASL messages
    READY = "ready"  # any message; no extended-protocol batch open
    BATCH = "batch"  # extended-protocol messages sent since the last Sync
    SKIPPING = "skipping"  # after an error in a batch: the server discards all until Sync
    COPY = "copy"  # streaming CopyData until CopyDone / CopyFail
    CLOSED = "closed"  # Terminate sent


class Side(enum.Enum):
    """Who sent the message that broke the protocol."""

    FRONTEND = "frontend"
    BACKEND = "backend"


class ProtocolViolation(Exception):
    """A message that the protocol does not allow in the current state."""

    def __init__(self, side: Side, message: str) -> None:
        super().__init__(f"{side.value}: {message}")
        self.side = side


Handler = Callable[["Conversation", bytes], None]

_EXTENDED_REPLIES = frozenset({
    ServerState.PARSE, ServerState.BIND, ServerState.DESCRIBE_STATEMENT,
    ServerState.DESCRIBE_ROWS, ServerState.EXECUTE, ServerState.CLOSE,
})  # fmt: skip
_COPY_STATES = frozenset({ServerState.COPY_IN, ServerState.COPY_OUT, ServerState.COPY_BOTH})
_AWAIT_READY = frozenset({
    ServerState.STARTUP, ServerState.QUERY, ServerState.FUNCTION_CALL, ServerState.SYNC,
    ServerState.READY,
})  # fmt: skip
_STATUSES = frozenset(int(s) for s in TransactionStatus)
_FATAL = frozenset({"FATAL", "PANIC"})


class Conversation:
    """The protocol state of one server connection, fed both directions of its traffic."""

    __slots__ = ("_after_copy", "_queue", "_status", "client")

    def __init__(self) -> None:
        """A conversation from the startup packet on (authentication not done yet)."""
        self._queue: deque[ServerState] = deque([ServerState.STARTUP])
        self._status = TransactionStatus.IDLE
        self._after_copy = ClientState.READY
        self.client = ClientState.STARTUP

    @classmethod
    def ready(cls, status: TransactionStatus = TransactionStatus.IDLE) -> Conversation:
        """A conversation that starts after the first ReadyForQuery (the handshake's end)."""
        conversation = cls()
        conversation._queue.clear()
        conversation._status = status
        conversation.client = ClientState.READY
        return conversation

    # --- the API ------------------------------------------------------------------------------

    def frontend(self, mtype: int, payload: bytes = b"") -> None:
        """A message the client sends. Raises ProtocolViolation (Side.FRONTEND)."""
        handler = FRONTEND_TRANSITIONS.get((self.client, mtype))
        if handler is None:
            raise ProtocolViolation(Side.FRONTEND, f"{_name(F, mtype)} while {self.client.value}")
        handler(self, payload)

    def backend(self, mtype: int, payload: bytes = b"") -> None:
        """A message the server sends. Raises ProtocolViolation (Side.BACKEND)."""
        handler = BACKEND_TRANSITIONS.get((self.server, mtype))
        if handler is None:
            raise ProtocolViolation(Side.BACKEND, f"{_name(B, mtype)} while {self.server.value}")
        handler(self, payload)

    @property
    def server(self) -> ServerState:
        """What the server owes next."""
        return self._queue[0] if self._queue else ServerState.IDLE

    @property
    def idle(self) -> bool:
        """Nothing owed, no batch open, no COPY: the proxy may talk to the server itself."""
        return not self._queue and self.client is ClientState.READY

    @property
    def pending(self) -> int:
        """How many ReadyForQuery messages the server still owes."""
        return sum(1 for state in self._queue if state in _AWAIT_READY)

    @property
    def in_copy(self) -> bool:
        """A COPY sub-protocol is under way in either direction."""
        return self.client is ClientState.COPY or self.server in _COPY_STATES

    @property
    def transaction_status(self) -> TransactionStatus:
        """The status of the last ReadyForQuery."""
        return self._status

    @property
    def expected(self) -> tuple[ServerState, ...]:
        """The queue of what the server owes, head first."""
        return tuple(self._queue)

    # --- frontend handlers --------------------------------------------------------------------

    def _ignore(self, payload: bytes) -> None:
        """A message that changes nothing (Flush; PasswordMessage; copy messages the server
        drops; anything the server discards while skipping to Sync)."""

    def _query(self, payload: bytes) -> None:
        self._queue.append(ServerState.QUERY)
        self.client = ClientState.READY

    def _function_call(self, payload: bytes) -> None:
        self._queue.append(ServerState.FUNCTION_CALL)
        self.client = ClientState.READY

    def _sync(self, payload: bytes) -> None:
        self._queue.append(ServerState.SYNC)
        self.client = ClientState.READY

    def _describe(self, payload: bytes) -> None:
        kind = payload[:1]
        if kind not in (b"S", b"P"):
            raise ProtocolViolation(Side.FRONTEND, f"Describe of an unknown kind {kind!r}")
        statement = kind == b"S"
        self._queue.append(
            ServerState.DESCRIBE_STATEMENT if statement else ServerState.DESCRIBE_ROWS
        )
        self.client = ClientState.BATCH

    def _terminate(self, payload: bytes) -> None:
        self.client = ClientState.CLOSED

    def _client_copy_done(self, payload: bytes) -> None:
        """CopyDone / CopyFail: the client's stream ends (the server replies, or errors)."""
        self.client = self._after_copy
        if self._queue[0] is ServerState.COPY_BOTH:
            self._queue[0] = ServerState.COPY_OUT
        else:
            self._queue.popleft()  # COPY_IN

    # --- backend handlers ---------------------------------------------------------------------

    def _stay(self, payload: bytes) -> None:
        """A message that leaves the state as it is (row data, asynchronous messages)."""

    def _pop(self, payload: bytes) -> None:
        self._queue.popleft()

    def _await_ready(self, payload: bytes) -> None:
        self._queue[0] = ServerState.READY

    def _parameters_described(self, payload: bytes) -> None:
        self._queue[0] = ServerState.DESCRIBE_ROWS

    def _ready_for_query(self, payload: bytes) -> None:
        if len(payload) != 1 or payload[0] not in _STATUSES:
            raise ProtocolViolation(Side.BACKEND, f"invalid ReadyForQuery payload {payload!r}")
        self._status = TransactionStatus(payload[0])
        if self._queue.popleft() is ServerState.STARTUP and self.client is ClientState.STARTUP:
            self.client = ClientState.READY

    def _copy_in(self, payload: bytes) -> None:
        self._start_copy(ServerState.COPY_IN)

    def _copy_both(self, payload: bytes) -> None:
        self._start_copy(ServerState.COPY_BOTH)

    def _copy_out(self, payload: bytes) -> None:
        self._queue.appendleft(ServerState.COPY_OUT)

    def _start_copy(self, mode: ServerState) -> None:
        """The server now reads CopyData: whatever the client sent after the COPY is part of
        the copy stream, where the server ignores Sync and Flush (libpq sends a Sync after an
        Execute without knowing it starts a COPY, and another after CopyDone)."""
        head = self._queue.popleft()
        if any(state is not ServerState.SYNC for state in self._queue):
            self._queue.appendleft(head)
            raise ProtocolViolation(Side.FRONTEND, "messages pipelined behind a COPY FROM STDIN")
        self._queue.clear()
        self._queue.extend((mode, head))
        self._after_copy = ClientState.BATCH if head is ServerState.EXECUTE else ClientState.READY
        if self.client is not ClientState.CLOSED:
            self.client = ClientState.COPY

    def _server_copy_done(self, payload: bytes) -> None:
        if self._queue[0] is ServerState.COPY_BOTH:
            self._queue[0] = ServerState.COPY_IN  # the client may still stream
        else:
            self._queue.popleft()  # COPY_OUT

    def _error(self, payload: bytes) -> None:
        """ErrorResponse: end any COPY, then resynchronize as the server does."""
        if _severity(payload) in _FATAL:
            self._queue = deque([ServerState.CLOSED])
            return
        while self._queue and self._queue[0] in _COPY_STATES:
            self._queue.popleft()
        if self.client is ClientState.COPY:
            self.client = self._after_copy
        head = self.server
        if head in (ServerState.QUERY, ServerState.FUNCTION_CALL, ServerState.READY):
            self._queue[0] = ServerState.READY  # the rest of a Query is skipped
        elif head is ServerState.SYNC:
            pass  # the commit at Sync failed: its ReadyForQuery follows
        elif head in _EXTENDED_REPLIES:
            self._skip_to_sync()
        else:
            raise ProtocolViolation(Side.BACKEND, f"non-fatal ErrorResponse while {head.value}")

    def _skip_to_sync(self) -> None:
        """The server discards every message up to the next Sync (and answers that Sync)."""
        while self._queue and self._queue[0] is not ServerState.SYNC:
            self._queue.popleft()
        if not self._queue and self.client is not ClientState.CLOSED:
            self.client = ClientState.SKIPPING


def _severity(payload: bytes) -> str:
    try:
        return ErrorResponse.decode(payload).severity
    except DecodeError as exc:
        raise ProtocolViolation(Side.BACKEND, f"malformed ErrorResponse: {exc}") from exc


def _name(types: type[FrontendType] | type[BackendType], mtype: int) -> str:
    try:
        return types(mtype).name
    except ValueError:
        return f"message type {bytes([mtype])!r}" if 0 <= mtype < 256 else f"type {mtype}"


def _push(state: ServerState) -> Handler:
    """A handler for an extended-protocol message that queues its reply."""

    def handler(conversation: Conversation, payload: bytes) -> None:
        conversation._queue.append(state)
        conversation.client = ClientState.BATCH

    return handler


# --- the transition tables ----------------------------------------------------------------------

C = Conversation
S = ServerState

_FRONTEND_NORMAL: dict[int, Handler] = {
    F.QUERY: C._query,
    F.FUNCTION_CALL: C._function_call,
    F.PARSE: _push(S.PARSE),
    F.BIND: _push(S.BIND),
    F.DESCRIBE: C._describe,
    F.EXECUTE: _push(S.EXECUTE),
    F.CLOSE: _push(S.CLOSE),
    F.SYNC: C._sync,
    F.FLUSH: C._ignore,
    F.COPY_DATA: C._ignore,  # outside copy mode the server drops these (postgres.c)
    F.COPY_DONE: C._ignore,
    F.COPY_FAIL: C._ignore,
    F.TERMINATE: C._terminate,
}

#: (client state, frontend type byte) -> handler.
FRONTEND_TRANSITIONS: dict[tuple[ClientState, int], Handler] = {
    (ClientState.STARTUP, F.PASSWORD_MESSAGE): C._ignore,
    (ClientState.STARTUP, F.TERMINATE): C._terminate,
    **{(ClientState.READY, t): h for t, h in _FRONTEND_NORMAL.items()},
    **{(ClientState.BATCH, t): h for t, h in _FRONTEND_NORMAL.items()},
    **{(ClientState.SKIPPING, t): C._ignore for t in _FRONTEND_NORMAL},
    (ClientState.SKIPPING, F.SYNC): C._sync,
    (ClientState.SKIPPING, F.TERMINATE): C._terminate,
    (ClientState.COPY, F.COPY_DATA): C._ignore,
    (ClientState.COPY, F.COPY_DONE): C._client_copy_done,
    (ClientState.COPY, F.COPY_FAIL): C._client_copy_done,
    (ClientState.COPY, F.SYNC): C._ignore,  # ignored by the server in copy-in mode
    (ClientState.COPY, F.FLUSH): C._ignore,
    (ClientState.COPY, F.TERMINATE): C._terminate,
}

_COPY_START: dict[int, Handler] = {
    B.COPY_IN_RESPONSE: C._copy_in,
    B.COPY_OUT_RESPONSE: C._copy_out,
    B.COPY_BOTH_RESPONSE: C._copy_both,
}

_BACKEND_OWN: dict[ServerState, dict[int, Handler]] = {
    S.STARTUP: {
        B.AUTHENTICATION: C._stay,
        B.BACKEND_KEY_DATA: C._stay,
        B.NEGOTIATE_PROTOCOL_VERSION: C._stay,
        B.READY_FOR_QUERY: C._ready_for_query,
    },
    S.IDLE: {},
    S.QUERY: {
        B.ROW_DESCRIPTION: C._stay,
        B.DATA_ROW: C._stay,
        B.COMMAND_COMPLETE: C._stay,
        B.EMPTY_QUERY_RESPONSE: C._stay,
        **_COPY_START,
        B.READY_FOR_QUERY: C._ready_for_query,
    },
    S.FUNCTION_CALL: {B.FUNCTION_CALL_RESPONSE: C._await_ready},
    S.PARSE: {B.PARSE_COMPLETE: C._pop},
    S.BIND: {B.BIND_COMPLETE: C._pop},
    S.DESCRIBE_STATEMENT: {B.PARAMETER_DESCRIPTION: C._parameters_described},
    S.DESCRIBE_ROWS: {B.ROW_DESCRIPTION: C._pop, B.NO_DATA: C._pop},
    S.EXECUTE: {
        B.DATA_ROW: C._stay,
        B.COMMAND_COMPLETE: C._pop,
        B.EMPTY_QUERY_RESPONSE: C._pop,
        B.PORTAL_SUSPENDED: C._pop,
        **_COPY_START,
    },
    S.CLOSE: {B.CLOSE_COMPLETE: C._pop},
    S.SYNC: {B.READY_FOR_QUERY: C._ready_for_query},
    S.READY: {B.READY_FOR_QUERY: C._ready_for_query},
    S.COPY_IN: {},
    S.COPY_OUT: {B.COPY_DATA: C._stay, B.COPY_DONE: C._server_copy_done},
    S.COPY_BOTH: {B.COPY_DATA: C._stay, B.COPY_DONE: C._server_copy_done},
    S.CLOSED: {},
}

#: Allowed in every server state but CLOSED.
ASYNCHRONOUS = (B.NOTICE_RESPONSE, B.PARAMETER_STATUS, B.NOTIFICATION_RESPONSE)
_ALWAYS: dict[int, Handler] = {B.ERROR_RESPONSE: C._error, **dict.fromkeys(ASYNCHRONOUS, C._stay)}

#: (server state, backend type byte) -> handler.
BACKEND_TRANSITIONS: dict[tuple[ServerState, int], Handler] = {
    (state, mtype): handler
    for state, own in _BACKEND_OWN.items()
    for mtype, handler in (own if state is S.CLOSED else _ALWAYS | own).items()
}

del C, S
