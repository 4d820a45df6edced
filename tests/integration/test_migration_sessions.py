"""Migration sessions end to end: the proxy keeps a virtual transaction for the client and sends
every statement as its own implicit transaction (DESIGN.md section 4, "Autocommit semantics").

Each test checks what the client sees (results, errors, the ReadyForQuery status through
`transaction_status`, notices) and, from a direct connection, what PostgreSQL already has:
in a migration session a statement is applied when it returns, before the COMMIT.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest
from pgmigrate_proxy.protocol.messages import ErrorResponse
from pgmigrate_proxy.protocol.types import BackendType
from psycopg import errors, pq

from tests.fixtures.postgres import PgInfo
from tests.fixtures.proxy import RunningProxy
from tests.integration.wire import Message, WireClient

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

MIGRATE = "-c pgmigrate.role=migrate"
USER = "u_trust"
PSQL = shutil.which("psql")
needs_psql = pytest.mark.skipif(PSQL is None, reason="psql is not installed")

Conn = psycopg.Connection[Any]
ProxyFactory = Callable[..., RunningProxy]
IDLE, INTRANS, INERROR = (
    pq.TransactionStatus.IDLE,
    pq.TransactionStatus.INTRANS,
    pq.TransactionStatus.INERROR,
)


# --- fixtures and helpers ------------------------------------------------------------------------


class Tables:
    """A fresh table `name` (id int) and its bookkeeping table `log` (name text), both owned by
    u_trust, plus a schema `schema` holding another table called `name`."""

    def __init__(self, admin: Conn, name: str) -> None:
        self.admin = admin
        self.name = name
        self.log = f"{name}_log"
        self.schema = f"{name}_s"

    def column(self, column: str, table: str | None = None, schema: str = "public") -> bool:
        """Whether the column exists, as another session sees it now."""
        row = self.admin.execute(
            "SELECT count(*) FROM information_schema.columns"
            " WHERE table_schema = %s AND table_name = %s AND column_name = %s",
            [schema, table or self.name, column],
        ).fetchone()
        return bool(row and row[0])

    def logged(self) -> list[str]:
        """The bookkeeping rows, as another session sees them now."""
        rows = self.admin.execute(f"SELECT name FROM {self.log} ORDER BY name").fetchall()
        return [row[0] for row in rows]

    def alter(self, column: str) -> str:
        return f"ALTER TABLE {self.name} ADD COLUMN {column} int"

    def insert(self, value: str) -> str:
        return f"INSERT INTO {self.log} VALUES ('{value}')"


@pytest.fixture
def tables(admin: Conn) -> Iterator[Tables]:
    found = Tables(admin, f"mig_{secrets.token_hex(4)}")
    for statement in (
        f"CREATE TABLE {found.name} (id int)",
        f"INSERT INTO {found.name} SELECT generate_series(1, 10)",
        f"CREATE TABLE {found.log} (name text)",
        f"CREATE SCHEMA {found.schema} AUTHORIZATION {USER}",
        f"CREATE TABLE {found.schema}.{found.name} (id int)",
        f"ALTER TABLE {found.name} OWNER TO {USER}",
        f"ALTER TABLE {found.log} OWNER TO {USER}",
        f"ALTER TABLE {found.schema}.{found.name} OWNER TO {USER}",
    ):
        admin.execute(statement)
    yield found
    admin.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE usename = %s AND pid <> pg_backend_pid()",
        [USER],
    )
    admin.execute("SET lock_timeout = '10s'")
    admin.execute(f"DROP TABLE IF EXISTS {found.name}, {found.log} CASCADE")
    admin.execute(f"DROP SCHEMA IF EXISTS {found.schema} CASCADE")


class Notices(list[tuple[str, str]]):
    """The notices a psycopg connection received: (severity, message)."""

    def add(self, diagnostic: psycopg.errors.Diagnostic) -> None:
        # Read now: the Diagnostic is only valid during the callback.
        self.append((diagnostic.severity or "", diagnostic.message_primary or ""))

    def of(self, severity: str) -> list[str]:
        return [message for seen, message in self if seen == severity]


@pytest.fixture
def connect(proxy: RunningProxy) -> Iterator[Callable[..., tuple[Conn, Notices]]]:
    """connect(autocommit=False, proxy=proxy, options=MIGRATE, **libpq params): a psycopg
    connection through the proxy as u_trust and the list its notices go to."""
    opened: list[Conn] = []

    def open_one(
        autocommit: bool = False,
        through: RunningProxy | None = None,
        options: str = MIGRATE,
        **params: Any,
    ) -> tuple[Conn, Notices]:
        conninfo = (through or proxy).conninfo(USER, connect_timeout="10", **params)
        conn = psycopg.connect(conninfo, autocommit=autocommit, options=options)
        notices = Notices()
        conn.add_notice_handler(notices.add)
        opened.append(conn)
        return conn, notices

    yield open_one
    for conn in opened:
        conn.close()


def backend_state(admin: Conn, pid: int) -> str:
    row = admin.execute("SELECT state FROM pg_stat_activity WHERE pid = %s", [pid]).fetchone()
    assert row is not None, f"no backend {pid}"
    return str(row[0])


def last_query(admin: Conn, pid: int) -> str:
    row = admin.execute("SELECT query FROM pg_stat_activity WHERE pid = %s", [pid]).fetchone()
    assert row is not None, f"no backend {pid}"
    return str(row[0])


def status(conn: Conn) -> pq.TransactionStatus:
    return conn.info.transaction_status


# --- (f) BEGIN; ALTER; ALTER; INSERT; COMMIT through psycopg --------------------------------------


def test_f_statements_are_applied_one_by_one(
    tables: Tables, connect: Callable[..., tuple[Conn, Notices]], admin: Conn
) -> None:
    conn, notices = connect()
    pid = conn.info.backend_pid
    assert status(conn) is IDLE
    cur = conn.execute(tables.alter("a"))  # psycopg sends BEGIN first
    assert cur.statusmessage == "ALTER TABLE"
    assert status(conn) is INTRANS
    assert tables.column("a")  # applied already: before the COMMIT
    # The server is not in a transaction: each statement was its own implicit one.
    assert backend_state(admin, pid) == "idle"

    conn.execute(tables.alter("b"))
    assert status(conn) is INTRANS
    assert tables.column("b")

    cur = conn.execute(f"INSERT INTO {tables.log} VALUES (%s)", ["0001_initial"])  # extended
    assert cur.statusmessage == "INSERT 0 1"
    assert status(conn) is INTRANS
    assert tables.logged() == ["0001_initial"]
    assert backend_state(admin, pid) == "idle"

    conn.commit()
    assert status(conn) is IDLE
    assert (tables.column("a"), tables.column("b"), tables.logged()) == (
        True,
        True,
        ["0001_initial"],
    )
    assert not notices.of("WARNING"), notices


def test_f_an_error_in_the_middle(
    tables: Tables, connect: Callable[..., tuple[Conn, Notices]], admin: Conn
) -> None:
    conn, notices = connect()
    pid = conn.info.backend_pid
    conn.execute(tables.alter("a"))
    conn.execute(tables.insert("kept"))
    with pytest.raises(errors.DuplicateColumn):
        conn.execute(tables.alter("a"))
    assert status(conn) is INERROR
    failed = last_query(admin, pid)  # the guard's own restore of lock_timeout, here

    # Further statements fail in the proxy, simple and extended alike, and never reach it.
    with pytest.raises(errors.InFailedSqlTransaction):
        conn.execute(tables.insert("simple"))
    assert status(conn) is INERROR
    with pytest.raises(errors.InFailedSqlTransaction):
        conn.execute(f"INSERT INTO {tables.log} VALUES (%s)", ["extended"])
    with pytest.raises(errors.InFailedSqlTransaction):
        conn.execute(tables.alter("b"))
    assert status(conn) is INERROR
    assert last_query(admin, pid) == failed
    assert tables.logged() == ["kept"]
    assert not tables.column("b")

    conn.rollback()
    assert status(conn) is IDLE
    warnings = notices.of("WARNING")
    assert len(warnings) == 1, notices
    assert "2 statement(s) stay applied despite the rollback" in warnings[0]
    assert tables.alter("a") in warnings[0] and tables.insert("kept") in warnings[0]
    assert tables.column("a") and tables.logged() == ["kept"]  # the price of autocommit

    conn.execute("SELECT 1")  # a new transaction works
    assert status(conn) is INTRANS
    conn.commit()
    assert len(notices.of("WARNING")) == 1


def test_f_commit_after_an_error_answers_rollback(
    tables: Tables, connect: Callable[..., tuple[Conn, Notices]]
) -> None:
    conn, notices = connect(autocommit=True)
    conn.execute("BEGIN")
    conn.execute(tables.alter("a"))
    with pytest.raises(errors.DivisionByZero):
        conn.execute("SELECT 1/0")
    cur = conn.execute("COMMIT")
    assert cur.statusmessage == "ROLLBACK"
    assert status(conn) is IDLE
    assert any(tables.alter("a") in w for w in notices.of("WARNING")), notices


def one_query(client: WireClient, sql: str) -> list[Message]:
    """A simple Query's replies up to its ReadyForQuery, errors included; nothing follows."""
    client.send(b"Q" + (len(sql.encode()) + 5).to_bytes(4, "big") + sql.encode() + b"\0")
    replies = []
    while True:
        message = client.read_message()
        replies.append(message)
        if message[0] == BackendType.READY_FOR_QUERY:
            return replies


