"""A proxy-managed prepared statement whose table changed behind the proxy's back (DDL run
directly on PostgreSQL, so no invalidation): its Bind fails with 0A000 "cached plan must not
change result type"; in an implicit transaction, before any row reached the client, the proxy
prepares it again and retries once, transparently; inside a transaction block the client gets
the error, as PostgreSQL would give it."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable, Iterator
from typing import Any

import asyncpg
import psycopg
import pytest
from pgmigrate_proxy.protocol.extended import data_row
from pgmigrate_proxy.protocol.framing import frame
from pgmigrate_proxy.protocol.types import BackendType, FrontendType

from tests.fixtures.postgres import PgInfo
from tests.fixtures.proxy import RunningProxy
from tests.fixtures.tunnel import Direction, Tunnel
from tests.integration.probes import wait_until
from tests.integration.wire import WireClient

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

Factory = Callable[..., RunningProxy]
USER = "u_trust"
QUERY = "SELECT * FROM retry_t WHERE id = %s"
QUERY_1 = b"SELECT * FROM retry_t WHERE id = $1"


@pytest.fixture
def table(admin: psycopg.Connection[Any]) -> Iterator[str]:
    admin.execute("DROP TABLE IF EXISTS retry_t")
    admin.execute("CREATE TABLE retry_t (id int PRIMARY KEY, v int)")
    admin.execute("INSERT INTO retry_t VALUES (1, 10), (2, 20)")
    admin.execute("ALTER TABLE retry_t OWNER TO u_trust")
    yield "retry_t"
    admin.execute("DROP TABLE IF EXISTS retry_t")


def pooled(proxy_factory: Factory, size: int = 1) -> RunningProxy:
    return proxy_factory(pool_mode="transaction", default_pool_size=size)


def connect(proxy: RunningProxy) -> psycopg.Connection[Any]:
    conn = psycopg.connect(proxy.conninfo(USER, connect_timeout="10"), autocommit=True)
    conn.prepare_threshold = 0  # every statement prepared (a named Parse), from the first
    return conn


def alter_directly(admin: psycopg.Connection[Any], new_type: str = "text") -> None:
    """The column's type changed on PostgreSQL itself: the proxy's guard never sees it."""
    admin.execute(f"ALTER TABLE retry_t ALTER COLUMN v TYPE {new_type}")


def test_psycopg_statement_retried_after_direct_ddl(
    proxy_factory: Factory, admin: psycopg.Connection[Any], table: str
) -> None:
    proxy = pooled(proxy_factory)
    conn = connect(proxy)
    assert conn.execute(QUERY, [1]).fetchone() == (1, 10)
    alter_directly(admin)
    assert conn.execute(QUERY, [1]).fetchone() == (1, "10")  # (main: 0A000)
    assert conn.execute(QUERY, [2]).fetchone() == (2, "20")
    # a second change, once more retried (the retry is once per failure, not once per name)
    alter_directly(admin, "bigint USING v::bigint")
    assert conn.execute(QUERY, [2]).fetchone() == (2, 20)
    assert conn.pgconn.transaction_status == psycopg.pq.TransactionStatus.IDLE
    # another client's copy of the statement, on the same server: prepared again already
    other = connect(proxy)
    assert other.execute(QUERY, [1]).fetchone() == (1, 10)
    names = conn.execute("SELECT name FROM pg_prepared_statements").fetchall()
    assert all(name.startswith("PGMIGRATE_") for (name,) in names), names
    for c in (conn, other):
        c.close()


def test_psycopg_error_kept_inside_a_transaction_block(
    proxy_factory: Factory, admin: psycopg.Connection[Any], table: str
) -> None:
    proxy = pooled(proxy_factory)
    conn = connect(proxy)
    assert conn.execute(QUERY, [1]).fetchone() == (1, 10)
    alter_directly(admin)
    with (
        pytest.raises(psycopg.errors.FeatureNotSupported, match="cached plan"),
        conn.transaction(),
    ):
        conn.execute(QUERY, [1])
    # the transaction rolled back (psycopg deallocates its statements after a ROLLBACK: the
    # proxy's are dropped on that server) and the statement runs again
    assert conn.pgconn.transaction_status == psycopg.pq.TransactionStatus.IDLE
    assert conn.execute(QUERY, [1]).fetchone() == (1, "10")
    conn.close()


def _parse(name: bytes, sql: bytes) -> bytes:
    return frame(FrontendType.PARSE, name + b"\0" + sql + b"\0" + struct.pack("!h", 0))


def _bind_describe_execute(name: bytes, value: bytes) -> bytes:
    params = struct.pack("!hhi", 0, 1, len(value)) + value + struct.pack("!h", 0)
    return (
        frame(FrontendType.BIND, b"\0" + name + b"\0" + params)
        + frame(FrontendType.DESCRIBE, b"P\0")
        + frame(FrontendType.EXECUTE, b"\0" + struct.pack("!i", 0))
    )


SYNC = frame(FrontendType.SYNC)


def _rows(messages: list[tuple[int, bytes]]) -> list[tuple[str | None, ...]]:
    return [data_row(p) for t, p in messages if t == BackendType.DATA_ROW]


def test_batch_of_two_statements_resent_whole_or_error_after_rows(
    proxy_factory: Factory, admin: psycopg.Connection[Any], table: str
) -> None:
    """One batch, two mapped statements, the stale one first: both resent, each result once.
    The stale one second: the first one's row reached the client, so the error does too (not
    resent); the statement is retired all the same, and runs in the next batch."""
    proxy = pooled(proxy_factory)
    with WireClient(proxy.host, proxy.port) as client:
        client.login()
        client.send(_parse(b"plus", b"SELECT $1::int + 1") + _parse(b"t", QUERY_1) + SYNC)
        client.read_until(BackendType.READY_FOR_QUERY)
        client.send(_bind_describe_execute(b"t", b"1") + SYNC)
        assert _rows(client.read_until(BackendType.READY_FOR_QUERY)) == [("1", "10")]
        alter_directly(admin)
        client.send(_bind_describe_execute(b"t", b"2") + _bind_describe_execute(b"plus", b"5")
                    + SYNC)  # fmt: skip
        replies = client.read_until(BackendType.READY_FOR_QUERY)
        assert _rows(replies) == [("2", "20"), ("6",)]
        assert [t for t, _ in replies].count(BackendType.BIND_COMPLETE) == 2
        assert replies[-1] == (BackendType.READY_FOR_QUERY, b"I")
        alter_directly(admin, "bigint USING v::bigint")
        client.send(_bind_describe_execute(b"plus", b"7") + _bind_describe_execute(b"t", b"1")
                    + SYNC)  # fmt: skip
        error = client.expect_error(
            skip=(
                BackendType.BIND_COMPLETE,
                BackendType.ROW_DESCRIPTION,
                BackendType.DATA_ROW,
                BackendType.COMMAND_COMPLETE,
            )
        )
        assert error.code == "0A000"
        assert client.read_message() == (BackendType.READY_FOR_QUERY, b"I")
        client.send(_bind_describe_execute(b"t", b"1") + SYNC)
        assert _rows(client.read_until(BackendType.READY_FOR_QUERY)) == [("1", "10")]


def test_asyncpg_statement_cache_after_direct_ddl(
    proxy_factory: Factory, admin: psycopg.Connection[Any], table: str
) -> None:
    """asyncpg retries an InvalidCachedStatementError itself outside a transaction, with a new
    Parse of the same text: the proxy maps it to the same server statement, so asyncpg's own
    retry alone would fail again; the proxy's retry makes the first execute succeed."""
    proxy = pooled(proxy_factory)

    async def main() -> None:
        conn = await asyncpg.connect(proxy.url(USER), timeout=10)
        try:
            query = "SELECT * FROM retry_t WHERE id = $1"
            assert tuple(await conn.fetchrow(query, 1)) == (1, 10)
            alter_directly(admin)
            assert tuple(await conn.fetchrow(query, 1)) == (1, "10")
            # in a transaction: asyncpg gets the error (and raises it: it does not retry there)
            alter_directly(admin, "bigint USING v::bigint")
            with pytest.raises(asyncpg.exceptions.InvalidCachedStatementError):
                async with conn.transaction():
                    await conn.fetchrow(query, 2)
            assert tuple(await conn.fetchrow(query, 2)) == (2, 20)
        finally:
            await conn.close()

    asyncio.run(main())


