"""The DDL guard end to end: a blocker session and application sessions straight to PostgreSQL,
the migration through the proxy.

Each scenario checks what the migration's client sees (result, error, notices), what happened
to the blocker, the catalog, and the latency of the application's queries on the same table
while the guarded statement was held or ran: the lock queue must never form behind it.
Latencies are printed (pytest -s) and asserted below a generous bound (a loaded 2-core box).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import psycopg
import pytest
from psycopg import errors, sql

from tests.fixtures.postgres import PgInfo
from tests.fixtures.proxy import RunningProxy
from tests.guard.scenarios import (
    BOUND,
    PgLog,
    Traffic,
    backend_alive,
    backend_state,
    column_exists,
    connect_through,
    lines,
    old_enough,
    shutdown_socket,
    stays,
    wait_for,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

#: The application's queries must stay well under this while the guard works (observed: ms).
LATENCY_BOUND = 1.0
#: Make PostgreSQL log a lock wait of the migration's backend longer than 20 ms: a queue
#: behind an idle-in-transaction blocker lasts at least until the watch or lock_timeout ends it
#: (50 ms), while an application query just finishing may hold the lock for a moment.
LOG_LOCK_WAITS = "-c log_lock_waits=on -c deadlock_timeout=20ms"
PSQL = shutil.which("psql") or "/usr/bin/psql"

ProxyFactory = Callable[..., RunningProxy]
Blockers = Callable[..., psycopg.Connection[Any]]


@pytest.fixture
def table(pg: PgInfo) -> Iterator[str]:
    """A fresh table of 10 rows; at teardown the sessions still using it are ended, then it
    is dropped."""
    name = f"scn_{secrets.token_hex(4)}"
    with pg.connect() as conn:
        ident = sql.Identifier(name)
        conn.execute(sql.SQL("CREATE TABLE {} (id int PRIMARY KEY)").format(ident))
        conn.execute(sql.SQL("INSERT INTO {} SELECT generate_series(1, 10)").format(ident))
    yield name
    with pg.connect() as conn:
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_locks"
            " WHERE relation = to_regclass(%s) AND pid <> pg_backend_pid()",
            (sql.Identifier(name).as_string(conn),),
        )
        conn.execute("SET lock_timeout = '10s'")
        conn.execute(sql.SQL("DROP TABLE IF EXISTS {} CASCADE").format(sql.Identifier(name)))


@pytest.fixture
def blockers(pg: PgInfo, table: str) -> Iterator[Blockers]:
    """Opens autocommit sessions straight to `pg`; closes them before the table goes."""
    opened: list[psycopg.Connection[Any]] = []

    def connect(**params: str) -> psycopg.Connection[Any]:
        conn = pg.connect(**{"application_name": "blocker", "connect_timeout": "10", **params})
        opened.append(conn)
        return conn

    yield connect
    for conn in opened:
        conn.close()


@pytest.fixture
def traffic(pg: PgInfo, table: str) -> Iterator[Traffic]:
    """Two application sessions querying `table` in a loop (started, stopped at teardown)."""
    with Traffic(pg, table) as running:
        yield running
    assert not running.errors, running.errors[:5]


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    """Threads for the migration's blocking calls."""
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="migration") as executor:
        yield executor


def hold(conn: psycopg.Connection[Any], statement: sql.Composed | str) -> int:
    """Open a transaction on `conn`, run `statement` in it, leave it idle; the backend pid."""
    conn.execute("BEGIN")
    conn.execute(statement)
    return conn.info.backend_pid


def q(template: str, *names: str) -> sql.Composed:
    return sql.SQL(template).format(*(sql.Identifier(n) for n in names))


def assert_terminated(conn: psycopg.Connection[Any]) -> None:
    """The connection was ended by pg_terminate_backend: its next query fails with 57P01."""
    with pytest.raises(errors.AdminShutdown):
        conn.execute("SELECT 1")


def result(future: Future[Any], timeout: float = BOUND) -> Any:
    return future.result(timeout=timeout)


def report(name: str, traffic: Traffic, since: float, until: float | None = None) -> float:
    if until is None:
        # a statement can end within the application's pause between two queries: let each
        # session run one more, so that the window holds a query that waited for it (if any)
        traffic.wait_queries(1)
    latency = traffic.max_latency(since, until)
    print(f"\n[{name}] {traffic.summary(since, until)}")
    return latency


