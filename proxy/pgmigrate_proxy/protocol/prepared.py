"""Named prepared statements under transaction pooling, mapped as pgbouncer 1.21+ maps them.

A client's statement names are its own; on the servers every statement has a proxy-wide name
(`PGMIGRATE_<n>`) keyed by its query text and parameter type OIDs, so that clients preparing
the same query share it and a client may prepare on one server and bind on another:

- `Registry` (one per proxy): key -> proxy name, reference counts, which relations each query
  names, and the names retired by a schema change (`invalidate`).
- `ClientStatements` (one per client): the client's names -> keys. Its `parse`, `bind`,
  `describe` and `close` take a client message's payload and the server it goes to, and
  return a `Step`: the frames to send to that server (names rewritten; a Parse injected when
  the server lacks the statement; a Close for the one its LRU evicts) and what to do with each
  reply, in order (`Expect`: forward it, swallow it, or answer the client with a frame that no
  server sends). None: the message is not about a named statement; send it as it is.
- `ServerStatements` (one per server connection): an LRU of the proxy names it has prepared,
  at most `max_prepared_statements`; `checkout()` closes the ones a schema change retired
  before the server is handed to a client.

Contract with the relay: when PostgreSQL answers ErrorResponse it skips the rest of the batch
up to Sync. For the expectation of the message that failed and of every one skipped after it
(ANSWERs included: PostgreSQL would not have answered them), the relay calls
`ServerStatements.undo(expect)` and `ClientStatements.undo(expect)` (a Parse or Close that did
not happen), drops it, and forwards the error.
Sans-IO: bytes and values only.
"""

from __future__ import annotations

import enum
import re
import struct
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import NamedTuple

from pgmigrate_proxy.protocol.framing import frame
from pgmigrate_proxy.protocol.messages import DecodeError, ErrorResponse
from pgmigrate_proxy.protocol.types import BackendType, FrontendType
from pgmigrate_proxy.sql.relations import referenced_relations

PREFIX = b"PGMIGRATE_"
PARSE_COMPLETE = frame(BackendType.PARSE_COMPLETE)
CLOSE_COMPLETE = frame(BackendType.CLOSE_COMPLETE)
SYNC = frame(FrontendType.SYNC)
_STATEMENT = b"S"
_INT16 = struct.Struct("!h")


class StatementKey(NamedTuple):
    """What makes two Parse messages the same statement: the query text and the parameter
    type OIDs, both as raw bytes of the Parse (`param_types`: the int16 count and the OIDs).
    A tuple: hashed and compared at C speed (it is looked up for every Parse)."""

    query: bytes
    param_types: bytes

    def parse_frame(self, name: bytes) -> bytes:
        """The Parse frame that prepares this statement as `name`."""
        return frame(FrontendType.PARSE, name + b"\0" + self.query + b"\0" + self.param_types)


class Reply(enum.Enum):
    """What the relay does with the reply to one message of a Step."""

    FORWARD = "forward"  # the server's reply goes to the client
    SWALLOW = "swallow"  # the reply (ParseComplete, CloseComplete) answers the proxy: drop it
    ANSWER = "answer"  # no server message: send Expect.frame to the client at this point


@dataclass(frozen=True, slots=True)
class Expect:
    """One entry of the expected-reply queue. `prepared` / `closed`: the proxy name this
    message prepares / closes on the server; `client_name` / `client_closed`: the client's
    name its Parse creates / its Close drops (for the undo methods, if PostgreSQL skips it)."""

    reply: Reply
    frame: bytes = b""
    prepared: bytes = b""
    closed: bytes = b""
    key: StatementKey | None = None
    client_name: bytes = b""
    client_closed: bytes = b""


@dataclass(frozen=True, slots=True)
class Step:
    """What one client message becomes: `frames` to the server, in order, and `expect`, one
    entry per frame (FORWARD or SWALLOW) plus the ANSWERs, in the order the client must see
    the replies. `error`: an ErrorResponse frame to answer instead; the relay then drops the
    client's messages up to Sync, as PostgreSQL would, and sends the Sync."""

    frames: tuple[bytes, ...] = ()
    expect: tuple[Expect, ...] = ()
    error: bytes = b""


_FORWARD = Expect(Reply.FORWARD)