def test_client_messages_sent_while_the_window_is_open_wait_for_the_resend(
    proxy_factory: Factory, admin: psycopg.Connection[Any], table: str, pg: PgInfo, tunnel: Tunnel
) -> None:
    """The client's next batch, sent while the stale one's replies are still on their way (held
    in the tunnel), waits in the proxy: it runs after the resent batch, its replies after."""
    proxy = proxy_factory(
        tunnel.url(pg), admin_upstream=pg.url(), pool_mode="transaction", default_pool_size=1
    )
    with WireClient(proxy.host, proxy.port) as client:
        client.login()
        client.send(_parse(b"t", QUERY_1) + _parse(b"plus", b"SELECT $1::int + 1") + SYNC)
        client.read_until(BackendType.READY_FOR_QUERY)
        client.send(_bind_describe_execute(b"t", b"1") + SYNC)
        replies = client.read_until(BackendType.READY_FOR_QUERY)
        assert _rows(replies) == [("1", "10")]
        pid = _backend_pid(admin)
        before = _query_start(admin, pid)
        alter_directly(admin)
        tunnel.delay(0.3, Direction.TO_CLIENT)
        client.send(_bind_describe_execute(b"t", b"2") + SYNC)
        # PostgreSQL has failed it (its error is in the tunnel): the next batch goes now
        wait_until(lambda: _query_start(admin, pid) != before, "the first batch to run")
        client.send(_bind_describe_execute(b"plus", b"5") + SYNC)
        first = client.read_until(BackendType.READY_FOR_QUERY)
        tunnel.delay(0, Direction.TO_CLIENT)
        second = client.read_until(BackendType.READY_FOR_QUERY)
    assert _rows(first) == [("2", "20")]
    assert _rows(second) == [("6",)]


def _backend_pid(admin: psycopg.Connection[Any]) -> int:
    row = admin.execute(
        "SELECT pid FROM pg_stat_activity WHERE usename = %s AND backend_type = 'client backend'",
        [USER],
    ).fetchone()
    assert row is not None
    return int(row[0])


def _query_start(admin: psycopg.Connection[Any], pid: int) -> object:
    row = admin.execute("SELECT query_start FROM pg_stat_activity WHERE pid = %s", [pid])
    found = row.fetchone()
    return None if found is None else found[0]
