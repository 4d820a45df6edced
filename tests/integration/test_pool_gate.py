"""The proxy's gate (runtime/gate.py): armed, it is shown every statement of every session, with
its text and backend pid, and holds at the proxy those its predicate picks, inside a
transaction or not; released, what it held runs. In transaction pooling (a statement between
transactions waits before a server is acquired) and in session pooling."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import psycopg
import pytest

from tests.fixtures.proxy import RunningProxy
from tests.integration.probes import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

Factory = Callable[..., RunningProxy]


def connect(proxy: RunningProxy, **kwargs: Any) -> psycopg.Connection[Any]:
    conn = psycopg.connect(proxy.conninfo("u_trust", connect_timeout="10"), **kwargs)
    conn.prepare_threshold = None
    return conn


def arm(proxy: RunningProxy, seen: list[tuple[int, list[str] | None]]) -> None:
    def marked(session: Any, texts: Any) -> bool:
        seen.append((session.backend_pid, texts))
        return texts is None or any("held" in text for text in texts)

    async def go() -> None:
        proxy.server.guard.gate.arm(marked)

    proxy.call(go())


def waiting(proxy: RunningProxy) -> int:
    async def count() -> int:
        return proxy.server.guard.gate.waiting

    return proxy.call(count())


def release(proxy: RunningProxy) -> None:
    async def go() -> None:
        proxy.server.guard.gate.release(None)

    proxy.call(go())


@pytest.mark.parametrize("mode", ["transaction", "session"])
def test_the_armed_gate_is_shown_every_statement(proxy_factory: Factory, mode: str) -> None:
    """Inside a transaction or not, with or without a server: the predicate decides."""
    proxy = proxy_factory(pool_mode=mode, default_pool_size=2)
    inside = connect(proxy)  # not autocommit: its first execute opens a transaction
    idle = connect(proxy, autocommit=True)
    assert inside.execute("SELECT 1").fetchone() == (1,)
    assert idle.execute("SELECT 1").fetchone() == (1,)
    seen: list[tuple[int, list[str] | None]] = []
    arm(proxy, seen)
    results: list[object] = []
    thread = threading.Thread(
        target=lambda: results.append(idle.execute("SELECT 'held 2'").fetchone())
    )
    thread.start()
    wait_until(lambda: waiting(proxy) == 1, "the idle session's statement held")
    # not picked: goes on, inside its transaction too
    assert inside.execute("SELECT 3").fetchone() == (3,)
    later = threading.Thread(
        target=lambda: results.append(inside.execute("SELECT 'held 4'").fetchone())
    )
    later.start()  # inside its transaction: held as well
    wait_until(lambda: waiting(proxy) == 2, "the statement inside a transaction held")
    # shown with its text and its server's backend (in transaction pooling not the one the
    # client was told of at login)
    pids = [pid for pid, texts in seen if texts == ["SELECT 3"]]
    assert pids and 0 not in pids
    # between transactions in transaction pooling: pid 0 without a server, or the server lent
    # to it (idle in the pool, still attached: it holds no lock)
    assert any(texts == ["SELECT 'held 2'"] for _, texts in seen)
    assert not results
    release(proxy)
    thread.join(10)
    later.join(10)
    assert sorted(results) == [("held 2",), ("held 4",)]  # type: ignore[type-var]
    # released and disarmed: the sessions carry on as before
    assert idle.execute("SELECT 'held 5'").fetchone() == ("held 5",)
    inside.commit()
    assert inside.execute("SELECT 6").fetchone() == (6,)
    inside.close()
    idle.close()


def test_a_held_statement_of_a_client_that_left_is_dropped(proxy_factory: Factory) -> None:
    proxy = proxy_factory(pool_mode="transaction", default_pool_size=1)
    leaving = connect(proxy, autocommit=True)
    arm(proxy, [])
    leaving.pgconn.send_query(b"CREATE TABLE gate_never (x int) -- held")
    wait_until(lambda: waiting(proxy) == 1, "the statement held")
    leaving.pgconn.finish()
    wait_until(lambda: waiting(proxy) == 0, "the held statement dropped")
    release(proxy)
    with connect(proxy, autocommit=True) as other:
        row = other.execute("SELECT to_regclass('gate_never') IS NULL").fetchone()
        assert row == (True,)
