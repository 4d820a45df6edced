"""The server connection apart from the client session (runtime/backend.py): a session hands
it back when it owes nothing, another takes it and relays through it, a detach mid-result is
refused, and the replies to the proxy's own queries never reach a client."""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import pytest
from pgmigrate_proxy.errors import ServerBusy
from pgmigrate_proxy.protocol.extended import data_row
from pgmigrate_proxy.protocol.framing import frame
from pgmigrate_proxy.protocol.types import BackendType, FrontendType
from pgmigrate_proxy.runtime.backend import ServerConnection
from pgmigrate_proxy.runtime.session import ClientSession

from tests.fixtures.proxy import RunningProxy
from tests.integration.probes import wait_until
from tests.integration.wire import Message, WireClient

ROW_DESCRIPTION = BackendType.ROW_DESCRIPTION
DATA_ROW = BackendType.DATA_ROW
COMMAND_COMPLETE = BackendType.COMMAND_COMPLETE
READY = BackendType.READY_FOR_QUERY
BIG_ROWS = 50_000


def session_of(proxy: RunningProxy, pid: int) -> ClientSession:
    """The proxy's session whose server connection is backend `pid` (read on its loop)."""

    async def find() -> ClientSession:
        for session in proxy.server._sessions:
            if session.server is not None and session.server.server_pid == pid:
                return session
        raise AssertionError(f"no session on backend {pid}")

    return proxy.call(find())


def on_loop(proxy: RunningProxy, action: Callable[[], object]) -> object:
    """Run `action` on the proxy's loop (sessions are touched only there)."""

    async def run() -> object:
        return action()

    return proxy.call(run())


def types(messages: list[Message]) -> list[int]:
    return [mtype for mtype, _ in messages]


def only_row(messages: list[Message]) -> tuple[str | None, ...]:
    assert types(messages) == [ROW_DESCRIPTION, DATA_ROW, COMMAND_COMPLETE, READY], messages
    return data_row(messages[1][1])


def test_a_server_connection_changes_hands_between_sessions(proxy: RunningProxy) -> None:
    with WireClient(proxy.host, proxy.port) as a, WireClient(proxy.host, proxy.port) as b:
        a.login()
        b.login()
        pid_a, pid_b = a.backend_pid, b.backend_pid
        session_a, session_b = session_of(proxy, pid_a), session_of(proxy, pid_b)

        def swap() -> None:
            server_a, server_b = session_a.detach(), session_b.detach()
            session_a.attach(server_b)
            session_b.attach(server_a)

        on_loop(proxy, swap)
        # each client now speaks through the other's server connection, and gets its answers
        assert only_row(a.query("SELECT pg_backend_pid(), 6 * 7")) == (str(pid_b), "42")
        assert only_row(b.query("SELECT pg_backend_pid(), 'b'")) == (str(pid_a), "b")
        # and a transaction's status follows the connection it runs on
        assert a.query("BEGIN")[-1] == (READY, b"T")
        assert b.query("SELECT 1")[-1] == (READY, b"I")
        assert a.query("COMMIT")[-1] == (READY, b"I")


def test_detach_is_refused_mid_result(proxy: RunningProxy) -> None:
    with WireClient(proxy.host, proxy.port) as a:
        a.login()
        session = session_of(proxy, a.backend_pid)
        sql = f"SELECT repeat('x', 100) FROM generate_series(1, {BIG_ROWS})"
        a.send(frame(FrontendType.QUERY, sql.encode() + b"\0"))
        assert a.read_message()[0] == ROW_DESCRIPTION  # the result has begun

        with pytest.raises(ServerBusy, match="replies are outstanding"):
            on_loop(proxy, session.detach)

        rest = a.read_until(READY)
        assert types(rest).count(DATA_ROW) == BIG_ROWS
        assert rest[-2][0] == COMMAND_COMPLETE
        server = session.server
        assert server is not None
        wait_until(lambda: on_loop(proxy, lambda: server.busy) is None, "the server idle")
        on_loop(proxy, session.detach)  # now it owes nothing
        on_loop(proxy, lambda: session.attach(server))
        assert only_row(a.query("SELECT 'still here'")) == ("still here",)


def test_injected_replies_never_reach_the_client(proxy: RunningProxy) -> None:
    with WireClient(proxy.host, proxy.port) as a:
        a.login()
        session = session_of(proxy, a.backend_pid)
        server = session.server
        assert server is not None

        async def inject() -> list[tuple[str | None, ...]]:
            ok = await server.inject("SELECT 41 + 1, current_user")
            failed = await server.inject("SELECT 1 / 0")
            assert failed.error is not None and failed.error["C"] == "22012"
            return ok.rows

        assert proxy.call(inject()) == [("42", "u_trust")]
        # the next thing the client reads is the answer to its own query: nothing of ours
        assert only_row(a.query("SELECT 'mine'")) == ("mine",)


def test_without_the_guard_replies_are_tracked_too(
    proxy_factory: Callable[..., RunningProxy],
) -> None:
    """The pooler needs to know what a server owes whether the guard is on or off."""
    proxy = proxy_factory(guard=False)
    with WireClient(proxy.host, proxy.port) as a:
        a.login()
        session = session_of(proxy, a.backend_pid)
        server = on_loop(proxy, session.detach)
        on_loop(proxy, lambda: session.attach(cast(ServerConnection, server)))
        assert only_row(a.query("SELECT 1")) == ("1",)