# --- (a) terminate --------------------------------------------------------------------------------


def test_a_terminate_clears_the_blocker_before_sending(
    pg: PgInfo,
    proxy_factory: ProxyFactory,
    table: str,
    blockers: Blockers,
    traffic: Traffic,
    proxy_log: list[str],
) -> None:
    proxy = proxy_factory()
    blocker = blockers()
    blocker_pid = hold(blocker, q("SELECT * FROM {}", table))
    old_enough(pg, proxy, blocker_pid)
    client = connect_through(proxy, pg, options=LOG_LOCK_WAITS)
    alter_pid = client.server_pid()
    log = PgLog(pg)
    since = time.monotonic()
    client.conn.execute(q("ALTER TABLE {} ADD COLUMN a int", table))
    until = time.monotonic()
    traffic.wait_queries(3)
    latency = report("a", traffic, since, until)
    print(f"[a] ALTER took {(until - since) * 1000:.1f} ms")

    assert column_exists(pg, table, "a")
    assert_terminated(blocker)
    warnings = client.messages("WARNING")
    assert any(f"terminated pid {blocker_pid}" in m for m in warnings), client.notices
    assert not client.has_notice("retrying"), client.notices
    # Sent once, after the blocker was gone: PostgreSQL logged no lock wait of the ALTER.
    assert not list(lines(log.text(), f"process {alter_pid} ", "waiting")), log.text()
    assert any("guard applied" in line and "attempts=1" in line for line in proxy_log)
    assert latency < LATENCY_BOUND
    client.conn.close()


# --- (b) show -------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["session", "config"])
def test_b_show_holds_the_statement_until_the_blocker_commits(
    pg: PgInfo,
    proxy_factory: ProxyFactory,
    table: str,
    blockers: Blockers,
    traffic: Traffic,
    pool: ThreadPoolExecutor,
    where: str,
) -> None:
    if where == "config":
        proxy, options = proxy_factory(blocking_action="show"), LOG_LOCK_WAITS
    else:
        proxy, options = proxy_factory(), f"-c pgmigrate.blocking_action=show {LOG_LOCK_WAITS}"
    blocker = blockers()
    blocker_pid = hold(blocker, q("SELECT * FROM {}", table))
    client = connect_through(proxy, pg, options=options)
    alter_pid = client.server_pid()
    log = PgLog(pg)
    since = time.monotonic()
    alter = pool.submit(client.conn.execute, q("ALTER TABLE {} ADD COLUMN b int", table))

    wait_for(lambda: client.has_notice(f"blocked by pid {blocker_pid}"), "the 'blocked by' notice")
    held_from = time.monotonic()
    # Held, not queued: the ALTER is not in PostgreSQL at all and the application keeps going.
    traffic.wait_queries(30)
    assert not alter.done()
    assert backend_state(pg, alter_pid) == ("idle", "Client")
    assert not column_exists(pg, table, "b")
    held_latency = report("b held", traffic, held_from)

    blocker.execute("COMMIT")
    result(alter)
    until = time.monotonic()
    latency = report("b", traffic, since, until)
    print(f"[b] ALTER held then applied in {(until - since) * 1000:.0f} ms")
    assert column_exists(pg, table, "b")
    assert blocker.execute("SELECT 1").fetchone() == (1,)  # kept
    notice = next(n for n in client.notices if f"blocked by pid {blocker_pid}" in n.message)
    assert notice.severity == "NOTICE"
    assert not client.messages("WARNING"), client.notices
    assert not list(lines(log.text(), f"process {alter_pid} ", "waiting")), log.text()
    assert held_latency < LATENCY_BOUND and latency < LATENCY_BOUND
    assert traffic.killed == 0
    client.conn.close()


# --- (c) none with a budget -----------------------------------------------------------------------


