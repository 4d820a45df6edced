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
from tests.guard.scenarios import (
    BOUND,
    backend_alive,
    column_exists,
    connect_through,
    shutdown_socket,
    wait_for,
)

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


def test_the_scope_query_finds_views_partitions_children_and_fk_partners(pg: PgInfo) -> None:
    """SCOPE_SQL and FUNCTIONS_SQL against a real catalog, as load_scope runs them ($1)."""
    from pgmigrate_proxy.guard.drain import FUNCTIONS_SQL, SCOPE_SQL, DrainScope, Reach

    ddl = """
        CREATE SCHEMA dscope;
        CREATE TABLE dscope.parent (id int PRIMARY KEY) PARTITION BY RANGE (id);
        CREATE TABLE dscope.part1 PARTITION OF dscope.parent FOR VALUES FROM (0) TO (10);
        CREATE TABLE dscope.other (id int PRIMARY KEY);
        CREATE TABLE dscope.target (id int PRIMARY KEY, other_id int REFERENCES dscope.other);
        CREATE TABLE dscope.child () INHERITS (dscope.target);
        CREATE TABLE dscope.referencing (target_id int REFERENCES dscope.target);
        CREATE VIEW dscope.v1 AS SELECT * FROM dscope.target;
        CREATE VIEW dscope.v2 AS SELECT * FROM dscope.v1;
        CREATE TABLE dscope.unrelated (id int);
        CREATE FUNCTION dscope.touch() RETURNS int LANGUAGE sql AS 'SELECT 1';
    """
    with pg.connect() as conn:
        conn.execute(ddl)
        try:
            oids = [
                conn.execute("SELECT %s::regclass::oid", (name,)).fetchone()[0]  # type: ignore[index]
                for name in ("dscope.target", "dscope.part1")
            ]
            literal = "{" + ",".join(str(oid) for oid in oids) + "}"
            with psycopg.RawCursor(conn) as cur:
                rows = cur.execute(SCOPE_SQL, (literal,)).fetchall()
                functions = cur.execute(FUNCTIONS_SQL).fetchall()
        finally:
            conn.execute("DROP SCHEMA dscope CASCADE")
    scope = DrainScope.from_rows("postgres", rows, functions)
    reach = {name: {r for _, r in entries} for name, entries in scope.relations.items()}
    assert reach == {
        "target": {Reach.ANY},
        "child": {Reach.ANY},  # an inheritance child
        "part1": {Reach.ANY},
        "parent": {Reach.ANY},  # a partition's parent: reading it locks the partition
        "v1": {Reach.ANY},
        "v2": {Reach.ANY},  # a view over the view
        "referencing": {Reach.WRITES},
        "other": {Reach.WRITES},  # referenced by the target: its deletes check the target
    }
    assert "touch" in scope.functions and "lower" not in scope.functions
    assert scope.touches("SELECT * FROM dscope.v2")
    assert not scope.touches("SELECT * FROM referencing")
    assert scope.touches("INSERT INTO referencing VALUES (1)")
    assert not scope.touches("SELECT * FROM dscope.unrelated")


def test_the_lock_snapshot_lets_through_the_sessions_holding_a_lock(
    pg: PgInfo, table: tuple[str, int], sessions: Connect
) -> None:
    import asyncio

    from pgmigrate_proxy.guard.drain import holding_pids

    from tests.guard.live import admin_for

    name, oid = table
    holder = sessions()
    holder_pid = hold(holder, name)
    sessions()  # connected, holding nothing

    async def snapshot() -> list[tuple[int, int, str, bool]]:
        async with admin_for(pg) as admin:
            return await admin.lock_rows([oid], database="postgres")

    rows = asyncio.run(snapshot())
    assert holding_pids(rows, {oid}) == {holder_pid}
    assert (holder_pid, oid, "AccessShareLock", True) in rows


class RecordingGate:
    """A gate that holds nothing but records what it was armed with and when it was released:
    the runtime's side of the drain (Arm, Release, and release whatever ended the run)."""

    def __init__(self) -> None:
        self.armed: list[Any] = []
        self.released: list[Any] = []

    def arm(self, rule: Any) -> Any:
        self.armed.append(rule)
        gate = self

        class Hold:
            def release(self) -> None:
                gate.released.append(rule)

            def recheck(self) -> None:
                return None

        return Hold()


def test_the_gate_is_armed_with_the_rule_and_released_after_a_failed_statement(
    pg: PgInfo,
    proxy_factory: ProxyFactory,
    table: tuple[str, int],
    sessions: Connect,
) -> None:
    name, _ = table
    proxy = proxy_factory(blocking_action="drain", drain_timeout=30.0)
    gate = RecordingGate()
    proxy.server.guard.drain_gate = gate
    holder = sessions()
    holder_pid = hold(holder, name)
    client = connect_through(proxy, pg)
    with ThreadPoolExecutor(max_workers=1) as pool:
        # fails once it runs: the column exists (42701)
        alter = pool.submit(client.conn.execute, q("ALTER TABLE {} ADD COLUMN id int", name))
        wait_for(lambda: gate.armed, "the gate to be armed")
        rule = gate.armed[0]
        assert rule.let_through == {holder_pid}  # it holds a lock on the table: let through
        other = type("S", (), {"database": "postgres", "backend_pid": 0})()
        assert rule.should_hold(other, [f'SELECT * FROM "{name}"'])
        assert not rule.should_hold(other, ["SELECT 1"])
        assert not gate.released  # held while the transaction runs
        holder.execute("COMMIT")
        with pytest.raises(errors.DuplicateColumn):
            alter.result(timeout=BOUND)
    assert gate.released == [rule]
    client.conn.close()


def test_a_client_that_leaves_mid_drain_releases_the_gate_and_sends_nothing(
    pg: PgInfo,
    proxy_factory: ProxyFactory,
    table: tuple[str, int],
    sessions: Connect,
) -> None:
    name, _ = table
    proxy = proxy_factory(blocking_action="drain", drain_timeout=30.0)
    gate = RecordingGate()
    proxy.server.guard.drain_gate = gate
    holder = sessions()
    hold(holder, name)
    client = connect_through(proxy, pg)
    with ThreadPoolExecutor(max_workers=1) as pool:
        alter = pool.submit(client.conn.execute, q("ALTER TABLE {} ADD COLUMN e int", name))
        wait_for(lambda: gate.armed, "the gate to be armed")
        shutdown_socket(client.conn)
        wait_for(lambda: gate.released, "the gate to be released")
        with pytest.raises(psycopg.Error):
            alter.result(timeout=BOUND)
    holder.execute("COMMIT")
    assert not column_exists(pg, name, "e")
    assert gate.released == gate.armed
