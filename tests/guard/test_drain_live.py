"""blocking_action = drain end to end, real PostgreSQL and real clients: the migration through the
proxy, the lock holder straight to PostgreSQL (so `drain_then` is what covers it). A short
transaction is waited for, never killed; one that never ends is terminated after drain_timeout,
or the statement gives up with 55P03 (drain_then = give_up) and nobody is touched."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psycopg
import pytest
from psycopg import errors, sql

from tests.fixtures.postgres import PgInfo
from tests.fixtures.proxy import RunningProxy
from tests.guard.live import Connect
from tests.guard.scenarios import BOUND, backend_alive, column_exists, connect_through, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

ProxyFactory = Callable[..., RunningProxy]


def q(template: str, name: str) -> sql.Composed:
    return sql.SQL(template).format(sql.Identifier(name))


def hold(conn: psycopg.Connection[Any], name: str) -> int:
    conn.execute("BEGIN")
    conn.execute(q("SELECT * FROM {}", name))
    return conn.info.backend_pid


def logged(proxy_log: list[str], text: str) -> Callable[[], bool]:
    return lambda: any(text in line for line in list(proxy_log))


def test_a_drain_waits_for_a_short_transaction_instead_of_killing_it(
    pg: PgInfo,
    proxy_factory: ProxyFactory,
    table: tuple[str, int],
    sessions: Connect,
    proxy_log: list[str],
) -> None:
    name, _ = table
    proxy = proxy_factory(blocking_action="drain", drain_timeout=30.0)
    holder = sessions()
    holder_pid = hold(holder, name)
    client = connect_through(proxy, pg)
    with ThreadPoolExecutor(max_workers=1) as pool:
        alter = pool.submit(client.conn.execute, q("ALTER TABLE {} ADD COLUMN a int", name))
        wait_for(logged(proxy_log, "guard drain "), "the drain to start")
        assert not alter.done()  # held while the transaction runs
        time.sleep(0.5)  # the application's transaction goes on a little, then commits
        holder.execute("COMMIT")
        alter.result(timeout=BOUND)
    assert column_exists(pg, name, "a")
    assert backend_alive(pg, holder_pid)
    holder.execute("SELECT 1")  # its session is fine
    assert not client.has_notice("terminated"), client.notices
    assert client.has_notice("draining: waiting"), client.notices
    assert wait_for(logged(proxy_log, "guard drained "), "the drained event")
    assert not any("drain_timeout" in line for line in proxy_log)
    client.conn.close()


def test_after_the_timeout_then_terminates_the_holder_left(
    pg: PgInfo,
    proxy_factory: ProxyFactory,
    table: tuple[str, int],
    sessions: Connect,
    proxy_log: list[str],
) -> None:
    name, _ = table
    proxy = proxy_factory(blocking_action="drain", drain_timeout=0.3)
    holder = sessions()
    holder_pid = hold(holder, name)
    client = connect_through(proxy, pg)
    client.conn.execute(q("ALTER TABLE {} ADD COLUMN b int", name))
    assert column_exists(pg, name, "b")
    wait_for(lambda: not backend_alive(pg, holder_pid), "the holder to be terminated")
    with pytest.raises(errors.AdminShutdown):
        holder.execute("SELECT 1")
    assert client.has_notice(f"terminated pid {holder_pid}"), client.notices
    assert any("guard drain_timeout" in line for line in proxy_log)
    client.conn.close()


def test_then_give_up_fails_the_statement_with_55P03_and_touches_nobody(
    pg: PgInfo,
    proxy_factory: ProxyFactory,
    table: tuple[str, int],
    sessions: Connect,
) -> None:
    name, _ = table
    proxy = proxy_factory(blocking_action="drain", drain_timeout=0.3, drain_then="give_up")
    holder = sessions()
    holder_pid = hold(holder, name)
    client = connect_through(proxy, pg)
    with pytest.raises(errors.LockNotAvailable) as info:
        client.conn.execute(q("ALTER TABLE {} ADD COLUMN c int", name))
    assert "drain" in str(info.value)
    assert not column_exists(pg, name, "c")
    assert backend_alive(pg, holder_pid)
    holder.execute("SELECT 1")  # still in its transaction, untouched
    holder.execute("COMMIT")
    client.conn.execute("SELECT 1")  # the migration session goes on
    client.conn.close()


def test_the_session_option_turns_drain_on(
    pg: PgInfo,
    proxy_factory: ProxyFactory,
    table: tuple[str, int],
    sessions: Connect,
) -> None:
    name, _ = table
    proxy = proxy_factory()  # terminate by default
    holder = sessions()
    holder_pid = hold(holder, name)
    options = "-c pgmigrate.blocking_action=drain -c pgmigrate.drain_timeout=200ms"
    client = connect_through(proxy, pg, options=options + " -c pgmigrate.drain_then=give_up")
    with pytest.raises(errors.LockNotAvailable):
        client.conn.execute(q("ALTER TABLE {} ADD COLUMN d int", name))
    assert backend_alive(pg, holder_pid)
    client.conn.close()