def test_c_none_gives_up_with_55P03_after_the_budget(
    pg: PgInfo,
    proxy_factory: ProxyFactory,
    table: str,
    blockers: Blockers,
    traffic: Traffic,
) -> None:
    proxy = proxy_factory()
    blocker = blockers()
    blocker_pid = hold(blocker, q("SELECT * FROM {}", table))
    client = connect_through(
        proxy, pg, options="-c pgmigrate.blocking_action=none -c pgmigrate.lock_budget=1s"
    )
    since = time.monotonic()
    with pytest.raises(errors.LockNotAvailable) as failure:
        client.conn.execute(q("ALTER TABLE {} ADD COLUMN c int", table))
    until = time.monotonic()
    traffic.wait_queries(3)
    latency = report("c", traffic, since, until)
    print(f"[c] 55P03 after {until - since:.2f} s: {failure.value}")

    assert failure.value.sqlstate == "55P03"
    assert 0.8 <= until - since <= 3.0
    assert not column_exists(pg, table, "c")
    assert blocker.execute("SELECT 1").fetchone() == (1,)  # untouched, still in its transaction
    assert blocker.info.transaction_status is psycopg.pq.TransactionStatus.INTRANS
    assert backend_alive(pg, blocker_pid)
    assert client.has_notice(f"blocked by pid {blocker_pid}", "NOTICE"), client.notices
    assert client.has_notice("lock budget spent", "WARNING"), client.notices
    assert latency < LATENCY_BOUND
    assert traffic.killed == 0
    assert client.conn.execute("SELECT 1").fetchone() == (1,)  # the session goes on
    client.conn.close()


# --- (g) the client goes away while its statement is held -----------------------------------------


def test_g_client_gone_while_held_drops_the_statement(
    pg: PgInfo,
    proxy_factory: ProxyFactory,
    table: str,
    blockers: Blockers,
    traffic: Traffic,
    pool: ThreadPoolExecutor,
) -> None:
    proxy = proxy_factory()
    blocker = blockers()
    blocker_pid = hold(blocker, q("SELECT * FROM {}", table))
    client = connect_through(proxy, pg, options="-c pgmigrate.blocking_action=show")
    server_pid = client.server_pid()
    alter = pool.submit(client.conn.execute, q("ALTER TABLE {} ADD COLUMN g int", table))
    wait_for(lambda: client.has_notice(f"blocked by pid {blocker_pid}"), "the 'blocked by' notice")

    shutdown_socket(client.conn)
    with pytest.raises(psycopg.OperationalError):
        result(alter)
    client.conn.close()
    wait_for(lambda: proxy.server.active_sessions == 0, "the proxy to drop the session")
    wait_for(lambda: not backend_alive(pg, server_pid), "the session's server connection to end")

    since = time.monotonic()
    blocker.execute("COMMIT")
    stays(lambda: not column_exists(pg, table, "g"), "the ALTER was never applied", 1.5)
    report("g", traffic, since)
    assert proxy.server.active_sessions == 0
    assert proxy.server.guard.in_flight == set()
    # The admin connection and the proxy still serve the next migration.
    other = connect_through(proxy, pg)
    other.conn.execute(q("ALTER TABLE {} ADD COLUMN g2 int", table))
    assert column_exists(pg, table, "g2") and not column_exists(pg, table, "g")
    other.conn.close()


# --- (d) CREATE INDEX CONCURRENTLY and an old snapshot --------------------------------------------


@pytest.fixture
def other_table(pg: PgInfo, table: str) -> Iterator[str]:
    """A second table (for sessions that hold nothing on `table`), dropped afterwards."""
    name = f"{table}_other"
    with pg.connect() as conn:
        conn.execute(q("CREATE TABLE {} (id int PRIMARY KEY)", name))
        conn.execute(q("INSERT INTO {} VALUES (1)", name))
    yield name
    with pg.connect() as conn:
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_locks"
            " WHERE relation = to_regclass(%s) AND pid <> pg_backend_pid()",
            (sql.Identifier(name).as_string(conn),),
        )
        conn.execute("SET lock_timeout = '10s'")
        conn.execute(q("DROP TABLE IF EXISTS {} CASCADE", name))


def index_valid(pg: PgInfo, index: str) -> bool | None:
    """pg_index.indisvalid of `index`; None when it does not exist."""
    with pg.connect() as conn:
        row = conn.execute(
            "SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass(%s)",
            (sql.Identifier(index).as_string(conn),),
        ).fetchone()
    return None if row is None else bool(row[0])