def summary(replies: list[Message]) -> list[str]:
    """Each reply in short: a tag, an error's SQLSTATE, a notice's severity, Z and status."""
    out = []
    for mtype, payload in replies:
        if mtype == BackendType.COMMAND_COMPLETE:
            out.append(payload.rstrip(b"\0").decode())
        elif mtype == BackendType.ERROR_RESPONSE:
            out.append("error " + str(dict(ErrorResponse.decode(payload).fields).get("C")))
        elif mtype == BackendType.NOTICE_RESPONSE:
            out.append("notice " + str(dict(ErrorResponse.decode(payload).fields).get("V")))
        elif mtype == BackendType.READY_FOR_QUERY:
            out.append("Z " + payload.decode())
        else:
            out.append(chr(mtype))
    return out


def test_f_one_query_one_ready_for_query(proxy: RunningProxy, tables: Tables) -> None:
    with WireClient(proxy.host, proxy.port) as client:
        client.startup(USER, options={"options": MIGRATE})
        client.read_until(BackendType.READY_FOR_QUERY)
        sql = "; ".join(
            ["BEGIN", tables.alter("a"), tables.alter("b"), tables.insert("f"), "COMMIT"]
        )
        assert summary(one_query(client, sql)) == [
            "BEGIN", "ALTER TABLE", "ALTER TABLE", "INSERT 0 1", "COMMIT", "Z I",
        ]  # fmt: skip
        assert summary(one_query(client, "SELECT 1")) == ["T", "D", "SELECT 1", "Z I"]

        sql = "; ".join(["BEGIN", tables.alter("c"), tables.alter("c"), tables.insert("x")])
        assert summary(one_query(client, sql)) == [
            "BEGIN", "ALTER TABLE", "error 42701", "Z E",
        ]  # fmt: skip
        assert summary(one_query(client, "SELECT 1; SELECT 2")) == ["error 25P02", "Z E"]
        assert summary(one_query(client, "ROLLBACK")) == ["notice WARNING", "ROLLBACK", "Z I"]
    assert tables.column("c") and tables.logged() == ["f"]


