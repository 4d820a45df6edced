"""Named prepared statements in transaction pooling, with real clients: more clients than
server connections, so that statements prepared on one server are bound on another; psycopg
(prepare_threshold=0, sync and async), asyncpg (its statement cache, and a pool), DEALLOCATE
ALL / DISCARD ALL, the LRU per server, and a column type changed under a prepared statement."""

from __future__ import annotations

import asyncio
import re
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest
from pgmigrate_proxy.protocol import schema
from pgmigrate_proxy.protocol.framing import frame
from pgmigrate_proxy.protocol.types import BackendType, FrontendType

from tests.fixtures.postgres import PgInfo
from tests.fixtures.proxy import RunningProxy
from tests.integration.probes import wait_until
from tests.integration.test_cli_clients import PGBENCH, bench_db, client_env, needs_pgbench
from tests.integration.wire import WireClient

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

__all__ = ["bench_db"]  # (the fixture, used here by name)
Factory = Callable[..., RunningProxy]
USER = "u_trust"


def pooled(proxy_factory: Factory, size: int, **overrides: Any) -> RunningProxy:
    return proxy_factory(pool_mode="transaction", default_pool_size=size, **overrides)


def connect(proxy: RunningProxy, **kwargs: Any) -> psycopg.Connection[Any]:
    conn = psycopg.connect(proxy.conninfo(USER, connect_timeout="10"), autocommit=True, **kwargs)
    conn.prepare_threshold = 0  # every statement prepared (a named Parse), from the first
    return conn


def server_pids(admin: psycopg.Connection[Any]) -> set[int]:
    rows = admin.execute(
        "SELECT pid FROM pg_stat_activity WHERE usename = %s AND backend_type = 'client backend'",
        [USER],
    ).fetchall()
    return {row[0] for row in rows}