def test_d_create_index_concurrently_ends_an_old_snapshot(
    pg: PgInfo,
    proxy_factory: ProxyFactory,
    table: str,
    other_table: str,
    blockers: Blockers,
    traffic: Traffic,
    pool: ThreadPoolExecutor,
    proxy_log: list[str],
) -> None:
    proxy = proxy_factory()
    old = blockers()
    old.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
    old.execute(q("SELECT 1 FROM {}", other_table))  # a snapshot; no lock on `table`
    old_pid = old.info.backend_pid
    client = connect_through(proxy, pg)
    index = f"{table}_cic"
    since = time.monotonic()
    build = pool.submit(
        client.conn.execute, q("CREATE INDEX CONCURRENTLY {} ON {} (id)", index, table)
    )
    try:
        result(build, timeout=8.0)
    finally:
        if not build.done():  # not watched: end the old transaction ourselves to unblock it
            with pg.connect() as killer:
                killer.execute("SELECT pg_terminate_backend(%s)", (old_pid,))
            build.exception(timeout=BOUND)
    until = time.monotonic()
    latency = report("d", traffic, since, until)
    print(f"[d] CREATE INDEX CONCURRENTLY took {(until - since) * 1000:.0f} ms")

    assert index_valid(pg, index) is True
    assert_terminated(old)
    # Reported, also when the build completes the moment the old snapshot is gone.
    assert client.has_notice(f"terminated pid {old_pid}", "WARNING"), client.notices
    assert any(f"guard terminated pid={old_pid}" in line for line in proxy_log), proxy_log
    assert not client.has_notice("retrying"), client.notices
    assert latency < LATENCY_BOUND
    client.conn.close()


# --- (e) ADD FOREIGN KEY: the blocker is on the referenced table ----------------------------------


def test_e_foreign_key_blocker_on_the_referenced_table(
    pg: PgInfo,
    proxy_factory: ProxyFactory,
    table: str,
    other_table: str,
    blockers: Blockers,
    traffic: Traffic,
) -> None:
    parent = other_table
    with pg.connect() as conn:
        conn.execute(q("INSERT INTO {} SELECT generate_series(2, 10)", parent))
    proxy = proxy_factory()
    blocker = blockers()
    # ROW EXCLUSIVE on the referenced table conflicts with the FK's SHARE ROW EXCLUSIVE there.
    blocker_pid = hold(blocker, q("INSERT INTO {} VALUES (1000)", parent))
    old_enough(pg, proxy, blocker_pid)
    client = connect_through(proxy, pg, options=LOG_LOCK_WAITS)
    alter_pid = client.server_pid()
    log = PgLog(pg)
    since = time.monotonic()
    client.conn.execute(
        q(
            "ALTER TABLE {} ADD CONSTRAINT {} FOREIGN KEY (id) REFERENCES {} (id)",
            table,
            f"{table}_fk",
            parent,
        )
    )
    until = time.monotonic()
    latency = report("e", traffic, since, until)

    with pg.connect() as conn:
        row = conn.execute(
            "SELECT contype, convalidated, confrelid = to_regclass(%s) FROM pg_constraint"
            " WHERE conname = %s",
            (sql.Identifier(parent).as_string(conn), f"{table}_fk"),
        ).fetchone()
    assert row == ("f", True, True)
    assert_terminated(blocker)
    assert client.has_notice(f"terminated pid {blocker_pid}", "WARNING"), client.notices
    assert not list(lines(log.text(), f"process {alter_pid} ", "waiting")), log.text()
    assert latency < LATENCY_BOUND
    client.conn.close()


# --- (h) psql -------------------------------------------------------------------------------------