def test_a_plain_query_with_begin_after_its_first_statement(
    proxy: RunningProxy, tables: Tables, admin: Conn
) -> None:
    """Every statement of a Query is looked at, not only the first one."""
    with WireClient(proxy.host, proxy.port) as client:
        client.startup(USER, options={"options": MIGRATE})
        client.read_until(BackendType.READY_FOR_QUERY)
        pid = int(one_query(client, "SELECT pg_backend_pid()")[1][1][6:].decode())
        replies = one_query(client, f"SET application_name = 'x'; BEGIN; {tables.insert('p')}")
        assert summary(replies)[-3:] == ["BEGIN", "INSERT 0 1", "Z T"]
        assert backend_state(admin, pid) == "idle"  # no real transaction left open
        assert tables.logged() == ["p"]
        assert summary(one_query(client, "COMMIT")) == ["COMMIT", "Z I"]


def test_a_begin_after_a_comment_is_virtual(
    tables: Tables, connect: Callable[..., tuple[Conn, Notices]], admin: Conn
) -> None:
    conn, notices = connect(autocommit=True)
    conn.execute("/* django */ BEGIN")
    assert status(conn) is INTRANS
    conn.execute(tables.alter("a"))
    assert tables.column("a")
    assert backend_state(admin, conn.info.backend_pid) == "idle"
    conn.execute("-- done\nCOMMIT")
    assert status(conn) is IDLE
    assert not notices, notices


# --- psql -----------------------------------------------------------------------------------------


def psql(
    proxy: RunningProxy, *args: str, options: str = MIGRATE
) -> subprocess.CompletedProcess[str]:
    assert PSQL is not None
    env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
    env.update(
        PGHOST=proxy.host,
        PGPORT=str(proxy.port),
        PGUSER=USER,
        PGDATABASE="postgres",
        PGCONNECT_TIMEOUT="10",
        PGSSLMODE="disable",
        PGOPTIONS=options,
        LC_ALL="C",
    )
    return subprocess.run(
        [PSQL, "-X", "-At", *args], env=env, capture_output=True, text=True, timeout=30
    )


@needs_psql
def test_psql_multi_statement_command(proxy: RunningProxy, tables: Tables) -> None:
    sql = "; ".join(
        ["BEGIN", tables.alter("a"), tables.alter("b"), tables.insert("psql"), "COMMIT"]
    )
    done = psql(proxy, "-v", "ON_ERROR_STOP=1", "-c", sql)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert tables.column("a") and tables.column("b") and tables.logged() == ["psql"]

    sql = "; ".join(["BEGIN", tables.alter("c"), tables.alter("c"), tables.insert("no"), "COMMIT"])
    done = psql(proxy, "-v", "ON_ERROR_STOP=1", "-c", sql)
    assert done.returncode == 1
    assert 'column "c" of relation' in done.stderr and "already exists" in done.stderr
    assert tables.column("c")  # applied before the error: it stays
    assert tables.logged() == ["psql"]


@needs_psql
def test_psql_script_file(proxy: RunningProxy, tables: Tables, tmp_path: Path) -> None:
    script = tmp_path / "migrate.sql"
    script.write_text(
        "\\set ON_ERROR_STOP on\n"
        "BEGIN;\n"
        f"{tables.alter('a')};\n"
        f"{tables.alter('b')};\n"
        f"{tables.insert('0001')};\n"
        "COMMIT;\n"
    )
    done = psql(proxy, "-f", str(script))
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["BEGIN", "ALTER", "TABLE", "ALTER", "TABLE", "INSERT", "0",
                                   "1", "COMMIT"]  # fmt: skip
    assert tables.column("a") and tables.column("b") and tables.logged() == ["0001"]

    script.write_text(
        "\\set ON_ERROR_STOP on\n"
        "BEGIN;\n"
        f"{tables.alter('c')};\n"
        f"{tables.alter('c')};\n"
        f"{tables.insert('0002')};\n"
        "COMMIT;\n"
    )
    done = psql(proxy, "-f", str(script))
    assert done.returncode == 3, done.stderr
    assert "already exists" in done.stderr
    assert tables.column("c") and tables.logged() == ["0001"]


