"""Relayed bytes go out at the end of the loop's round (runtime/roundwrites.py): once per
round, after the round's other callbacks, and never after what the session writes to its
client itself. A real event loop and a real socket pair; no PostgreSQL needed."""

from __future__ import annotations

import asyncio
import socket

from pgmigrate_proxy.config import Config
from pgmigrate_proxy.runtime.roundwrites import RoundWrites
from pgmigrate_proxy.runtime.server import ProxyServer
from pgmigrate_proxy.runtime.session import ClientSession


class Recorder:
    def __init__(self, name: str, seen: list[str]) -> None:
        self.name = name
        self.seen = seen

    def send_deferred(self) -> None:
        self.seen.append(self.name)


def test_one_flush_per_round_after_the_rounds_callbacks() -> None:
    async def main() -> list[str]:
        loop = asyncio.get_running_loop()
        writes = RoundWrites()
        seen: list[str] = []
        first, second = Recorder("first", seen), Recorder("second", seen)

        def round_of_callbacks() -> None:
            writes.due(first)
            writes.due(second)
            seen.append("rest of the round")

        loop.call_soon(round_of_callbacks)
        await asyncio.sleep(0)  # the round
        await asyncio.sleep(0)  # the flush it scheduled
        writes.due(first)  # a later round: scheduled again
        await asyncio.sleep(0)
        return seen

    assert asyncio.run(main()) == ["rest of the round", "first", "second", "first"]


async def _session(sock: socket.socket) -> tuple[asyncio.BaseTransport, ClientSession]:
    """A client session of a proxy (not started: no upstream needed) on one end of a pair."""
    hub = ProxyServer(Config(upstream="postgresql://localhost/postgres", listen_port=0))
    loop = asyncio.get_running_loop()
    transport, session = await loop.connect_accepted_socket(lambda: ClientSession(hub), sock)
    assert isinstance(session, ClientSession)
    return transport, session


def _read_all(sock: socket.socket, size: int) -> bytes:
    sock.settimeout(5)
    data = b""
    while len(data) < size:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def test_the_sessions_own_writes_come_after_what_it_deferred() -> None:
    """A notice written in the round in which replies were relayed reaches the client after
    them, and closing sends what was deferred first."""
    ours, theirs = socket.socketpair()

    async def main() -> None:
        _, session = await _session(ours)
        session.relay_later(b"row 1;")
        session.relay_later(b"row 2;")
        session.deliver_raw(b"notice;")  # (written now: the deferred rows go first)
        session.relay_later(b"row 3;")
        session.terminated()  # closes: row 3 goes out first
        await asyncio.sleep(0.05)

    asyncio.run(main())
    assert _read_all(theirs, 100) == b"row 1;row 2;notice;row 3;"
    theirs.close()


def test_bytes_deferred_for_a_client_that_left_are_dropped() -> None:
    ours, theirs = socket.socketpair()

    async def main() -> None:
        transport, session = await _session(ours)
        session.relay_later(b"before;")
        await asyncio.sleep(0)  # the round ends: sent
        await asyncio.sleep(0)
        session.relay_later(b"after;")
        transport.close()  # the client's side closes before the round ends
        await asyncio.sleep(0.05)  # no error: the flush skips a closing transport

    asyncio.run(main())
    assert _read_all(theirs, 100) == b"before;"
    theirs.close()
