"""What a session holds back for the DDL guard: units of client messages, the backlog behind
them, the server's replies taken aside, and the bookkeeping that says when injecting is safe.

The relay hands every scanned chunk with watched frames to `Holder.pump`. Ordinary frames
only update the bookkeeping (replies pending, extended batch open, COPY) and the chunk goes
out with one write. A frame that starts a guarded statement begins a unit: it and everything
after it wait until the unit is complete (the Query itself, or the batch up to Sync or
Flush) and the guard pipeline has run it; then the backlog is pumped again, in order.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections import deque
from collections.abc import Callable, Coroutine, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from pgmigrate_proxy.protocol import extended
from pgmigrate_proxy.protocol.framing import HEADER, Cut, Frame, message_types
from pgmigrate_proxy.protocol.messages import DecodeError, ErrorResponse, ReadyForQuery
from pgmigrate_proxy.protocol.replies import Owner, ReplyQueue, UnexpectedReply
from pgmigrate_proxy.protocol.sqlstate import SqlState
from pgmigrate_proxy.protocol.types import BackendType, FrontendType, TransactionStatus
from pgmigrate_proxy.runtime import guarding, offload
from pgmigrate_proxy.runtime.autocommit import State
from pgmigrate_proxy.runtime.migration import MigrationRunner
from pgmigrate_proxy.sql import Statement, classify, first_keyword, is_plain
from pgmigrate_proxy.sql.cache import ByteLRU
from pgmigrate_proxy.sql.classify import MAX_CLASSIFIED
from pgmigrate_proxy.sql.prefilter import PLAIN_KEYWORDS

if TYPE_CHECKING:
    from pgmigrate_proxy.runtime.session import ClientSession

log = logging.getLogger("pgmigrate_proxy.session")

#: Frontend frames the guard reads: statements, every extended-protocol message (each opens a
#: batch: the reply queue must see them all, or an error's skipping is misread), COPY ends,
#: function calls.
FRONTEND_WATCH = (
    FrontendType.QUERY, FrontendType.PARSE, FrontendType.BIND, FrontendType.DESCRIBE,
    FrontendType.CLOSE, FrontendType.EXECUTE, FrontendType.SYNC, FrontendType.FLUSH,
    FrontendType.FUNCTION_CALL, FrontendType.COPY_DONE, FrontendType.COPY_FAIL,
)  # fmt: skip
#: Backend frames the reply queue must always see (protocol/replies.py); every frame while it
#: says it needs every reply. Migration sessions also read the errors that stream past (COPY):
#: they fail the virtual block.
BACKEND_WATCH = (
    BackendType.READY_FOR_QUERY, BackendType.COPY_IN_RESPONSE, BackendType.ERROR_RESPONSE,
)  # fmt: skip
MIGRATION_BACKEND_WATCH = BACKEND_WATCH
_INJECTED_NAME = "pgmigrate_proxy"
#: Pieces of a write up to this size are joined into one; larger ones go out as they are.
_JOIN_LIMIT = 64 * 1024
#: Past this many bytes waiting behind a held unit, stop reading from the client.
_BACKLOG_PAUSE = 1 << 20
_TRANSACTION_CONTROL = "TransactionStmt"
_SYNC = FrontendType.SYNC.value
_QUERY = FrontendType.QUERY.value
#: First words of a Query that, alone in it, cannot take a lock that queues traffic.
_PLAIN_HEADS = (b"select ", b"select\n", b"insert ", b"update ", b"delete ", b"with ", b"values ")
_READY_FOR_QUERY = BackendType.READY_FOR_QUERY.value
_STATUSES = {bytes([s]): s for s in TransactionStatus}
_EXECUTE = FrontendType.EXECUTE.value
_BIND = FrontendType.BIND.value
#: Messages that have no body (Flush, Sync).
_EMPTY_MESSAGES = frozenset({FrontendType.FLUSH.value, FrontendType.SYNC.value})
#: Frontend messages of an ordinary session that never start a guarded statement.
_PASSING = frozenset({_EXECUTE, FrontendType.DESCRIBE.value, FrontendType.CLOSE.value})
#: Parse messages seen lately, by their bytes: (statement name, guarded statements or None);
#: at most 4 MB of them, all sessions together, none over 64 kB (a long one is parsed again).
_PARSES: ByteLRU[bytes, tuple[str, tuple[Statement, ...] | None]] = ByteLRU(4 << 20, 64 << 10)
#: Statement texts whose resolved targets are kept for Executes that come mid-batch.
_KNOWN_TARGETS = 64
_COPY_IN = (BackendType.COPY_IN_RESPONSE, BackendType.COPY_BOTH_RESPONSE)
#: Server messages that may come at any time: passed on even amid an injected query's replies.
_ASYNCHRONOUS = (
    BackendType.NOTIFICATION_RESPONSE, BackendType.PARAMETER_STATUS, BackendType.NOTICE_RESPONSE,
)  # fmt: skip


def plain_query(payload: bytes) -> bool:
    """The cheapest test, on the Query's bytes: one ordinary DML statement (a SELECT, INSERT,
    UPDATE, DELETE, WITH or VALUES, with at most a final semicolon). Anything else goes to
    the full prefilter and the parser."""
    if not payload[:7].lower().startswith(_PLAIN_HEADS):
        return False
    semicolon = payload.find(b";")
    return semicolon < 0 or not payload[semicolon + 1 : -1].strip()


#: Bytes of a text (no NUL among them) past which it has over MAX_CLASSIFIED characters.
_LONG_TEXT = 4 * MAX_CLASSIFIED


def _passes_by_head(payload: bytes, start: int = 0) -> bool:
    """True for a text (from byte `start`) so long that sql.classify judges it by the first
    keyword of its first MAX_CLASSIFIED characters alone, when that keyword lets it pass: such
    a text is never decoded whole on the loop (100 MB took 330 ms)."""
    if payload.find(b"\0", start, start + _LONG_TEXT + 1) >= 0:
        return False  # the text ends early (or is not that long): the usual path
    head = payload[start : start + _LONG_TEXT].decode("utf-8", "replace")[:MAX_CLASSIFIED]
    keyword = first_keyword(head)
    return keyword is None or keyword in PLAIN_KEYWORDS


def _check(item: Frame) -> None:
    """Raise DecodeError when a frame the migration runner reads is malformed."""
    if item.type == FrontendType.QUERY:
        if b"\0" not in item.payload:  # (as query_text checks it, without decoding 10 MB)
            raise DecodeError("string not terminated")
    elif item.type == FrontendType.PARSE:
        extended.parse_statement(item.payload)
    elif item.type == FrontendType.BIND:
        extended.bind_names(item.payload)


def _fatal(item: Frame) -> bool:
    """An ErrorResponse that ends the session (FATAL or PANIC)."""
    if item.type != BackendType.ERROR_RESPONSE:
        return False
    try:
        return ErrorResponse.decode(item.payload).severity in ("FATAL", "PANIC")
    except DecodeError:
        return False


class _Deferred(Exception):
    """Not an error: a text to classify off the loop before its frame can go on."""

    def __init__(self, sql: str) -> None:
        self.sql = sql


class Holder:
    """The guard's side of one session (see the module docstring)."""

    def __init__(
        self, session: ClientSession, settings: guarding.GuardSettings, *, migration: bool = False
    ) -> None:
        self.session = session
        self.settings = settings
        self.migration = MigrationRunner(self) if migration else None
        self.capture: list[Frame] | None = None  # replies the migration runner takes aside
        self.replies = ReplyQueue()  # what the server still owes, and to whom
        self._every_reply = False  # the backend scanner shows every frame (see _watch)
        self._statements: dict[str, tuple[Statement, ...]] = {}  # guarded prepared statements
        self._targets: dict[str, guarding.Resolution] = {}  # see remember_targets
        self._backlog: deque[tuple[Cut, int, int]] | None = None  # set while holding
        self._backlog_bytes = 0
        self._unit: list[bytes] | None = None  # a unit being collected
        self._unit_statements: tuple[Statement, ...] = ()
        self._unit_frames: list[Frame] = []
        self._sink: list[Frame] | None = None
        self._sink_done: asyncio.Future[list[Frame]] | None = None
        self._idle: asyncio.Future[None] | None = None
        self.task: asyncio.Task[None] | None = None
        self.budget = offload.LoopBudget()  # on-loop classification (runtime/offload.py)
        self._classified: tuple[str, tuple[Statement, ...]] | None = None  # the last done apart

    @property
    def holding(self) -> bool:
        return self._backlog is not None

    # --- frontend -------------------------------------------------------------------------

    def pump(self, cut: Cut, first: int = 0, pos: int = 0) -> None:
        """Forward a scanned chunk from frame `first` and byte `pos` on, or queue it.

        A message the proxy must read and cannot (a migration session's Query without its
        terminator) ends the session with 08P01, as PostgreSQL ends it; anything else that
        goes wrong here ends it with XX000: never a hang, never a reply out of order."""
        self._safely(self._pump, cut, first, pos)

    def _safely(self, step: Callable[..., None], *args: Any) -> None:
        """Run a step over client data; see pump for what a failure does."""
        try:
            step(*args)
            if self.replies.needs_every_reply is not self._every_reply:
                self._watch()
        except DecodeError as exc:
            self.abandon(SqlState.PROTOCOL_VIOLATION, f"invalid message from the client: {exc}")
        except Exception:
            log.exception("session %s: guard failed on client data", self.session.peer)
            self.abandon(
                SqlState.INTERNAL_ERROR, "pgmigrate-proxy: internal error in the DDL guard"
            )

    def abandon(self, code: str, message: str) -> None:
        """Drop what is held and end the session with an error (after the replies owed)."""
        self._backlog = None
        self._unit = None
        self.session.fail(code, message)

    def _pump(self, cut: Cut, first: int, pos: int) -> None:
        if self._backlog is not None:
            self._backlog.append((cut, first, pos))
            self._backlog_bytes += cut.tail - pos
            if self._backlog_bytes > _BACKLOG_PAUSE:
                self.session.pause_client_reading()
            if self._unit is not None:
                self._collect()
            return
        out: list[bytes] = [cut.carry] if cut.carry and pos == 0 and first == 0 else []
        data = cut.data
        frames = cut.frames
        replies = self.replies
        for index in range(first, len(frames)):
            item = frames[index]
            mtype = item.type
            # the most frequent frames, inline (a migration session's Sync may end its skipping)
            if mtype == _SYNC and item.start >= 0 and self.migration is None:
                if item.payload:
                    raise DecodeError("Sync with a body")
                replies.sent(mtype)
                continue
            if mtype in _PASSING and item.start >= 0 and self.migration is None:
                replies.sent(mtype)  # Execute, Describe, Close: they start no statement
                continue
            bind = mtype == _BIND and item.start >= 0 and self.migration is None
            if bind and not self._statements:
                replies.sent(mtype)  # no guarded prepared statement it could bind
                continue
            # (a migration session sees every statement: no shortcut there)
            plain = mtype == _QUERY and item.start >= 0 and self.migration is None
            if plain and plain_query(item.payload):
                replies.sent(mtype)
                continue
            if mtype in _EMPTY_MESSAGES and item.payload:
                # (PostgreSQL answers it with an error that makes it skip to the next Sync, a
                # Query included, unlike a Flush or Sync: the proxy cannot follow that; 08P01)
                raise DecodeError(f"{chr(mtype)!r} message with a body")
            start = pos if item.start < 0 else item.start
            try:
                statements = self._guarded(item)
            except _Deferred as deferred:  # this frame and the rest wait for its classification
                out.append(data[pos:start])
                self._write_server(out)
                self._defer(deferred.sql, cut, index, start)
                return
            if statements is not None and (statements or self.migration is not None):
                out.append(data[pos:start])
                self._write_server(out)
                self._begin(item, statements, cut, index)
                return
            replies.sent(mtype)
            if item.start < 0:  # (its header and payload as they are: a copy of 100 MB is 30 ms)
                out.append(HEADER.pack(mtype, len(item.payload) + 4))
                out.append(item.payload)
                pos = item.end
        if not out and pos == 0 and cut.tail == len(data):
            server = self.session.server
            if server is not None:
                server.write(data)  # the usual case: the chunk as it came
            return
        out.append(data[pos : cut.tail])
        self._write_server(out)

    def _watch(self) -> None:
        """Show the backend scanner every frame while the reply queue needs every reply (or
        the proxy takes replies aside), only those it must always see otherwise."""
        every = self.sinking or self.replies.needs_every_reply
        self._every_reply = every
        self.session.watch_backend(every=every)

    def _write_server(self, out: list[bytes]) -> None:
        server = self.session.server
        if server is None:
            return
        if len(out) == 1:
            if out[0]:
                server.write(out[0])
        elif sum(map(len, out)) > _JOIN_LIMIT:
            server.writelines(out)  # a large message: written from where it lies, not copied
        else:
            server.write(b"".join(out))

    def _guarded(self, item: Frame) -> tuple[Statement, ...] | None:
        """The guarded statements a frame starts (None: it passes)."""
        if self.migration is not None:
            return self._migration_unit(item)
        try:
            if item.type == FrontendType.QUERY:
                if len(item.payload) > _LONG_TEXT and _passes_by_head(item.payload):
                    return None
                return self._guarded_sql(extended.query_text(item.payload))
            if item.type == FrontendType.PARSE:
                name, found = self._parse(item.payload)
                if found:
                    self._statements[name] = found
                elif self._statements:
                    self._statements.pop(name, None)
                return found
            if item.type == FrontendType.BIND and self._statements:
                return self._statements.get(extended.bind_names(item.payload)[1])
        except DecodeError:
            return None  # PostgreSQL will reject it in its own words
        return None

    def _migration_unit(self, item: Frame) -> tuple[Statement, ...] | None:
        """In a migration session every statement is a unit, COPY aside (it streams)."""
        _check(item)
        if item.type == FrontendType.QUERY:
            copy = first_keyword(extended.query_text(item.payload)) == "COPY"
            failed = self.migration is not None and self.migration.virtual.state is State.FAILED
            if copy and not failed:
                return None  # COPY streams: its replies pass by (an error fails the block)
            return ()
        if item.type in (FrontendType.PARSE, FrontendType.BIND):
            return ()
        skipping = self.migration is not None and self.migration.skipping
        if item.type == FrontendType.SYNC and skipping:
            return ()  # the Sync that ends the skipping: answered by the runner
        return None

    def _parse(self, payload: bytes) -> tuple[str, tuple[Statement, ...] | None]:
        """A Parse's statement name and guarded statements; the same Parse comes again and
        again (one per execution, for most drivers): keep the answer by its bytes."""
        if self.session.status is TransactionStatus.FAILED:
            return extended.parse_statement(payload)[0], None
        if len(payload) > _LONG_TEXT:  # (nor hashed for the cache: it would not be kept)
            name_end = payload.find(b"\0")
            if name_end >= 0 and _passes_by_head(payload, name_end + 1):
                return payload[:name_end].decode("utf-8", "replace"), None
        known = _PARSES.get(payload)
        if known is None:
            name, sql = extended.parse_statement(payload)
            known = (name, self._guarded_sql(sql))
            _PARSES.put(payload, known, 2 * sys.getsizeof(payload))  # the key, and the text
        return known

    def _guarded_sql(self, sql: str) -> tuple[Statement, ...] | None:
        if self.session.status is TransactionStatus.FAILED or is_plain(sql):
            return None
        statements = self._classify(sql)
        return statements if any(guarding.needs_guard(s) for s in statements) else None

    def _classify(self, sql: str) -> tuple[Statement, ...]:
        """classify(sql) within the loop budget; _Deferred when it must be done apart."""
        done = self._classified
        if done is not None and done[0] == sql:
            return done[1]
        if not self.budget.take(sql):
            raise _Deferred(sql)
        return classify(sql)

    def _defer(self, sql: str, cut: Cut, index: int, start: int) -> None:
        """Hold the chunk from frame `index` on while `sql` is classified in a worker thread;
        then pump it again (the frame finds its classification in _classified)."""
        self._backlog = deque([(cut, index, start)])
        self._backlog_bytes = cut.tail - start
        self.task = asyncio.get_running_loop().create_task(self._classify_apart(sql))

    async def _classify_apart(self, sql: str) -> None:
        async def work() -> None:
            self._classified = (sql, await offload.classify_off_loop(sql))

        await self._run_unit(work(), "classification")

    # --- units ----------------------------------------------------------------------------------

    def _begin(self, item: Frame, statements: tuple[Statement, ...], cut: Cut, index: int) -> None:
        self._backlog = deque()
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
            cut, first, pos = self._backlog.popleft()
            for index in range(first, len(cut.frames)):
                item = cut.frames[index]
                start = pos if item.start < 0 else item.start
                if item.type == FrontendType.QUERY and self.migration is not None:
                    # a Query inside a batch is a statement of its own for the runner (the
                    # batch so far goes first, without its Sync: the runner ends it)
                    self._unit.append(cut.data[pos:start])
                    self._backlog.appendleft((cut, index, start))
                    self._launch()
                    return
                self._unit.append(cut.data[pos:start])
                self._unit.append(item.raw)
                self._unit_frames.append(item)
                pos = item.end
                if self.migration is not None:
                    _check(item)  # the runner reads them: a bad one ends the session now
                elif item.type == FrontendType.PARSE:
                    self._parse_in_unit(item)
                if item.type in (FrontendType.SYNC, FrontendType.FLUSH):
                    self._backlog.appendleft((cut, index + 1, pos))
                    self._launch()
                    return
            self._unit.append(cut.data[pos : cut.tail])

    def _parse_in_unit(self, item: Frame) -> None:
        """Keep the prepared-statement map right for a Parse inside a held unit: classified on
        the loop even past the budget (at most MAX_CLASSIFIED: the unit cannot wait here)."""
        try:
            self._guarded(item)
        except _Deferred as deferred:
            self._classified = (deferred.sql, classify(deferred.sql))
            self._guarded(item)

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
            self.task = asyncio.get_running_loop().create_task(self._migration(work))
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
        await self._run_unit(work, "a migration session")

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
        except DecodeError as exc:  # (the client's messages were checked: the server's?)
            self.task = None
            self.abandon(SqlState.PROTOCOL_VIOLATION, f"pgmigrate-proxy: invalid message: {exc}")
            return
        except Exception:
            self.task = None
            log.exception("session %s: %s failed", self.session.peer, what)
            self.abandon(SqlState.INTERNAL_ERROR, f"pgmigrate-proxy: internal error in {what}")
            return
        # (cleared before release: it may start the next unit's task)
        self.task = None
        self.release()  # pump() catches its own errors

    async def _prepare(self, data: bytes, frames: list[Frame]) -> None:
        """Parse (and Describe) of a guarded statement, to Flush: nothing locks yet, but this
        is the last batch boundary before its Execute (asyncpg's prepare): resolve its
        targets now, then send the round on."""
        parsed = await self._parsed_statements(frames)
        statements = [s for s in parsed if guarding.needs_guard(s)]
        if statements:
            await self.wait_idle()
            if self.can_inject:
                resolved = await guarding.resolve_targets(self, self.session.hub.guard, statements)
                self.remember_targets(statements, resolved)
        for item in frames:
            self.replies.sent(item.type)
        self._watch()
        self._write_server([data])

    async def _parsed_statements(self, frames: list[Frame]) -> list[Statement]:
        found: list[Statement] = []
        for item in frames:
            if item.type == FrontendType.PARSE:
                try:
                    sql = extended.parse_statement(item.payload)[1]
                except DecodeError:
                    continue  # PostgreSQL will reject it in its own words
                done = self._classified
                if done is not None and done[0] == sql:
                    found.extend(done[1])
                elif not is_plain(sql):
                    found.extend(await offload.classify_bounded(sql, self.budget))
        return found

    def known_targets(self, statements: Iterable[Statement]) -> guarding.Resolution:
        """What was resolved for these statements when they were prepared; a statement never
        resolved makes the whole unresolved (it goes out untouched)."""
        known = [self._targets.get(statement.text) for statement in statements]
        if any(part is None for part in known):
            return guarding.UNRESOLVED
        return guarding.Resolution.merge(part for part in known if part is not None)

    def remember_targets(
        self, statements: Iterable[Statement], resolved: guarding.Resolution
    ) -> None:
        """Kept per statement text (a few, bounded) for Executes that come mid-batch."""
        for statement in statements:
            if len(self._targets) >= _KNOWN_TARGETS:
                self._targets.pop(next(iter(self._targets)))
            self._targets[statement.text] = resolved

    async def _guard(self, unit: guarding.HeldUnit, frames: list[Frame]) -> None:
        await self._run_unit(self._guard_unit(unit, frames), "the DDL guard")

    async def _guard_unit(self, unit: guarding.HeldUnit, frames: list[Frame]) -> None:
        await guarding.run(self, self.session.hub.guard, self.settings, unit)

    def release(self) -> None:
        """Stop holding; pump what waited, in order (it may start another unit)."""
        backlog, self._backlog = self._backlog, None
        self.session.resume_client_reading()
        while backlog and self.session.relaying:
            cut, first, pos = backlog.popleft()
            self.pump(cut, first, pos)
            if self._backlog is not None:  # a new unit began: the rest waits behind it
                self._backlog.extend(backlog)
                if self._unit is not None:
                    self._safely(self._collect)  # a bad message in it ends the session
                return

    # --- backend --------------------------------------------------------------------------------

    def backend_frames(self, frames: list[Frame]) -> None:
        """Bookkeeping for watched server frames passed on to the client."""
        replies = self.replies
        for item in frames:
            mtype = item.type
            try:
                replies.received(mtype)
            except UnexpectedReply as exc:
                raise DecodeError(str(exc)) from None
            if mtype == _READY_FOR_QUERY:
                status = _STATUSES.get(item.payload[:1])
                if status is None:
                    raise DecodeError("malformed ReadyForQuery")
                self.session.status = status
                if self.migration is not None:
                    self.migration.batch_failed = False
            elif mtype == BackendType.ERROR_RESPONSE and self.migration is not None:
                self.migration.passed_error(in_batch=replies.batch_open)
        idle = self._idle
        if idle is not None and not idle.done() and (not replies.readies or replies.copy_in):
            idle.set_result(None)
        if self._every_reply and not replies.needs_every_reply:
            self._watch()

    @property
    def sinking(self) -> bool:
        return self._sink is not None

    def sink_frames(self, frames: list[Frame]) -> None:
        """Server frames while the proxy has requests of its own out: the replies to those
        (and what comes amid them) are kept from the client, the client's pass on."""
        sink = self._sink
        assert sink is not None
        replies = self.replies
        passed: list[bytes] = []
        for item in frames:
            try:
                owner = replies.received(item.type)
            except UnexpectedReply as exc:
                raise DecodeError(str(exc)) from None
            if item.type == BackendType.READY_FOR_QUERY:
                self.session.status = ReadyForQuery.decode(item.payload).status
            if owner is Owner.PROXY and item.type in _COPY_IN:
                # the client's held unit entered COPY FROM STDIN: the data must come from the
                # client, which waits behind the unit; the unit ends here and what is left of
                # its replies is the client's
                sink.append(item)
                replies.hand_over()
                continue
            if owner is Owner.CLIENT or (owner is None and not replies.proxy_owed):
                passed.append(item.raw)  # a reply to the client's request, sent before ours
                if item.type == BackendType.ERROR_RESPONSE and self.migration is not None:
                    # (ours go out only once the client's Syncs are answered: this is an
                    # error of a batch the client left open)
                    self.migration.passed_error(in_batch=True)
            else:
                sink.append(item)
        if passed:
            self.deliver_raw(b"".join(passed))
        if not replies.proxy_owed:
            taken, self._sink = sink, None
            done, self._sink_done = self._sink_done, None
            self._watch()
            if self._idle is not None and not self._idle.done() and not replies.readies:
                self._idle.set_result(None)
            if done is not None and not done.done():
                done.set_result(taken)

    def server_lost(self) -> bytes:
        """The server connection is gone: fail the waits; return the server's last words
        taken aside (its FATAL: the statement's backend was terminated, the server is
        shutting down) for the client, who must see them as a relayed statement would."""
        last_words = b""
        if self._sink is not None:
            last_words = b"".join(f.raw for f in self._sink if _fatal(f))
        for waiter in (self._sink_done, self._idle):
            if waiter is not None and not waiter.done():
                waiter.set_exception(ConnectionError("the server connection was lost"))
        return last_words

    # --- what the guard pipeline uses (guarding.GuardedSession) ----------------------------------

    @property
    def server_pid(self) -> int:
        key = self.session.server_key
        return key.process_id if key is not None else 0

    @property
    def database(self) -> str:
        params = self.session.parameters
        return params.get("database") or params.get("user", "")

    @property
    def status(self) -> TransactionStatus:
        return self.session.status

    @property
    def can_inject(self) -> bool:
        return self.replies.idle and self.session.status is not TransactionStatus.FAILED

    @property
    def batch_open(self) -> bool:
        """Extended-protocol messages went to the server since the last Sync."""
        return self.replies.batch_open

    @property
    def gone(self) -> bool:
        return self.session.client is None or self.session.server is None

    async def wait_idle(self) -> None:
        """Until the server has answered everything sent before the unit up to its last Sync:
        what follows in an open batch is answered only once a Sync or Flush goes out (the
        server holds those replies back), so it cannot be waited for; nor can a COPY FROM
        STDIN, which waits for the client's data (the unit then goes into the COPY stream, and
        PostgreSQL judges it there)."""
        while self.replies.readies and not self.replies.copy_in:
            self._idle = asyncio.get_running_loop().create_future()
            await self._idle
            self._idle = None

    async def exchange(self, data: bytes) -> list[Frame]:
        """Send data as the proxy's own requests; return every server frame that answers them
        (the reply queue knows what each of its messages expects, to Sync or to Flush)."""
        server = self.session.server
        if server is None:
            raise ConnectionError("the server connection was lost")
        for mtype in message_types(data):
            self.replies.sent(mtype, Owner.PROXY)
        if not self.replies.proxy_owed:
            return []  # nothing in it expects a reply (a Flush alone)
        self._sink = []
        self._sink_done = asyncio.get_running_loop().create_future()
        self._watch()
        server.write(data)
        return await self._sink_done

    async def inject(self, sql: str, params: Sequence[str | None] = ()) -> extended.QueryResult:
        """Run one query of the proxy's own on the session's server connection."""
        frames = await self.exchange(
            extended.build_query(_INJECTED_NAME, sql, params) + extended.sync()
        )
        result = extended.QueryResult(rows=[])
        self.deliver(f for f in frames if f.type in _ASYNCHRONOUS)
        for item in frames:
            if item.type == BackendType.DATA_ROW:
                result.rows.append(extended.data_row(item.payload))
            elif item.type == BackendType.ERROR_RESPONSE:
                result.error = dict(ErrorResponse.decode(item.payload).fields)
                log.warning(
                    "session %s: injected query failed: %s",
                    self.session.peer,
                    result.error.get("M"),
                )
        return result

    def deliver(self, frames: Iterable[Frame]) -> None:
        if self.capture is not None:
            self.capture.extend(frames)
            return
        self.deliver_raw(b"".join(f.raw for f in frames))

    def deliver_raw(self, data: bytes) -> None:
        client = self.session.client
        if client is not None and data:
            client.write(data)

    def rewrite_status(self, frames: list[Frame], data: bytes) -> bytes:
        """In a migration session, ReadyForQuery passed on raw carries the virtual status."""
        if self.migration is None:
            return data
        status = self.migration.client_status()
        changed = bytearray(data)
        for item in frames:
            if item.type == BackendType.READY_FOR_QUERY:
                changed[item.end - 1] = status
        return bytes(changed)

    def notice(self, severity: str, message: str, detail: str | None = None) -> None:
        client = self.session.client
        if client is None:
            return
        extra = {"detail": detail} if detail else None
        code = SqlState.WARNING if severity == "WARNING" else SqlState.SUCCESSFUL_COMPLETION
        notice = ErrorResponse.build(severity, code, message, notice=True, extra=extra)
        client.write(notice.encode())