def test_h_psql_gets_the_warning_and_exit_0(
    pg: PgInfo,
    proxy_factory: ProxyFactory,
    table: str,
    blockers: Blockers,
    traffic: Traffic,
) -> None:
    proxy = proxy_factory()
    blocker = blockers()
    blocker_pid = hold(blocker, q("SELECT * FROM {}", table))
    old_enough(pg, proxy, blocker_pid)
    env = {**os.environ, "PGPASSWORD": pg.password(pg.superuser), "PGCONNECT_TIMEOUT": "10"}
    env.pop("PGOPTIONS", None)
    alter = sql.SQL("ALTER TABLE {} ADD COLUMN h int").format(sql.Identifier(table))
    with pg.connect() as conn:
        text = alter.as_string(conn)
    command = [
        PSQL, "-X", "-v", "ON_ERROR_STOP=1", "-h", proxy.host, "-p", str(proxy.port),
        "-U", pg.superuser, "-d", "postgres", "-c", text,
    ]  # fmt: skip
    since = time.monotonic()
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=BOUND)
    until = time.monotonic()
    latency = report("h", traffic, since, until)
    print(f"[h] psql stderr: {done.stderr.strip()}")

    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ALTER TABLE"
    assert "WARNING:" in done.stderr and f"terminated pid {blocker_pid}" in done.stderr
    assert column_exists(pg, table, "h")
    assert_terminated(blocker)
    assert latency < LATENCY_BOUND


# --- the extended protocol ------------------------------------------------------------------------


def test_extended_prepared_ddl(
    pg: PgInfo, proxy_factory: ProxyFactory, table: str, blockers: Blockers, traffic: Traffic
) -> None:
    """psycopg prepare=True: Parse (named) + Sync, then Bind/Execute of that statement + Sync."""
    proxy = proxy_factory()
    blocker = blockers()
    blocker_pid = hold(blocker, q("SELECT * FROM {}", table))
    old_enough(pg, proxy, blocker_pid)
    client = connect_through(proxy, pg)
    since = time.monotonic()
    client.conn.execute(q("ALTER TABLE {} ADD COLUMN x1 int", table), prepare=True)
    latency = report("extended prepare", traffic, since)
    assert column_exists(pg, table, "x1")
    assert_terminated(blocker)
    assert client.has_notice(f"terminated pid {blocker_pid}", "WARNING"), client.notices
    assert latency < LATENCY_BOUND
    client.conn.close()


def test_extended_pipeline_with_parameters(
    pg: PgInfo, proxy_factory: ProxyFactory, table: str, blockers: Blockers, traffic: Traffic
) -> None:
    """A parameterized UPDATE, the DDL and a parameterized SELECT in one pipeline (one Sync)."""
    proxy = proxy_factory()
    blocker = blockers()
    blocker_pid = hold(blocker, q("SELECT * FROM {}", table))
    old_enough(pg, proxy, blocker_pid)
    client = connect_through(proxy, pg)
    since = time.monotonic()
    with client.conn.pipeline():
        update = client.conn.execute(q("UPDATE {} SET id = id WHERE id = %s", table), (3,))
        client.conn.execute(q("ALTER TABLE {} ADD COLUMN x2 int", table))
        select = client.conn.execute(q("SELECT count(x2) + %s FROM {}", table), (5,))
    latency = report("pipeline", traffic, since)
    assert update.rowcount == 1
    assert select.fetchone() == (5,)
    assert column_exists(pg, table, "x2")
    assert_terminated(blocker)
    assert client.has_notice(f"terminated pid {blocker_pid}", "WARNING"), client.notices
    assert latency < LATENCY_BOUND
    client.conn.close()


def test_extended_pipeline_fetch_inside_sends_flush(
    pg: PgInfo, proxy_factory: ProxyFactory, table: str, blockers: Blockers, traffic: Traffic
) -> None:
    """Fetching a result inside a pipeline makes psycopg send Flush, not Sync, after the DDL:
    the DDL must be guarded all the same."""
    proxy = proxy_factory()
    blocker = blockers()
    blocker_pid = hold(blocker, q("SELECT * FROM {}", table))
    old_enough(pg, proxy, blocker_pid)
    # Bounded by PostgreSQL itself should the ALTER go out unguarded and queue.
    client = connect_through(proxy, pg, options="-c lock_timeout=1s")
    since = time.monotonic()
    try:
        with client.conn.pipeline():
            client.conn.execute(q("ALTER TABLE {} ADD COLUMN x3 int", table))
            cur = client.conn.execute("SELECT %s::int", (7,))
            assert cur.fetchone() == (7,)  # Flush
    finally:
        latency = report("pipeline flush", traffic, since)
    assert column_exists(pg, table, "x3")
    assert_terminated(blocker)
    assert client.has_notice(f"terminated pid {blocker_pid}", "WARNING"), client.notices
    assert latency < LATENCY_BOUND
    client.conn.close()