def test_psycopg_threads_prepare_everywhere(
    proxy_factory: Factory, admin: psycopg.Connection[Any]
) -> None:
    proxy = pooled(proxy_factory, 3)
    clients = [connect(proxy) for _ in range(10)]
    wait_until(lambda: len(server_pids(admin)) <= 3, "the pool to shrink to its size")
    seen: set[int] = set()
    failures: list[BaseException] = []

    def work(n: int, conn: psycopg.Connection[Any]) -> None:
        try:
            for i in range(30):
                row = conn.execute("SELECT %s::int * 2, pg_backend_pid()", [n * 100 + i])
                found = row.fetchone()
                assert found is not None and found[0] == (n * 100 + i) * 2
                seen.add(found[1])
                with conn.transaction():
                    found = conn.execute("SELECT %s::text || 'x'", [str(i)]).fetchone()
                    assert found == (f"{i}x",)
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=work, args=(n, c)) for n, c in enumerate(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures[:3]
    # not pinned: the clients' statements ran on every server of the pool, never more than 3
    assert len(seen) == 3 and len(server_pids(admin)) <= 3
    rows = [c.execute("SELECT name FROM pg_prepared_statements").fetchall() for c in clients[:3]]
    assert all(name.startswith("PGMIGRATE_") for found in rows for (name,) in found), rows
    for conn in clients:
        conn.close()


def test_psycopg_async_prepares_everywhere(proxy_factory: Factory) -> None:
    proxy = pooled(proxy_factory, 2)
    conninfo = proxy.conninfo(USER, connect_timeout="10")

    async def one(n: int, aconn: psycopg.AsyncConnection[Any], pids: set[int]) -> None:
        aconn.prepare_threshold = 0
        for i in range(20):
            cursor = await aconn.execute("SELECT %s::int + 1, pg_backend_pid()", [n + i])
            row = await cursor.fetchone()
            assert row is not None and row[0] == n + i + 1
            pids.add(row[1])

    async def main() -> set[int]:
        pids: set[int] = set()
        # all connected the whole time: 8 clients with prepared statements on 2 servers
        aconns = [
            await psycopg.AsyncConnection.connect(conninfo, autocommit=True) for _ in range(8)
        ]
        try:
            work = (one(n, aconn, pids) for n, aconn in enumerate(aconns))
            await asyncio.wait_for(asyncio.gather(*work), 60)
        finally:
            for aconn in aconns:
                await aconn.close()
        return pids

    assert len(asyncio.run(main())) == 2


async def _no_reset(conn: asyncpg.Connection) -> None:
    """asyncpg's pool resets a connection on release with UNLISTEN * and RESET ALL, which pin
    it in transaction mode (as they would mislead under pgbouncer): a no-op instead."""


def test_asyncpg_statement_cache_and_pool(proxy_factory: Factory) -> None:
    proxy = pooled(proxy_factory, 3)
    url = proxy.url(USER)

    async def main() -> tuple[set[int], set[int]]:
        pids: set[int] = set()
        conns = [await asyncpg.connect(url, timeout=10) for _ in range(6)]
        try:

            async def use(n: int, conn: asyncpg.Connection, round_: int) -> None:
                row = await conn.fetchrow(
                    "SELECT $1::int * 3 AS v, pg_backend_pid() AS pid", n + round_
                )
                assert row is not None and row["v"] == (n + round_) * 3
                pids.add(row["pid"])
                assert await conn.fetchval("SELECT $1::text || 'y'", str(n)) == f"{n}y"

            for round_ in range(4):  # every connection's cached statements, on any server
                for n, conn in enumerate(conns):
                    await use(n, conn, round_)
                # one holds a server in a transaction: the others' statements go to another
                async with conns[round_].transaction():
                    held = await conns[round_].fetchval("SELECT pg_backend_pid()")
                    before = set(pids)
                    for n, conn in enumerate(conns):
                        if n != round_:
                            await use(n, conn, round_)
                    assert held not in pids - before
        finally:
            for conn in conns:
                await conn.close()
        pool_pids: set[int] = set()
        pool = await asyncpg.create_pool(url, min_size=2, max_size=8, reset=_no_reset)
        try:

            async def task(n: int) -> None:
                for i in range(10):
                    async with pool.acquire() as conn:
                        value = await conn.fetchval("SELECT $1::bigint + $2::bigint", n, i)
                        assert value == n + i
                        stmt = await conn.prepare("SELECT $1::int - 1, pg_backend_pid()")
                        row = await stmt.fetchrow(n)
                        assert row is not None and row[0] == n - 1
                        pool_pids.add(row[1])

            await asyncio.wait_for(asyncio.gather(*(task(n) for n in range(40))), 90)
        finally:
            await pool.close()
        return pids, pool_pids

    pids, pool_pids = asyncio.run(main())
    assert len(pids) > 1 and len(pids) <= 3
    assert len(pool_pids) > 1 and len(pool_pids) <= 3


def test_deallocate_all_and_discard_all(proxy_factory: Factory) -> None:
    proxy = pooled(proxy_factory, 1)
    conn = connect(proxy)
    other = connect(proxy)
    with psycopg.connect(proxy.conninfo(USER, connect_timeout="10"), autocommit=True) as plain:
        plain.prepare_threshold = None
        for statement in ("DEALLOCATE ALL", "DISCARD ALL", "DEALLOCATE ALL"):
            assert conn.execute("SELECT %s::int", [1]).fetchone() == (1,)
            assert other.execute("SELECT %s::int + 1", [1]).fetchone() == (2,)
            # psycopg's own DEALLOCATE ALL (an unnamed Parse) and a simple Query of the
            # client: both forget the client's statements and the server's, no pin
            plain.pgconn.exec_(statement.encode())
            conn.execute(statement, prepare=False)
            assert conn.execute("SELECT %s::int", [3]).fetchone() == (3,)
            assert other.execute("SELECT %s::int + 1", [3]).fetchone() == (4,)
        # a simple DEALLOCATE of a client's name: answered, the statement is gone for it
        conn.execute("SELECT %s::int * 5", [1])
        names = conn.execute(
            "SELECT name FROM pg_prepared_statements WHERE statement LIKE '%%* 5%%'"
        ).fetchall()
        assert names and all(name.startswith("PGMIGRATE_") for (name,) in names)
        result = conn.pgconn.exec_(b"DEALLOCATE _pg3_9999")  # not the client's: PostgreSQL's error
        assert result.error_message and "does not exist" in result.error_message.decode()
    assert conn.pgconn.transaction_status == psycopg.pq.TransactionStatus.IDLE
    conn.close()
    other.close()


def test_lru_keeps_max_prepared_statements_per_server(proxy_factory: Factory) -> None:
    proxy = pooled(proxy_factory, 1, max_prepared_statements=3)
    conn = connect(proxy)
    queries = [f"SELECT %s::int + {n}" for n in range(7)]
    for _ in range(3):
        for n, query in enumerate(queries):
            assert conn.execute(query, [10]).fetchone() == (10 + n,)
    count = conn.execute("SELECT count(*) FROM pg_prepared_statements").fetchone()
    assert count is not None and count[0] <= 3  # (this query's own statement among them)
    conn.close()


def test_cached_plan_after_alter_column_type(
    proxy_factory: Factory, admin: psycopg.Connection[Any]
) -> None:
    """A statement prepared, the column's type changed through the proxy (the guard knows the
    table): the statement runs again with the new type, not "cached plan must not change
    result type" (0A000), on the server that ran the DDL and on another."""
    admin.execute("DROP TABLE IF EXISTS cached_plan")
    admin.execute("CREATE TABLE cached_plan (id int PRIMARY KEY, v int)")
    admin.execute("GRANT ALL ON cached_plan TO u_trust")
    admin.execute("INSERT INTO cached_plan VALUES (1, 10), (2, 20)")
    admin.execute("ALTER TABLE cached_plan OWNER TO u_trust")
    proxy = pooled(proxy_factory, 2)
    conns = [connect(proxy) for _ in range(3)]
    query = "SELECT * FROM cached_plan WHERE id = %s"
    for conn in conns:
        assert conn.execute(query, [1]).fetchone() == (1, 10)
    # two servers hold the statement: both in a transaction at once
    with conns[0].transaction(), conns[1].transaction():
        assert conns[0].execute(query, [2]).fetchone() == (2, 20)
        assert conns[1].execute(query, [2]).fetchone() == (2, 20)
    # (a client that leaves while the guard still restores its server's settings: its server
    # goes back to the pool once restored, tests/integration/test_pool_guard_leave.py)
    ddl = psycopg.connect(proxy.conninfo(USER, connect_timeout="10"), autocommit=True)
    ddl.prepare_threshold = None
    ddl.execute("ALTER TABLE cached_plan ALTER COLUMN v TYPE text")
    for conn in conns:
        assert conn.execute(query, [1]).fetchone() == (1, "10")
    with conns[0].transaction(), conns[1].transaction():
        assert conns[0].execute(query, [2]).fetchone() == (2, "20")
        assert conns[1].execute(query, [2]).fetchone() == (2, "20")
    for conn in [*conns, ddl]:
        conn.close()
    admin.execute("DROP TABLE cached_plan")


def test_retired_statements_are_closed_before_the_server_is_handed_out(
    proxy_factory: Factory, admin: psycopg.Connection[Any]
) -> None:
    """After a guarded DDL, the server's copy of a statement on that table is closed before any
    client gets the server again, the fast path's hand-out (an idle ready server) included."""
    admin.execute("DROP TABLE IF EXISTS retired_t")
    admin.execute("CREATE TABLE retired_t (id int PRIMARY KEY, v int)")
    admin.execute("ALTER TABLE retired_t OWNER TO u_trust")
    proxy = pooled(proxy_factory, 1)
    prepared = connect(proxy)
    assert prepared.execute("SELECT * FROM retired_t WHERE id = %s", [1]).fetchone() is None
    plain = psycopg.connect(proxy.conninfo(USER, connect_timeout="10"), autocommit=True)
    plain.prepare_threshold = None  # its own queries are not prepared

    def copies() -> int:
        row = plain.execute(
            "SELECT count(*) FROM pg_prepared_statements WHERE statement = %s",
            ["SELECT * FROM retired_t WHERE id = $1"],
        ).fetchone()
        assert row is not None
        return int(row[0])

    assert copies() == 1  # (one server: the statement is on it)
    ddl = psycopg.connect(proxy.conninfo(USER, connect_timeout="10"), autocommit=True)
    ddl.execute("ALTER TABLE retired_t ADD COLUMN w int")  # guarded: the table changed
    # (the DDL's own client may go on on its server; any other client gets it checked out)
    assert copies() == 0
    assert prepared.execute("SELECT * FROM retired_t WHERE id = %s", [1]).fetchone() is None
    for conn in (prepared, plain, ddl):
        conn.close()
    admin.execute("DROP TABLE retired_t")


#: TPC-B's statements, each in its own implicit transaction: pgbench up to 16 prepares each
#: command with a blocking PQprepare when a client first runs it, which stops all the clients
#: of its thread; with BEGIN ... END scripts those hold their servers meanwhile, and with more
#: clients than servers the PQprepare never gets one (pgbench's limit, not the pooler's).
AUTOCOMMIT_TPCB = """\\set aid random(1, 100000 * :scale)
\\set bid random(1, 1 * :scale)
\\set tid random(1, 10 * :scale)
\\set delta random(-5000, 5000)
UPDATE pgbench_accounts SET abalance = abalance + :delta WHERE aid = :aid;
SELECT abalance FROM pgbench_accounts WHERE aid = :aid;
UPDATE pgbench_tellers SET tbalance = tbalance + :delta WHERE tid = :tid;
INSERT INTO pgbench_history (tid, bid, aid, delta, mtime)
  VALUES (:tid, :bid, :aid, :delta, CURRENT_TIMESTAMP);
"""


@needs_pgbench
def test_pgbench_prepared_64_clients_on_8_servers(
    proxy_factory: Factory,
    pg: PgInfo,
    admin: psycopg.Connection[Any],
    bench_db: str,
    tmp_path: Path,
) -> None:
    assert PGBENCH is not None
    proxy = pooled(proxy_factory, 8)
    env = client_env(proxy, pg.superuser, pg.superuser_password) | {"PGDATABASE": bench_db}
    direct = env | {"PGHOST": pg.host, "PGPORT": str(pg.port)}

    def pgbench(*args: str, environ: dict[str, str] = env) -> str:
        done = subprocess.run(
            [PGBENCH, *args], env=environ, capture_output=True, text=True, timeout=150
        )
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout + done.stderr

    pgbench("-i", "-s", "1", "-q", environ=direct)
    script = tmp_path / "autocommit_tpcb.sql"
    script.write_text(AUTOCOMMIT_TPCB)
    report = pgbench("-M", "prepared", "-c", "64", "-j", "2", "-t", "20", "-n", "-f", str(script))
    processed = re.search(r"actually processed: (\d+)/(\d+)", report)
    assert processed is not None and processed.groups() == ("1280", "1280"), report
    failed = re.search(r"number of failed transactions: (\d+)", report)
    assert failed is not None and failed.group(1) == "0", report

    def backends() -> int:
        row = admin.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = %s", [bench_db]
        ).fetchone()
        assert row is not None
        return int(row[0])

    # The 56 logins beyond the pool's size were closed at their first transaction's end; a
    # closed server's backend leaves pg_stat_activity when its process exits, a moment after
    # the Terminate (CI saw 9 right after pgbench's end), so the count is awaited.
    wait_until(lambda: backends() <= 8, "the backends of closed servers to exit")

    async def pool_size() -> int:
        return proxy.server.pools.pool(bench_db, pg.superuser).size

    assert proxy.call(pool_size()) <= 8


