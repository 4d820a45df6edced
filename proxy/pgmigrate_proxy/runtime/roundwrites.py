"""What the relay passes to clients goes out at the end of the event loop's round of I/O
callbacks, all of it together (as Redis writes its replies just before its loop sleeps):
a client process with many connections (pgbench, an application server's pool) is woken
once for the replies of a round, not once for each. Nothing waits for these writes within
the round: its other callbacks (the next client's query to a server) run first.

Only relayed bytes are deferred (ClientSession.relay_later); a session that writes to its
client itself (an error, a notice, closing) sends what it deferred first, so the client
gets every byte in order.
"""

from __future__ import annotations

import asyncio
from typing import Protocol


class Deferring(Protocol):
    """A session with bytes deferred until the round ends."""

    def send_deferred(self) -> None: ...


class RoundWrites:
    """The sessions whose deferred bytes go out when the current round ends (one per proxy
    server: one call_soon per round in which something was relayed)."""

    __slots__ = ("_due",)

    def __init__(self) -> None:
        self._due: list[Deferring] = []

    def due(self, session: Deferring) -> None:
        """`session` deferred bytes (the first of this round)."""
        if not self._due:
            asyncio.get_running_loop().call_soon(self.flush)
        self._due.append(session)

    def flush(self) -> None:
        """The round ended: every session sends what it deferred."""
        due, self._due = self._due, []
        for session in due:
            session.send_deferred()