# --- asyncpg --------------------------------------------------------------------------------------


async def asyncpg_session(
    proxy: RunningProxy, pg: PgInfo, work: Callable[[Any], Any]
) -> list[tuple[str, str]]:
    import asyncpg

    conn = await asyncpg.connect(proxy.url(pg.superuser), timeout=10)
    notices: list[tuple[str, str]] = []
    conn.add_log_listener(lambda _conn, msg: notices.append((msg.severity, msg.message)))
    try:
        await asyncio.wait_for(work(conn), BOUND)
    finally:
        await asyncio.wait_for(conn.close(), 10)
    return notices


@pytest.mark.parametrize("how", ["execute", "prepare"])
def test_asyncpg_ddl(
    pg: PgInfo,
    proxy_factory: ProxyFactory,
    table: str,
    blockers: Blockers,
    traffic: Traffic,
    how: str,
) -> None:
    proxy = proxy_factory()
    blocker = blockers()
    blocker_pid = hold(blocker, q("SELECT * FROM {}", table))
    old_enough(pg, proxy, blocker_pid)
    column = f"ap_{how}"
    with pg.connect() as conn:
        text = q(f"ALTER TABLE {{}} ADD COLUMN {column} int", table).as_string(conn)

    async def work(conn: Any) -> None:
        if how == "execute":  # simple Query
            assert await conn.execute(text) == "ALTER TABLE"
        else:  # Parse/Describe/Sync, then Bind/Execute/Sync
            statement = await conn.prepare(text)
            assert await statement.fetch() == []

    since = time.monotonic()
    notices = asyncio.run(asyncpg_session(proxy, pg, work))
    latency = report(f"asyncpg {how}", traffic, since)
    assert column_exists(pg, table, column)
    assert_terminated(blocker)
    assert any(
        severity == "WARNING" and f"terminated pid {blocker_pid}" in message
        for severity, message in notices
    ), notices
    assert latency < LATENCY_BOUND


def test_asyncpg_prepared_ddl_with_show_is_held(
    pg: PgInfo,
    proxy_factory: ProxyFactory,
    table: str,
    blockers: Blockers,
    traffic: Traffic,
) -> None:
    import asyncpg

    proxy = proxy_factory(blocking_action="show")
    blocker = blockers()
    blocker_pid = hold(blocker, q("SELECT * FROM {}", table))
    with pg.connect() as conn:
        text = q("ALTER TABLE {} ADD COLUMN aps int", table).as_string(conn)
    notices: list[tuple[str, str]] = []
    window: list[float] = []

    async def work(conn: Any) -> None:
        alter_pid = conn.get_server_pid()
        statement = await conn.prepare(text)  # Parse, Describe, Flush
        fetch = asyncio.ensure_future(statement.fetch())  # Bind, Execute, Sync
        try:
            while not any(f"blocked by pid {blocker_pid}" in m for _, m in notices):
                assert not fetch.done()
                await asyncio.sleep(0.01)
            window.append(time.monotonic())
            for _ in range(10):  # held by the proxy, not queued in PostgreSQL
                state = await asyncio.to_thread(backend_state, pg, alter_pid)
                assert state[1] == "Client", state  # held: never waiting on a Lock
                await asyncio.sleep(0.03)
            window.append(time.monotonic())
        finally:
            blocker.execute("COMMIT")
            await fetch

    async def session() -> None:
        # lock_timeout: bounded by PostgreSQL itself should the ALTER queue.
        settings = {"lock_timeout": "3s"}
        conn = await asyncpg.connect(proxy.url(pg.superuser), timeout=10, server_settings=settings)
        conn.add_log_listener(lambda _conn, msg: notices.append((msg.severity, msg.message)))
        try:
            await asyncio.wait_for(work(conn), BOUND)
        finally:
            await asyncio.wait_for(conn.close(), 10)

    asyncio.run(session())
    latency = report("asyncpg prepare show", traffic, window[0], window[1])
    assert column_exists(pg, table, "aps")
    assert latency < LATENCY_BOUND


# --- several statements in one simple Query -------------------------------------------------------