def test_errors_reach_the_client_where_postgresql_puts_them(
    proxy_factory: Factory, admin: psycopg.Connection[Any]
) -> None:
    """A Parse the proxy injects that fails (the table was dropped behind its back) gives the
    client the error at its Bind, and the server does not count it as prepared; a client's
    own Parse that fails leaves no name behind."""
    admin.execute("DROP TABLE IF EXISTS gone_soon")
    admin.execute("CREATE TABLE gone_soon (id int)")
    admin.execute("GRANT ALL ON gone_soon TO u_trust")
    proxy = pooled(proxy_factory, 1, max_prepared_statements=1)
    conn = connect(proxy)
    query = "SELECT count(*) FROM gone_soon WHERE id > %s"
    assert conn.execute(query, [0]).fetchone() == (0,)
    assert conn.execute("SELECT %s::int + 7", [1]).fetchone() == (8,)  # evicts the first
    admin.execute("DROP TABLE gone_soon")
    with pytest.raises(psycopg.errors.UndefinedTable):
        conn.execute(query, [0])  # the injected Parse fails: the error at the client's Bind
    assert conn.pgconn.transaction_status == psycopg.pq.TransactionStatus.IDLE
    admin.execute("CREATE TABLE gone_soon (id int)")
    admin.execute("GRANT ALL ON gone_soon TO u_trust")
    assert conn.execute(query, [0]).fetchone() == (0,)  # prepared again, now it works
    with pytest.raises(psycopg.errors.UndefinedColumn):  # (the client's own Parse fails)
        conn.execute("SELECT no_such_column FROM pg_class WHERE oid = %s", [1])
    assert conn.execute("SELECT %s::int + 7", [2]).fetchone() == (9,)
    count = conn.execute("SELECT count(*) FROM pg_prepared_statements").fetchone()
    assert count == (1,)  # the LRU of one: only this query's statement is on the server
    # a batch: the error, then nothing
    with pytest.raises(psycopg.errors.UndefinedTable), conn.pipeline():
        conn.execute("SELECT %s::int + 7", [3])
        conn.execute("SELECT count(*) FROM no_such_table WHERE id > %s", [0])
        conn.execute("SELECT %s::int * 4", [1])
    assert conn.execute("SELECT %s::int * 4", [2]).fetchone() == (8,)
    assert conn.execute(query, [0]).fetchone() == (0,)
    conn.close()
    admin.execute("DROP TABLE gone_soon")


