"""Transaction pooling's fast path: a client whose server is given back at each transaction's
end gets an idle, ready server at its next message without a task (hold.py
_attached_at_once, pooling.py acquire_at_once); a server that needs a check or a SET still
goes the slow way (PoolLink.acquire)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Generator
from typing import Any

import psycopg
import pytest

from tests.fixtures.proxy import RunningProxy

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

Factory = Callable[..., RunningProxy]


def count_tasks(proxy: RunningProxy) -> list[int]:
    """Count the tasks created on the proxy's loop from now on (the count in a list)."""
    counted = [0]

    async def install() -> None:
        loop = asyncio.get_running_loop()

        def factory(
            loop: asyncio.AbstractEventLoop,
            coro: Generator[Any, None, Any] | Coroutine[Any, Any, Any],
            **kwargs: Any,
        ) -> asyncio.Task[Any]:
            counted[0] += 1
            return asyncio.Task(coro, loop=loop, **kwargs)

        loop.set_task_factory(factory)

    proxy.call(install())
    return counted


def pids(conn: psycopg.Connection[Any], rounds: int) -> set[int]:
    seen = set()
    for _ in range(rounds):
        row = conn.execute("SELECT pg_backend_pid()").fetchone()
        assert row is not None
        seen.add(row[0])
    return seen


def test_ready_server_is_attached_without_a_task(proxy_factory: Factory) -> None:
    proxy = proxy_factory(pool_mode="transaction", default_pool_size=2)
    with psycopg.connect(proxy.conninfo("u_trust"), autocommit=True) as conn:
        conn.prepare_threshold = None
        pids(conn, 3)  # the pool holds the login server
        tasks = count_tasks(proxy)
        assert len(pids(conn, 50)) == 1
    assert tasks[0] < 5  # the slow path made one a transaction


def test_server_due_for_a_check_takes_the_slow_path(proxy_factory: Factory) -> None:
    proxy = proxy_factory(
        pool_mode="transaction", default_pool_size=1, server_check_delay=0,
        server_check_query="SELECT 1",
    )  # fmt: skip
    with psycopg.connect(proxy.conninfo("u_trust"), autocommit=True) as conn:
        conn.prepare_threshold = None
        pids(conn, 2)
        tasks = count_tasks(proxy)
        pids(conn, 20)
    assert tasks[0] >= 20


def test_parameters_differ_takes_the_slow_path(proxy_factory: Factory) -> None:
    proxy = proxy_factory(pool_mode="transaction", default_pool_size=1)
    conninfo = proxy.conninfo("u_trust")
    with (
        psycopg.connect(conninfo, autocommit=True, application_name="one") as one,
        psycopg.connect(conninfo, autocommit=True, application_name="two") as two,
    ):
        one.prepare_threshold = two.prepare_threshold = None
        for _ in range(10):
            for conn, name in ((one, "one"), (two, "two")):
                row = conn.execute("SELECT current_setting('application_name')").fetchone()
                assert row == (name,)
