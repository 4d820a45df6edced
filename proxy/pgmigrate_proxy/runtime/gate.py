"""The proxy-wide gate at transaction boundaries: once armed with a predicate, it is shown the
first statement of each new transaction of every client session, and one it holds waits at the
proxy (its client's later data behind it) until the gate is released, in arrival order.

What counts as the first statement of a new transaction: the first statement-starting message
(Query, Parse, Bind, Execute, FunctionCall) of a received chunk, sent when the session's server
owes nothing and is idle (`I`), or, in transaction pooling, when the session has no server (it
is then shown before a server is acquired for it). Messages that a client pipelines behind an
unanswered one are not shown (the proxy cannot know yet whether they start a transaction).
Unarmed, the relay pays one attribute check per chunk (runtime/hold.py).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Protocol

from pgmigrate_proxy.protocol.framing import Frame
from pgmigrate_proxy.protocol.types import FrontendType


class GatedSession(Protocol):
    """What a predicate is told of the session whose statement it judges."""

    peer: str


#: Decides whether to hold a session's first statement of a new transaction (given its frame).
Predicate = Callable[[GatedSession, Frame], bool]
#: The messages that can start a transaction's first statement.
GATED_TYPES = frozenset(
    t.value for t in (FrontendType.QUERY, FrontendType.PARSE, FrontendType.BIND,
                      FrontendType.EXECUTE, FrontendType.FUNCTION_CALL)
)  # fmt: skip


class Gate:
    """One proxy's gate (see the module docstring); used on the proxy's event loop only."""

    __slots__ = ("_waiters", "predicate")

    def __init__(self) -> None:
        self.predicate: Predicate | None = None  # None: unarmed, nothing is shown or held
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def waiting(self) -> int:
        """Statements held now."""
        return sum(1 for w in self._waiters if not w.done())

    def arm(self, predicate: Predicate) -> None:
        """From now on, hold the first statements of new transactions that `predicate` picks."""
        self.predicate = predicate

    def release(self) -> None:
        """Disarm and let every held statement go, in the order they were held."""
        self.predicate = None
        waiters, self._waiters = self._waiters, deque()
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def holds(self, session: GatedSession, item: Frame) -> bool:
        """Whether the armed gate holds this first statement of a new transaction."""
        predicate = self.predicate
        return predicate is not None and item.type in GATED_TYPES and predicate(session, item)

    def hold(self) -> asyncio.Future[None]:
        """A place in the queue, taken at once (a release before it is awaited counts): done
        when released; its holder cancels it when its client leaves."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        return waiter
