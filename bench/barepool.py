"""A bare transaction pooler in Python on uvloop: the reference `bench/pooler.py --bare` runs
beside pgbouncer and the proxy, to show what a Python pooler's relay alone costs here.

It reads nothing but the last six bytes of each server chunk: a chunk that ends with
ReadyForQuery 'I' gives the server back, to the first queued client (its held bytes go out at
once) or to the idle list; a client chunk goes to the client's server, to an idle one, or
waits in the queue. The first `pool_size` clients' logins are relayed to PostgreSQL and their
server connections become the pool; later clients are told AuthenticationOk and the first
login's ParameterStatus messages without any check. Terminate is dropped. Nothing else of
the protocol is handled (no cancel, no session state, no named statements across servers, no
message split across reads): it is a measuring stick for pgbench -S, not a pooler.

    python bench/barepool.py UPSTREAM_HOST UPSTREAM_PORT LISTEN_PORT POOL_SIZE
"""

from __future__ import annotations

import asyncio
import struct
import sys
from collections import deque
from typing import cast

import uvloop

_READY_IDLE = b"Z\x00\x00\x00\x05I"
_AUTH_OK = b"R\x00\x00\x00\x08\x00\x00\x00\x00"
_KEY = b"K\x00\x00\x00\x0c\x00\x00\x00\x01\x00\x00\x00\x02"


class Pool:
    def __init__(self, host: str, port: int, size: int) -> None:
        self.host, self.port, self.size = host, port, size
        self.opened = 0
        self.idle: list[Server] = []
        self.queue: deque[Client] = deque()
        self.welcome = b""  # the first login's ParameterStatus messages
        self.opening: set[asyncio.Task[None]] = set()

    def give_back(self, server: Server) -> None:
        if self.queue:
            client = self.queue.popleft()
            server.client = client
            client.server = server
            server.transport.write(b"".join(client.held))
            client.held.clear()
        else:
            server.client = None
            self.idle.append(server)


class Server(asyncio.Protocol):
    transport: asyncio.Transport

    def __init__(self, pool: Pool, client: Client) -> None:
        self.pool = pool
        self.client: Client | None = client
        self.login = True
        self.welcome: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # (uvloop's: not a subclass)

    def data_received(self, data: bytes) -> None:
        client = self.client
        if client is None:
            return
        client.transport.write(data)
        if self.login:
            self._learn(data)
            if data[-6:-5] != b"Z":
                return
            self.login = False
            if not self.pool.welcome:
                self.pool.welcome = b"".join(self.welcome)
        elif data[-6:] != _READY_IDLE:
            return
        client.server = None
        self.pool.give_back(self)

    def _learn(self, data: bytes) -> None:
        pos = 0
        while pos + 5 <= len(data):
            (length,) = struct.unpack_from("!I", data, pos + 1)
            if data[pos : pos + 1] == b"S":
                self.welcome.append(data[pos : pos + 1 + length])
            pos += 1 + length


class Client(asyncio.Protocol):
    transport: asyncio.Transport

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.server: Server | None = None
        self.held: list[bytes] = []
        self.started = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # (uvloop's: not a subclass)

    def data_received(self, data: bytes) -> None:
        if not self.started:
            self.started = True
            self._start(data)
            return
        if data[:1] == b"X":
            return
        server = self.server
        if server is not None:
            server.transport.write(data)
            return
        pool = self.pool
        if pool.idle:
            server = pool.idle.pop()
            server.client = self
            self.server = server
            server.transport.write(data)
            return
        self.held.append(data)
        if len(self.held) == 1:
            pool.queue.append(self)

    def _start(self, data: bytes) -> None:
        pool = self.pool
        if pool.opened < pool.size:
            pool.opened += 1
            task = asyncio.get_running_loop().create_task(self._open(data))
            pool.opening.add(task)
            task.add_done_callback(pool.opening.discard)
            return
        self.transport.write(_AUTH_OK + pool.welcome + _KEY + _READY_IDLE)

    async def _open(self, startup: bytes) -> None:
        loop = asyncio.get_running_loop()
        pool = self.pool
        _, server = await loop.create_connection(lambda: Server(pool, self), pool.host, pool.port)
        self.server = server
        server.transport.write(startup)

    def connection_lost(self, exc: Exception | None) -> None:
        if self in self.pool.queue:
            self.pool.queue.remove(self)


async def serve(host: str, port: int, listen_port: int, size: int) -> None:
    pool = Pool(host, port, size)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Client(pool), "127.0.0.1", listen_port)
    await server.serve_forever()


def main() -> None:
    host, port, listen_port, size = sys.argv[1:5]
    uvloop.run(serve(host, int(port), int(listen_port), int(size)))


if __name__ == "__main__":
    main()