def test_multi_statement_query(
    pg: PgInfo, proxy_factory: ProxyFactory, table: str, blockers: Blockers, traffic: Traffic
) -> None:
    proxy = proxy_factory()
    blocker = blockers()
    blocker_pid = hold(blocker, q("SELECT * FROM {}", table))
    old_enough(pg, proxy, blocker_pid)
    client = connect_through(proxy, pg)
    since = time.monotonic()
    client.conn.execute(
        q("ALTER TABLE {} ADD COLUMN m1 int; ALTER TABLE {} ADD COLUMN m2 int;", table, table)
    )
    latency = report("multi-statement", traffic, since)
    assert column_exists(pg, table, "m1") and column_exists(pg, table, "m2")
    assert_terminated(blocker)
    assert client.has_notice(f"terminated pid {blocker_pid}", "WARNING"), client.notices
    assert latency < LATENCY_BOUND
    client.conn.close()


# --- retries, and the session's own lock_timeout --------------------------------------------------


def show_lock_timeout(client: Any) -> str:
    row = client.conn.execute("SHOW lock_timeout").fetchone()
    assert row is not None
    return str(row[0])


def test_retries_until_the_blocker_commits_and_restores_lock_timeout(
    pg: PgInfo,
    proxy_factory: ProxyFactory,
    table: str,
    blockers: Blockers,
    traffic: Traffic,
) -> None:
    proxy = proxy_factory(retry_max_delay=0.2)
    blocker = blockers()
    blocker_pid = hold(blocker, q("SELECT * FROM {}", table))
    client = connect_through(
        proxy, pg, options="-c pgmigrate.blocking_action=none -c pgmigrate.lock_budget=3s"
    )
    client.conn.execute("SET lock_timeout = '7s'")
    committer = threading.Timer(1.0, blocker.execute, ("COMMIT",))
    since = time.monotonic()
    committer.start()
    try:
        client.conn.execute(q("ALTER TABLE {} ADD COLUMN r int", table))
    finally:
        committer.join(BOUND)
    until = time.monotonic()
    latency = report("retry", traffic, since, until)
    retries = [m for m in client.messages("NOTICE") if "retrying" in m]
    print(f"[retry] applied after {until - since:.2f} s and {len(retries)} retries")

    assert column_exists(pg, table, "r")
    assert len(retries) >= 3, client.notices
    assert 0.9 <= until - since < 3.0
    assert blocker.execute("SELECT 1").fetchone() == (1,)  # never touched
    assert client.has_notice(f"blocked by pid {blocker_pid}", "NOTICE"), client.notices
    assert show_lock_timeout(client) == "7s"
    assert latency < LATENCY_BOUND

    # After a failure too: the budget spent, 55P03, and the session's own value is back.
    hold(blocker, q("SELECT * FROM {}", table))
    short = connect_through(
        proxy, pg, options="-c pgmigrate.blocking_action=none -c pgmigrate.lock_budget=300ms"
    )
    short.conn.execute("SET lock_timeout = '8s'")
    with pytest.raises(errors.LockNotAvailable):
        short.conn.execute(q("ALTER TABLE {} ADD COLUMN r2 int", table))
    assert show_lock_timeout(short) == "8s"
    assert not column_exists(pg, table, "r2")
    short.conn.close()
    client.conn.close()


# --- the admin connection is lost -----------------------------------------------------------------


def test_admin_connection_lost_then_back(
    pg: PgInfo,
    proxy_factory: ProxyFactory,
    table: str,
    blockers: Blockers,
    traffic: Traffic,
) -> None:
    proxy = proxy_factory()
    admin = proxy.server.guard.admin
    assert admin is not None and admin.connected
    lost_pid = admin.pid
    with pg.connect() as conn:
        conn.execute("SELECT pg_terminate_backend(%s)", (lost_pid,))
    wait_for(lambda: not backend_alive(pg, lost_pid), "the admin backend to end")

    blocker = blockers()
    blocker_pid = hold(blocker, q("SELECT * FROM {}", table))
    old_enough(pg, proxy, blocker_pid)
    client = connect_through(proxy, pg)
    since = time.monotonic()
    client.conn.execute(q("ALTER TABLE {} ADD COLUMN al int", table))
    latency = report("admin lost", traffic, since)
    print(f"[admin lost] notices: {client.messages()}")

    assert column_exists(pg, table, "al")
    assert_terminated(blocker)
    assert client.has_notice(f"terminated pid {blocker_pid}", "WARNING"), client.notices
    assert admin.connected and admin.pid not in (0, lost_pid)
    assert backend_alive(pg, admin.pid)
    assert latency < LATENCY_BOUND
    client.conn.close()