def _cstring(payload: bytes, start: int = 0) -> tuple[bytes, int]:
    end = payload.find(b"\0", start)
    if end < 0:
        raise DecodeError("string not terminated")
    return payload[start:end], end + 1


class Registry:
    """The proxy-wide statements: key -> `PGMIGRATE_<n>`, held by clients and servers.

    `relations_of(query)` gives the relation names a query names, or None for "any" (the
    default reads them with the parser, once per new query text)."""

    def __init__(
        self,
        relations_of: Callable[[str], frozenset[str] | None] = referenced_relations,
        history: int = 256,
    ) -> None:
        self._relations_of = relations_of
        self._history = history
        self._counter = 0
        self._names: dict[StatementKey, bytes] = {}
        self._refs: dict[StatementKey, int] = {}
        self._relations: dict[StatementKey, frozenset[str] | None] = {}
        self._by_relation: dict[str, set[StatementKey]] = {}
        self._anywhere: set[StatementKey] = set()
        #: (epoch, names retired then), oldest first; at most `history` entries.
        self._retired: list[tuple[int, frozenset[bytes]]] = []
        self.epoch = 0

    def __len__(self) -> int:
        return len(self._refs)

    def name(self, key: StatementKey) -> bytes:
        """The proxy name of `key` now (a new one after `invalidate` retired the old)."""
        found = self._names.get(key)
        if found is None:
            self._counter += 1
            found = self._names[key] = PREFIX + str(self._counter).encode()
        return found

    def hold(self, key: StatementKey) -> None:
        """A client or server starts using `key`."""
        count = self._refs.get(key, 0)
        self._refs[key] = count + 1
        if count == 0:
            relations = self._relations_of(key.query.decode("utf-8", "replace"))
            self._relations[key] = relations
            for relation in relations if relations is not None else ():
                self._by_relation.setdefault(relation.lower(), set()).add(key)
            if relations is None:
                self._anywhere.add(key)

    def release(self, key: StatementKey) -> None:
        """A client or server stops using `key`; the last one lets it go."""
        count = self._refs.pop(key) - 1
        if count:
            self._refs[key] = count
            return
        self._names.pop(key, None)
        self._anywhere.discard(key)
        for relation in self._relations.pop(key) or ():
            keys = self._by_relation[relation.lower()]
            keys.discard(key)
            if not keys:
                del self._by_relation[relation.lower()]

    def invalidate(self, relations: Iterable[str]) -> frozenset[bytes]:
        """After DDL on `relations` (bare names): retire the names of every statement naming
        one of them (and of those whose relations are unknown); return the retired names.
        Their keys get new names; servers close the old ones at checkout."""
        keys = set(self._anywhere)
        for relation in relations:
            keys |= self._by_relation.get(relation.lower(), set())
        return self.retire(keys)

    def retire(self, keys: Iterable[StatementKey]) -> frozenset[bytes]:
        """Retire the names of `keys` (a server found one stale: its schema changed where the
        proxy did not see it); return the retired names. Their keys get new names; servers
        close the old ones at checkout."""
        retired = frozenset(name for key in keys if (name := self._names.pop(key, None)))
        if retired:
            self.epoch += 1
            self._retired.append((self.epoch, retired))
            del self._retired[: -self._history]
        return retired

    def retired_since(self, epoch: int) -> frozenset[bytes] | None:
        """The names retired after `epoch`; None when that history is no longer kept."""
        if epoch == self.epoch:
            return frozenset()
        if not self._retired or self._retired[0][0] > epoch + 1:
            return None
        return frozenset().union(*(names for seen, names in self._retired if seen > epoch))


