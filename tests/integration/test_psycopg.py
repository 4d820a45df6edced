"""psycopg 3 through the proxy: sync and async, pipelines, COPY, notifications, cancel, cursors,
prepared statements, large values, multi-statement queries and transaction status."""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from pgmigrate_proxy import __version__
from psycopg import errors, pq
from psycopg.rows import TupleRow

from tests.fixtures.postgres import PgInfo
from tests.fixtures.proxy import RunningProxy
from tests.integration.probes import active_query_pid, session_status, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

Conn = psycopg.Connection[TupleRow]
BIG = 17 * 1024 * 1024  # above libpq's and the proxy's 16 MB thresholds of interest


def connect(proxy: RunningProxy, user: str = "u_trust", **kwargs: Any) -> Conn:
    return psycopg.connect(proxy.conninfo(user, connect_timeout="10"), **kwargs)


@pytest.fixture
def conn(proxy: RunningProxy) -> Iterator[Conn]:
    """An autocommit psycopg connection through the proxy as u_trust."""
    with connect(proxy, autocommit=True) as conn:
        yield conn


def test_connection_identifies_proxy_and_server_pid(conn: Conn) -> None:
    assert conn.info.parameter_status("pgmigrate_proxy") == __version__
    assert conn.info.parameter_status("server_version")
    row = conn.execute("SELECT pg_backend_pid(), current_user").fetchone()
    assert row == (conn.info.backend_pid, "u_trust")


def test_async_connections(proxy: RunningProxy) -> None:
    async def one(n: int) -> list[int]:
        conninfo = proxy.conninfo("u_trust", connect_timeout="10")
        async with await psycopg.AsyncConnection.connect(conninfo) as aconn:
            assert aconn.info.parameter_status("pgmigrate_proxy") == __version__
            async with aconn.transaction():
                cur = await aconn.execute("SELECT g * %s FROM generate_series(1, 100) g", [n])
                rows = await cur.fetchall()
            assert aconn.info.transaction_status is pq.TransactionStatus.IDLE
            return [row[0] for row in rows]

    async def main() -> list[list[int]]:
        return await asyncio.gather(*(one(n) for n in range(1, 6)))

    results = asyncio.run(asyncio.wait_for(main(), 30))
    assert [sum(r) for r in results] == [5050 * n for n in range(1, 6)]


def txstatus(conn: Conn) -> pq.TransactionStatus:
    """libpq's idea of the transaction status (from the last ReadyForQuery relayed)."""
    return conn.info.transaction_status


def test_transaction_status_is_tracked(proxy: RunningProxy) -> None:
    with connect(proxy) as conn:
        status = pq.TransactionStatus
        assert txstatus(conn) is status.IDLE
        assert session_status(proxy) == "I"
        conn.execute("SELECT 1")
        assert txstatus(conn) is status.INTRANS
        assert session_status(proxy) == "T"
        with pytest.raises(errors.DivisionByZero):
            conn.execute("SELECT 1/0")
        assert txstatus(conn) is status.INERROR
        assert session_status(proxy) == "E"
        with pytest.raises(errors.InFailedSqlTransaction):
            conn.execute("SELECT 1")
        conn.rollback()
        assert txstatus(conn) is status.IDLE
        assert session_status(proxy) == "I"
        with conn.transaction():
            conn.execute("CREATE TEMP TABLE tx (x int)")
            conn.execute("INSERT INTO tx VALUES (1)")
        conn.commit()
        assert conn.execute("SELECT count(*) FROM tx").fetchone() == (1,)