@needs_psql
def test_psql_script_without_on_error_stop(
    proxy: RunningProxy, tables: Tables, tmp_path: Path
) -> None:
    script = tmp_path / "migrate.sql"
    script.write_text(
        "BEGIN;\n"
        f"{tables.alter('a')};\n"
        f"{tables.alter('a')};\n"
        f"{tables.insert('never')};\n"
        "COMMIT;\n"
        "SELECT 'after';\n"
    )
    done = psql(proxy, "-f", str(script))
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["BEGIN", "ALTER TABLE", "ROLLBACK", "after"]
    errors_seen = [line for line in done.stderr.splitlines() if "ERROR" in line]
    assert len(errors_seen) == 2, done.stderr
    assert "already exists" in errors_seen[0]
    assert "current transaction is aborted" in errors_seen[1]
    assert "WARNING:  pgmigrate: autocommit session: 1 statement(s) stay applied" in done.stderr
    assert tables.column("a") and tables.logged() == []


# --- asyncpg --------------------------------------------------------------------------------------


def test_asyncpg_transactions(proxy: RunningProxy, pg: PgInfo, tables: Tables) -> None:
    async def main() -> None:
        conn = await asyncpg_connect(proxy, pg)
        try:
            async with conn.transaction():
                await conn.execute(tables.alter("a"))  # no arguments: a simple Query
                assert conn.is_in_transaction()
                assert tables.column("a")
                await conn.execute(f"INSERT INTO {tables.log} VALUES ($1)", "asyncpg")
                assert tables.logged() == ["asyncpg"]
                async with conn.transaction():  # a savepoint
                    await conn.execute(tables.alter("b"))
                with pytest.raises(asyncpg.DuplicateColumnError):
                    async with conn.transaction():
                        await conn.execute(tables.alter("b"))
                assert conn.is_in_transaction()
                assert await conn.fetchval("SELECT count(*) FROM " + tables.log) == 1
            assert not conn.is_in_transaction()

            with pytest.raises(asyncpg.DuplicateColumnError):
                async with conn.transaction():
                    await conn.execute(tables.alter("c"))
                    await conn.execute(tables.alter("c"))
            assert not conn.is_in_transaction()
            assert tables.column("c")
            async with conn.transaction():
                with pytest.raises(asyncpg.DivisionByZeroError):
                    await conn.execute("SELECT 1/0")
                with pytest.raises(asyncpg.InFailedSQLTransactionError):
                    await conn.execute(tables.insert("never"))
            # __aexit__ sent COMMIT: answered ROLLBACK, and the session goes on
            assert not conn.is_in_transaction()
            assert await conn.fetchval("SELECT 42") == 42
        finally:
            await conn.close()

    asyncio.run(asyncio.wait_for(main(), 30))
    assert tables.column("a") and tables.column("b") and tables.logged() == ["asyncpg"]


async def asyncpg_connect(proxy: RunningProxy, pg: PgInfo) -> Any:
    return await asyncpg.connect(
        host=proxy.host,
        port=proxy.port,
        user=USER,
        password=pg.password(USER),
        database="postgres",
        server_settings={"options": MIGRATE},
        timeout=10,
    )


FLUSH_BUG = (
    "BUG hold.py Holder._launch/_migration_unit: asyncpg prepares with Parse/Describe/Flush; "
    "a migration-session unit ending in Flush goes to the server raw, so MigrationRunner never "
    "records the statement's SQL (runner.prepared) and the later Bind/Execute/Sync is run with "
    "sql=None: not classified (no guard), not recognised as transaction control"
)


def test_asyncpg_prepared_begin_is_virtual(
    proxy: RunningProxy, pg: PgInfo, tables: Tables, admin: Conn
) -> None:
    async def main() -> tuple[bool, str]:
        conn = await asyncpg_connect(proxy, pg)
        try:
            await (await conn.prepare("BEGIN")).fetch()
            return conn.is_in_transaction(), backend_state(admin, conn.get_server_pid())
        finally:
            await conn.close()

    # Today: (False, "idle in transaction"): a real transaction the client does not see.
    assert asyncio.run(asyncio.wait_for(main(), 30)) == (True, "idle")


def test_asyncpg_fetch_of_a_ddl_is_guarded(
    proxy: RunningProxy, pg: PgInfo, tables: Tables, proxy_log: list[str]
) -> None:
    async def main() -> None:
        conn = await asyncpg_connect(proxy, pg)
        try:
            await conn.fetch(tables.alter("a"))  # prepared: Parse/Describe/Flush, then Bind
        finally:
            await conn.close()

    asyncio.run(asyncio.wait_for(main(), 30))
    assert tables.column("a")
    assert any("guard applied" in line and "ADD COLUMN a" in line for line in proxy_log)


# --- extended batches: psycopg pipeline mode ------------------------------------------------------


