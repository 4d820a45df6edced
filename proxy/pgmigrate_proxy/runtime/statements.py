"""Named prepared statements in transaction pooling: one client's side of the mapping of
protocol/prepared.py, driven on the server connection the client holds at the moment.

The holder asks `plan` for each Parse, Bind, Describe, Close and Query frame. Most Binds and
Describes are only renamed (written in place). Anything the server must do first (a Parse
the server lacks, the Close of the statement its LRU evicts) goes out as the proxy's own
requests through `ServerConnection.exchange`, followed by a Flush, while the client's later
messages wait in the holder: the replies of the client's earlier requests pass on in order,
the proxy's are kept, and then the client gets what PostgreSQL would have sent it:

- its ParseComplete for its own Parse (also when the server had the statement already), its
  CloseComplete for its Close (the proxy closes nothing on the server: other clients may use
  the statement); these answers come right away when the server owes nothing, or else after a
  barrier (a Close of a name never used, whose CloseComplete is kept) that proves the earlier
  replies have passed;
- the error of a Parse the proxy injected, at the place of the Bind or Describe that needed
  it (PostgreSQL skips the rest up to Sync, as it would have skipped after a failed Bind), the
  statement not recorded on that server;
- nothing, when PostgreSQL skipped the proxy's requests (an earlier message of the batch
  failed): the mapping is undone as if the client's message had been skipped.

A batch of mapped statements sent whole to a server that owed nothing opens a retry window
(protocol/retry.py): when PostgreSQL finds a statement's plan stale (its table changed where
the proxy's guard did not see it), the statements of the batch are retired in the registry
(`retire`: new names, prepared again where used next); in an implicit transaction, with
nothing of the batch passed on yet, they are also closed on that server, prepared again and
the batch resent, once (`resend`).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pgmigrate_proxy.protocol import extended
from pgmigrate_proxy.protocol.framing import Cut, Frame, frame
from pgmigrate_proxy.protocol.messages import DecodeError
from pgmigrate_proxy.protocol.prepared import (
    PREFIX,
    ClientStatements,
    Expect,
    QueryAction,
    Registry,
    Reply,
    ServerStatements,
    Step,
    close_frame,
)
from pgmigrate_proxy.protocol.retry import RetryWindow, batch, describes
from pgmigrate_proxy.protocol.types import BackendType, FrontendType, TransactionStatus
from pgmigrate_proxy.runtime.ports import Capture, ClientWriter
from pgmigrate_proxy.sql import Statement, is_plain
from pgmigrate_proxy.sql.session_state import session_state

if TYPE_CHECKING:
    from pgmigrate_proxy.runtime.backend import ServerConnection

FLUSH = frame(FrontendType.FLUSH)
#: A name the registry never gives (its counter starts at 1): closing it changes nothing.
_NEVER = PREFIX + b"0"
BARRIER = close_frame(_NEVER)
#: A Parse that always fails: it puts the server in the state an error of the client's own
#: message would (skipping to Sync), where the proxy answers the client with its own error.
_FAILING_PARSE = frame(FrontendType.PARSE, _NEVER + b"\0PGMIGRATE_FAIL\0\0\0")
_COMPLETIONS = frozenset(
    {BackendType.PARSE_COMPLETE, BackendType.CLOSE_COMPLETE, BackendType.ERROR_RESPONSE}
)
_ERROR = BackendType.ERROR_RESPONSE.value
_READY = BackendType.READY_FOR_QUERY.value
_QUERY = FrontendType.QUERY.value
_PARSE = FrontendType.PARSE.value
_BIND = FrontendType.BIND.value
_DESCRIBE = FrontendType.DESCRIBE.value
#: Client messages that may open a retry window (a mapped statement's, renamed only).
WINDOW_OPENERS = frozenset({_BIND, _DESCRIBE})
_DROPPING = (b"deallocate", b"discard")
#: The first bytes a DEALLOCATE or DISCARD may start with (bytes.lstrip's whitespace).
_DROP_FIRST = frozenset(bytes([c]) for c in b"dD \t\n\r\x0b\x0c")
#: Frames the mapping reads.
MAPPED = frozenset(
    t.value for t in (FrontendType.PARSE, FrontendType.BIND, FrontendType.DESCRIBE,
                      FrontendType.CLOSE, FrontendType.QUERY)
)  # fmt: skip


def invalidator(registry: Registry) -> Callable[[Iterable[Statement]], None]:
    """`invalidate` bound to `registry`, one per registry (every client's holder keeps it)."""
    found: Callable[[Iterable[Statement]], None] | None = getattr(registry, "on_ddl", None)
    if found is None:
        found = functools.partial(invalidate, registry)
        registry.on_ddl = found  # type: ignore[attr-defined]
    return found


def invalidate(registry: Registry, statements: Iterable[Statement]) -> None:
    """After guarded DDL: retire the statements naming the tables it changed (each server
    closes its copies before it is handed out again: `checkout`)."""
    names = {lock.relation.name for s in statements for lock in s.locks}
    if names:
        registry.invalidate(names)


class Retiring:
    """A client writer for a guarded unit's runner that retires the statements on the tables
    of the unit right before each delivery to the client: before the client can learn that
    the DDL is done (and another of its connections, or a client told by it, binds again).

    Once the unit's replies went out (`answered`: a ReadyForQuery among them), the client is
    not `gone` for the runner: it restores the server's settings even if the client left
    then, and the server goes back to the pool after (runtime/pooling.py, client_left)."""

    __slots__ = ("answered", "client", "retire")

    def __init__(self, client: ClientWriter, retire: Callable[[], None]) -> None:
        self.client = client
        self.retire = retire
        self.answered = False

    @property
    def gone(self) -> bool:
        return self.client.gone and not self.answered

    def deliver(self, frames: Iterable[Frame]) -> None:
        self.retire()
        frames = tuple(frames)
        if any(item.type == _READY for item in frames):
            self.answered = True
        self.client.deliver(frames)

    def deliver_raw(self, data: bytes) -> None:
        self.retire()
        self.client.deliver_raw(data)

    def notice(self, severity: str, message: str, detail: str | None = None) -> None:
        self.client.notice(severity, message, detail)

    def _session(self) -> object:
        inner: object = self.client
        while isinstance(inner, Capture):
            inner = inner.client
        return inner

    @property
    def parameters(self) -> object:  # (the guard's events name the client: guarding._client)
        return getattr(self._session(), "parameters", None)

    @property
    def peer(self) -> object:
        return getattr(self._session(), "peer", None)


async def checkout(server: ServerConnection) -> None:
    """Before a pooled server goes to a client: close what a schema change retired."""
    statements = server.statements
    if statements is None:
        return
    step = statements.checkout()
    if step.frames:
        await server.exchange(b"".join(step.frames))


class Window(RetryWindow):
    """A retry window the holder can wait for (protocol/retry.py)."""

    __slots__ = ("_waiter", "over")

    def __init__(
        self, frames: list[Frame], on_stale: Callable[[RetryWindow], None], *, resend: bool
    ) -> None:
        super().__init__(frames, on_stale, resend=resend)
        self.over = False
        self._waiter: asyncio.Future[None] | None = None  # made only when someone waits

    def close(self) -> None:
        self.over = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def wait(self) -> None:
        """Until the server is done with the window."""
        if not self.over:
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter


@dataclass(frozen=True, slots=True)
class Plan:
    """What one client frame becomes. `proxy`: frames to send first as the proxy's own, with
    `expect` (one per frame, their replies kept); `answer`: what the client gets once they
    succeeded (or at once, when there are none and the server owes nothing); `undo`: the
    expectations to undo if they did not happen; `inline`: the client's frame as it goes to
    the server (renamed), after all that; `error`: the client's error in place of the
    server's (a failing Parse goes first, so that the server skips to Sync as it would)."""

    inline: bytes = b""
    proxy: bytes = b""
    expect: tuple[Expect, ...] = ()
    answer: bytes = b""
    undo: tuple[Expect, ...] = ()
    error: bytes = b""

    @property
    def rename_only(self) -> bool:
        return not self.proxy and not self.answer and not self.error


class PreparedLink:
    """One client's prepared statements in transaction pooling (module docstring)."""

    __slots__ = ("_client", "capacity", "registry")

    def __init__(self, registry: Registry, capacity: int) -> None:
        self.registry = registry
        self.capacity = capacity
        self._client: ClientStatements | None = None  # made at its first use (idle clients)

    @property
    def client(self) -> ClientStatements:
        found = self._client
        if found is None:
            found = self._client = ClientStatements(self.registry)
        return found

    def server_statements(self, server: ServerConnection) -> ServerStatements:
        found = server.statements
        if found is None:
            found = server.statements = ServerStatements(self.registry, self.capacity)
        return found

    def plan(self, item: Frame, server: ServerConnection) -> Plan | None:
        """The Plan of a client frame; None: it goes as it is (not about a mapped name).
        Unnamed statements (most drivers, pgbench -M extended) cost a byte check or two: they
        never reach the map (nor make the client's side of it)."""
        mtype = item.type
        payload = item.payload
        if mtype == _BIND:
            name = payload.find(b"\0") + 1  # (after the portal's name)
            if payload[name : name + 1] == b"\0":
                return None  # the unnamed statement
        elif mtype == _QUERY:
            if payload[:1] not in _DROP_FIRST:
                return None  # (every Query comes here: not a DEALLOCATE or DISCARD)
            return self._query(item, server)
        elif mtype == _PARSE:
            name_end = payload.find(b"\0")
            if name_end < 0:
                return None  # malformed: PostgreSQL rejects it
            if name_end == 0:  # unnamed: psycopg sends its DEALLOCATE (ALL) this way
                if payload[1:2] not in _DROP_FIRST:
                    return None
                return self._deallocate(item, server)
            try:
                sql = extended.parse_statement(item.payload)[1]
            except DecodeError:
                return None
            if not is_plain(sql) or session_state(sql):
                return None  # may need the DDL guard, or leaves state: unmapped (pinned)
        elif payload[1:2] == b"\0" or payload[:1] != b"S":
            return None  # Describe, Close: a portal, or the unnamed statement
        step = self.client.message(mtype, item.payload, self.server_statements(server))
        return None if step is None else _plan(step)

    def _deallocate(self, item: Frame, server: ServerConnection) -> Plan | None:
        """An unnamed Parse of DEALLOCATE or DISCARD ALL: DEALLOCATE ALL and DISCARD ALL go as
        they are (the server's statements are gone once it runs them); DEALLOCATE of one of
        the client's names becomes DEALLOCATE ALL on the server (PostgreSQL has no DEALLOCATE
        IF EXISTS, and the server may not hold it): the others are prepared again there."""
        if not item.payload[1:24].lstrip().lower().startswith(_DROPPING):
            return None  # (the cheap test; a comment before it: not seen, its client pinned)
        try:
            sql = extended.parse_statement(item.payload)[1]
        except DecodeError:
            return None
        action = self._drops(sql, server)
        if action is QueryAction.FORWARD:
            return None
        self.server_statements(server).clear()
        if action is QueryAction.FORWARD_THEN_CLEAR:
            return Plan(inline=item.raw)
        types = item.payload[item.payload.index(b"\0", 1) + 1 :]
        return Plan(inline=frame(_PARSE, b"\0DEALLOCATE ALL\0" + types))

    def _drops(self, sql: str, server: ServerConnection) -> QueryAction:
        """ClientStatements.query, when PostgreSQL would run the statement (not in a failed
        transaction; DISCARD ALL not in a transaction block)."""
        status = server.status
        discard = sql.lstrip()[:7].lower() == "discard"
        if status is TransactionStatus.FAILED or (discard and status is not TransactionStatus.IDLE):
            return QueryAction.FORWARD  # PostgreSQL refuses it: nothing changes
        return self.client.query(sql)

    def _query(self, item: Frame, server: ServerConnection) -> Plan | None:
        """DEALLOCATE [PREPARE] name | ALL and DISCARD ALL, when they would succeed."""
        if not item.payload[:24].lstrip().lower().startswith(_DROPPING):
            return None  # (every Query comes here: bytes only)
        try:
            sql = extended.query_text(item.payload)
        except DecodeError:
            return None
        if not server.replies.idle:
            return None  # (answered by the proxy only when nothing is owed before it)
        action = self._drops(sql, server)
        status = server.status
        if action is QueryAction.FORWARD:
            return None
        if action is QueryAction.FORWARD_THEN_CLEAR:
            self.server_statements(server).clear()
            return Plan(inline=item.raw)
        tag = frame(BackendType.COMMAND_COMPLETE, b"DEALLOCATE\0")
        ready = frame(BackendType.READY_FOR_QUERY, bytes([status]))
        return Plan(answer=tag + ready)

    async def run(self, plan: Plan, server: ServerConnection, client: ClientWriter) -> None:
        """Send the plan's requests of the proxy's own and give the client its replies (the
        holder sends `plan.inline` after)."""
        if plan.proxy:
            frames = await server.exchange(plan.proxy + FLUSH)
        elif plan.error:
            frames = await server.exchange(_FAILING_PARSE + FLUSH)
        else:
            frames = await server.exchange(BARRIER + FLUSH)
        self.settle(plan, server, client, frames)

    def settle(
        self, plan: Plan, server: ServerConnection, client: ClientWriter, frames: list[Frame]
    ) -> None:
        """Match the replies of the proxy's requests to their expectations (module docstring)."""
        out: list[bytes] = []
        completions: list[Frame] = []
        for item in frames:
            if item.type in _COMPLETIONS:
                completions.append(item)
            else:
                out.append(item.raw)  # a notice or a parameter change amid them
        expect = plan.expect or (Expect(Reply.SWALLOW),)  # (the barrier, or the failing Parse)
        failed = next((i for i, f in enumerate(completions) if f.type == _ERROR), None)
        done = len(completions) if failed is None else failed
        if done < len(expect):  # failed at `done`, or skipped from there on
            statements = self.server_statements(server)
            for entry in expect[done:]:
                statements.undo(entry)
                self.client.undo(entry)
            for entry in plan.undo:
                self.client.undo(entry)
            if failed is not None:
                out.append(plan.error or completions[failed].raw)
        else:
            out.append(plan.answer)
        client.deliver_raw(b"".join(out))

    def answer_now(self, plan: Plan, server: ServerConnection, client: ClientWriter) -> bool:
        """Answer a plan with nothing to send first at once, when the server owes nothing."""
        if plan.proxy or plan.error or not server.replies.idle:
            return False
        client.deliver_raw(plan.answer)
        return True

    def open_window(
        self,
        cut: Cut,
        first: int,
        server: ServerConnection,
        on_stale: Callable[[RetryWindow], None],
    ) -> None:
        """Hold back the replies of the batch cut.frames[first:] (just sent whole to an idle
        server, frame `first` a mapped statement's) while they may still show a stale plan."""
        frames = cut.frames
        if batch(frames, first, len(cut.data)):
            idle = server.status is TransactionStatus.IDLE
            resend = describes(frames[first:], idle)
            server.window = Window(frames[first:], on_stale, resend=resend)
            server.watch()

    def retire(self, window: Window) -> None:
        """The statements of a window's batch: one of them is stale (which one, the error does
        not say); they get new names, prepared again where they are used next."""
        keys = set()
        statements = self.client
        for item in window.frames:
            payload = item.payload
            if item.type == _BIND:
                start = payload.index(b"\0") + 1
                key = statements.key(payload[start : payload.index(b"\0", start)])
            elif item.type == _DESCRIBE and payload[:1] == b"S":
                key = statements.key(payload[1 : payload.index(b"\0", 1)])
            else:
                continue
            if key is not None:
                keys.add(key)
        self.registry.retire(keys)

    async def resend(self, window: Window, server: ServerConnection, client: ClientWriter) -> None:
        """After a stale-plan error (its replies dropped up to ReadyForQuery; the statements
        retired: `retire`): close them on this server, send the batch again (each statement
        prepared again first). Its replies go to the client as they come: no second retry."""
        await checkout(server)
        out: list[bytes] = []
        for item in window.frames:
            plan = self.plan(item, server) if item.type in WINDOW_OPENERS else None
            if plan is None or plan.rename_only:
                out.append(item.raw if plan is None else plan.inline)
                server.replies.sent(item.type)
                continue
            _write(server, out)
            out = []
            await self.run(plan, server, client)  # (a Parse first: its error is the client's)
            if plan.inline:
                out.append(plan.inline)
                server.replies.sent(item.type)
        _write(server, out)
        server.watch()


def _write(server: ServerConnection, out: list[bytes]) -> None:
    if out and server.transport is not None:
        server.transport.write(b"".join(out))


def _plan(step: Step) -> Plan:
    """A prepared.Step as the holder runs it: the client's own message last (a renamed Bind
    or Describe goes inline; a Parse goes as the proxy's own, its ParseComplete answered)."""
    if step.error:
        return Plan(error=step.error)
    proxy: list[bytes] = []
    expect: list[Expect] = []
    answer: list[bytes] = []
    undo: list[Expect] = []
    inline = b""
    frames = iter(step.frames)
    for entry in step.expect:
        if entry.reply is Reply.ANSWER:
            answer.append(entry.frame)
            undo.append(entry)
            continue
        sent = next(frames)
        if entry.reply is Reply.FORWARD and not entry.prepared:
            inline = sent  # the client's Bind or Describe, renamed
            continue
        if entry.prepared:  # closed first: a DEALLOCATE ALL that did not run, a failed reset
            proxy.append(close_frame(entry.prepared))  # cannot leave it there (42P05)
            expect.append(Expect(Reply.SWALLOW))
        proxy.append(sent)
        expect.append(entry)
        if entry.reply is Reply.FORWARD:  # the client's own Parse: its ParseComplete
            answer.append(frame(BackendType.PARSE_COMPLETE))
    return Plan(
        inline=inline,
        proxy=b"".join(proxy),
        expect=tuple(expect),
        answer=b"".join(answer),
        undo=tuple(undo),
    )
