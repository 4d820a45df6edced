"""What one server connection still owes: the queue of expected replies, in order, and whose
request each one answers (the client's, or one the proxy injected and whose replies it keeps).

As pgbouncer's outstanding-request list and pgdog's backend state keep it, each frontend
message forwarded pushes what it expects and each backend message pops what it answers,
following PostgreSQL's rules (postgres.c and the docs' "Message Flow"):

- Parse, Bind, Describe, Close and Execute expect their own completion (ParseComplete,
  BindComplete, RowDescription or NoData, CloseComplete, CommandComplete / EmptyQueryResponse
  / PortalSuspended); Sync and Query a ReadyForQuery; FunctionCall a FunctionCallResponse and
  a ReadyForQuery; Flush, CopyData and Terminate nothing.
- After an ErrorResponse to an extended-protocol message the server discards everything up to
  the next Sync (Query and FunctionCall included): their entries go.
- During COPY IN the server ignores Sync and Flush: a Sync sent after the statement that
  started the COPY expects nothing (settled when the client's CopyDone or CopyFail goes out,
  or, when that went out before the server's CopyInResponse came, when it comes).
- A ReadyForQuery answers everything queued before it: replies come in order, so a completion
  the caller did not feed (the relay watches few message types) was answered before it.
  ReadyForQuery, ErrorResponse and CopyInResponse must always be fed: they change what is
  owed in ways no later message reveals; every other reply must be fed while
  `needs_every_reply` says so (a request of the proxy's is queued, whose replies are kept one
  by one; a batch is open; or a Query or FunctionCall sits behind extended-protocol requests,
  where what an ErrorResponse discards depends on which request it answers).

Entries are run-length encoded: a pipeline of a thousand Syncs is one entry.
"""

from __future__ import annotations

import enum
from collections import deque
from typing import Final

from pgmigrate_proxy.protocol.types import BackendType, FrontendType


class Owner(enum.Enum):
    """Whose request a reply answers."""

    CLIENT = "client"  # passed on to the client
    PROXY = "proxy"  # injected by the proxy: its replies are kept from the client


class Expect(enum.Enum):
    """What a request expects, named after the request."""

    PARSE = "parse"
    BIND = "bind"
    DESCRIBE = "describe"
    CLOSE = "close"
    EXECUTE = "execute"
    FUNCTION = "function"  # a FunctionCall's FunctionCallResponse
    QUERY = "query"  # a Query's (or FunctionCall's) ReadyForQuery: discarded after an error
    SYNC = "sync"  # a Sync's ReadyForQuery: where skipping after an error stops


class UnexpectedReply(Exception):
    """The server sent a reply to no request (a ReadyForQuery with nothing owed)."""


F, B = FrontendType, BackendType
#: Frontend message -> what it expects (FunctionCall and the COPY ends are handled apart).
_PUSHES: Final[dict[int, Expect]] = {
    F.PARSE: Expect.PARSE, F.BIND: Expect.BIND, F.DESCRIBE: Expect.DESCRIBE,
    F.CLOSE: Expect.CLOSE, F.EXECUTE: Expect.EXECUTE, F.QUERY: Expect.QUERY, F.SYNC: Expect.SYNC,
}  # fmt: skip
_EXTENDED: Final = frozenset(
    {Expect.PARSE, Expect.BIND, Expect.DESCRIBE, Expect.CLOSE, Expect.EXECUTE}
)
#: Backend message -> the request kinds it completes.
_COMPLETES: Final[dict[int, frozenset[Expect]]] = {
    B.PARSE_COMPLETE: frozenset({Expect.PARSE}),
    B.BIND_COMPLETE: frozenset({Expect.BIND}),
    B.CLOSE_COMPLETE: frozenset({Expect.CLOSE}),
    B.ROW_DESCRIPTION: frozenset({Expect.DESCRIBE}),  # a Query's RowDescription: no entry
    B.NO_DATA: frozenset({Expect.DESCRIBE}),
    B.COMMAND_COMPLETE: frozenset({Expect.EXECUTE}),
    B.EMPTY_QUERY_RESPONSE: frozenset({Expect.EXECUTE}),
    B.PORTAL_SUSPENDED: frozenset({Expect.EXECUTE}),
    B.FUNCTION_CALL_RESPONSE: frozenset({Expect.FUNCTION}),
}
_READY: Final = (Expect.QUERY, Expect.SYNC)
_CLIENT: Final = Owner.CLIENT
#: The client's extended-protocol messages that wait in a batch's plain list (see _materialize).
_LAZY: Final[dict[int, Expect]] = {t: k for t, k in _PUSHES.items() if k in _EXTENDED}
_EXECUTE_TYPE: Final = int(F.EXECUTE)
_SYNC_TYPE: Final = int(F.SYNC)
_QUERY_TYPE: Final = int(F.QUERY)
_READY_TYPE: Final = int(B.READY_FOR_QUERY)
_QUERY: Final = Expect.QUERY
_SYNC: Final = Expect.SYNC


