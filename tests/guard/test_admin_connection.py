"""The admin connection itself: its session settings, reconnection, and sick or absent servers."""

from __future__ import annotations

import asyncio
import socket

import psycopg
import pytest
from pgmigrate_proxy.admin import APPLICATION_NAME, AdminConnection, AdminUnavailable
from psycopg.conninfo import make_conninfo

from tests.fixtures.postgres import PgInfo
from tests.guard.live import AE, Connect, admin_for, eventually

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]


def test_reconnects_after_its_backend_is_terminated(pg: PgInfo, sessions: Connect) -> None:
    other = sessions()

    async def body() -> None:
        async with admin_for(pg) as admin:
            old = admin.pid
            [me] = await admin.activity([old])
            assert me.application_name == APPLICATION_NAME
            other.execute("SELECT pg_terminate_backend(%s)", (old,))

            async def gone() -> bool:
                row = other.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (old,)
                ).fetchone()
                return row == (0,)

            await eventually(gone, "the admin backend to exit")
            [again] = await admin.activity([other.info.backend_pid])  # reconnects, runs again
            assert again.pid == other.info.backend_pid
            assert admin.connected and admin.pid not in (0, old)
            await admin.close()
            assert not admin.connected
            await admin.ensure()
            assert admin.connected

    asyncio.run(body())


def test_session_settings_bound_every_query(pg: PgInfo) -> None:
    async def body() -> None:
        async with admin_for(pg, statement_timeout=1.5) as admin:
            rows = await admin._fetch(  # private: the settings are not part of the API
                "SELECT current_setting('statement_timeout') AS st,"
                " current_setting('lock_timeout') AS lt,"
                " current_setting('application_name') AS app",
                {},
            )
            assert rows == [{"st": "1500ms", "lt": "1500ms", "app": APPLICATION_NAME}]
            with pytest.raises(psycopg.errors.QueryCanceled):
                await admin._fetch("SELECT pg_sleep(5)", {})
            assert admin.connected  # a statement timeout does not cost the connection

    asyncio.run(body())


def test_unreachable_server_gives_up_after_backoff() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there
    conninfo = make_conninfo(host="127.0.0.1", port=port, user="u", password="sekrit-pw")
    admin = AdminConnection(conninfo, reconnect_attempts=3, reconnect_delay=0.01)

    async def body() -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(AdminUnavailable) as caught:
            await admin.ensure()
        assert loop.time() - started >= 0.03  # slept 0.01 + 0.02 between the three tries
        assert "sekrit" not in str(caught.value)
        with pytest.raises(AdminUnavailable):
            await admin.find_blockers({1: AE})

    asyncio.run(body())


def test_a_server_that_never_answers_cannot_hang_connect() -> None:
    with socket.socket() as silent:  # accepts TCP, never speaks
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        host, port = silent.getsockname()
        conninfo = make_conninfo(host=host, port=port, user="u", dbname="d")
        admin = AdminConnection(conninfo, connect_timeout=0.3, reconnect_attempts=2)

        async def body() -> None:
            loop = asyncio.get_running_loop()
            started = loop.time()
            with pytest.raises(AdminUnavailable):
                await admin.ensure()
            assert loop.time() - started < 5

        asyncio.run(body())


class StallingRelay:
    """A TCP relay to the server that can stop passing bytes, like a sick network or server."""

    def __init__(self, host: str, port: int) -> None:
        self._target = (host, port)
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> int:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()
        self._flowing.set()

    def stall(self) -> None:
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self._target)
        self._writers += [writer, up_writer]
        await asyncio.gather(
            self._pump(reader, up_writer), self._pump(up_reader, writer), return_exceptions=True
        )

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            await self._flowing.wait()
            writer.write(data)
            await writer.drain()
        writer.close()


def test_a_stalled_server_cannot_hang_a_query(pg: PgInfo) -> None:
    async def body() -> None:
        relay = StallingRelay(pg.host, pg.port)
        async with relay as port:
            conninfo = make_conninfo(pg.direct_conninfo(), port=port)
            admin = AdminConnection(conninfo, statement_timeout=0.5, reconnect_attempts=1)
            await admin.connect()
            assert await admin.blocking_pids(admin.pid) == []
            relay.stall()
            loop = asyncio.get_running_loop()
            started = loop.time()
            with pytest.raises(AdminUnavailable, match="timed out"):
                await admin.blocking_pids(admin.pid)
            # 0.5 s statement_timeout + 1 s margin + at most two 0.5 s unwinds
            assert loop.time() - started < 3.5
            assert not admin.connected
            relay.resume()
            await admin.ensure()
            assert await admin.blocking_pids(admin.pid) == []
            await admin.close()

    asyncio.run(body())