def test_multi_statement_simple_query(conn: Conn) -> None:
    cur = conn.cursor()
    cur.execute(
        "CREATE TEMP TABLE ms (x int); INSERT INTO ms VALUES (1), (2), (3);"
        " SELECT x FROM ms ORDER BY x; SELECT 'done'"
    )
    statuses, rows = [], []
    while True:
        statuses.append(cur.statusmessage)
        rows.append(cur.fetchall() if cur.description else None)
        if not cur.nextset():
            break
    assert statuses == ["CREATE TABLE", "INSERT 0 3", "SELECT 3", "SELECT 1"]
    assert rows[2:] == [[(1,), (2,), (3,)], [("done",)]]

    with pytest.raises(errors.DivisionByZero):
        conn.execute("INSERT INTO ms VALUES (4); SELECT 1/0; INSERT INTO ms VALUES (5)")
    assert conn.info.transaction_status is pq.TransactionStatus.IDLE
    # one implicit transaction: the error rolled back the statement before it too
    assert conn.execute("SELECT count(*) FROM ms").fetchone() == (3,)


def test_pipeline_with_an_error_in_the_middle(conn: Conn) -> None:
    conn.execute("CREATE TEMP TABLE pl (x int)")
    with conn.pipeline() as pipeline:
        cursors = [conn.execute("SELECT %s::int * 2", [i]) for i in range(200)]
        pipeline.sync()
        assert [c.fetchone() for c in cursors] == [(i * 2,) for i in range(200)]

    with pytest.raises(errors.DivisionByZero), conn.pipeline() as pipeline:
        conn.execute("INSERT INTO pl VALUES (1)")
        pipeline.sync()  # committed on its own
        conn.execute("INSERT INTO pl VALUES (2)")
        conn.execute("SELECT 1/0")
        conn.execute("INSERT INTO pl VALUES (3)")  # skipped by the server: aborted pipeline
        pipeline.sync()
    assert conn.info.transaction_status is pq.TransactionStatus.IDLE
    assert conn.execute("SELECT array_agg(x ORDER BY x) FROM pl").fetchone() == ([1],)

    with conn.pipeline():  # and the connection pipelines again
        inserted = conn.execute("INSERT INTO pl VALUES (4) RETURNING x")
        counted = conn.execute("SELECT count(*) FROM pl")
    assert inserted.fetchone() == (4,)
    assert counted.fetchone() == (2,)


def test_copy_from_stdin_and_to_stdout(conn: Conn) -> None:
    conn.execute("CREATE TEMP TABLE cp (id int, body text)")
    rows = [(i, uuid.UUID(int=i * 7919).hex * 6) for i in range(25_000)]  # ~5 MB of text
    sent = hashlib.sha256()
    with conn.cursor().copy("COPY cp (id, body) FROM STDIN") as copy:
        for i, body in rows:
            line = f"{i}\t{body}\n".encode()
            sent.update(line)
            copy.write(line)
    assert conn.execute("SELECT count(*), sum(length(body)) FROM cp").fetchone() == (
        len(rows),
        sum(len(body) for _, body in rows),
    )
    received = hashlib.sha256()
    size = 0
    with conn.cursor().copy("COPY (SELECT id, body FROM cp ORDER BY id) TO STDOUT") as copy:
        for block in copy:
            received.update(block)
            size += len(block)
    assert size > 4_000_000
    assert received.hexdigest() == sent.hexdigest()


