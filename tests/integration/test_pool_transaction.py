"""Transaction pooling with real clients: many psycopg clients (threads and asyncio tasks) share
a few server connections, each transaction on whichever is free; startup parameters follow the
client; a client killed mid-transaction leaves nothing behind; query_wait_timeout and
max_client_conn answer with clear errors."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from pgmigrate_proxy.runtime.pooling import PINS
from psycopg import errors, pq

from tests.fixtures.proxy import RunningProxy
from tests.integration.probes import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

Factory = Callable[..., RunningProxy]


def connect(proxy: RunningProxy, user: str = "u_trust", **kwargs: Any) -> psycopg.Connection[Any]:
    """psycopg without server-side prepared statements (a named Parse pins its client until
    the pooler maps prepared statements)."""
    conn = psycopg.connect(proxy.conninfo(user, connect_timeout="10"), **kwargs)
    conn.prepare_threshold = None
    return conn


def server_pids(admin: psycopg.Connection[Any], user: str = "u_trust") -> set[int]:
    rows = admin.execute(
        "SELECT pid FROM pg_stat_activity WHERE usename = %s AND backend_type = 'client backend'",
        [user],
    ).fetchall()
    return {row[0] for row in rows}


def test_threads_share_a_small_pool(proxy_factory: Factory, admin: psycopg.Connection[Any]) -> None:
    proxy = proxy_factory(pool_mode="transaction", default_pool_size=3)
    clients = [connect(proxy, autocommit=True) for _ in range(12)]  # logins first
    wait_until(lambda: len(server_pids(admin)) <= 3, "the pool to shrink to its size")
    seen: set[int] = set()
    errors_seen: list[BaseException] = []
    most = [0]

    def work(n: int, conn: psycopg.Connection[Any]) -> None:
        try:
            for i in range(40):
                with conn.transaction():
                    row = conn.execute("SELECT %s::int * 2, pg_backend_pid()", [n * 100 + i])
                    found = row.fetchone()
                    assert found is not None and found[0] == (n * 100 + i) * 2
                    seen.add(found[1])
                most[0] = max(most[0], len(server_pids(admin)))
        except BaseException as exc:
            errors_seen.append(exc)

    threads = [threading.Thread(target=work, args=(n, c)) for n, c in enumerate(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors_seen, errors_seen[:3]
    assert 1 < len(seen) <= 3
    assert most[0] <= 3
    for conn in clients:
        conn.close()


def test_async_tasks_share_a_small_pool(proxy_factory: Factory) -> None:
    proxy = proxy_factory(pool_mode="transaction", default_pool_size=2)
    conninfo = proxy.conninfo("u_trust", connect_timeout="10")

    async def one(n: int, pids: set[int]) -> None:
        async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as aconn:
            aconn.prepare_threshold = None
            for i in range(20):
                async with aconn.transaction():
                    cur = await aconn.execute("SELECT %s::int + 1, pg_backend_pid()", [n + i])
                    row = await cur.fetchone()
                    assert row is not None and row[0] == n + i + 1
                    pids.add(row[1])
                assert aconn.info.transaction_status is pq.TransactionStatus.IDLE

    async def main() -> set[int]:
        pids: set[int] = set()
        await asyncio.gather(*(one(n * 1000, pids) for n in range(16)))
        return pids

    pids = asyncio.run(main())
    assert 1 <= len(pids) <= 2


def test_killed_mid_transaction_leaves_nothing(
    proxy_factory: Factory, admin: psycopg.Connection[Any]
) -> None:
    admin.execute("DROP TABLE IF EXISTS pool_killed")
    admin.execute("CREATE TABLE pool_killed (x int)")
    admin.execute("GRANT ALL ON pool_killed TO PUBLIC")
    proxy = proxy_factory(pool_mode="transaction", default_pool_size=1)
    victim = connect(proxy)
    victim.execute("INSERT INTO pool_killed VALUES (1)")
    with pytest.raises(errors.DivisionByZero):
        victim.execute("SELECT 1 / 0")  # the transaction is aborted, too
    victim.pgconn.finish()
    with connect(proxy, autocommit=True) as next_client:
        assert next_client.execute("SELECT count(*) FROM pool_killed").fetchone() == (0,)
        assert next_client.execute("SELECT 1").fetchone() == (1,)
        assert next_client.info.transaction_status is pq.TransactionStatus.IDLE


def _idle_servers(proxy: RunningProxy) -> int:
    async def count() -> int:
        return sum(len(pool.idle) for pool in proxy.server.pools.pools.values())

    return proxy.call(count())


def test_killed_without_terminate_mid_transaction(
    proxy_factory: Factory, admin: psycopg.Connection[Any]
) -> None:
    """A client whose connection just drops (no Terminate) inside a transaction: its server is
    rolled back and handed to the next client, which finds no open transaction, no row of the
    killed one, no SET LOCAL left and no lock held."""
    admin.execute("DROP TABLE IF EXISTS pool_dropped")
    admin.execute("CREATE TABLE pool_dropped (x int)")
    admin.execute("GRANT ALL ON pool_dropped TO PUBLIC")
    proxy = proxy_factory(pool_mode="transaction", default_pool_size=1)
    victim = connect(proxy)
    victim.execute("INSERT INTO pool_dropped VALUES (1)")
    victim.execute("SET LOCAL statement_timeout = '42s'")
    victim.execute("LOCK TABLE pool_dropped IN ACCESS EXCLUSIVE MODE")
    row = victim.execute("SELECT pg_backend_pid()").fetchone()
    assert row is not None
    pid = row[0]
    dup = socket.socket(fileno=os.dup(victim.fileno()))
    dup.shutdown(socket.SHUT_RDWR)  # the connection drops: no Terminate
    dup.close()
    wait_until(lambda: _idle_servers(proxy) == 1, "the victim's server back in the pool")
    state = admin.execute("SELECT state FROM pg_stat_activity WHERE pid = %s", [pid]).fetchone()
    assert state == ("idle",)
    with connect(proxy, autocommit=True) as next_client:
        assert next_client.execute("SELECT pg_backend_pid()").fetchone() == (pid,)  # reused
        assert next_client.execute("SELECT count(*) FROM pool_dropped").fetchone() == (0,)
        assert next_client.execute("SHOW statement_timeout").fetchone() == ("0",)
        assert next_client.info.transaction_status is pq.TransactionStatus.IDLE
    victim.close()


def test_startup_parameters_follow_the_client(proxy_factory: Factory) -> None:
    proxy = proxy_factory(pool_mode="transaction", default_pool_size=1)
    one = psycopg.connect(  # (a few queries each: psycopg prepares none)
        proxy.conninfo("u_trust", application_name="app_one", options="-c TimeZone=UTC"),
        autocommit=True,
    )
    two = psycopg.connect(
        proxy.conninfo("u_trust", application_name="app_two", options="-c TimeZone=UTC"),
        autocommit=True,
    )
    for _ in range(3):
        for conn, name in ((one, "app_one"), (two, "app_two")):
            assert conn.execute("SHOW application_name").fetchone() == (name,)
            assert conn.info.parameter_status("application_name") == name
    assert (
        one.execute("SELECT pg_backend_pid()").fetchone()
        == two.execute("SELECT pg_backend_pid()").fetchone()
    )
    one.close()
    two.close()


def test_startup_options_follow_the_client(proxy_factory: Factory) -> None:
    """`-c` settings of synced parameters in the startup options are carried to every server
    the client gets, as its startup parameters are (pgbouncer 1.20+ does the same)."""
    proxy = proxy_factory(pool_mode="transaction", default_pool_size=1)
    zones = {"one": "Asia/Tokyo", "two": "America/New_York"}
    clients = {
        name: psycopg.connect(
            proxy.conninfo(
                "u_trust", options=f"-c TimeZone={zone} --search-path=pg_catalog,public"
            ),
            autocommit=True,
        )
        for name, zone in zones.items()
    }
    plain = connect(proxy, autocommit=True)
    default = plain.execute("SHOW TimeZone").fetchone()
    for _ in range(3):
        for name, conn in clients.items():
            assert conn.execute("SHOW TimeZone").fetchone() == (zones[name],)
            assert conn.execute("SHOW search_path").fetchone() == ("pg_catalog,public",)
        pids = {c.execute("SELECT pg_backend_pid()").fetchone() for c in clients.values()}
        assert len(pids) == 1  # one server for both
    assert default is not None and default[0] not in zones.values()
    for conn in clients.values():
        conn.close()
    plain.close()


@pytest.mark.parametrize(
    "options", ["-c work_mem=2MB", "-c TimeZone=UTC --statement-timeout=5s", "-e"]
)
def test_other_startup_options_are_refused(proxy_factory: Factory, options: str) -> None:
    """Any other startup option would stay behind on a shared server: refused at login, with
    the option named; a migration session (its own server) and session pooling keep them."""
    proxy = proxy_factory(pool_mode="transaction")
    with pytest.raises(psycopg.OperationalError) as info:
        psycopg.connect(proxy.conninfo("u_trust", options=options, connect_timeout="10"))
    message = str(info.value)
    assert "cannot be kept in transaction pooling mode" in message
    assert options.split()[-1].lstrip("-").split("=")[0].replace("-", "_") in message
    if options == "-c work_mem=2MB":
        migration = "-c pgmigrate.role=migrate " + options
        with psycopg.connect(proxy.conninfo("u_trust", options=migration)) as conn:
            assert conn.execute("SHOW work_mem").fetchone() == ("2MB",)
        with psycopg.connect(proxy.conninfo("u_trust", options="-c pgmigrate.lock_timeout=1s")):
            pass  # (the proxy's own settings are fine)
        session = proxy_factory(pool_mode="session")
        with psycopg.connect(session.conninfo("u_trust", options=options)) as conn:
            assert conn.execute("SHOW work_mem").fetchone() == ("2MB",)


def test_query_wait_timeout(proxy_factory: Factory) -> None:
    proxy = proxy_factory(pool_mode="transaction", default_pool_size=1, query_wait_timeout=0.5)
    holder = connect(proxy)
    holder.execute("SELECT 1")  # in a transaction: keeps the only server
    with connect(proxy, autocommit=True) as waiter:
        with pytest.raises(psycopg.OperationalError, match="query_wait_timeout") as info:
            waiter.execute("SELECT 1")
        assert info.value.sqlstate == "08P01"
    holder.rollback()
    assert holder.execute("SELECT 2").fetchone() == (2,)
    holder.close()


def test_max_client_conn(proxy_factory: Factory) -> None:
    proxy = proxy_factory(pool_mode="transaction", max_client_conn=2)
    first, second = connect(proxy), connect(proxy)
    with pytest.raises(psycopg.OperationalError, match="max_client_conn"):
        connect(proxy)  # (FATAL 53300: psycopg keeps no sqlstate for a failed connection)
    first.close()
    wait_until(lambda: _can_connect(proxy), "a slot after a client left")
    second.close()


def _can_connect(proxy: RunningProxy) -> bool:
    try:
        connect(proxy).close()
    except psycopg.OperationalError:
        return False
    return True


def test_set_pins_the_client(proxy_factory: Factory, proxy_log: list[str]) -> None:
    proxy = proxy_factory(pool_mode="transaction", default_pool_size=2)
    pinned = connect(proxy, autocommit=True)
    pinned.execute("SET work_mem = '9MB'")
    other = connect(proxy, autocommit=True)
    pid = pinned.execute("SELECT pg_backend_pid()").fetchone()
    for _ in range(5):
        assert other.execute("SELECT pg_backend_pid()").fetchone() != pid
        assert pinned.execute("SHOW work_mem").fetchone() == ("9MB",)
        assert pinned.execute("SELECT pg_backend_pid()").fetchone() == pid
    assert any("pinned" in line and "SET" in line for line in proxy_log)
    pinned.close()
    other.close()


def test_listen_pins_and_notifications_arrive(proxy_factory: Factory) -> None:
    proxy = proxy_factory(pool_mode="transaction", default_pool_size=2)
    before = PINS.get("LISTEN", 0)
    listener = connect(proxy, autocommit=True)
    listener.execute("LISTEN pool_channel")
    assert PINS.get("LISTEN", 0) == before + 1  # counted (this process runs the proxy)
    pid = listener.execute("SELECT pg_backend_pid()").fetchone()
    with connect(proxy, autocommit=True) as sender:
        for _ in range(3):  # the listener keeps its server: the sender never gets it
            assert sender.execute("SELECT pg_backend_pid()").fetchone() != pid
        sender.execute("NOTIFY pool_channel, 'hello'")
    gen = listener.notifies(timeout=10, stop_after=1)
    assert [n.payload for n in gen] == ["hello"]
    assert listener.execute("SELECT pg_backend_pid()").fetchone() == pid
    listener.close()


@pytest.mark.parametrize(
    ("statement", "params", "reason"),
    [
        ("SET work_mem = '9MB'", None, "(SET)"),
        ("LISTEN pool_refused", None, "(LISTEN)"),
        ("SELECT set_config('work_mem', %s, false)", ["9MB"], "(set_config(..., false))"),
        ("SELECT pg_advisory_lock(42)", None, "(session advisory lock)"),
    ],
)
def test_refused_session_state(
    proxy_factory: Factory, statement: str, params: list[str] | None, reason: str
) -> None:
    """session_state = refuse: FATAL 0A000 naming the statement, what it leaves and the
    setting; the session ends (its later statements would have counted on that state); the
    pool carries on. Transaction-scoped forms pass."""
    proxy = proxy_factory(pool_mode="transaction", session_state="refuse", default_pool_size=1)
    conn = connect(proxy, autocommit=True)
    with pytest.raises(psycopg.errors.FeatureNotSupported) as info:
        conn.execute(statement, params)  # (with params: an unnamed Parse)
    message = str(info.value)
    assert statement.split("%s")[0] in message and reason in message
    assert "session_state = refuse" in message
    assert conn.closed or conn.pgconn.status == pq.ConnStatus.BAD
    with pytest.raises(psycopg.OperationalError):
        conn.execute("SELECT 1")
    conn.close()
    with connect(proxy) as fine:  # (a transaction)
        assert fine.execute("SELECT set_config('work_mem', '9MB', true)").fetchone() == ("9MB",)
        fine.execute("SET LOCAL work_mem = '8MB'")
        assert fine.execute("SELECT pg_advisory_xact_lock(42)").fetchone() == ("",)


def test_named_prepared_statement_pins(proxy_factory: Factory, proxy_log: list[str]) -> None:
    # (with the prepared-statement mapping off: test_pool_prepared.py has it on)
    proxy = proxy_factory(pool_mode="transaction", default_pool_size=2, max_prepared_statements=0)
    conn = connect(proxy, autocommit=True)
    conn.prepare_threshold = 0  # every query a named prepared statement
    pid = conn.execute("SELECT pg_backend_pid()").fetchone()
    with connect(proxy, autocommit=True) as other:
        for _ in range(3):
            assert other.execute("SELECT pg_backend_pid()").fetchone() != pid
            assert conn.execute("SELECT pg_backend_pid()").fetchone() == pid
    assert any("pinned" in line and "named prepared" in line for line in proxy_log)
    conn.close()


def test_migration_session_keeps_its_server(proxy_factory: Factory) -> None:
    proxy = proxy_factory(pool_mode="transaction", default_pool_size=2)
    migration = psycopg.connect(
        proxy.conninfo("u_trust", options="-c pgmigrate.role=migrate"), autocommit=True
    )
    pid = migration.execute("SELECT pg_backend_pid()").fetchone()
    with connect(proxy, autocommit=True) as other:
        for _ in range(3):
            assert other.execute("SELECT pg_backend_pid()").fetchone() != pid
            assert migration.execute("SELECT pg_backend_pid()").fetchone() == pid
    migration.close()


def test_guarded_ddl_from_a_pooled_client(
    proxy_factory: Factory, admin: psycopg.Connection[Any], proxy_log: list[str]
) -> None:
    """A pooled client's ALTER waits behind an idle-in-transaction reader: the guard ends the
    reader, the ALTER runs, and the client carries on in the pool."""
    admin.execute("DROP TABLE IF EXISTS pool_guarded")
    admin.execute("CREATE TABLE pool_guarded (id int)")
    admin.execute("ALTER TABLE pool_guarded OWNER TO u_trust")
    proxy = proxy_factory(pool_mode="transaction", default_pool_size=2)
    blocker = psycopg.connect(proxy.pg.url("u_trust"))  # straight to PostgreSQL
    blocker.execute("SELECT * FROM pool_guarded")  # holds ACCESS SHARE, idle in transaction
    conn = connect(proxy, autocommit=True)
    conn.execute("ALTER TABLE pool_guarded ADD COLUMN extra int")
    row = admin.execute(
        "SELECT count(*) FROM information_schema.columns WHERE table_name = 'pool_guarded'"
    ).fetchone()
    assert row == (2,)
    assert conn.execute("SELECT 5").fetchone() == (5,)
    assert any("guard applied" in line for line in proxy_log)
    conn.close()
    blocker.close()
    admin.execute("DROP TABLE pool_guarded")


def test_waiting_clients_get_the_server_in_arrival_order(
    proxy_factory: Factory, admin: psycopg.Connection[Any]
) -> None:
    """A released server goes straight to the client that has waited longest (queued in the
    pool without a task): with the only server held in a transaction, clients that queue one
    after another run in that order once it is released."""
    proxy = proxy_factory(pool_mode="transaction", default_pool_size=1)
    sequence = f"fifo_{os.getpid()}_{id(proxy)}"
    admin.execute(f"CREATE SEQUENCE {sequence}")
    admin.execute(f"GRANT USAGE ON SEQUENCE {sequence} TO u_trust")
    holder = connect(proxy)
    holder.execute("SELECT 1")  # in a transaction: keeps the only server
    pool = proxy.server.pools.pools[("postgres", "u_trust")]
    waiters = [connect(proxy, autocommit=True) for _ in range(4)]
    got: dict[int, int] = {}
    threads = []

    def run(i: int, conn: psycopg.Connection[Any]) -> None:
        row = conn.execute("SELECT nextval(%s)", [sequence]).fetchone()
        assert row is not None
        got[i] = row[0]

    for i, conn in enumerate(waiters):
        thread = threading.Thread(target=run, args=(i, conn))
        thread.start()
        threads.append(thread)
        wait_until(lambda: len(pool.waiters) == i + 1, f"client {i} to wait")  # noqa: B023
    holder.rollback()
    for thread in threads:
        thread.join(timeout=30)
    assert [got[i] for i in range(len(waiters))] == sorted(got.values())
    assert pool.stats.server_assignment_count >= len(waiters)
    for conn in (holder, *waiters):
        conn.close()
    admin.execute(f"DROP SEQUENCE {sequence}")