class ServerStatements:
    """The proxy names one server connection has prepared: an LRU of at most `capacity`."""

    def __init__(self, registry: Registry, capacity: int) -> None:
        self.registry = registry
        self.capacity = capacity
        self._lru: OrderedDict[bytes, StatementKey] = OrderedDict()
        self._epoch = registry.epoch

    def __len__(self) -> int:
        return len(self._lru)

    def __contains__(self, name: bytes) -> bool:
        return name in self._lru

    def names(self) -> list[bytes]:
        """The prepared names, least recently used first."""
        return list(self._lru)

    def ensure(
        self, key: StatementKey, parse_reply: Reply = Reply.SWALLOW, client_name: bytes = b""
    ) -> tuple[bytes, list[bytes], list[Expect]]:
        """Make `key` prepared here: its proxy name, and the frames to send first (the Close of
        the statement the LRU evicts, SWALLOW; then the Parse, whose ParseComplete gets
        `parse_reply`; `client_name` when it is the client's own Parse) with their
        expectations; no frames when it is prepared already."""
        name = self.registry.name(key)
        if name in self._lru:
            self._lru.move_to_end(name)
            return name, [], []
        frames: list[bytes] = []
        expect: list[Expect] = []
        while self._lru and len(self._lru) >= self.capacity:
            old, old_key = self._lru.popitem(last=False)
            self.registry.release(old_key)
            frames.append(close_frame(old))
            expect.append(Expect(Reply.SWALLOW, closed=old, key=old_key))
        frames.append(key.parse_frame(name))
        expect.append(Expect(parse_reply, prepared=name, key=key, client_name=client_name))
        self._lru[name] = key
        self.registry.hold(key)
        return name, frames, expect

    def undo(self, expect: Expect) -> None:
        """PostgreSQL skipped the message of `expect` (an error came before it in its batch)."""
        if expect.prepared and expect.prepared in self._lru:
            self.registry.release(self._lru.pop(expect.prepared))
        if expect.closed and expect.key is not None and expect.closed not in self._lru:
            self._lru[expect.closed] = expect.key
            self._lru.move_to_end(expect.closed, last=False)  # it was the least recently used
            self.registry.hold(expect.key)

    def clear(self) -> None:
        """Everything here was deallocated (DISCARD ALL, DEALLOCATE ALL, a reset query)."""
        for key in self._lru.values():
            self.registry.release(key)
        self._lru.clear()

    @property
    def current(self) -> bool:
        """No schema change retired anything since the last checkout (none is needed)."""
        return self._epoch == self.registry.epoch

    def checkout(self) -> Step:
        """Before handing this server to a client: Close each statement a schema change retired
        (then a Sync), every reply swallowed; an empty Step when there is none."""
        retired = self.registry.retired_since(self._epoch)
        self._epoch = self.registry.epoch
        stale = list(self._lru) if retired is None else [n for n in self._lru if n in retired]
        if not stale:
            return Step()
        frames, expect = [], []
        for name in stale:
            self.registry.release(self._lru.pop(name))
            frames.append(close_frame(name))
            expect.append(Expect(Reply.SWALLOW, closed=name))
        return Step((*frames, SYNC), (*expect, Expect(Reply.SWALLOW)))


def close_frame(name: bytes) -> bytes:
    """Close of prepared statement `name`."""
    return frame(FrontendType.CLOSE, _STATEMENT + name + b"\0")


def _error(code: str, message: str) -> bytes:
    return ErrorResponse.build("ERROR", code, message).encode()


#: A Query that is only DEALLOCATE [PREPARE] name|ALL or DISCARD ALL.
_DEALLOCATE = re.compile(
    r'\s*(?:deallocate\s+(?:prepare\s+)?(?:(all)|([a-z_][a-z0-9_$]*)|"((?:[^"]|"")+)")'
    r"|discard\s+(all))\s*;?\s*",
    re.IGNORECASE | re.DOTALL,
)


class QueryAction(enum.Enum):
    """What ClientStatements.query says the relay does with a Query."""

    FORWARD = "forward"  # not about the client's statements
    ANSWER_DEALLOCATE = "answer"  # answer CommandComplete "DEALLOCATE" + ReadyForQuery yourself
    FORWARD_THEN_CLEAR = "clear"  # forward it; if it succeeds, the server's clear()


