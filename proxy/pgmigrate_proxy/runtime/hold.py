"""What a session holds back for the DDL guard: units of client messages, the backlog behind
them, and launching the unit runners (the guard's driver, the migration runner) on the
session's server connection (runtime/backend.py), which keeps the replies owed.

The relay hands every scanned chunk with watched frames to `Holder.pump`. Ordinary frames
only feed the server connection's reply queue and the chunk goes out with one write. A frame
that starts a guarded statement (runtime/detect.py) begins a unit: it and everything after it
wait until the unit is complete (the Query itself, or the batch up to Sync or Flush) and its
runner has run it; then the backlog is pumped again, in order.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any, Final, Protocol

from pgmigrate_proxy.errors import ProxyError
from pgmigrate_proxy.protocol import extended
from pgmigrate_proxy.protocol.batches import unnamed_batch
from pgmigrate_proxy.protocol.framing import HEADER, HEADER_SIZE, Cut, Frame
from pgmigrate_proxy.protocol.messages import DecodeError
from pgmigrate_proxy.protocol.retry import RetryWindow
from pgmigrate_proxy.protocol.sqlstate import SqlState
from pgmigrate_proxy.protocol.types import FrontendType, TransactionStatus
from pgmigrate_proxy.runtime import guarding, offload
from pgmigrate_proxy.runtime.autocommit import State
from pgmigrate_proxy.runtime.backend import ServerConnection
from pgmigrate_proxy.runtime.detect import (
    Deferred,
    Detector,
    check_readable,
    names_no_state,
    plain_query,
)
from pgmigrate_proxy.runtime.gate import GatedSession
from pgmigrate_proxy.runtime.migration import MigrationRunner, single_statement
from pgmigrate_proxy.runtime.onemigration import LockFailed, MigrationLock
from pgmigrate_proxy.runtime.ports import ClientWriter
from pgmigrate_proxy.runtime.statements import (
    MAPPED,
    WINDOW_OPENERS,
    Plan,
    PreparedLink,
    Retiring,
    Window,
)
from pgmigrate_proxy.sql import Statement, first_keyword

log = logging.getLogger("pgmigrate_proxy.session")

#: Frontend frames the guard reads: statements, every extended-protocol message (each opens a
#: batch: the reply queue must see them all, or an error's skipping is misread), COPY ends,
#: function calls.
FRONTEND_WATCH: Final = (
    FrontendType.QUERY, FrontendType.PARSE, FrontendType.BIND, FrontendType.DESCRIBE,
    FrontendType.CLOSE, FrontendType.EXECUTE, FrontendType.SYNC, FrontendType.FLUSH,
    FrontendType.FUNCTION_CALL, FrontendType.COPY_DONE, FrontendType.COPY_FAIL,
    FrontendType.TERMINATE,
)  # fmt: skip
#: Past this many bytes waiting behind a held unit, stop reading from the client.
_BACKLOG_PAUSE: Final = 1 << 20
#: Pieces of a write up to this size are joined into one; larger ones go out as they are.
_JOIN_LIMIT: Final = 64 * 1024
_EXTENDED_REQUESTS: Final = frozenset(
    t.value for t in (FrontendType.PARSE, FrontendType.BIND, FrontendType.DESCRIBE,
                      FrontendType.CLOSE, FrontendType.EXECUTE)
)  # fmt: skip
_TRANSACTION_CONTROL: Final = "TransactionStmt"
_SYNC: Final = FrontendType.SYNC.value
_QUERY: Final = FrontendType.QUERY.value
_EXECUTE: Final = FrontendType.EXECUTE.value
_BIND: Final = FrontendType.BIND.value
_PARSE: Final = FrontendType.PARSE.value
#: Messages that have no body (Flush, Sync).
_EMPTY_MESSAGES: Final = frozenset({FrontendType.FLUSH.value, FrontendType.SYNC.value})
#: Frontend messages of an ordinary session that never start a guarded statement.
#: Frontend messages read for session state in transaction pooling.
_TERMINATE: Final = FrontendType.TERMINATE.value
#: What a holder points at while its session has no server (transaction pooling, between
#: transactions): never connected, so it behaves as a lost one. Keeping the server given back
#: instead would keep it alive (scanner, reply queue, lease) for as long as the client idles:
#: with more clients than pooled servers, mostly closed login servers, 1.5 kB a client.
NO_SERVER: Final = ServerConnection()
_STATEFUL: Final = frozenset({_QUERY, FrontendType.PARSE.value})
_PASSING: Final = frozenset({_EXECUTE, FrontendType.DESCRIBE.value, FrontendType.CLOSE.value})


def _frames(data: bytes, types: list[int] | None, starts: list[int] | None) -> list[Frame]:
    """The frames a scan of a whole chunk would show (FRONTEND_WATCH: every message of a
    Query or of an unnamed batch), for a chunk the shortcuts queued (`types`: its messages,
    None: one Query; `starts`: where they begin)."""
    if types is None or starts is None:
        return [Frame(_QUERY, data[HEADER_SIZE:], len(data), 0)]
    ends = [*starts[1:], len(data)]
    return [
        Frame(mtype, data[pos + HEADER_SIZE : end], end, pos)
        for mtype, pos, end in zip(types, starts, ends, strict=True)
    ]


def _with_frames(
    backlog: list[tuple[Cut, int, int]] | None,
    judged: tuple[bytes, list[int] | None, list[int] | None] | None,
) -> None:
    """Give the chunk a shortcut queued (Holder._server_for: `judged`) its frames before the
    general path reads the backlog; most such chunks go out without them."""
    if judged is not None and backlog:
        cut = backlog[0][0]
        if cut.data is judged[0] and not cut.frames:
            cut.frames = _frames(*judged)


class HolderOwner(ClientWriter, Protocol):
    """The client session a Holder works for: how it writes to the client and closes."""

    peer: str

    @property
    def relaying(self) -> bool: ...
    def fail(self, code: str, message: str) -> None: ...
    def units_done(self) -> None: ...
    def terminated(self) -> None: ...
    def pause_client_reading(self) -> None: ...
    def resume_client_reading(self) -> None: ...


class ServerSource:
    """Where a session without a server gets one: its pool link (runtime/pooling.py PoolLink
    subclasses this). A base class, not a Protocol: compiled (setup.py), the holder calls it
    natively, with no import of pooling (which imports this module)."""

    __slots__ = ()

    async def acquire(self) -> None:
        """Get a server for the session, in a task (it may wait, check the server, SET)."""
        raise NotImplementedError

    def acquire_at_once(self, *, queue: bool = True) -> bool | None:
        """Attach an idle server now (True), queue the session (None), or neither (False)."""
        raise NotImplementedError


class Holder:
    """The guard's side of one session (see the module docstring)."""

    def __init__(
        self,
        session: HolderOwner,
        server: ServerConnection,
        services: guarding.GuardServices,
        settings: guarding.GuardSettings | None,
        *,
        migration: bool = False,
    ) -> None:
        self.session = session
        self.server = server  # the session's server connection (see attach)
        self.services = services
        self.settings = settings
        self.detect = Detector()
        self.migration = (
            MigrationRunner(server, session, self._run_guarded, self.detect.budget)
            if migration
            else None
        )
        self.targets = guarding.TargetMemory()
        #: session option migration_lock: one migration session at a time per database
        self.lock = (
            MigrationLock(settings.migration_lock_timeout)
            if migration and settings is not None and settings.migration_lock
            else None
        )
        #: set while holding; a list, not a deque: an idle pooled client holds an empty one,
        #: 56 bytes where a deque takes 760 (backlogs are a few chunks)
        self._backlog: list[tuple[Cut, int, int]] | None = None
        self._backlog_bytes = 0
        self._unit: list[bytes] | None = None  # a unit being collected
        self._unit_statements: tuple[Statement, ...] = ()
        self._unit_frames: list[Frame] = []
        self._sink: list[Frame] | None = None
        self._sink_done: asyncio.Future[list[Frame]] | None = None
        self._idle: asyncio.Future[None] | None = None
        self.task: asyncio.Task[None] | None = None
        #: transaction pooling: reads each Query and Parse for session state (runtime/pooling.py)
        self.state_watch: Callable[[Frame], None] | None = None
        #: transaction pooling: the client's prepared statements (runtime/statements.py)
        self.prepared: PreparedLink | None = None
        #: told the statements of each guarded unit once it ran (prepared-statement invalidation)
        self.ddl_done: Callable[[tuple[Statement, ...]], None] | None = None
        self._runner_client: Retiring | None = None  # the writer of the guarded unit running
        #: set while the session has no server: its pool link gets one (acquire, started by
        #: the client's next data; acquire_at_once, tried first, without a task)
        self._waits_on: ServerSource | None = None
        self._gate = services.gate  # (runtime/gate.py)
        self._gated: Frame | None = None  # the frame the gate last let through
        self._queued = False  # queued in its pool for a server, without a task (server_came)
        #: transaction pooling: set while the session's server is lent to the pool, idle
        #: (PoolLink.take_back): the client's next data takes it back first
        self.take_back: Callable[[], None] | None = None
        #: the last Parse _plain_batch found plain (most drivers send the same one each time)
        self._plain_parse = b""
        #: the chunk a shortcut judged and queued in the pool, its message types (None: one
        #: Query) and where they start: release sends it as the shortcut would have, without
        #: judging it again; its frames are made only if the general path takes it
        self._judged: tuple[bytes, list[int] | None, list[int] | None] | None = None

    @property
    def holding(self) -> bool:
        return self._backlog is not None

    def attach(self, server: ServerConnection) -> None:
        """Work on another server connection from the next unit on (the session's)."""
        self.server = server
        if self.migration is not None:
            self.migration.server = server

    def wait_for_server(self, link: ServerSource, *, now: bool = False) -> None:
        """The session gave its server back: hold what the client sends until the pool `link`
        has attached another, with acquire (run at the client's next data, or `now`) or first
        with acquire_at_once, which attaches a server without a task when one is ready
        (True), or queues the session in its pool (None: server_came or acquire_now
        follows). The link itself, not its bound methods: nothing made per transaction."""
        self.server = NO_SERVER
        self._backlog = []
        self._backlog_bytes = 0
        self._waits_on = link
        if now:
            self._start_acquire()

    def _attached_at_once(self, cut: Cut) -> bool:
        """Transaction pooling's fast path: the client's next data found its session without a
        server, and an idle one was attached at once (no task, no backlog). With none idle the
        session may be queued in its pool instead (self._queued: the data waits in the backlog
        until server_came)."""
        link = self._waits_on
        if link is None or self.task is not None or self._backlog:
            return False
        if self._queued:
            return False
        if cut.frames and cut.frames[0].type == _TERMINATE:
            return False  # a client without a server leaves: none needed (_pump)
        outcome = link.acquire_at_once(queue=not self._gate.arms)  # (the gate: acquire's task)
        if outcome is None:
            self._queued = True
            return False
        if not outcome:
            return False
        self._backlog = None
        self._waits_on = None
        return True

    def server_came(self) -> None:
        """The pool attached a server to this queued session: pump what waited (no task)."""
        self._queued = False
        self._waits_on = None
        self.release()
        if self.task is None and not self.holding and self.server.replies.idle:
            self.session.units_done()  # (with replies owed, the server is not idle yet)

    def takes(self, server: ServerConnection) -> bool:
        """Whether this queued session can take `server` the short way (PoolLink._pass_on):
        one chunk held, the one a shortcut judged and queued, nothing changed since that
        would send it through pump (_judged_sent's conditions), the server clean (no retry
        window, no frame shown to the scanner beyond the usual)."""
        judged = self._judged
        backlog = self._backlog
        if judged is None or not self._queued or backlog is None or len(backlog) != 1:
            return False
        if not self._judgement_holds() or server.window is not None or server.every_reply:
            return False
        if server.transport is None:
            return False
        return backlog[0][0].data is judged[0] and self.session.relaying

    def acquire_now(self) -> None:
        """The pool handed this queued session a server that needs a check or SETs first:
        acquire runs in a task (the server is reserved for it)."""
        self._queued = False
        self._start_acquire()

    def _start_acquire(self) -> None:
        link, self._waits_on = self._waits_on, None
        assert link is not None
        waiter = self._gate_waiter() if self._gate.arms else None
        # (held by the armed gate: before a server is acquired)
        coro = self._after_gate(waiter, link.acquire) if waiter is not None else link.acquire()
        self.task = asyncio.get_running_loop().create_task(
            self._run_unit(coro, "acquiring a server connection")
        )

    # --- the gate (runtime/gate.py) ---------------------------------------------------------

    def _gate_place(self, cut: Cut, first: int, pid: int) -> asyncio.Future[None] | None:
        """Show the armed gate the statements of a chunk from frame `first` on (`pid`: the
        session's backend, 0 without a server); its place in the gate's queue if it holds them."""
        if first >= len(cut.frames) or self.migration is not None:
            return None  # (a migration session's own statements are never held)
        item = cut.frames[first]
        if item is self._gated:
            return None  # (released: it goes on)
        seen = GatedSession(self.session.peer, self.server.database, pid)
        place = self._gate.hold(seen, cut.frames[first:], self.detect.texts)
        if place is not None:
            self._gated = item
        return place

    def _gate_waiter(self) -> asyncio.Future[None] | None:
        """The session has no server: show the armed gate what it sent first."""
        backlog = self._backlog
        _with_frames(backlog, self._judged)
        return self._gate_place(*backlog[0][:2], 0) if backlog else None

    def _gate_holds(self, cut: Cut, first: int, pos: int) -> bool:
        """Show the armed gate a chunk; when it holds it, the chunk from there waits for it."""
        place = self._gate_place(cut, first, self.server.server_pid)
        if place is None:
            return False
        self._backlog = [(cut, first, pos)]
        self._backlog_bytes = cut.tail - pos
        self.task = asyncio.get_running_loop().create_task(
            self._run_unit(self._after_gate(place, None), "the gate")
        )
        return True

    @staticmethod
    async def _after_gate(
        waiter: asyncio.Future[None], then: Callable[[], Coroutine[Any, Any, None]] | None
    ) -> None:
        await waiter
        if then is not None:
            await then()

    # --- frontend -------------------------------------------------------------------------

    def pump(self, cut: Cut, first: int = 0, pos: int = 0) -> None:
        """Forward a scanned chunk from frame `first` and byte `pos` on, or queue it.

        A message the proxy must read and cannot (a migration session's Query without its
        terminator) ends the session with 08P01, as PostgreSQL ends it; anything else that
        goes wrong here ends it with XX000: never a hang, never a reply out of order."""
        try:  # (_safely, inline: this is the relay's hot path)
            self._pump(cut, first, pos)
            server = self.server
            if server.replies.needs_every_reply is not server.every_reply:
                server.watch()
        except Exception as exc:
            self._failed(exc)

    def query(self, data: bytes) -> bool:
        """The relay's shortcut for a chunk that is one whole Query (FrameScanner.single): an
        ordinary DML statement that leaves no session state, no unit held, no gate armed, no
        retry window open, not a migration session, goes out as pump would send it, without a
        scan; False when it is not that case (pump it). Its lent server is taken back first;
        a session without a server gets one at once, or waits in its pool with the Query held
        (_attached_at_once, as pump would)."""
        if self._busy_for_shortcuts():
            return False
        payload = data[HEADER_SIZE:]
        if not plain_query(payload) or payload[:1] in (b"d", b"D"):
            return False  # (a DELETE: the prepared-statement map reads it for a DEALLOCATE)
        if self.state_watch is not None and not names_no_state(payload):
            return False  # (the watch decides: pin, or refuse)
        return self._go(data, None)

    def batch(self, data: bytes, starts: list[int]) -> bool:
        """query()'s shortcut for a chunk of whole messages (`starts`: FrameScanner.starts)
        that is one batch of the unnamed statement (protocol/batches.py) whose Parse, if it
        has one, is the one _plain_batch last found plain, byte for byte. False when it is not
        that case (pump it)."""
        if self._busy_for_shortcuts():
            return False
        types = unnamed_batch(data, starts, self._plain_parse)
        if types is None:
            return False
        detect = self.detect
        if types[0] == _PARSE:  # (what Detector.guarded does for it: replaces the unnamed)
            detect.texts[""] = self._plain_parse
            if detect.statements:
                detect.statements.pop("", None)
        elif "" in detect.statements:
            return False  # binds a guarded unnamed statement
        return self._go(data, types, starts)

    def _busy_for_shortcuts(self) -> bool:
        """A migration session, an armed gate, or a session without a server that holds data,
        collects a unit or runs a task: the shortcuts leave its chunks to pump."""
        if self.migration is not None or self._gate.arms:
            return True
        backlog = self._backlog
        return backlog is not None and bool(
            backlog or self._unit is not None or self.task is not None
        )

    def _go(self, data: bytes, types: list[int] | None, starts: list[int] | None = None) -> bool:
        """The shortcuts' way out for a chunk they took (`types`: its messages, None: one
        Query): to the session's server, or for a session without one through _server_for;
        False when pump must take it after all."""
        try:
            backlog = self._backlog
            if backlog is not None:
                found = self._server_for(data, types, backlog, starts)
                if found is not True:
                    return found is None
            return self._send(data, types)
        except Exception as exc:
            self._failed(exc)
        return True

    def _server_for(
        self,
        data: bytes,
        types: list[int] | None,
        backlog: list[tuple[Cut, int, int]],
        starts: list[int] | None = None,
    ) -> bool | None:
        """The shortcuts' step for a session without a server, as _attached_at_once takes it
        for pump: True when an idle server was attached at once; None when the session was
        queued in its pool with the chunk (`types`: its messages, None: one Query; `starts`:
        where they begin) held for server_came; False: the general path takes the chunk."""
        link = self._waits_on
        if link is None or self._queued:
            return False
        outcome = link.acquire_at_once(queue=True)
        if outcome is None:  # queued in its pool: the chunk waits for server_came
            self._queued = True
            backlog.append((Cut(data, [], b"", len(data)), 0, 0))  # (frames: _with_frames)
            self._backlog_bytes += len(data)
            self._judged = (data, types, starts)
            return None
        if not outcome:
            return False  # (pump starts acquire)
        self._backlog = None
        self._waits_on = None
        return True

    def _send(self, data: bytes, types: list[int] | None) -> bool:
        """The shortcuts' end: take the lent server back, feed the reply queue the chunk's
        messages (`types`; None: one Query), write the chunk. False, with nothing sent, when
        the general path must take it (the server went back to be checked, a retry window
        is open, the server is lost)."""
        take_back = self.take_back
        if take_back is not None:
            self.take_back = None
            take_back()
            if self._backlog is not None:
                return False  # (given back to be checked first: pump waits for a server)
        server = self.server
        transport = server.transport
        if server.window is not None or transport is None:
            return False
        replies = server.replies
        if types is None:
            replies.sent(_QUERY)
        else:
            replies.sent_all(types, len(types) - 1)
        if not server.sent_at:
            server.sending()
        transport.write(data)
        if replies.needs_every_reply is not server.every_reply:
            server.watch()
        return True

    def _judgement_holds(self) -> bool:
        """Nothing that a chunk a shortcut queued (_server_for) depends on changed while it
        waited: not a migration session, no armed gate, no unit or task of this session
        (each sends it through pump instead)."""
        return (
            self.migration is None and not self._gate.arms and self._unit is None
            and self.task is None
        )  # fmt: skip

    def _judged_sent(self, judged: tuple[bytes, list[int] | None, list[int] | None]) -> bool:
        """Whether the chunk a shortcut queued (_server_for) went out as it would have then:
        nothing it depends on changed while it waited but the gate's arming, a unit or task
        of this session (_judgement_holds)."""
        if not self._judgement_holds():
            return False
        try:
            return self._send(judged[0], judged[1])
        except Exception as exc:
            self._failed(exc)
        return True

    def _one_query(self, cut: Cut) -> bool:
        """Whether a held chunk that is one whole Query went out through query()."""
        frames = cut.frames
        if len(frames) != 1 or frames[0].type != _QUERY or frames[0].start != 0:
            return False
        return frames[0].end == len(cut.data) and self.query(cut.data)

    def _safely(self, step: Callable[..., None], *args: Any) -> None:
        """Run a step over client data; see pump for what a failure does."""
        try:
            step(*args)
            server = self.server
            if server.replies.needs_every_reply is not server.every_reply:
                server.watch()
        except Exception as exc:
            self._failed(exc)

    def _failed(self, exc: Exception) -> None:
        """A step over client data failed: end the session as pump says."""
        if isinstance(exc, DecodeError):
            self.abandon(SqlState.PROTOCOL_VIOLATION, f"invalid message from the client: {exc}")
        elif isinstance(exc, ProxyError):  # a statement refused (runtime/pooling.py)
            self.abandon(exc.sqlstate, str(exc))
        else:
            log.error("session %s: guard failed on client data", self.session.peer, exc_info=exc)
            self.abandon(
                SqlState.INTERNAL_ERROR, "pgmigrate-proxy: internal error in the DDL guard"
            )

    def abandon(self, code: str, message: str) -> None:
        """Drop what is held and end the session with an error (after the replies owed)."""
        self._backlog = None
        self._unit = None
        self.session.fail(code, message)

    def _pump(self, cut: Cut, first: int, pos: int) -> None:
        take_back = self.take_back
        if take_back is not None:
            self.take_back = None
            take_back()
        if self._backlog is not None and not self._attached_at_once(cut):
            self._backlog.append((cut, first, pos))
            self._backlog_bytes += cut.tail - pos
            if self._backlog_bytes > _BACKLOG_PAUSE:
                self.session.pause_client_reading()
            if self._unit is not None:
                self._collect()
            elif self._waits_on is not None and self.task is None and not self._queued:
                if cut.frames and cut.frames[0].type == _TERMINATE and cut.frames[0].start == 0:
                    self.session.terminated()  # a client without a server leaves: none needed
                    return
                self._start_acquire()
            return
        open_window = self.server.window
        if open_window is not None:  # (a retry may resend what went before: wait)
            assert isinstance(open_window, Window)
            self._behind_window(open_window, [(cut, first, pos)])
            return
        if self._gate.arms and self._gate_holds(cut, first, pos):
            return
        if pos == 0 and not cut.carry and self.migration is None and self._plain_batch(cut):
            return
        out: list[bytes] = [cut.carry] if cut.carry and pos == 0 and first == 0 else []
        data = cut.data
        frames = cut.frames
        server = self.server
        migration = self.migration
        state_watch = self.state_watch
        sent: list[int] = []  # types forwarded, for the reply queue (one call per chunk)
        note = sent.append
        extended = 0  # how many of them are extended-protocol requests (ReplyQueue.sent_all)
        prepared = self.prepared
        window = -1  # the frame that may open a retry window (runtime/statements.py)
        for index in range(first, len(frames)):
            item = frames[index]
            mtype = item.type
            if prepared is not None and mtype in MAPPED:
                plan = prepared.plan(item, server)
                if plan is not None:  # a mapped statement name (runtime/statements.py)
                    start = pos if item.start < 0 else item.start
                    out.append(data[pos:start])
                    pos = item.end
                    if plan.rename_only:
                        if window < 0 and not sent and mtype in WINDOW_OPENERS:
                            window = index if server.replies.idle else len(frames)
                        out.append(plan.inline)
                        note(mtype)
                        extended += mtype in _EXTENDED_REQUESTS
                        continue
                    if sent:
                        server.replies.sent_all(sent, extended)
                        sent.clear()
                        extended = 0
                    self._write_server(out)
                    out = []
                    if prepared.answer_now(plan, server, self.session):
                        continue
                    self._prepared_round(plan, mtype, cut, index)
                    return
            if state_watch is not None and mtype in _STATEFUL:
                state_watch(item)
                state_watch = self.state_watch
            if mtype == _TERMINATE:  # kept: the session decides whether its server goes back
                if sent:
                    server.replies.sent_all(sent, extended)
                if item.start >= 0:
                    out.append(data[pos : item.start])
                self._write_server(out)
                self.session.terminated()
                return
            if item.start >= 0 and migration is None:
                # the most frequent frames, inline (a migration session sees every statement,
                # and its Sync may end its skipping: no shortcut there)
                if mtype == _SYNC:
                    if item.payload:
                        raise DecodeError("Sync with a body")
                    note(mtype)
                    continue
                if mtype in _PASSING:
                    note(mtype)  # Execute, Describe, Close: they start no statement
                    extended += 1
                    continue
                if mtype == _BIND and not self.detect.statements:
                    note(mtype)  # no guarded prepared statement it could bind
                    extended += 1
                    continue
                if mtype == _QUERY and plain_query(item.payload):
                    note(mtype)
                    continue
            if mtype in _EMPTY_MESSAGES and item.payload:
                # (PostgreSQL answers it with an error that makes it skip to the next Sync, a
                # Query included, unlike a Flush or Sync: the proxy cannot follow that; 08P01)
                raise DecodeError(f"{chr(mtype)!r} message with a body")
            start = pos if item.start < 0 else item.start
            try:  # (self._guarded, inline)
                if migration is not None:
                    statements = self._migration_unit(item)
                elif self.settings is None:
                    statements = None  # the guard is off: the holder only tracks replies
                else:
                    failed = server.status is TransactionStatus.FAILED
                    statements = self.detect.guarded(item, failed=failed)
            except Deferred as deferred:  # this frame and the rest wait for its classification
                server.replies.sent_all(sent)
                out.append(data[pos:start])
                self._write_server(out)
                self._defer(deferred.sql, cut, index, start)
                return
            if statements is not None and (statements or migration is not None):
                server.replies.sent_all(sent)
                out.append(data[pos:start])
                self._write_server(out)
                self._begin(item, statements, cut, index)
                return
            note(mtype)
            if mtype in _EXTENDED_REQUESTS:
                extended += 1
            if item.start < 0:  # (its header and payload as they are: a copy of 100 MB is 30 ms)
                out.append(HEADER.pack(mtype, len(item.payload) + 4))
                out.append(item.payload)
                pos = item.end
        if sent:
            server.replies.sent_all(sent, extended)
            if not server.sent_at:
                server.sending()
        if 0 <= window < len(frames) and prepared is not None:
            prepared.open_window(cut, window, server, self._window_stale)
        if not out and pos == 0 and cut.tail == len(data):
            transport = server.transport
            if transport is not None:
                transport.write(data)  # the usual case: the chunk as it came
            return
        out.append(data[pos : cut.tail])
        self._write_server(out)

    def _plain_batch(self, cut: Cut) -> bool:
        """_pump's way into batch() for a chunk it scanned: one whole batch of the unnamed
        statement whose Parse, new or not, is plain (then remembered). False: the loop takes
        the chunk."""
        frames = cut.frames
        if cut.tail != len(cut.data) or not frames or frames[-1].type != _SYNC:
            return False
        if any(item.start < 0 for item in frames):
            return False
        first = frames[0]
        parse = first.type == _PARSE
        if parse and first.payload != self._plain_parse and not self._plain_unnamed(first):
            return False
        return self.batch(cut.data, [item.start for item in frames])

    def _plain_unnamed(self, item: Frame) -> bool:
        """Whether a Parse may take _plain_batch's shortcut (remembered when it may): the
        unnamed statement, an ordinary DML statement that leaves no state, nothing the
        prepared-statement map reads, not guarded."""
        payload = item.payload
        end = payload.find(b"\0", 1)
        if payload[:1] != b"\0" or end < 0:
            return False
        text = payload[1 : end + 1]
        if not plain_query(text) or not names_no_state(text):
            return False
        if self.prepared is not None and self.prepared.plan(item, self.server) is not None:
            return False
        failed = self.server.status is TransactionStatus.FAILED
        try:
            if self.settings is not None and self.detect.guarded(item, failed=failed) is not None:
                return False
        except Deferred:
            return False  # (classified apart past the loop's budget: the loop defers it)
        self._plain_parse = payload
        return True

    def _prepared_round(self, plan: Plan, mtype: int, cut: Cut, index: int) -> None:
        """Hold the chunk after frame `index` while the proxy's requests for it go first."""
        end = cut.frames[index].end
        self._backlog = [(cut, index + 1, end)]
        self._backlog_bytes = cut.tail - end
        task = asyncio.get_running_loop().create_task(
            self._run_unit(self._prepared(plan, mtype), "a prepared statement")
        )
        self.task = task

    async def _prepared(self, plan: Plan, mtype: int) -> None:
        server = self.server
        assert self.prepared is not None
        await self.prepared.run(plan, server, self.session)
        if plan.inline:
            server.replies.sent(mtype)
            self._write_server([plan.inline])
        if server.replies.needs_every_reply is not server.every_reply:
            server.watch()

    # --- a retry window (runtime/statements.py) ------------------------------------------------

    def _behind_window(self, window: Window, backlog: list[tuple[Cut, int, int]]) -> None:
        """Hold what the client sends from now on until the window is over (and its batch
        resent, if a plan was stale)."""
        self._backlog = backlog
        self._backlog_bytes = sum(cut.tail - pos for cut, _, pos in backlog)
        self.task = asyncio.get_running_loop().create_task(
            self._run_unit(self._after_window(window), "retrying a prepared statement")
        )

    def _window_stale(self, window: RetryWindow) -> None:
        """The server found a plan of the window's batch stale: its statements are retired;
        when it is resent, its replies are dropped up to its ReadyForQuery and it goes again
        then (the client waits meanwhile)."""
        log.info(
            "session %s: a prepared statement's plan went stale on server %s (its table changed "
            "where the proxy did not see it): %s",
            self.session.peer, self.server.server_pid,
            "prepared again and resent" if window.resend else "error passed on, prepared again",
        )  # fmt: skip
        assert isinstance(window, Window)
        if self.prepared is not None:
            self.prepared.retire(window)
        if window.resend and self.task is None:  # (else a task waits already)
            self._behind_window(window, [])

    async def _after_window(self, window: Window) -> None:
        await window.wait()
        if window.stale and window.resend and self.prepared is not None:
            await self.prepared.resend(window, self.server, self.session)

    def _write_server(self, out: list[bytes]) -> None:
        transport = self.server.transport
        if transport is None:
            return
        if len(out) == 1:
            if out[0]:
                transport.write(out[0])
        elif sum(map(len, out)) > _JOIN_LIMIT:
            transport.writelines(out)  # a large message: written from where it lies, not copied
        else:
            transport.write(b"".join(out))

    def _defer(self, sql: str, cut: Cut, index: int, start: int) -> None:
        """Hold the chunk from frame `index` on while `sql` is classified in a worker thread;
        then pump it again (the frame finds its classification in detect.classified)."""
        self._backlog = [(cut, index, start)]
        self._backlog_bytes = cut.tail - start
        self.task = asyncio.get_running_loop().create_task(self._classify_apart(sql))

    async def _classify_apart(self, sql: str) -> None:
        async def work() -> None:
            self.detect.classified = (sql, await offload.classify_off_loop(sql))

        await self._run_unit(work(), "classification")

    def _guarded(self, item: Frame) -> tuple[Statement, ...] | None:
        """The guarded statements a frame starts (None: it passes)."""
        if self.migration is not None:
            return self._migration_unit(item)
        if self.settings is None:
            return None  # the guard is off: the holder only tracks replies (pooling)
        return self.detect.guarded(item, failed=self.server.status is TransactionStatus.FAILED)

    def _migration_unit(self, item: Frame) -> tuple[Statement, ...] | None:
        """In a migration session every statement is a unit, COPY aside (it streams)."""
        check_readable(item)
        if item.type == FrontendType.QUERY:
            sql = extended.query_text(item.payload)
            runner = self.migration
            assert runner is not None
            if (first_keyword(sql) == "COPY" and runner.virtual.state is not State.FAILED
                    and not runner.skipping and single_statement(sql)):  # fmt: skip
                # COPY streams: its replies pass by (an error fails the block). Not after an
                # error in a batch (the runner drops the Query, as PostgreSQL skips it), nor
                # with other statements (a BEGIN in them would open a real transaction)
                return None
            return ()
        if item.type in (FrontendType.PARSE, FrontendType.BIND):
            return ()
        skipping = self.migration is not None and self.migration.skipping
        if item.type == FrontendType.SYNC and skipping:
            return ()  # the Sync that ends the skipping: answered by the runner
        return None

    # --- units ----------------------------------------------------------------------------------

    def _begin(self, item: Frame, statements: tuple[Statement, ...], cut: Cut, index: int) -> None:
        self._backlog = []
        self._backlog_bytes = 0
        self._unit = [item.raw]
        self._unit_frames = [item]
        self._unit_statements = statements
        if item.type == FrontendType.QUERY:
            self._backlog.append((cut, index + 1, item.end))
            self._launch()
            return
        self._backlog.append((cut, index + 1, item.end))
        if item.type in (FrontendType.SYNC, FrontendType.FLUSH):
            self._launch()
            return
        self._collect()

    def _collect(self) -> None:
        """Move backlog bytes into the unit up to its Sync or Flush; launch it when complete."""
        assert self._backlog is not None and self._unit is not None
        while self._backlog:
            cut, first, pos = self._backlog.pop(0)
            for index in range(first, len(cut.frames)):
                item = cut.frames[index]
                start = pos if item.start < 0 else item.start
                if item.type == FrontendType.QUERY and self.migration is not None:
                    # a Query inside a batch is a statement of its own for the runner (the
                    # batch so far goes first, without its Sync: the runner ends it)
                    self._unit.append(cut.data[pos:start])
                    self._backlog.insert(0, (cut, index, start))
                    self._launch()
                    return
                if item.type in _EMPTY_MESSAGES and item.payload:
                    # as in _pump: PostgreSQL's error for it skips to the next Sync, Queries
                    # included, which the proxy cannot follow (08P01, the session ends)
                    raise DecodeError(f"{chr(item.type)!r} message with a body")
                self._unit.append(cut.data[pos:start])
                self._unit.append(item.raw)
                self._unit_frames.append(item)
                pos = item.end
                if self.migration is not None:
                    check_readable(item)  # the runner reads them: a bad one ends the session now
                elif item.type == FrontendType.PARSE:  # keep the prepared-statement map right
                    failed = self.server.status is TransactionStatus.FAILED
                    self.detect.guarded_in_unit(item, failed=failed)
                if item.type in (FrontendType.SYNC, FrontendType.FLUSH):
                    self._backlog.insert(0, (cut, index + 1, pos))
                    self._launch()
                    return
            self._unit.append(cut.data[pos : cut.tail])

    def _launch(self) -> None:
        assert self._unit is not None
        data = b"".join(self._unit)
        frames = self._unit_frames
        self._unit = None
        executes = sum(1 for f in frames if f.type in (FrontendType.EXECUTE, FrontendType.QUERY))
        work: Coroutine[Any, Any, None] | None = None
        synced = frames[-1].type == FrontendType.SYNC
        if self.migration is not None and (frames[0].type == FrontendType.SYNC or (synced and
                                           not executes)):  # fmt: skip
            # a Sync (alone, or after Parse / Describe): the runner answers it, and it ends the
            # skipping after an error as PostgreSQL's does
            work = self.migration.run_batch(data, frames)
        elif not executes:  # a Parse/Describe/Flush round: nothing takes a lock yet
            if self.migration is not None:
                self.migration.note_parses(frames)
            work = self._prepare(data, frames)
        elif self.migration is not None and frames[0].type == FrontendType.QUERY:
            work = self.migration.run_query(extended.query_text(frames[0].payload))
        elif self.migration is not None:
            work = self.migration.run_batch(data, frames, final=synced)
        if work is not None:
            task = asyncio.get_running_loop().create_task(self._migration(work))
            # cancelled before its first step (the client left in the same read), the task
            # never awaits `work`: close it, so it is dropped without a RuntimeWarning
            task.add_done_callback(lambda _: work.close())
            self.task = task
            return
        expect = sum(1 for f in frames if f.type in (FrontendType.SYNC, FrontendType.QUERY))
        control = any(s.kind == _TRANSACTION_CONTROL for s in self._unit_statements)
        unit = guarding.HeldUnit(
            data=data,
            statements=tuple(s for s in self._unit_statements if guarding.needs_guard(s)),
            expect=expect,
            retryable=expect == 1 and not control and guarding.redoable(self._unit_statements),
        )
        self.task = asyncio.get_running_loop().create_task(self._guard(unit, frames))

    async def _migration(self, work: Coroutine[Any, Any, None]) -> None:
        if self.lock is not None:
            try:
                await self.lock.ensure(self.services.admin, self.server.database, self.session)
            except LockFailed as exc:
                work.close()
                self.task = None
                self.abandon(exc.code, exc.message)
                return
        await self._run_unit(work, "a migration session")

    def closed(self) -> None:
        """The session ended: the migration lock (if held) goes."""
        if self.lock is not None:
            self.lock.release()

    async def _run_unit(self, work: Coroutine[Any, Any, None], what: str) -> None:
        """Run a unit's work, then pump what waited behind it. Every way out ends in the
        unit's answer or an error and a closed session; nothing escapes the task."""
        try:
            await work
        except asyncio.CancelledError:
            self.task = None
            raise  # the session closed: the held statement is dropped
        except ConnectionError as exc:
            self.task = None
            # the server is gone (the session is closing already) or unusable
            self.abandon(
                SqlState.CONNECTION_FAILURE, f"pgmigrate-proxy: lost the server connection: {exc}"
            )
            return
        except DecodeError as bad:  # (the client's messages were checked: the server's?)
            self.task = None  # (a name per exception type: mypyc types each name once)
            self.abandon(SqlState.PROTOCOL_VIOLATION, f"pgmigrate-proxy: invalid message: {bad}")
            return
        except Exception:
            self.task = None
            log.exception("session %s: %s failed", self.session.peer, what)
            self.abandon(SqlState.INTERNAL_ERROR, f"pgmigrate-proxy: internal error in {what}")
            return
        # (cleared before release: it may start the next unit's task)
        self.task = None
        self.release()  # pump() catches its own errors
        self._done_unless_busy()

    def _done_unless_busy(self) -> None:
        """After a unit ran and release pumped the backlog: tell the session, unless another
        unit or task began. (A method: in _run_unit mypy keeps `task` narrowed to the None it
        set before release, and mypyc would trust that.)"""
        if self.task is None and not self.holding:
            self.session.units_done()

    async def _prepare(self, data: bytes, frames: list[Frame]) -> None:
        """Parse (and Describe) of a guarded statement, to Flush: nothing locks yet, but this
        is the last batch boundary before its Execute (asyncpg's prepare): resolve its
        targets now, then send the round on."""
        parsed = await self.detect.parsed_statements(frames)
        statements = [s for s in parsed if guarding.needs_guard(s)]
        server = self.server
        if statements:
            await server.wait_idle()
            if server.can_inject:
                resolved = await guarding.resolve_targets(
                    server, self.session, self.services, statements
                )
                self.targets.remember_targets(statements, resolved)
        for item in frames:
            server.replies.sent(item.type)
        server.watch()
        self._write_server([data])

    async def _guard(self, unit: guarding.HeldUnit, frames: list[Frame]) -> None:
        await self._run_unit(self._guard_unit(unit, frames), "the DDL guard")

    async def _guard_unit(self, unit: guarding.HeldUnit, frames: list[Frame]) -> None:
        await self._run_guarded(unit, self.session)

    async def _run_guarded(self, unit: guarding.HeldUnit, client: ClientWriter) -> None:
        """One unit through the guard, on the session's server connection of the moment."""
        assert self.settings is not None
        done = self.ddl_done
        if done is not None:  # statements on its tables are prepared again after it
            client = self._runner_client = Retiring(client, lambda: done(unit.statements))
        try:
            await guarding.run(
                self.server, client, self.services, self.settings, unit, self.targets
            )
        finally:
            self._runner_client = None

    @property
    def finishing(self) -> bool:
        """A guarded unit's replies went out: what its runner still does (restoring the
        server's settings) needs no client (a client leaving then drops what it sent after).
        Not in a migration session: its runner may have more of the client's statements to
        run, which must be dropped when the client leaves."""
        runner = self._runner_client
        return runner is not None and runner.answered and self.migration is None

    def release(self) -> None:
        """Stop holding; pump what waited, in order (it may start another unit)."""
        backlog, self._backlog = self._backlog, None
        self.session.resume_client_reading()
        judged, self._judged = self._judged, None
        if backlog is not None and len(backlog) == 1 and self.session.relaying:
            cut, first, pos = backlog[0]  # (one whole Query or batch waited: the shortcuts)
            if not first and not pos and not cut.carry:
                if judged is not None and judged[0] is cut.data and self._judged_sent(judged):
                    return
                _with_frames(backlog, judged)
                if self._one_query(cut):
                    return
        _with_frames(backlog, judged)
        while backlog and self.session.relaying:
            cut, first, pos = backlog.pop(0)
            self.pump(cut, first, pos)
            if self._held_again(backlog):
                return

    def _held_again(self, rest: list[tuple[Cut, int, int]]) -> bool:
        """After release pumped a chunk: when a new unit began, the rest waits behind it.
        (A method of its own: read here, `_backlog` is not narrowed to release's None, which
        mypyc would trust: mypy keeps narrowing an attribute across calls.)"""
        backlog = self._backlog
        if backlog is None:
            return False
        backlog.extend(rest)
        if self._unit is not None:
            self._safely(self._collect)  # a bad message in it ends the session
        return True
