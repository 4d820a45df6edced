"""The relay's shortcuts for the usual chunks (hold.py Holder.query and _plain_batch,
backend.py ServerConnection._shortcut) must do what the general path does: these send by hand
exactly the chunks they take (one whole Query; one whole batch of the unnamed statement) and
the chunks next to them that they must leave to the general path (a guarded statement, session
state, a Bind of a guarded unnamed statement), in transaction and session pooling."""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from pgmigrate_proxy.protocol.framing import frame
from pgmigrate_proxy.protocol.types import BackendType, FrontendType
from psycopg import sql

from tests.fixtures.postgres import PgInfo
from tests.fixtures.proxy import RunningProxy
from tests.fixtures.tables import scratch_table
from tests.integration.wire import Message, WireClient

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

Factory = Callable[..., RunningProxy]
USER = "u_trust"


def query(text: str) -> bytes:
    return frame(FrontendType.QUERY, text.encode() + b"\0")


def batch(text: str | None, *, parse: bool = True) -> bytes:
    """Parse (unnamed, unless `parse` is False: the last unnamed statement is bound again),
    Bind, Describe portal, Execute, Sync: one chunk, as pgbench -M extended sends it."""
    out = b""
    if parse:
        assert text is not None
        out += frame(FrontendType.PARSE, b"\0" + text.encode() + b"\0" + struct.pack("!h", 0))
    out += frame(FrontendType.BIND, b"\0\0" + struct.pack("!hhh", 0, 0, 0))
    out += frame(FrontendType.DESCRIBE, b"P\0")
    out += frame(FrontendType.EXECUTE, b"\0" + struct.pack("!i", 0))
    return out + frame(FrontendType.SYNC)


def errors(messages: list[Message]) -> list[bytes]:
    return [payload for mtype, payload in messages if mtype == BackendType.ERROR_RESPONSE]


def rows(messages: list[Message]) -> int:
    return sum(1 for mtype, _ in messages if mtype == BackendType.DATA_ROW)


@pytest.fixture
def table(pg: PgInfo) -> Iterator[str]:
    with scratch_table(pg, "shortcut", owner=USER) as name:
        yield name


def blocker(pg: PgInfo, table: str) -> psycopg.Connection[Any]:
    """A session of the same role in an open transaction that read the table (its
    AccessShareLock blocks an ALTER TABLE): the guard may end it, the role's own."""
    conn = pg.connect(USER, application_name="shortcut-blocker")
    conn.execute("BEGIN")
    conn.execute(sql.SQL("SELECT * FROM {}").format(sql.Identifier(table)))
    return conn


def ended(conn: psycopg.Connection[Any]) -> bool:
    try:
        conn.execute("SELECT 1")
    except psycopg.OperationalError:
        return True
    return False


@pytest.mark.parametrize("mode", ["transaction", "session"])
def test_ddl_after_plain_batches_is_guarded(
    proxy_factory: Factory, pg: PgInfo, table: str, mode: str
) -> None:
    """Plain batches teach _plain_batch their Parse; an unnamed DDL Parse after them, and a
    batch that binds that DDL statement again without a Parse, still go through the guard
    (the blocker is ended each time, the ALTER succeeds instead of waiting behind it)."""
    proxy = proxy_factory(pool_mode=mode, blocking_action="terminate", default_pool_size=2)
    with WireClient(proxy.host, proxy.port) as wire:
        wire.login(USER)
        plain = sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(table)).as_string()
        for _ in range(5):
            wire.send(batch(plain))
            replies = wire.read_until(BackendType.READY_FOR_QUERY)
            assert not errors(replies) and rows(replies) == 1
        first = blocker(pg, table)
        alter = f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS added int"
        wire.send(batch(alter))
        assert not errors(wire.read_until(BackendType.READY_FOR_QUERY))
        assert ended(first)
        second = blocker(pg, table)
        wire.send(batch(None, parse=False))  # binds the unnamed ALTER again
        assert not errors(wire.read_until(BackendType.READY_FOR_QUERY))
        assert ended(second)
        wire.send(batch(plain))  # and the plain one takes the shortcut again
        replies = wire.read_until(BackendType.READY_FOR_QUERY)
        assert not errors(replies) and rows(replies) == 1


@pytest.mark.parametrize("mode", ["transaction", "session"])
def test_ddl_in_a_whole_query_chunk_is_guarded(
    proxy_factory: Factory, pg: PgInfo, table: str, mode: str
) -> None:
    proxy = proxy_factory(pool_mode=mode, blocking_action="terminate", default_pool_size=2)
    with WireClient(proxy.host, proxy.port) as wire:
        wire.login(USER)
        for _ in range(5):
            assert rows(wire.query(f"SELECT count(*) FROM {table}")) == 1
        held = blocker(pg, table)
        wire.send(query(f"ALTER TABLE {table} ADD COLUMN added int"))
        assert not errors(wire.read_until(BackendType.READY_FOR_QUERY))
        assert ended(held)