class ClientStatements:
    """One client's prepared statement names, mapped to the registry's statements."""

    __slots__ = ("_names", "registry")

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self._names: dict[bytes, StatementKey] = {}

    def __len__(self) -> int:
        return len(self._names)

    def key(self, name: bytes) -> StatementKey | None:
        return self._names.get(name)

    def parse(self, payload: bytes, server: ServerStatements) -> Step | None:
        """Parse: a named statement is mapped and, unless the server has it, prepared there
        under its proxy name; its ParseComplete is the client's (or answered by the proxy)."""
        name, pos = _cstring(payload)
        if not name:
            return None
        if name in self._names:
            shown = name.decode("utf-8", "replace")
            return Step(error=_error("42P05", f'prepared statement "{shown}" already exists'))
        query, pos = _cstring(payload, pos)
        key = StatementKey(query, payload[pos:])
        self._names[name] = key
        self.registry.hold(key)
        _, frames, expect = server.ensure(key, Reply.FORWARD, name)
        if not frames:  # the server has it: the proxy answers the client's Parse
            return Step((), (Expect(Reply.ANSWER, PARSE_COMPLETE, key=key, client_name=name),))
        return Step(tuple(frames), tuple(expect))

    def undo(self, expect: Expect) -> None:
        """PostgreSQL skipped (or failed) the client's Parse or Close of `expect`: the name is
        not made, or not dropped."""
        if expect.client_name and self._names.get(expect.client_name) == expect.key:
            self.registry.release(self._names.pop(expect.client_name))
        name, key = expect.client_closed, expect.key
        if name and key is not None and name not in self._names:
            self._names[name] = key
            self.registry.hold(key)

    def bind(self, payload: bytes, server: ServerStatements) -> Step | None:
        """Bind: the statement name rewritten, after a Parse if the server lacks it."""
        _portal, pos = _cstring(payload)
        name, end = _cstring(payload, pos)
        key = self._names.get(name)
        if key is None:
            return None
        proxy_name, frames, expect = server.ensure(key)
        bind = frame(FrontendType.BIND, payload[:pos] + proxy_name + b"\0" + payload[end:])
        return Step((*frames, bind), (*expect, _FORWARD))

    def describe(self, payload: bytes, server: ServerStatements) -> Step | None:
        """Describe of a statement: rewritten, after a Parse if the server lacks it."""
        if payload[:1] != _STATEMENT:
            return None
        key = self._names.get(_cstring(payload, 1)[0])
        if key is None:
            return None
        proxy_name, frames, expect = server.ensure(key)
        describe = frame(FrontendType.DESCRIBE, _STATEMENT + proxy_name + b"\0")
        return Step((*frames, describe), (*expect, _FORWARD))

    def close(self, payload: bytes, server: ServerStatements) -> Step | None:
        """Close of a statement: forgotten by the client, kept on the server (other clients
        may use it; its LRU drops it in time); the proxy answers CloseComplete."""
        if payload[:1] != _STATEMENT:
            return None
        name = _cstring(payload, 1)[0]
        key = self._names.pop(name, None)
        if key is None:
            return None
        self.registry.release(key)
        return Step((), (Expect(Reply.ANSWER, CLOSE_COMPLETE, key=key, client_closed=name),))

    def message(self, mtype: int, payload: bytes, server: ServerStatements) -> Step | None:
        """The Step for any client message (None: send it as it is)."""
        handler = self._HANDLERS.get(mtype)
        return handler(self, payload, server) if handler else None

    _HANDLERS: dict[int, Callable[[ClientStatements, bytes, ServerStatements], Step | None]] = {
        FrontendType.PARSE: parse,
        FrontendType.BIND: bind,
        FrontendType.DESCRIBE: describe,
        FrontendType.CLOSE: close,
    }

    def query(self, sql: str) -> QueryAction:
        """A Query's effect on the client's names: `DEALLOCATE name` of one of them is answered
        by the proxy (the servers keep the statement); DEALLOCATE ALL and DISCARD ALL forget
        them all and go to the server, which then holds none."""
        match = _DEALLOCATE.fullmatch(sql)
        if match is None:
            return QueryAction.FORWARD
        if match[1] or match[4]:
            self.release_all()
            return QueryAction.FORWARD_THEN_CLEAR
        name = (match[2].lower() if match[2] else match[3].replace('""', '"')).encode()
        key = self._names.pop(name, None)
        if key is None:
            return QueryAction.FORWARD
        self.registry.release(key)
        return QueryAction.ANSWER_DEALLOCATE

    def release_all(self) -> None:
        """Forget every name (DEALLOCATE ALL, DISCARD ALL, or the client left)."""
        for key in self._names.values():
            self.registry.release(key)
        self._names.clear()