class _Entry:
    """`count` requests of one kind and owner, in a row; `exact`: only a feed of every reply
    keeps them right (the proxy's own, or a Query inside a batch)."""

    __slots__ = ("count", "exact", "kind", "owner")

    def __init__(self, kind: Expect, owner: Owner, exact: bool) -> None:
        self.kind = kind
        self.owner = owner
        self.exact = exact
        self.count = 1


class ReplyQueue:
    """The expected replies of one server connection (see the module docstring)."""

    __slots__ = (
        "_early_copy_end", "_entries", "_exact", "_last_query", "_lazy", "_proxy", "_run",
        "_skipping", "_syncs_since_statement", "batch_open", "copy_in",
    )  # fmt: skip

    def __init__(self) -> None:
        self._entries: deque[_Entry] = deque()
        self._syncs_since_statement = 0  # Syncs after the last Query / Execute (COPY IN rule)
        self.batch_open = False  # extended-protocol messages sent since the last Sync
        self.copy_in = False  # the server reads the client's CopyData
        self._skipping = False  # an extended message failed: the server discards up to Sync
        self._exact = 0  # entries marked exact
        self._proxy = 0  # entries of the proxy's requests
        self._run: list[Expect] = []  # the client's extended requests not yet entries
        self._lazy = True  # the open batch's client requests may wait in _run
        self._last_query = False  # the last statement sent was a Query (not an Execute)
        #: A CopyDone/CopyFail sent before the COPY's CopyInResponse came: [ReadyForQuery
        #: messages still due before that statement's, Syncs sent after it (ignored if COPY)]
        self._early_copy_end: list[int] | None = None

    # --- what is owed ---------------------------------------------------------------------------

    @property
    def idle(self) -> bool:
        """Nothing owed and no batch open: the proxy may send a request of its own."""
        return not self._entries and not self.batch_open and not self.copy_in

    @property
    def needs_every_reply(self) -> bool:
        """True while the queue stays exact only if every reply is fed (module docstring);
        while a batch is open its requests are counted one by one from then on."""
        if self.batch_open:
            if self._run:
                self._materialize()
            return True
        return self._exact != 0

    @property
    def empty(self) -> bool:
        """Nothing owed (a batch may still be open)."""
        return not self._entries and not self._run

    @property
    def proxy_owed(self) -> bool:
        """Replies to requests of the proxy's are still to come."""
        return self._proxy != 0

    @property
    def readies(self) -> int:
        """How many ReadyForQuery messages the server still owes."""
        return sum(e.count for e in self._entries if e.kind in _READY)

    @property
    def head_owner(self) -> Owner | None:
        """Whose request the server is answering now (None: nothing owed)."""
        return self._entries[0].owner if self._entries else None

    def pending(self) -> list[tuple[Expect, Owner, int]]:
        """The queue, head first, as (what, whose, how many)."""
        if self._run:
            self._materialize()
        return [(e.kind, e.owner, e.count) for e in self._entries]

    # --- frontend -------------------------------------------------------------------------------

    def sent(self, message_type: int, owner: Owner = Owner.CLIENT) -> None:
        """A frontend message went to the server."""
        if owner is _CLIENT and not self._skipping:  # the relay's hot path, first
            if message_type == _QUERY_TYPE and not self.batch_open:  # a Query between batches
                self._syncs_since_statement = 0
                self._last_query = True
                self._append_client(_QUERY)
                return
            if message_type in _LAZY and self._lazy:
                self.batch_open = True
                self._run.append(_LAZY[message_type])
                if message_type == _EXECUTE_TYPE:
                    self._syncs_since_statement = 0
                    self._last_query = False
                return
            if message_type == _SYNC_TYPE and self._run:
                self._run.clear()  # answered before the Sync's ReadyForQuery: it stands for them
        kind = _PUSHES.get(message_type)
        if self._skipping:  # the server discards it unanswered, a Sync aside
            if kind is not Expect.SYNC:
                return
            self._skipping = False
        client = owner is Owner.CLIENT
        if self._run and not client:
            self._materialize()
        if kind is not None:
            if kind is Expect.SYNC:
                self.batch_open = False
                self._syncs_since_statement += 1
                if self._run:  # answered before the Sync's ReadyForQuery: it stands for them
                    self._run.clear()
                self._lazy = True
            elif kind in _EXTENDED:
                self.batch_open = True
                if kind is Expect.EXECUTE:
                    self._syncs_since_statement = 0
                    self._last_query = False
                if client and self._lazy:
                    self._run.append(kind)
                    return
            else:
                self._syncs_since_statement = 0
                self._last_query = True
                if self._run:
                    self._materialize()  # a Query inside the batch: every request counts
            self._push(kind, owner)
        elif message_type == F.FUNCTION_CALL:
            self._syncs_since_statement = 0
            self._last_query = True  # (never a COPY: its ReadyForQuery ends any early end)
            if self._run:
                self._materialize()
            self._push(Expect.FUNCTION, owner)
            self._push(Expect.QUERY, owner)
        elif message_type in (F.COPY_DONE, F.COPY_FAIL) and self.copy_in:
            self.copy_in = False
            self._forget_syncs(self._syncs_since_statement)  # ignored during COPY IN
            self._syncs_since_statement = 0
        elif message_type in (F.COPY_DONE, F.COPY_FAIL) and self._early_copy_end is None:
            # the last statement may be a COPY whose CopyInResponse is still on its way: then
            # this ends it, and the Syncs sent since the statement are ignored (received())
            syncs = self._syncs_since_statement
            before = self.readies - syncs - self._last_query
            if before >= 0 and (self._entries or self._run):
                self._early_copy_end = [before, syncs]

    def sent_all(self, types: list[int], extended: int = 0) -> None:
        """sent() of the client's messages `types`, in order: the relay's one call per chunk
        (Bind, Describe and Execute of a batch only join its plain list here). `extended`:
        how many of them are Parse, Bind, Describe, Close or Execute (the relay counts them);
        when all but a final Sync are, the batch is settled at once."""
        if (extended and extended == len(types) - 1 and types[-1] == _SYNC_TYPE and self._lazy
                and not self._skipping):  # fmt: skip
            # one whole batch: its Sync's ReadyForQuery stands for all of it (see sent())
            if _EXECUTE_TYPE in types:
                self._syncs_since_statement = 0
                self._last_query = False
            self._synced()
            return
        for message_type in types:
            if self._skipping:
                self.sent(message_type)
            elif message_type in _LAZY and self._lazy:
                self.batch_open = True
                self._run.append(_LAZY[message_type])
                if message_type == _EXECUTE_TYPE:
                    self._syncs_since_statement = 0
                    self._last_query = False
            elif message_type == _SYNC_TYPE:
                self._synced()
            else:
                self.sent(message_type)

    def _synced(self) -> None:
        """A client's Sync, not skipping (sent() takes it the general way, to the same end)."""
        self.batch_open = False
        self._syncs_since_statement += 1
        self._run.clear()  # answered before the Sync's ReadyForQuery: it stands for them
        self._lazy = True
        self._append_client(_SYNC)

    def _append_client(self, kind: Expect) -> None:
        """_push of a client's request that is not exact (a Query between batches, a Sync)."""
        entries = self._entries
        if entries:
            tail = entries[-1]
            if tail.kind is kind and tail.owner is _CLIENT and not tail.exact:
                tail.count += 1
                return
        entries.append(_Entry(kind, _CLIENT, False))

    def _materialize(self) -> None:
        """The client's extended requests of the open batch, kept as a plain list until now
        (most batches end with their Sync in the same chunk, and then the Sync's entry stands
        for them), become entries: from here on the batch is counted request by request."""
        run, self._run = self._run, []
        self._lazy = False
        for kind in run:
            self._push(kind, Owner.CLIENT)

    def _push(self, kind: Expect, owner: Owner) -> None:
        entries = self._entries
        proxy = owner is Owner.PROXY
        # a Query or FunctionCall inside a batch: what an error discards depends on it
        exact = proxy or (self.batch_open and kind in (Expect.QUERY, Expect.FUNCTION))
        if entries:
            tail = entries[-1]
            if tail.kind is kind and tail.owner is owner and tail.exact is exact:
                tail.count += 1
                return
        entries.append(_Entry(kind, owner, exact))
        self._exact += exact
        self._proxy += proxy

    def _drop(self, entry: _Entry) -> None:
        """Account for an entry leaving the queue."""
        self._exact -= entry.exact
        self._proxy -= entry.owner is Owner.PROXY

    def _forget_syncs(self, count: int) -> None:
        entries = self._entries
        while count and entries and entries[-1].kind is Expect.SYNC:
            tail = entries[-1]
            taken = min(count, tail.count)
            tail.count -= taken
            count -= taken
            if not tail.count:
                self._drop(entries.pop())

    def _forget_ignored_syncs(self, count: int) -> None:
        """The first `count` Syncs after the statement being answered (the head, or the head
        Sync's own when the statement was an Execute not counted apart) expect nothing."""
        entries = self._entries
        index = 0 if entries and entries[0].kind is Expect.SYNC else 1
        while count and index < len(entries) and entries[index].kind is Expect.SYNC:
            entry = entries[index]
            taken = min(count, entry.count)
            entry.count -= taken
            count -= taken
            if entry.count:
                break
            self._drop(entry)
            del entries[index]

    def hand_over(self) -> None:
        """The proxy's requests become the client's: their remaining replies go to the client
        (a held unit that entered COPY FROM STDIN: only the client can finish it)."""
        for entry in self._entries:
            if entry.owner is Owner.PROXY:
                entry.owner = Owner.CLIENT  # (still exact: fed every reply until it goes)
                self._proxy -= 1

    # --- backend --------------------------------------------------------------------------------

    def received(self, message_type: int) -> Owner | None:
        """A backend message came: pop what it answers. Returns whose request it belongs to
        (for a message that completes nothing, such as a DataRow or a notice, the request
        being answered now); None when nothing is owed."""
        if message_type == _READY_TYPE:
            entries = self._entries
            if entries and self._early_copy_end is None:  # the relay's hot path
                head = entries[0]
                if head.kind is _QUERY or head.kind is Expect.SYNC:
                    self.copy_in = False
                    head.count -= 1
                    if not head.count:
                        entries.popleft()
                        if head.exact or head.owner is not _CLIENT:
                            self._drop(head)
                    return head.owner
            return self._ready()
        if self._run:
            self._materialize()
        if message_type == B.ERROR_RESPONSE:
            return self._error()
        if message_type == B.COPY_IN_RESPONSE:
            early, self._early_copy_end = self._early_copy_end, None
            if early is None:
                self.copy_in = True
            elif early[0] == 0:  # the client already ended this COPY (see sent())
                self._forget_ignored_syncs(early[1])
            return self.head_owner
        kinds = _COMPLETES.get(message_type)
        if kinds is None:
            return self.head_owner
        return self._complete(kinds)

    def _complete(self, kinds: frozenset[Expect]) -> Owner | None:
        """Pop the first entry of `kinds` before the next ReadyForQuery, and all before it."""
        entries = self._entries
        for index, entry in enumerate(entries):
            kind = entry.kind
            if kind in _READY:
                break  # part of a Query's results (its RowDescription, CommandComplete)
            if kind in kinds:
                for _ in range(index):
                    self._drop(entries.popleft())
                return self._take_one()
        return self.head_owner

    def _take_one(self) -> Owner:
        head = self._entries[0]
        head.count -= 1
        if not head.count:
            self._drop(self._entries.popleft())
        return head.owner

    def _ready(self) -> Owner:
        entries = self._entries
        while entries and entries[0].kind not in _READY:
            self._drop(entries.popleft())  # answered earlier, by replies not fed here
        if not entries:
            raise UnexpectedReply("ReadyForQuery with nothing owed")
        self.copy_in = False
        early = self._early_copy_end
        if early is not None:
            early[0] -= 1
            if early[0] < 0:
                self._early_copy_end = None  # that statement ended without entering COPY IN
        return self._take_one()

    def _error(self) -> Owner | None:
        entries = self._entries
        if not entries:
            return None
        if self.copy_in:  # the COPY failed: the Syncs sent during it were ignored
            owner = entries[0].owner
            self.copy_in = False
            self._forget_syncs(self._syncs_since_statement)
            self._syncs_since_statement = 0
            if not entries:  # an Execute's COPY: the server discards up to the next Sync
                self._skipping = self.batch_open = True
                return owner
        head = entries[0]
        owner, kind = head.owner, head.kind
        if kind in _READY:
            return owner  # a Query's (or Sync's) error: its ReadyForQuery follows
        if kind is Expect.FUNCTION:
            self._take_one()
            return owner
        # an extended-protocol message failed: the server skips everything up to the next Sync
        while entries and entries[0].kind is not Expect.SYNC:
            self._drop(entries.popleft())
        self._skipping = not entries  # its Sync is still to come: what comes before is dropped
        return owner