def test_values_over_16_mb_both_ways(conn: Conn) -> None:
    blob = os.urandom(BIG)
    row = conn.execute("SELECT length(%b), md5(%b)", [blob, blob]).fetchone()
    assert row == (BIG, hashlib.md5(blob).hexdigest())
    echoed = conn.execute("SELECT %b::bytea", [blob], binary=True).fetchone()
    assert echoed is not None and echoed[0] == blob
    text = conn.execute("SELECT repeat('ab', %s)", [BIG // 2]).fetchone()
    assert text is not None and text[0] == "ab" * (BIG // 2)


def test_listen_notify(proxy: RunningProxy, conn: Conn, admin: psycopg.Connection[Any]) -> None:
    conn.execute("LISTEN pgm_it")
    admin.execute("NOTIFY pgm_it, 'direct'")
    with connect(proxy, autocommit=True) as other:
        other.execute("SELECT pg_notify('pgm_it', 'proxied')")
        other_pid = other.info.backend_pid
    notes = list(conn.notifies(timeout=10, stop_after=2))
    assert [(n.channel, n.payload, n.pid) for n in notes] == [
        ("pgm_it", "direct", admin.info.backend_pid),
        ("pgm_it", "proxied", other_pid),
    ]


#: Run in a child process: psycopg's C implementation of cancel() blocks in PQcancel holding
#: the GIL, which would starve the in-process proxy that has to relay the CancelRequest.
CANCEL_CLIENT = """
import sys, threading, time, psycopg
conn = psycopg.connect(sys.argv[1], autocommit=True)
outcome = []
def run():
    try:
        conn.execute("SELECT pg_sleep(30)")
        outcome.append("finished")
    except psycopg.Error as exc:
        outcome.append(type(exc).__name__)
worker = threading.Thread(target=run)
worker.start()
sys.stdin.readline()  # the parent saw the statement running
started = time.monotonic()
getattr(conn, sys.argv[2])()
worker.join(20)
print(outcome[0] if outcome else "still-running", time.monotonic() - started)
print(conn.info.backend_pid, conn.execute("SELECT pg_backend_pid()").fetchone()[0])
"""


@pytest.mark.parametrize("method", ["cancel", "cancel_safe"])
def test_cancel_stops_a_running_statement(
    proxy: RunningProxy, admin: psycopg.Connection[Any], method: str
) -> None:
    app = f"pgm-cancel-{method}"
    conninfo = proxy.conninfo("u_trust", connect_timeout="10", application_name=app)
    with subprocess.Popen(
        [sys.executable, "-c", CANCEL_CLIENT, conninfo, method],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as child:
        try:
            pid = wait_until(lambda: active_query_pid(admin, app), "pg_sleep to be running")
            out, err = child.communicate("go\n", timeout=25)
        finally:
            child.kill()
    assert child.returncode == 0, err
    (outcome, elapsed), pids = (line.split() for line in out.splitlines())
    assert outcome == "QueryCanceled", out + err
    assert float(elapsed) < 5, f"cancel took {elapsed} s"
    assert pids == [str(pid), str(pid)]  # conn.info.backend_pid == pg_backend_pid()


def test_server_side_cursors(proxy: RunningProxy) -> None:
    with connect(proxy) as conn:
        with conn.cursor("pgm_named") as cur:
            cur.itersize = 100
            cur.execute("SELECT g FROM generate_series(1, 10000) g")
            assert cur.fetchmany(5) == [(1,), (2,), (3,), (4,), (5,)]
            open_cursors = conn.execute("SELECT name FROM pg_cursors").fetchall()
            assert ("pgm_named",) in open_cursors
            assert sum(row[0] for row in cur) == sum(range(6, 10001))
        conn.commit()
        with conn.cursor("pgm_held", withhold=True, scrollable=True) as held:
            held.execute("SELECT g FROM generate_series(1, 50) g")
            conn.commit()  # a WITH HOLD cursor survives the commit
            held.scroll(40, mode="absolute")
            assert held.fetchone() == (41,)


def test_prepared_statements(proxy: RunningProxy, conn: Conn) -> None:
    query = "SELECT %s::int + 1"
    for i in range(3):
        assert conn.execute(query, [i], prepare=True).fetchone() == (i + 1,)
    named = conn.execute(
        "SELECT count(*) FROM pg_prepared_statements WHERE statement LIKE 'SELECT $1::int + 1'"
    ).fetchone()
    assert named == (1,)

    with connect(proxy, autocommit=True, prepare_threshold=0) as eager:
        for i in range(3):
            assert eager.execute("SELECT %s::text || 'x'", [str(i)]).fetchone() == (f"{i}x",)
        names = eager.execute("SELECT name FROM pg_prepared_statements").fetchall()
        assert any(name.startswith("_pg3_") for (name,) in names), names


def test_login_as_superuser_sees_server_state(proxy: RunningProxy, pg: PgInfo) -> None:
    with connect(proxy, pg.superuser, autocommit=True) as conn:
        clients = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE pid = pg_backend_pid()"
            " AND client_addr = '127.0.0.1'"
        ).fetchone()
        assert clients == (1,)
