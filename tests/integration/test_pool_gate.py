"""The gate at transaction boundaries (runtime/gate.py): armed, it holds the first statement of
a session's next transaction at the proxy, while a session already inside a transaction goes
on; released, what it held runs. In transaction pooling (the statement waits before a server is
acquired) and in session pooling (it waits with its server attached)."""

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


def arm(proxy: RunningProxy, seen: list[str]) -> None:
    def everything(session: Any, item: Any) -> bool:
        seen.append(session.peer)
        return True

    async def go() -> None:
        proxy.server.guard.gate.arm(everything)

    proxy.call(go())


def waiting(proxy: RunningProxy) -> int:
    async def count() -> int:
        return proxy.server.guard.gate.waiting

    return proxy.call(count())


def release(proxy: RunningProxy) -> None:
    async def go() -> None:
        proxy.server.guard.gate.release()

    proxy.call(go())


@pytest.mark.parametrize("mode", ["transaction", "session"])
def test_gate_holds_new_transactions_only(proxy_factory: Factory, mode: str) -> None:
    proxy = proxy_factory(pool_mode=mode, default_pool_size=2)
    inside = connect(proxy)  # not autocommit: its first execute opens a transaction
    idle = connect(proxy, autocommit=True)
    assert inside.execute("SELECT 1").fetchone() == (1,)
    assert idle.execute("SELECT 1").fetchone() == (1,)
    seen: list[str] = []
    arm(proxy, seen)
    results: list[object] = []
    thread = threading.Thread(target=lambda: results.append(idle.execute("SELECT 2").fetchone()))
    thread.start()
    wait_until(lambda: waiting(proxy) == 1, "the idle session's next statement held")
    # the session inside its transaction is not held, up to and including its COMMIT
    assert inside.execute("SELECT 3").fetchone() == (3,)
    inside.commit()
    assert waiting(proxy) == 1 and not results
    later = threading.Thread(target=lambda: results.append(inside.execute("SELECT 4").fetchone()))
    later.start()  # its next transaction: held too
    wait_until(lambda: waiting(proxy) == 2, "the next transaction's first statement held")
    assert len(seen) == 2
    release(proxy)
    thread.join(10)
    later.join(10)
    assert sorted(results) == [(2,), (4,)]  # type: ignore[type-var]
    # released and disarmed: the sessions carry on as before
    assert idle.execute("SELECT 5").fetchone() == (5,)
    inside.rollback()
    assert inside.execute("SELECT 6").fetchone() == (6,)
    inside.close()
    idle.close()


def test_a_held_statement_of_a_client_that_left_is_dropped(proxy_factory: Factory) -> None:
    proxy = proxy_factory(pool_mode="transaction", default_pool_size=1)
    leaving = connect(proxy, autocommit=True)
    arm(proxy, [])
    leaving.pgconn.send_query(b"CREATE TABLE gate_never (x int)")
    wait_until(lambda: waiting(proxy) == 1, "the statement held")
    leaving.pgconn.finish()
    wait_until(lambda: waiting(proxy) == 0, "the held statement dropped")
    release(proxy)
    with connect(proxy, autocommit=True) as other:
        row = other.execute("SELECT to_regclass('gate_never') IS NULL").fetchone()
        assert row == (True,)
