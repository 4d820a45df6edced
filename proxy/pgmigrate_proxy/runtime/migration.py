"""Runs the units of a migration session: each statement its own implicit transaction.

A simple Query is split into its statements; each is answered by the virtual transaction
(autocommit.py), or sent alone (through the guard when it takes a guarded lock), and the
client gets one reply stream ending in one ReadyForQuery with the virtual status. An
extended-query batch is sent as it is (it is one statement with its Sync) or, when it is a
transaction-control statement, answered message by message.
"""

from __future__ import annotations

import asyncio
import logging

from pgmigrate_proxy.guard.unit import HeldUnit, needs_guard, redoable
from pgmigrate_proxy.protocol import extended
from pgmigrate_proxy.protocol.framing import Frame, frame
from pgmigrate_proxy.protocol.messages import ErrorResponse, Query, ReadyForQuery
from pgmigrate_proxy.protocol.sqlstate import SqlState
from pgmigrate_proxy.protocol.types import BackendType, FrontendType, TransactionStatus
from pgmigrate_proxy.runtime import offload
from pgmigrate_proxy.runtime.autocommit import Kind, Reply, State, VirtualTransaction, is_control
from pgmigrate_proxy.runtime.ports import Capture, ClientWriter, RunGuarded, ServerPort
from pgmigrate_proxy.sql import Statement, classify, first_keyword, is_plain
from pgmigrate_proxy.sql.classify import MAX_CLASSIFIED, MAX_SCRIPT_STATEMENTS, classify_script

log = logging.getLogger("pgmigrate_proxy.session")


def command_complete(tag: str) -> bytes:
    return frame(BackendType.COMMAND_COMPLETE, tag.encode() + b"\0")


def error_frame(code: str, message: str) -> bytes:
    return ErrorResponse.build("ERROR", code, message).encode()