# --- explicit transactions ------------------------------------------------------------------------


def test_explicit_transaction_with_a_blocker(
    pg: PgInfo, proxy_factory: ProxyFactory, table: str, blockers: Blockers, traffic: Traffic
) -> None:
    proxy = proxy_factory()
    blocker = blockers()
    blocker_pid = hold(blocker, q("SELECT * FROM {}", table))
    old_enough(pg, proxy, blocker_pid)
    client = connect_through(proxy, pg, autocommit=False)
    since = time.monotonic()
    client.conn.execute(q("INSERT INTO {} VALUES (11)", table))  # BEGIN is sent first
    client.conn.execute(q("ALTER TABLE {} ADD COLUMN t1 int", table))
    client.conn.execute(q("UPDATE {} SET t1 = id", table))
    assert not column_exists(pg, table, "t1")  # not committed yet
    client.conn.commit()
    latency = report("transaction", traffic, since)
    assert column_exists(pg, table, "t1")
    assert_terminated(blocker)
    assert client.has_notice(f"terminated pid {blocker_pid}", "WARNING"), client.notices
    assert latency < LATENCY_BOUND
    client.conn.close()


def test_explicit_transaction_budget_spent_gives_55P03(
    pg: PgInfo, proxy_factory: ProxyFactory, table: str, blockers: Blockers, traffic: Traffic
) -> None:
    """Inside a transaction block an attempt that fails aborts the transaction: it cannot be
    redone, and the client must hear about the lock (55P03), not 25P02 from a second try."""
    proxy = proxy_factory()
    blocker = blockers()
    hold(blocker, q("SELECT * FROM {}", table))
    client = connect_through(
        proxy,
        pg,
        options="-c pgmigrate.blocking_action=none -c pgmigrate.lock_budget=500ms",
        autocommit=False,
    )
    client.conn.execute("SELECT 1")  # BEGIN
    since = time.monotonic()
    with pytest.raises(psycopg.Error) as failure:
        client.conn.execute(q("ALTER TABLE {} ADD COLUMN t2 int", table))
    latency = report("transaction 55P03", traffic, since)
    print(f"[transaction 55P03] {failure.value.sqlstate}: {failure.value}; {client.messages()}")
    client.conn.rollback()
    assert failure.value.sqlstate == "55P03"
    assert not client.has_notice("retrying"), client.notices
    assert not column_exists(pg, table, "t2")
    assert latency < LATENCY_BOUND
    client.conn.close()


# --- the guard off --------------------------------------------------------------------------------


def test_guard_off_passes_ddl_straight_through(
    pg: PgInfo,
    proxy_factory: ProxyFactory,
    table: str,
    blockers: Blockers,
    proxy_log: list[str],
) -> None:
    proxy = proxy_factory(guard=False)
    assert proxy.server.guard.admin is None
    blocker = blockers()
    blocker_pid = hold(blocker, q("SELECT * FROM {}", table))
    client = connect_through(proxy, pg, options=LOG_LOCK_WAITS)
    alter_pid = client.server_pid()
    log = PgLog(pg)
    client.conn.execute("SET lock_timeout = '300ms'")
    with pytest.raises(errors.LockNotAvailable):
        client.conn.execute(q("ALTER TABLE {} ADD COLUMN off int", table))
    # It went out at once and queued (PostgreSQL logged the wait); nobody touched the blocker.
    assert wait_for(
        lambda: list(lines(log.text(), f"process {alter_pid} ", "waiting")), "the lock wait log"
    )
    assert client.notices == []
    assert blocker.execute("SELECT 1").fetchone() == (1,)
    assert backend_alive(pg, blocker_pid)
    assert not [line for line in proxy_log if "pgmigrate_proxy.guard" in line]
    blocker.execute("COMMIT")
    client.conn.execute(q("ALTER TABLE {} ADD COLUMN off int", table))
    assert column_exists(pg, table, "off")
    client.conn.close()
