"""A drain holds the proxy's other sessions at its gate, real PostgreSQL and real clients: the
migration and the application through the proxy (transaction and session pooling), the lock
holder the drain waits for straight to PostgreSQL. New work on the table (psycopg's BEGIN and
then its statement, an autocommit statement) waits at the proxy and runs after the DDL; a
session already holding a lock on it, or working on another table, goes on; a held statement
whose client leaves is dropped; a failed DDL statement releases everything; two drains on two
tables hold only their own table's traffic; a drain holds the writes of a referencing table."""

from __future__ import annotations

import secrets
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import psycopg
import pytest
from psycopg import errors, sql

from tests.fixtures.postgres import PgInfo
from tests.fixtures.proxy import RunningProxy
from tests.guard.live import Connect
from tests.guard.scenarios import (
    BOUND,
    CONNECT_SECONDS,
    Client,
    column_exists,
    connect_through,
    shutdown_socket,
    wait_for,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

ProxyFactory = Callable[..., RunningProxy]
MODES = ["transaction", "session"]


def q(template: str, *names: str) -> sql.Composed:
    return sql.SQL(template).format(*(sql.Identifier(n) for n in names))


def start(proxy_factory: ProxyFactory, mode: str = "transaction") -> RunningProxy:
    return proxy_factory(
        blocking_action="drain", drain_timeout=30.0, pool_mode=mode, default_pool_size=10
    )


#: Connections through the proxy, closed first at a test's end (a failed test's open
#: transactions would keep the tables from being dropped).
OPENED: list[psycopg.Connection[Any]] = []


@pytest.fixture(autouse=True)
def _close_opened() -> Iterator[None]:
    yield
    while OPENED:
        OPENED.pop().close()


def app(proxy: RunningProxy, pg: PgInfo, *, autocommit: bool = True) -> psycopg.Connection[Any]:
    """An application session through the proxy (psycopg: BEGIN sent alone when not autocommit)."""
    conn = psycopg.connect(
        proxy.conninfo(pg.superuser, connect_timeout=CONNECT_SECONDS, application_name="app"),
        autocommit=autocommit,
    )
    conn.prepare_threshold = None
    OPENED.append(conn)
    return conn


def migrating(proxy: RunningProxy, pg: PgInfo) -> Client:
    client = connect_through(proxy, pg)
    OPENED.append(client.conn)
    return client


def waiting(proxy: RunningProxy) -> int:
    async def count() -> int:
        return proxy.server.guard.gate.waiting

    return proxy.call(count())


def held(proxy: RunningProxy, n: int, what: str) -> None:
    wait_for(lambda: waiting(proxy) == n, what)


def hold_lock(conn: psycopg.Connection[Any], table: str) -> None:
    """The transaction the drain waits for (straight to PostgreSQL)."""
    conn.execute("BEGIN")
    conn.execute(q("SELECT * FROM {}", table))


def drained(proxy_log: list[str], n: int = 1) -> Callable[[], bool]:
    return lambda: sum("guard drain " in line for line in list(proxy_log)) >= n


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    """Threads for the blocking calls; not waited for at the end (a failed test's calls end
    when the proxy and the sessions close)."""
    executor = ThreadPoolExecutor(max_workers=8)
    yield executor
    executor.shutdown(wait=False, cancel_futures=True)


@pytest.fixture
def other_table(pg: PgInfo) -> Iterator[str]:
    name = f"other_{secrets.token_hex(4)}"
    with pg.connect() as conn:
        conn.execute(q("CREATE TABLE {} (id int)", name))
        yield name
        conn.execute(q("DROP TABLE IF EXISTS {} CASCADE", name))


def alter(client: Any, template: str, name: str) -> Callable[[], object]:
    return lambda: client.conn.execute(q(template, name))


def insert_returning(conn: psycopg.Connection[Any], table: str) -> tuple[Any, ...]:
    """One row in (in a transaction of its own when not autocommit); RETURNING * shows
    whether it ran before or after a column was added."""
    row = conn.execute(q("INSERT INTO {} (id) VALUES (1) RETURNING *", table)).fetchone()
    if not conn.autocommit:
        conn.commit()
    assert row is not None
    return tuple(row)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("autocommit", [True, False], ids=["autocommit", "begin"])
def test_new_work_on_the_table_is_held_and_runs_after_the_ddl(
    pg: PgInfo,
    proxy_factory: ProxyFactory,
    table: tuple[str, int],
    sessions: Connect,
    proxy_log: list[str],
    pool: ThreadPoolExecutor,
    other_table: str,
    mode: str,
    autocommit: bool,
) -> None:
    name, _ = table
    proxy = start(proxy_factory, mode)
    holder = sessions()
    hold_lock(holder, name)
    worker = app(proxy, pg, autocommit=autocommit)
    elsewhere = app(proxy, pg, autocommit=False)  # mid-transaction on another table
    elsewhere.execute(q("INSERT INTO {} VALUES (1)", other_table))
    migration = migrating(proxy, pg)
    ddl = pool.submit(alter(migration, "ALTER TABLE {} ADD COLUMN a int", name))
    wait_for(drained(proxy_log), "the drain to start")
    work = pool.submit(insert_returning, worker, name)
    held(proxy, 1, "the new work on the table held at the proxy")
    # a session working on another table is not held, up to its COMMIT
    elsewhere.execute(q("INSERT INTO {} VALUES (2)", other_table))
    elsewhere.commit()
    assert not work.done() and not ddl.done()
    holder.execute("COMMIT")
    ddl.result(timeout=BOUND)
    assert work.result(timeout=BOUND) == (1, None)  # ran after the column was added
    assert waiting(proxy) == 0
    assert column_exists(pg, name, "a")
    assert worker.execute("SELECT 1").fetchone() == (1,)  # released, disarmed: carries on
    for conn in (worker, elsewhere, migration.conn):
        conn.close()


def test_a_session_holding_a_lock_on_the_table_goes_through(
    pg: PgInfo,
    proxy_factory: ProxyFactory,
    table: tuple[str, int],
    proxy_log: list[str],
    pool: ThreadPoolExecutor,
) -> None:
    """Its next statements on the table are let through (holding them would deadlock it against
    the drain, which waits for its transaction); a new session's are held meanwhile."""
    name, _ = table
    proxy = start(proxy_factory)
    inside = app(proxy, pg, autocommit=False)
    inside.execute(q("SELECT * FROM {}", name))  # holds ACCESS SHARE until it commits
    worker = app(proxy, pg)
    migration = migrating(proxy, pg)
    ddl = pool.submit(alter(migration, "ALTER TABLE {} ADD COLUMN b int", name))
    wait_for(drained(proxy_log), "the drain to start")
    work = pool.submit(insert_returning, worker, name)
    held(proxy, 1, "the new session's statement held")
    inside.execute(q("INSERT INTO {} VALUES (7)", name))  # let through
    assert inside.execute(q("SELECT count(*) FROM {}", name)).fetchone() == (1,)
    assert not ddl.done()
    inside.commit()
    ddl.result(timeout=BOUND)
    assert work.result(timeout=BOUND) == (1, None)
    for conn in (inside, worker, migration.conn):
        conn.close()


def test_a_held_statement_whose_client_leaves_is_dropped(
    pg: PgInfo,
    proxy_factory: ProxyFactory,
    table: tuple[str, int],
    sessions: Connect,
    proxy_log: list[str],
    pool: ThreadPoolExecutor,
) -> None:
    name, _ = table
    proxy = start(proxy_factory)
    holder = sessions()
    hold_lock(holder, name)
    leaving = app(proxy, pg)
    migration = migrating(proxy, pg)
    ddl = pool.submit(alter(migration, "ALTER TABLE {} ADD COLUMN c int", name))
    wait_for(drained(proxy_log), "the drain to start")
    leaving.pgconn.send_query(q("INSERT INTO {} VALUES (9)", name).as_bytes(leaving))
    held(proxy, 1, "the statement held")
    shutdown_socket(leaving)
    held(proxy, 0, "the held statement dropped")
    holder.execute("COMMIT")
    ddl.result(timeout=BOUND)
    assert holder.execute(q("SELECT count(*) FROM {}", name)).fetchone() == (0,)
    migration.conn.close()


def test_a_drain_whose_statement_fails_releases_everything(
    pg: PgInfo,
    proxy_factory: ProxyFactory,
    table: tuple[str, int],
    sessions: Connect,
    proxy_log: list[str],
    pool: ThreadPoolExecutor,
) -> None:
    name, _ = table
    proxy = start(proxy_factory)
    holder = sessions()
    hold_lock(holder, name)
    workers = [app(proxy, pg) for _ in range(3)]
    migration = migrating(proxy, pg)
    # fails once it runs: the column exists (42701)
    ddl = pool.submit(alter(migration, "ALTER TABLE {} ADD COLUMN id int", name))
    wait_for(drained(proxy_log), "the drain to start")
    work = [pool.submit(insert_returning, w, name) for w in workers]
    held(proxy, 3, "the three statements held")
    holder.execute("COMMIT")
    with pytest.raises(errors.DuplicateColumn):
        ddl.result(timeout=BOUND)
    assert [w.result(timeout=BOUND) for w in work] == [(1,)] * 3
    assert waiting(proxy) == 0
    for conn in (*workers, migration.conn):
        conn.close()


def test_two_drains_on_two_tables_hold_only_their_own_traffic(
    pg: PgInfo,
    proxy_factory: ProxyFactory,
    table: tuple[str, int],
    other_table: str,
    sessions: Connect,
    proxy_log: list[str],
    pool: ThreadPoolExecutor,
) -> None:
    first, _ = table
    second = other_table
    proxy = start(proxy_factory)
    holders = {name: sessions() for name in (first, second)}
    for name, conn in holders.items():
        hold_lock(conn, name)
    migrations = [migrating(proxy, pg) for _ in range(2)]
    ddls = [
        pool.submit(alter(m, "ALTER TABLE {} ADD COLUMN x int", name))
        for m, name in zip(migrations, (first, second), strict=True)
    ]
    wait_for(drained(proxy_log, 2), "both drains to start")
    workers = {name: app(proxy, pg) for name in (first, second)}
    work: dict[str, Future[tuple[Any, ...]]] = {
        name: pool.submit(insert_returning, conn, name) for name, conn in workers.items()
    }
    held(proxy, 2, "one statement held on each table")
    holders[first].execute("COMMIT")
    ddls[0].result(timeout=BOUND)
    assert work[first].result(timeout=BOUND) == (1, None)  # the first drain's release
    assert not work[second].done() and not ddls[1].done()  # not the second's
    assert waiting(proxy) == 1
    holders[second].execute("COMMIT")
    ddls[1].result(timeout=BOUND)
    assert work[second].result(timeout=BOUND) == (1, None)
    for conn in (*workers.values(), *(m.conn for m in migrations)):
        conn.close()


def test_a_drain_on_a_referenced_table_holds_the_referencing_writes(
    pg: PgInfo,
    proxy_factory: ProxyFactory,
    sessions: Connect,
    proxy_log: list[str],
    pool: ThreadPoolExecutor,
) -> None:
    """Inserting into the referencing table locks the referenced one (the RI check's FOR KEY
    SHARE): held. Reading it locks nothing of the target: goes on."""
    parent, child = f"parent_{secrets.token_hex(3)}", f"child_{secrets.token_hex(3)}"
    with pg.connect() as conn:
        conn.execute(q("CREATE TABLE {} (id int PRIMARY KEY)", parent))
        conn.execute(q("INSERT INTO {} VALUES (1)", parent))
        conn.execute(q("CREATE TABLE {} (parent_id int REFERENCES {})", child, parent))
    try:
        proxy = start(proxy_factory)
        holder = sessions()
        hold_lock(holder, parent)
        reader, writer = app(proxy, pg), app(proxy, pg)
        migration = migrating(proxy, pg)
        ddl = pool.submit(alter(migration, "ALTER TABLE {} ADD COLUMN y int", parent))
        wait_for(drained(proxy_log), "the drain to start")
        write = pool.submit(writer.execute, q("INSERT INTO {} VALUES (1)", child))
        held(proxy, 1, "the referencing write held")
        assert reader.execute(q("SELECT count(*) FROM {}", child)).fetchone() == (0,)
        holder.execute("COMMIT")
        ddl.result(timeout=BOUND)
        write.result(timeout=BOUND)
        for conn in (reader, writer, migration.conn):
            conn.close()
    finally:
        with pg.connect() as conn:
            conn.execute(q("DROP TABLE IF EXISTS {}, {}", child, parent))


def test_a_prepared_statement_is_judged_by_its_text(
    pg: PgInfo,
    proxy_factory: ProxyFactory,
    table: tuple[str, int],
    other_table: str,
    sessions: Connect,
    proxy_log: list[str],
    pool: ThreadPoolExecutor,
) -> None:
    """psycopg's prepared statements (Bind of a named statement parsed before the drain): the
    one on another table goes on, the one on the target is held."""
    name, _ = table
    proxy = start(proxy_factory, "session")
    worker = app(proxy, pg)
    worker.prepare_threshold = 0  # prepared at the first execution
    for table_name in (name, other_table):
        worker.execute(q("SELECT count(*) FROM {}", table_name), prepare=True)
    holder = sessions()
    hold_lock(holder, name)
    migration = migrating(proxy, pg)
    ddl = pool.submit(alter(migration, "ALTER TABLE {} ADD COLUMN z int", name))
    wait_for(drained(proxy_log), "the drain to start")
    done = threading.Event()
    assert worker.execute(q("SELECT count(*) FROM {}", other_table), prepare=True).fetchone()
    def on_target() -> None:
        worker.execute(q("SELECT count(*) FROM {}", name), prepare=True)
        done.set()

    work = pool.submit(on_target)
    held(proxy, 1, "the prepared statement on the target held")
    assert not done.is_set()
    holder.execute("COMMIT")
    ddl.result(timeout=BOUND)
    work.result(timeout=BOUND)
    worker.close()
    migration.conn.close()