def test_pipeline_batches_run_statement_by_statement(
    tables: Tables, connect: Callable[..., tuple[Conn, Notices]], admin: Conn
) -> None:
    conn, notices = connect(autocommit=True)
    pid = conn.info.backend_pid
    for round_ in range(2):  # the second time the prepared statements are only bound
        with conn.pipeline():
            begin = conn.execute("BEGIN", prepare=True)
            alter = conn.execute(tables.alter(f"a{round_}"), prepare=True)
            insert = conn.execute(
                f"INSERT INTO {tables.log} VALUES (%s)", [f"p{round_}"], prepare=True
            )
        assert [begin.statusmessage, alter.statusmessage, insert.statusmessage] == [
            "BEGIN", "ALTER TABLE", "INSERT 0 1",
        ]  # fmt: skip
        assert status(conn) is INTRANS
        assert tables.column(f"a{round_}")  # applied, before the COMMIT
        assert f"p{round_}" in tables.logged()
        assert backend_state(admin, pid) == "idle"
        with conn.pipeline():
            commit = conn.execute("COMMIT", prepare=True)
        assert commit.statusmessage == "COMMIT"
        assert status(conn) is IDLE
    prepared = conn.execute("SELECT statement FROM pg_prepared_statements").fetchall()
    assert not [s for (s,) in prepared if s in ("BEGIN", "COMMIT")]  # answered, never sent
    assert not notices, notices


def test_pipeline_with_an_error(
    tables: Tables, connect: Callable[..., tuple[Conn, Notices]]
) -> None:
    conn, notices = connect(autocommit=True)
    with pytest.raises(errors.DuplicateColumn), conn.pipeline():
        conn.execute("BEGIN", prepare=True)
        conn.execute(tables.alter("a"), prepare=True)
        conn.execute(tables.alter("a"), prepare=True)
        conn.execute(f"INSERT INTO {tables.log} VALUES (%s)", ["skipped"], prepare=True)
    assert status(conn) is INERROR
    with pytest.raises(errors.InFailedSqlTransaction), conn.pipeline():
        conn.execute(f"INSERT INTO {tables.log} VALUES (%s)", ["failed"], prepare=True)
    with conn.pipeline():
        rollback = conn.execute("ROLLBACK", prepare=True)
    assert rollback.statusmessage == "ROLLBACK"
    assert status(conn) is IDLE
    assert any(tables.alter("a") in w for w in notices.of("WARNING")), notices
    assert tables.column("a") and tables.logged() == []


def test_pipeline_release_of_an_unknown_savepoint_fails_the_block(
    connect: Callable[..., tuple[Conn, Notices]],
) -> None:
    conn, _ = connect(autocommit=True)
    conn.execute("BEGIN")
    with pytest.raises(errors.InvalidSavepointSpecification), conn.pipeline():
        conn.execute("RELEASE SAVEPOINT nope", prepare=True)
    assert status(conn) is INERROR  # as PostgreSQL: any error fails the block
    conn.execute("ROLLBACK")
    assert status(conn) is IDLE


def test_pipeline_set_local_and_atomic(
    tables: Tables, connect: Callable[..., tuple[Conn, Notices]], admin: Conn
) -> None:
    """SET LOCAL and pgmigrate.atomic sent as extended batches do what they do in a Query."""
    conn, _ = connect(autocommit=True)
    pid = conn.info.backend_pid
    conn.execute("SET lock_timeout = '7s'")
    conn.execute("BEGIN")
    with conn.pipeline():
        set_local = conn.execute("SET LOCAL lock_timeout = '1234ms'", prepare=True)
        conn.execute("SET pgmigrate.atomic = on", prepare=True)
        conn.execute(tables.insert("r1"), prepare=True)
    assert set_local.statusmessage == "SET"
    assert show(conn, "lock_timeout") == "1234ms"
    assert backend_state(admin, pid) == "idle in transaction"  # the stretch: a real one
    assert tables.logged() == []
    with conn.pipeline():
        conn.execute("SET pgmigrate.atomic = off", prepare=True)
    assert backend_state(admin, pid) == "idle"
    assert tables.logged() == ["r1"]
    with conn.pipeline():
        conn.execute("COMMIT", prepare=True)
    assert status(conn) is IDLE
    assert show(conn, "lock_timeout") == "7s"


def test_auto_prepared_atomic_switch_still_opens_a_real_transaction(
    tables: Tables, connect: Callable[..., tuple[Conn, Notices]], admin: Conn
) -> None:
    """psycopg prepares a statement run prepare_threshold times: from then on it comes as an
    extended batch (Bind/Execute only), as Django's server-side binding would send it."""
    conn, _ = connect(autocommit=True)
    conn.prepare_threshold = 1
    pid = conn.info.backend_pid
    for round_ in range(3):
        conn.execute("BEGIN")
        conn.execute("SET pgmigrate.atomic = on")
        conn.execute(tables.insert(f"r{round_}"))
        assert backend_state(admin, pid) == "idle in transaction", round_
        assert tables.logged() == [f"r{i}" for i in range(round_)]
        conn.execute("SET pgmigrate.atomic = off")
        conn.execute("COMMIT")
        assert status(conn) is IDLE
    assert tables.logged() == ["r0", "r1", "r2"]
    # ("SET pgmigrate.atomic ..." was prepared on the client side only: the proxy answered its
    # Parse, so pg_prepared_statements does not show it.)