class MigrationRunner:
    """The units of one migration session, run on the server connection it is given (`server`
    follows the session's: the pooler may change it between units), replies written to
    `client`; statements that take a guarded lock go through `guard`."""

    def __init__(
        self,
        server: ServerPort,
        client: ClientWriter,
        guard: RunGuarded,
        budget: offload.LoopBudget | None = None,
    ) -> None:
        self.server = server
        self.budget = budget or offload.LoopBudget()  # the session's on-loop classification
        self.client = client
        self.guard = guard
        self.virtual = VirtualTransaction()
        self.prepared: dict[str, str] = {}  # statement name -> SQL, for Binds of later batches
        self.skipping = False  # an error in a batch sent to Flush: skip to the client's Sync
        self.sent_sync = False  # a statement of the current batch went out with our Sync
        self.batch_failed = False  # an error passed by in a batch the client has not synced

    def passed_error(self, *, in_batch: bool) -> None:
        """An error in traffic that streams past the runner (COPY, a Describe sent on its
        own): it fails the block, and (`in_batch`) the server skips the rest of the batch."""
        self.virtual.forwarded("COPY", True)
        if in_batch:
            self.batch_failed = True

    def ready(self) -> None:
        """A ReadyForQuery passed on: no batch of the client's is left failed."""
        self.batch_failed = False

    def client_status(self) -> TransactionStatus:
        """What ReadyForQuery tells the client: the real status inside an atomic stretch."""
        if self.virtual.state is State.ATOMIC:
            return self.server.status
        return self.virtual.status

    # --- simple Query ----------------------------------------------------------------------

    async def run_query(self, sql: str) -> None:
        """One Query message: its statements one by one, then one ReadyForQuery."""
        await self.server.wait_idle()
        if self.skipping or (self.server.batch_open and not await self._end_client_batch()):
            return  # after an error in a batch, PostgreSQL discards a Query without a reply
        cheap = len(sql) <= MAX_CLASSIFIED and self.budget.take(sql)
        pieces = _split(sql) if cheap else await _split_off_loop(sql)
        if pieces is None:
            self.client.deliver_raw(error_frame(SqlState.PROGRAM_LIMIT_EXCEEDED, _TOO_MANY))
            pieces = []
        for text, statements in pieces:
            if len(pieces) > 1 and first_keyword(text) == "COPY":
                self.client.deliver_raw(error_frame(SqlState.FEATURE_NOT_SUPPORTED, _COPY_ALONE))
                self.virtual.forwarded(text, True)
                break
            if not await self._statement(text, statements):
                break  # PostgreSQL stops a Query at its first error
        self.client.deliver_raw(ReadyForQuery(self.client_status()).encode())

    async def _end_client_batch(self) -> bool:
        """The client left an extended batch open (no Sync: asyncpg's prepare ends with a
        Flush) and sends a Query: end the batch with a Sync of ours first. False when the batch
        had failed: the server was skipping to Sync, so the Query is dropped and the client's
        own Sync is answered by the runner, as PostgreSQL would answer them."""
        frames = await self.server.exchange(extended.sync())
        self.client.deliver(f for f in frames if f.type != BackendType.READY_FOR_QUERY)
        failed = self.batch_failed or _error(frames) is not None
        self.batch_failed = False
        if failed:
            self.virtual.forwarded("(extended query)", True)
            self.skipping = True
        return not failed

    async def _statement(self, text: str, statements: tuple[Statement, ...]) -> bool:
        """Run one statement; False when it failed."""
        reply = self.virtual.statement(text)
        await self._settings(reply)
        if reply.notice is not None:
            self.client.notice("WARNING", reply.notice)
        if reply.kind is Kind.ANSWER:
            self.client.deliver_raw(command_complete(reply.tag))
            return True
        if reply.kind is Kind.REJECT:
            assert reply.error is not None
            self.client.deliver_raw(error_frame(*reply.error))
            if self.virtual.state is State.OPEN:
                self.virtual.state = State.FAILED
            return False
        if reply.kind is Kind.SEND_REAL:
            error = await self._send_real(reply)
            self.client.deliver_raw(error or command_complete(reply.tag))
            return error is None
        ok = await self._forward(reply.server_sql or text, statements)
        await self._restore(reply.restore)  # after the real transaction that ended
        return ok

    async def _settings(self, reply: Reply) -> None:
        """SET LOCAL turned into SET: save the value first; put it back when the block ends."""
        if reply.kind is not Kind.FORWARD:
            await self._restore(reply.restore)
        if reply.setting is not None and reply.setting not in self.virtual.saved:
            result = await self.server.inject("SELECT current_setting($1, true)", [reply.setting])
            self.client.deliver(result.asynchronous)
            if result.rows and result.rows[0][0] is not None:
                self.virtual.saved[reply.setting] = result.rows[0][0]

    async def _restore(self, settings: tuple[tuple[str, str], ...]) -> None:
        for name, value in settings:
            result = await self.server.inject("SELECT set_config($1, $2, false)", [name, value])
            self.client.deliver(result.asynchronous)

    async def _send_real(self, reply: Reply) -> bytes | None:
        """The real BEGIN or COMMIT of an atomic stretch; its error (the block then fails)."""
        assert reply.server_sql is not None
        frames = await self.server.exchange(Query(reply.server_sql).encode())
        self.client.deliver(f for f in frames if f.type in _ASYNCHRONOUS)
        error = _error(frames)
        if error is None and reply.server_sql == "COMMIT" and _tag(frames) == b"ROLLBACK":
            # The stretch had failed (the client saw E): the server rolled it back. Like any
            # statement in a failed block, `atomic = off` gets 25P02; the block stays failed.
            error = error_frame(SqlState.IN_FAILED_SQL_TRANSACTION, _ABORTED)
        if error is not None:
            self.virtual.atomic_failed()
        return error

    async def _forward(self, text: str, statements: tuple[Statement, ...]) -> bool:
        unit = HeldUnit(
            data=Query(text).encode(),
            statements=tuple(s for s in statements if needs_guard(s)),
            expect=1,
            retryable=self.virtual.state is not State.ATOMIC and redoable(statements),
        )
        frames = await self._run(unit)
        failed = any(f.type == BackendType.ERROR_RESPONSE for f in frames)
        self.client.deliver(f for f in frames if f.type != BackendType.READY_FOR_QUERY)
        self.virtual.forwarded(text, failed)
        return not failed

    async def _run(self, unit: HeldUnit) -> list[Frame]:
        """The unit's replies: through the guard when it takes a guarded lock."""
        if not unit.statements:
            return await self.server.exchange(unit.data)
        captured = Capture(self.client)
        await self.guard(unit, captured)
        return captured.frames

    # --- extended-query batches ------------------------------------------------------------------

    async def run_batch(self, data: bytes, frames: list[Frame], *, final: bool = True) -> None:
        """A batch up to Sync (final) or Flush, statement by statement, each with a Sync of
        its own; after an error the rest of the batch is skipped up to the client's Sync."""
        await self.server.wait_idle()
        if not self.skipping:
            for group in _statements_of(frames):
                sql = self._sql_of(group)
                if not await self._group(sql, group):
                    self.skipping = True  # PostgreSQL skips the rest of the batch
                    break
        if final:
            if self.server.batch_open and not self.sent_sync:
                # An earlier round to Flush (asyncpg's prepare) left the server mid-batch and
                # nothing of this one reached it: its Sync must, as the client sent one.
                await self.server.exchange(extended.sync())
            self.skipping = False
            self.client.deliver_raw(ReadyForQuery(self.client_status()).encode())
        self.sent_sync = False

    def note_parses(self, frames: list[Frame]) -> None:
        """A Parse round sent on its own (asyncpg's prepare): remember the statements' SQL."""
        for item in frames:
            if item.type == FrontendType.PARSE:
                name, sql = extended.parse_statement(item.payload)
                self.prepared[name] = sql

    def _sql_of(self, group: list[Frame]) -> str | None:
        for item in group:
            if item.type == FrontendType.PARSE:
                name, sql = extended.parse_statement(item.payload)
                self.prepared[name] = sql
                return sql
            if item.type == FrontendType.BIND:
                return self.prepared.get(extended.bind_names(item.payload)[1])
        return None

    async def _group(self, sql: str | None, group: list[Frame]) -> bool:
        """One statement's messages of a batch; False when it failed."""
        if sql is not None and is_control(sql) and single_statement(sql):
            return await self._answer_batch(sql, group)
        if self.virtual.state is State.FAILED:
            self.client.deliver_raw(error_frame(SqlState.IN_FAILED_SQL_TRANSACTION, _ABORTED))
            return False
        if sql is not None and first_keyword(sql) == "COPY":
            self.client.deliver_raw(error_frame(SqlState.FEATURE_NOT_SUPPORTED, _COPY_ALONE))
            self.virtual.forwarded(sql, True)
            return False
        statements = await self._classify(sql) if sql and not is_plain(sql) else ()
        if len(statements) > 1:
            statements = ()  # PostgreSQL rejects a Parse of several (42601): nothing to guard
        unit = HeldUnit(
            data=b"".join(f.raw for f in group) + extended.sync(),
            statements=tuple(s for s in statements if needs_guard(s)),
            expect=1,
            retryable=self.virtual.state is not State.ATOMIC and redoable(statements),
        )
        replies = await self._run(unit)
        self.sent_sync = True
        failed = any(f.type == BackendType.ERROR_RESPONSE for f in replies)
        if any(f.type == FrontendType.EXECUTE for f in group):
            self.virtual.forwarded(sql or "(prepared statement)", failed)
        self.client.deliver(f for f in replies if f.type != BackendType.READY_FOR_QUERY)
        return not failed

    async def _classify(self, sql: str) -> tuple[Statement, ...]:
        return await offload.classify_bounded(sql, self.budget)

    async def _answer_batch(self, sql: str, frames: list[Frame]) -> bool:
        """Reply to each message of a transaction-control batch as PostgreSQL would.

        The client's Parse and Bind never reach the server: what it must run of the statement
        (an atomic stretch's BEGIN or COMMIT, SET LOCAL made a SET, the real transaction's own
        control) goes as a simple Query, which such statements allow (they take no parameters).
        Without an Execute (Parse and Describe only) the statement is not run at all.
        """
        executes = any(f.type == FrontendType.EXECUTE for f in frames)
        reply = self.virtual.statement(sql) if executes else Reply(Kind.ANSWER)
        await self._settings(reply)
        if reply.notice is not None:
            self.client.notice("WARNING", reply.notice)
        tag, error = reply.tag, None
        if reply.kind is Kind.REJECT:
            assert reply.error is not None
            error = error_frame(*reply.error)
        elif reply.kind is Kind.SEND_REAL:
            error = await self._send_real(reply)
        elif reply.kind is Kind.FORWARD:
            text = reply.server_sql or sql
            replies = await self.server.exchange(Query(text).encode())
            self.client.deliver(f for f in replies if f.type in _ASYNCHRONOUS)
            error, tag = _error(replies), (_tag(replies) or b"").decode()
            self.virtual.forwarded(text, error is not None)
            await self._restore(reply.restore)
        out: list[bytes] = []
        failed = False
        for item in frames:
            if failed:
                break
            if item.type == FrontendType.PARSE:
                out.append(frame(BackendType.PARSE_COMPLETE))
            elif item.type == FrontendType.BIND:
                out.append(frame(BackendType.BIND_COMPLETE))
            elif item.type == FrontendType.DESCRIBE:
                if item.payload[:1] == b"S":
                    out.append(frame(BackendType.PARAMETER_DESCRIPTION, b"\0\0"))
                out.append(frame(BackendType.NO_DATA))
            elif item.type == FrontendType.CLOSE:
                out.append(frame(BackendType.CLOSE_COMPLETE))
            elif item.type == FrontendType.EXECUTE:
                if error is not None:
                    out.append(error)
                    failed = True
                else:
                    out.append(command_complete(tag))
        self.client.deliver_raw(b"".join(out))
        return not failed