def test_wire_parse_answers_close_and_deallocate(proxy_factory: Factory) -> None:
    """On the wire, in order: the client's Parse of a statement the server has is answered
    (ParseComplete, as PostgreSQL would), a Close is answered CloseComplete, a simple
    DEALLOCATE of one of its names gets "DEALLOCATE"; after them the name is gone for it."""
    proxy = pooled(proxy_factory, 1)
    parse = schema.build("Parse", statement="s1", query="SELECT $1::int * 2", parameter_types=[23])
    bind = schema.build(
        "Bind",
        portal="",
        statement="s1",
        parameter_formats=[],
        parameters=[b"21"],
        result_formats=[],
    )
    execute = schema.build("Execute", portal="", max_rows=0)
    sync = frame(FrontendType.SYNC)
    close = schema.build("Close", kind=b"S", name="s1")
    with WireClient(proxy.host, proxy.port) as first, WireClient(proxy.host, proxy.port) as second:
        first.login()
        second.login()
        for client in (first, second):  # the second's Parse: the server has the statement
            client.send(parse + bind + execute + sync)
            got = client.read_until(BackendType.READY_FOR_QUERY)
            assert [chr(t) for t, _ in got] == ["1", "2", "D", "C", "Z"], got
        first.send(parse + bind + execute + sync)  # s1 again: 42P05, the rest skipped
        assert first.expect_error().code == "42P05"
        got = first.read_until(BackendType.READY_FOR_QUERY)
        assert [chr(t) for t, _ in got] == ["Z"], got
        second.send(close + sync)
        assert [chr(t) for t, _ in second.read_until(BackendType.READY_FOR_QUERY)] == ["3", "Z"]
        got = first.query("DEALLOCATE s1")
        assert [chr(t) for t, _ in got] == ["C", "Z"] and got[0][1] == b"DEALLOCATE\0", got
        for client in (first, second):
            client.send(bind + execute + sync)
            error = client.expect_error()
            assert error.code == "26000", error  # invalid_sql_statement_name, as PostgreSQL
            client.read_until(BackendType.READY_FOR_QUERY)