def test_pipeline_with_a_flush_in_the_middle(
    tables: Tables, connect: Callable[..., tuple[Conn, Notices]], admin: Conn
) -> None:
    conn, notices = connect(autocommit=True)
    pid = conn.info.backend_pid
    with conn.pipeline():
        conn.execute("BEGIN")
        conn.execute(tables.alter("a"))
        assert conn.execute("SELECT 1").fetchone() == (1,)  # psycopg sends Flush, not Sync
        conn.execute("COMMIT")
    assert status(conn) is IDLE
    assert not notices, notices
    assert backend_state(admin, pid) == "idle"
    assert tables.column("a")


# --- savepoints (Django nests atomic blocks with them) --------------------------------------------


def test_savepoints_django_style(
    tables: Tables, connect: Callable[..., tuple[Conn, Notices]]
) -> None:
    conn, notices = connect()
    conn.execute(tables.alter("a"))  # BEGIN first
    conn.execute('SAVEPOINT "s139_x1"')
    conn.execute(tables.alter("b"))
    conn.execute('RELEASE SAVEPOINT "s139_x1"')
    assert status(conn) is INTRANS
    conn.execute('SAVEPOINT "s139_x2"')
    with pytest.raises(errors.DuplicateColumn):
        conn.execute(tables.alter("b"))
    assert status(conn) is INERROR
    cur = conn.execute('ROLLBACK TO SAVEPOINT "s139_x2"')
    assert cur.statusmessage == "ROLLBACK"
    assert status(conn) is INTRANS  # recovered, as PostgreSQL would
    warnings = notices.of("WARNING")
    assert len(warnings) == 1 and tables.alter("b") in warnings[0], notices
    conn.execute('RELEASE SAVEPOINT "s139_x2"')
    conn.execute(tables.insert("0002"))
    with pytest.raises(errors.InvalidSavepointSpecification):
        conn.execute('RELEASE SAVEPOINT "s139_x2"')  # released already
    assert status(conn) is INERROR
    conn.rollback()
    assert tables.column("a") and tables.column("b") and tables.logged() == ["0002"]


def test_savepoints_psycopg_nested_transactions(
    tables: Tables, connect: Callable[..., tuple[Conn, Notices]]
) -> None:
    conn, _ = connect(autocommit=True)
    with conn.transaction():  # BEGIN
        conn.execute(tables.alter("a"))
        with conn.transaction():  # SAVEPOINT "_pg3_1"
            conn.execute(tables.alter("b"))
        with pytest.raises(errors.DuplicateColumn), conn.transaction():
            conn.execute(tables.insert("in-savepoint"))
            conn.execute(tables.alter("b"))
        # psycopg sent "ROLLBACK TO SAVEPOINT ...; RELEASE SAVEPOINT ..." as one Query
        assert status(conn) is INTRANS
        conn.execute(tables.insert("after"))
    assert status(conn) is IDLE
    assert tables.column("a") and tables.column("b")
    assert tables.logged() == ["after", "in-savepoint"]  # applied: autocommit


def test_savepoint_outside_a_transaction(connect: Callable[..., tuple[Conn, Notices]]) -> None:
    conn, _ = connect(autocommit=True)
    with pytest.raises(errors.NoActiveSqlTransaction):
        conn.execute("SAVEPOINT a")
    with pytest.raises(errors.NoActiveSqlTransaction):
        conn.execute("ROLLBACK TO SAVEPOINT a")
    assert status(conn) is IDLE


# --- SET LOCAL ------------------------------------------------------------------------------------


def show(conn: Conn, setting: str) -> str:
    row = conn.execute(f"SHOW {setting}").fetchone()
    assert row is not None
    return str(row[0])


@pytest.mark.parametrize("end", ["COMMIT", "ROLLBACK"])
def test_set_local_lasts_until_the_end_of_the_block(
    tables: Tables, connect: Callable[..., tuple[Conn, Notices]], end: str
) -> None:
    conn, _ = connect(autocommit=True)
    conn.execute("SET lock_timeout = '7s'")
    before_path = show(conn, "search_path")
    conn.execute("BEGIN")
    conn.execute("SET LOCAL lock_timeout = '1234ms'")
    conn.execute(f"SET LOCAL search_path = {tables.schema}, public")
    assert show(conn, "lock_timeout") == "1234ms"  # in the next implicit transactions too
    # Resolved with the session's search_path: the schema's table, not public's.
    conn.execute(f"ALTER TABLE {tables.name} ADD COLUMN s int")
    assert tables.column("s", schema=tables.schema) and not tables.column("s")
    assert show(conn, "lock_timeout") == "1234ms"  # the guard put it back after its attempt
    conn.execute(end)
    assert status(conn) is IDLE
    assert show(conn, "lock_timeout") == "7s"
    assert show(conn, "search_path") == before_path


def test_set_local_outside_a_block_is_postgresql_s(
    connect: Callable[..., tuple[Conn, Notices]],
) -> None:
    conn, notices = connect(autocommit=True)
    conn.execute("SET LOCAL lock_timeout = '5s'")  # lasts for its own implicit transaction
    assert show(conn, "lock_timeout") == "0"
    assert any("SET LOCAL can only be used in transaction blocks" in w
               for w in notices.of("WARNING")), notices  # fmt: skip


