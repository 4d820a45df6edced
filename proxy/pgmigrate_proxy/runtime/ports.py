"""What a unit runner (the DDL guard's driver, the migration runner) is given: a server
connection to speak on and a way to write to the client; never the client session itself."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Protocol

from pgmigrate_proxy.guard.unit import HeldUnit
from pgmigrate_proxy.protocol.extended import QueryResult
from pgmigrate_proxy.protocol.framing import Frame
from pgmigrate_proxy.protocol.types import TransactionStatus


class ClientWriter(Protocol):
    """How a runner writes to the client (the client session implements it)."""

    @property
    def gone(self) -> bool:
        """The client has left."""

    def deliver(self, frames: Iterable[Frame]) -> None: ...
    def deliver_raw(self, data: bytes) -> None: ...
    def notice(self, severity: str, message: str, detail: str | None = None) -> None: ...


class ServerPort(Protocol):
    """What a runner asks of the server connection (runtime/backend.py implements it)."""

    @property
    def status(self) -> TransactionStatus: ...
    @property
    def server_pid(self) -> int: ...
    @property
    def database(self) -> str: ...
    @property
    def can_inject(self) -> bool: ...
    @property
    def batch_open(self) -> bool: ...
    @property
    def gone(self) -> bool: ...

    async def wait_idle(self) -> None: ...
    async def exchange(self, data: bytes) -> list[Frame]: ...
    async def inject(self, sql: str, params: Sequence[str | None] = ()) -> QueryResult: ...


#: Runs one held unit through the DDL guard, its replies written to the given client writer.
RunGuarded = Callable[[HeldUnit, ClientWriter], Awaitable[None]]


class Capture:
    """A client writer that keeps the replies aside (a migration runner reads them first);
    raw writes and notices still reach the client at once."""

    __slots__ = ("client", "frames")

    def __init__(self, client: ClientWriter) -> None:
        self.client = client
        self.frames: list[Frame] = []

    @property
    def gone(self) -> bool:
        return self.client.gone

    def deliver(self, frames: Iterable[Frame]) -> None:
        self.frames.extend(frames)

    def deliver_raw(self, data: bytes) -> None:
        self.client.deliver_raw(data)

    def notice(self, severity: str, message: str, detail: str | None = None) -> None:
        self.client.notice(severity, message, detail)