def test_session_state_in_a_whole_query_chunk_pins(proxy_factory: Factory) -> None:
    """A whole Query that takes a session advisory lock is left to the session-state watch:
    the client keeps its server (a second client of a pool of one waits, then times out)."""
    proxy = proxy_factory(pool_mode="transaction", default_pool_size=1, query_wait_timeout=1.0)
    with WireClient(proxy.host, proxy.port) as pinned, WireClient(proxy.host, proxy.port) as other:
        pinned.login(USER)
        other.login(USER)
        assert rows(pinned.query("SELECT 1")) == 1
        assert rows(other.query("SELECT 1")) == 1  # (the one server goes back and forth)
        assert not errors(pinned.query("SELECT pg_advisory_lock(4242)"))
        other.send(query("SELECT 1"))
        timed_out = other.read_until(BackendType.ERROR_RESPONSE)[-1][1]
        assert b"query_wait_timeout" in timed_out
        assert rows(pinned.query("SELECT 2")) == 1


def test_deletes_and_dml_go_out_with_their_replies(proxy_factory: Factory, table: str) -> None:
    """Whole Query chunks of each plain kind (a DELETE is left to the general path, for the
    prepared-statement map), replies in one chunk or in many (a result larger than a read),
    in transaction mode with two clients sharing one server."""
    proxy = proxy_factory(pool_mode="transaction", default_pool_size=1)
    with WireClient(proxy.host, proxy.port) as one, WireClient(proxy.host, proxy.port) as two:
        one.login(USER)
        two.login(USER)
        for wire, base in ((one, 0), (two, 1000)):
            insert = f"INSERT INTO {table} SELECT g FROM generate_series({base}, {base + 99}) g"
            assert not errors(wire.query(insert))
        assert rows(one.query(f"SELECT id FROM {table}")) == 200
        big = two.query("SELECT repeat('x', 1000) FROM generate_series(1, 5000)")
        assert rows(big) == 5000 and not errors(big)
        assert not errors(one.query(f"DELETE FROM {table} WHERE id < 1000"))
        assert not errors(two.query(f"UPDATE {table} SET id = id + 1"))
        assert rows(one.query(f"WITH t AS (SELECT id FROM {table}) SELECT count(*) FROM t")) == 1
        assert one.query(f"SELECT count(*) FROM {table}")[-2][0] == BackendType.COMMAND_COMPLETE


def test_chunks_queued_for_a_server_go_out_whole(
    proxy_factory: Factory, pg: PgInfo, table: str
) -> None:
    """A client whose pool has no idle server waits in it with its chunk (Holder._server_for):
    a plain batch and a whole Query each go out once the other client's transaction ends,
    answered in full; and a DDL batch that waited the same way still goes through the guard
    (the blocker is ended, the ALTER succeeds). (No Bind without its Parse here: the other
    client's Query replaced the server's unnamed statement, as it may under any pooler.)"""
    proxy = proxy_factory(pool_mode="transaction", blocking_action="terminate", default_pool_size=1)
    plain = sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(table)).as_string()
    with WireClient(proxy.host, proxy.port) as owner, WireClient(proxy.host, proxy.port) as waiter:
        owner.login(USER)
        waiter.login(USER)
        for _ in range(2):  # (the first teaches _plain_batch the Parse, the second takes it)
            waiter.send(batch(plain))
            assert rows(waiter.read_until(BackendType.READY_FOR_QUERY)) == 1
        for chunk in (batch(plain), query(plain)):
            assert not errors(owner.query("BEGIN"))  # the one server stays with owner
            waiter.send(chunk)
            assert not errors(owner.query("SELECT pg_sleep(0.2)"))
            assert not errors(owner.query("COMMIT"))
            replies = waiter.read_until(BackendType.READY_FOR_QUERY)
            assert not errors(replies) and rows(replies) == 1
            assert replies[-1][1] == b"I"
        held = blocker(pg, table)
        assert not errors(owner.query("BEGIN"))
        waiter.send(batch(f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS queued int"))
        assert not errors(owner.query("COMMIT"))
        assert not errors(waiter.read_until(BackendType.READY_FOR_QUERY))
        assert ended(held)
        waiter.send(batch(plain))
        replies = waiter.read_until(BackendType.READY_FOR_QUERY)
        assert not errors(replies) and rows(replies) == 1