# --- pgmigrate.atomic -----------------------------------------------------------------------------


def test_atomic_stretch_runs_in_a_real_transaction(
    tables: Tables, connect: Callable[..., tuple[Conn, Notices]], admin: Conn
) -> None:
    conn, notices = connect()
    pid = conn.info.backend_pid
    conn.execute(tables.alter("a"))
    assert tables.column("a")
    conn.execute("SET pgmigrate.atomic = on")
    assert status(conn) is INTRANS
    conn.execute(tables.insert("r1"))
    conn.execute(tables.insert("r2"))
    assert backend_state(admin, pid) == "idle in transaction"  # a real one
    assert tables.logged() == []  # not yet visible
    conn.execute("SET pgmigrate.atomic = off")
    assert status(conn) is INTRANS
    assert backend_state(admin, pid) == "idle"
    assert tables.logged() == ["r1", "r2"]
    conn.execute(tables.alter("b"))
    assert tables.column("b")
    conn.commit()
    assert status(conn) is IDLE
    assert not notices, notices


def test_atomic_stretch_error_rolls_it_all_back(
    tables: Tables, connect: Callable[..., tuple[Conn, Notices]]
) -> None:
    conn, _ = connect()
    conn.execute(tables.alter("a"))
    conn.execute("SET pgmigrate.atomic = on")
    conn.execute(tables.insert("r1"))
    conn.execute(tables.alter("b"))
    with pytest.raises(errors.DuplicateColumn):
        conn.execute(tables.alter("b"))
    assert status(conn) is INERROR
    with pytest.raises(errors.InFailedSqlTransaction):
        conn.execute(tables.insert("r2"))
    assert status(conn) is INERROR
    conn.rollback()
    assert status(conn) is IDLE
    assert tables.column("a")  # before the stretch: applied
    assert not tables.column("b") and tables.logged() == []  # the stretch: rolled back
    conn.execute(tables.insert("again"))  # the session goes on
    conn.commit()
    assert tables.logged() == ["again"]


def test_atomic_off_after_an_error_does_not_hide_it(
    tables: Tables, connect: Callable[..., tuple[Conn, Notices]]
) -> None:
    conn, _ = connect()
    conn.execute("SET pgmigrate.atomic = on")  # BEGIN first
    conn.execute(tables.insert("r1"))
    with pytest.raises(errors.DivisionByZero):
        conn.execute("SELECT 1/0")
    with pytest.raises(errors.InFailedSqlTransaction):
        conn.execute("SET pgmigrate.atomic = off")
    assert status(conn) is INERROR
    conn.rollback()
    assert status(conn) is IDLE
    assert tables.logged() == []


@pytest.mark.parametrize("end", ["COMMIT", "ROLLBACK"])
def test_atomic_stretch_ending_the_block(
    tables: Tables, connect: Callable[..., tuple[Conn, Notices]], end: str
) -> None:
    """COMMIT or ROLLBACK inside the stretch ends the real transaction and the client's block:
    SET LOCAL values come back, a rollback names what was applied before the stretch."""
    conn, notices = connect(autocommit=True)
    conn.execute("SET lock_timeout = '7s'")
    conn.execute("BEGIN")
    conn.execute("SET LOCAL lock_timeout = '1234ms'")
    conn.execute(tables.alter("a"))
    conn.execute("SET pgmigrate.atomic = on")
    conn.execute(tables.insert("r1"))
    conn.execute(end)
    assert status(conn) is IDLE
    assert show(conn, "lock_timeout") == "7s"
    warnings = notices.of("WARNING")
    if end == "ROLLBACK":
        assert len(warnings) == 1 and tables.alter("a") in warnings[0], notices
        assert tables.logged() == []
    else:
        assert warnings == [] and tables.logged() == ["r1"]
    assert tables.column("a")


# --- statements that cannot run in a transaction block --------------------------------------------


def test_concurrently_and_vacuum_inside_a_block(
    tables: Tables, connect: Callable[..., tuple[Conn, Notices]], admin: Conn
) -> None:
    conn, _ = connect()
    conn.execute(tables.alter("a"))  # BEGIN first
    table = f"{tables.schema}.{tables.name}"  # u_trust may create relations there
    conn.execute(f"CREATE INDEX CONCURRENTLY {tables.name}_i ON {table} (id)")
    row = admin.execute(
        "SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass(%s)",
        [f"{tables.schema}.{tables.name}_i"],
    ).fetchone()
    assert row == (True,)  # built and valid, before the COMMIT
    conn.execute(f"VACUUM {table}")
    conn.execute(f"DROP INDEX CONCURRENTLY {tables.schema}.{tables.name}_i")
    assert status(conn) is INTRANS
    conn.commit()
    assert status(conn) is IDLE


# --- which sessions are migration sessions ------------------------------------------------------