#: Server messages that may come at any time: passed on from the proxy's own exchanges.
_ASYNCHRONOUS = (
    BackendType.NOTICE_RESPONSE, BackendType.PARAMETER_STATUS, BackendType.NOTIFICATION_RESPONSE,
)  # fmt: skip
_ABORTED = "current transaction is aborted, commands ignored until end of transaction block"
_COPY_ALONE = (
    "pgmigrate: in a migration session COPY runs only as a simple Query of its own (not in a "
    "Query of several statements, not through the extended protocol)"
)
_TOO_MANY = (
    f"pgmigrate: a Query of more than {MAX_SCRIPT_STATEMENTS} statements in a migration "
    "session: send its statements in several Query messages"
)


def single_statement(sql: str) -> bool:
    """Whether a text holds at most one statement (a semicolon only at its end, or the parser
    finds one): a COPY that passes by, or a control statement the runner answers, must be
    alone, else the rest would run on the server unseen (or PostgreSQL rejects the Parse)."""
    if ";" not in sql.rstrip().rstrip(";"):
        return True
    return len(classify(sql)) <= 1


def _split(sql: str) -> list[tuple[str, tuple[Statement, ...]]]:
    """The statements of a Query, each with its classification (one when it is plain)."""
    if ";" not in sql and is_plain(sql) and not is_control(sql):
        return [(sql, ())]  # one plain statement (several might hide a BEGIN after the first)
    statements = classify(sql)
    if len(statements) <= 1:
        return [(sql, statements)]
    return [(s.text, (s,)) for s in statements]


async def _split_off_loop(sql: str) -> list[tuple[str, tuple[Statement, ...]]] | None:
    """_split for a long text, in a worker thread; None when it holds too many statements
    to split without stalling the other sessions (a plain single statement is never split)."""
    if is_plain(sql) and not is_control(sql):
        return [(sql, ())]
    if sql.count(";") > MAX_SCRIPT_STATEMENTS:
        return None
    return await asyncio.get_running_loop().run_in_executor(None, classify_script, sql)


def _statements_of(frames: list[Frame]) -> list[list[Frame]]:
    """A batch's messages cut after each Execute (Sync and Flush left out)."""
    groups: list[list[Frame]] = [[]]
    for item in frames:
        if item.type in (FrontendType.SYNC, FrontendType.FLUSH):
            continue
        groups[-1].append(item)
        if item.type == FrontendType.EXECUTE:
            groups.append([])
    return [g for g in groups if g]


def _tag(frames: list[Frame]) -> bytes | None:
    for item in frames:
        if item.type == BackendType.COMMAND_COMPLETE:
            return item.payload.rstrip(b"\0")
    return None


def _error(frames: list[Frame]) -> bytes | None:
    for item in frames:
        if item.type == BackendType.ERROR_RESPONSE:
            return item.raw
    return None