def test_application_name_pattern_marks_sessions(
    proxy_factory: ProxyFactory,
    tables: Tables,
    connect: Callable[..., tuple[Conn, Notices]],
) -> None:
    proxy = proxy_factory(migration_application_names=("migrate*",))
    conn, _ = connect(through=proxy, options="", application_name="migrate-0042")
    conn.execute(tables.alter("a"))
    assert tables.column("a")  # autocommit semantics: visible before the COMMIT
    conn.commit()

    app, _ = connect(through=proxy, options="", application_name="web")
    app.execute(tables.alter("b"))
    assert not tables.column("b")  # a real transaction
    app.commit()
    assert tables.column("b")

    # An explicit role in the options wins over the pattern.
    other, _ = connect(through=proxy, options="-c pgmigrate.role=app", application_name="migrate-x")
    other.execute(tables.alter("c"))
    assert not tables.column("c")
    other.rollback()
    assert not tables.column("c")


def test_a_normal_session_keeps_real_transactions(
    tables: Tables, connect: Callable[..., tuple[Conn, Notices]], admin: Conn
) -> None:
    conn, notices = connect(options="")
    pid = conn.info.backend_pid
    conn.execute(tables.alter("a"))
    assert status(conn) is INTRANS
    assert not tables.column("a")  # not before the COMMIT
    assert backend_state(admin, pid) == "idle in transaction"
    with pytest.raises(errors.DuplicateColumn):
        conn.execute(tables.alter("a"))
    assert status(conn) is INERROR
    conn.rollback()
    assert not tables.column("a")  # all or nothing
    conn.execute(tables.alter("b"))
    conn.commit()
    assert tables.column("b")
    assert not notices, notices


# --- the guard, one statement at a time -----------------------------------------------------------


def test_guard_retries_a_blocked_alter_inside_a_block(
    proxy_factory: ProxyFactory,
    tables: Tables,
    connect: Callable[..., tuple[Conn, Notices]],
    pg: PgInfo,
) -> None:
    proxy = proxy_factory(blocking_action="none", lock_budget=3.0)
    with pg.connect(application_name="blocker", connect_timeout="10") as blocker:
        blocker.execute("BEGIN")
        blocker.execute(f"SELECT count(*) FROM {tables.name}")
        committed = threading.Event()

        def commit() -> None:
            blocker.execute("COMMIT")
            committed.set()

        ends = threading.Timer(1.0, commit)
        conn, notices = connect(through=proxy)
        conn.execute("SELECT 1")  # BEGIN first
        ends.start()
        try:
            conn.execute(tables.alter("a"))
            # it got its lock only once the blocker was gone (retried, not waited in the queue)
            assert committed.is_set()
        finally:
            ends.join()
    assert tables.column("a")
    assert any("retrying" in n for n in notices.of("NOTICE")), notices
    conn.execute(tables.insert("guarded"))
    conn.commit()
    assert status(conn) is IDLE
    assert tables.logged() == ["guarded"]


def test_guard_terminates_a_blocker_inside_a_block(
    tables: Tables, connect: Callable[..., tuple[Conn, Notices]], pg: PgInfo
) -> None:
    with pg.connect(application_name="blocker", connect_timeout="10") as blocker:
        blocker.execute("BEGIN")
        blocker.execute(f"SELECT count(*) FROM {tables.name}")
        blocker_pid = blocker.info.backend_pid
        conn, notices = connect()
        conn.execute(tables.alter("a"))  # inside BEGIN
        with pytest.raises(errors.AdminShutdown):
            blocker.execute("SELECT 1")
    assert any(f"terminated pid {blocker_pid}" in w for w in notices.of("WARNING")), notices
    assert status(conn) is INTRANS and tables.column("a")
    conn.commit()


# --- COPY -----------------------------------------------------------------------------------------


def test_copy_from_stdin_in_a_migration_session(
    tables: Tables, connect: Callable[..., tuple[Conn, Notices]]
) -> None:
    conn, _ = connect()
    conn.execute(tables.alter("a"))  # BEGIN first
    with conn.cursor().copy(f"COPY {tables.log} (name) FROM STDIN") as copy:
        for i in range(1000):
            copy.write_row([f"row{i:04}"])
    assert status(conn) is INTRANS
    assert len(tables.logged()) == 1000  # applied
    conn.execute(tables.insert("zz"))
    conn.commit()
    assert status(conn) is IDLE
    assert len(tables.logged()) == 1001


def test_copy_in_a_failed_block_is_refused(
    tables: Tables, connect: Callable[..., tuple[Conn, Notices]]
) -> None:
    conn, _ = connect()
    with pytest.raises(errors.DivisionByZero):
        conn.execute("SELECT 1/0")
    try:
        with conn.cursor().copy(f"COPY {tables.log} (name) FROM STDIN") as copy:
            copy.write_row(["in-failed-block"])
    except errors.InFailedSqlTransaction:
        pass
    assert tables.logged() == []
    assert status(conn) is INERROR


def test_a_failed_copy_fails_the_block(
    tables: Tables, connect: Callable[..., tuple[Conn, Notices]]
) -> None:
    conn, _ = connect()
    conn.execute(tables.alter("a"))  # BEGIN first
    with (
        pytest.raises(errors.BadCopyFileFormat),
        conn.cursor().copy(f"COPY {tables.log} (name) FROM STDIN") as copy,
    ):
        copy.write(b"too\tmany\n")
    assert status(conn) is INERROR
