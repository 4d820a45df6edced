"""Classification on the proxy's event loop is bounded by construction: a long text is parsed
in a worker thread, and many small distinct ones in a chunk stay within the loop budget.

Observed, not timed: the parser's entry point is wrapped to record on which thread, and in
which turn of the proxy's loop, each text was parsed.
"""

from __future__ import annotations

import asyncio
import importlib
import threading
from collections import Counter
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from pgmigrate_proxy.protocol.framing import frame
from pgmigrate_proxy.protocol.types import BackendType, FrontendType
from pgmigrate_proxy.runtime.offload import LOOP_BUDGET
from pgmigrate_proxy.sql import cache_clear

from tests.fixtures.proxy import RunningProxy
from tests.integration.wire import WireClient

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

#: The module (the package's `classify` attribute is the function of that name).
classify_module = importlib.import_module("pgmigrate_proxy.sql.classify")
MIGRATE = "-c pgmigrate.role=migrate"
ALTER = "ALTER TABLE offload_t ADD COLUMN IF NOT EXISTS c int"
#: About 24 kB of statements, then an ALTER: over the loop budget, under MAX_CLASSIFIED.
LONG = "SELECT 1;" * 2700 + ALTER


class Parses:
    """Every text the classifier parses: (on the proxy's loop thread?, loop turn, length)."""

    def __init__(self, proxy: RunningProxy) -> None:
        self.proxy = proxy
        self.seen: list[tuple[bool, int, int]] = []
        self.turn = 0
        self._ticking = False

    def on_loop(self) -> list[int]:
        return [length for loop, _, length in self.seen if loop]

    def off_loop(self) -> list[int]:
        return [length for loop, _, length in self.seen if not loop]

    def per_turn(self) -> Counter[int]:
        """Bytes parsed on the loop thread in each turn of the loop."""
        turns: Counter[int] = Counter()
        for loop, turn, length in self.seen:
            if loop:
                turns[turn] += length
        return turns

    def tick(self) -> None:  # runs once per turn of the proxy's loop while counting turns
        self.turn += 1
        if self._ticking:
            self.proxy.loop.call_soon(self.tick)

    def count_turns(self) -> None:
        self._ticking = True
        self.proxy.loop.call_soon_threadsafe(self.tick)

    def stop(self) -> None:
        self._ticking = False


@pytest.fixture
def parses(proxy: RunningProxy, monkeypatch: pytest.MonkeyPatch) -> Iterator[Parses]:
    record = Parses(proxy)
    original = classify_module._classify
    loop_thread = proxy._thread.ident

    def recording(sql: str) -> Any:
        record.seen.append((threading.get_ident() == loop_thread, record.turn, len(sql)))
        return original(sql)

    cache_clear()
    monkeypatch.setattr(classify_module, "_classify", recording)
    yield record
    record.stop()
    cache_clear()


@pytest.fixture
def table(admin: psycopg.Connection[Any]) -> None:
    admin.execute("DROP TABLE IF EXISTS offload_t")
    admin.execute("CREATE TABLE offload_t (a int)")
    admin.execute("ALTER TABLE offload_t OWNER TO u_trust")


def _has_column(admin: psycopg.Connection[Any]) -> bool:
    row = admin.execute(
        "SELECT count(*) FROM pg_attribute WHERE attrelid = 'offload_t'::regclass AND attname = 'c'"
    ).fetchone()
    return row == (1,)


@pytest.mark.usefixtures("table")
def test_a_long_query_is_classified_off_the_loop(
    proxy: RunningProxy, parses: Parses, admin: psycopg.Connection[Any]
) -> None:
    with psycopg.connect(proxy.conninfo("u_trust"), autocommit=True) as conn:
        conn.execute(LONG.encode())
        assert conn.execute("SELECT 1").fetchone() == (1,)
    assert _has_column(admin)
    assert parses.off_loop(), "the long text was never parsed in a worker thread"
    assert max(parses.on_loop(), default=0) <= LOOP_BUDGET


@pytest.mark.usefixtures("table")
def test_a_long_parse_is_classified_off_the_loop(
    proxy: RunningProxy, parses: Parses, admin: psycopg.Connection[Any]
) -> None:
    """A Parse (and the Describe and Flush of asyncpg's prepare, where the proxy reads it again
    to resolve its targets), then its Bind and Execute."""
    sql = f"{ALTER} CHECK (c IN (" + ", ".join(["1"] * 6000) + "))"  # about 18 kB
    with WireClient(proxy.host, proxy.port) as client:
        client.login("u_trust")
        client.send(
            frame(FrontendType.PARSE, b"\0" + sql.encode() + b"\0\0\0")
            + frame(FrontendType.DESCRIBE, b"S\0")
            + frame(FrontendType.FLUSH)
        )
        client.read_until(BackendType.NO_DATA)
        client.send(
            frame(FrontendType.BIND, b"\0\0\0\0\0\0\0\0")
            + frame(FrontendType.EXECUTE, b"\0\0\0\0\0")
            + frame(FrontendType.SYNC)
        )
        replies = client.read_until(BackendType.READY_FOR_QUERY)
    assert (BackendType.COMMAND_COMPLETE, b"ALTER TABLE\0") in replies
    assert _has_column(admin)
    assert parses.off_loop(), "the long Parse was never parsed in a worker thread"
    assert max(parses.on_loop(), default=0) <= LOOP_BUDGET


@pytest.mark.usefixtures("table")
def test_a_long_query_of_a_migration_session_is_split_off_the_loop(
    proxy: RunningProxy, parses: Parses, admin: psycopg.Connection[Any]
) -> None:
    url = proxy.conninfo("u_trust", options=MIGRATE)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(LONG.encode())
    assert _has_column(admin)
    assert max(parses.on_loop(), default=0) <= LOOP_BUDGET


def test_many_distinct_statements_in_one_chunk_stay_within_the_loop_budget(
    proxy: RunningProxy, parses: Parses
) -> None:
    """3000 pipelined Queries, each a different statement the prefilter cannot pass: each
    turn of the loop parses at most LOOP_BUDGET bytes of them; all are answered, in order."""
    count = 3000
    queries = b"".join(
        frame(FrontendType.QUERY, f"CREATE TEMP TABLE offload_{i} (a int)".encode() + b"\0")
        for i in range(count)
    )
    with WireClient(proxy.host, proxy.port) as client:
        client.login("u_trust")
        parses.count_turns()
        client.send(queries)
        tags = []
        while len(tags) < count:
            mtype, payload = client.read_message()
            if mtype == BackendType.COMMAND_COMPLETE:
                tags.append(payload)
            assert mtype != BackendType.ERROR_RESPONSE, payload
        client.read_until(BackendType.READY_FOR_QUERY)
        parses.stop()
        assert tags == [b"CREATE TABLE\0"] * count
    turns = parses.per_turn()
    assert sum(turns.values()) + sum(parses.off_loop()) >= 3000 * len("CREATE TEMP TABLE offload_")
    assert max(turns.values()) <= LOOP_BUDGET, f"{max(turns.values())} bytes in one turn"


def test_the_budget_refills_when_the_loop_turns() -> None:
    from pgmigrate_proxy.runtime.offload import LoopBudget

    async def scenario() -> tuple[bool, bool, bool, bool]:
        budget = LoopBudget()
        big = "ALTER TABLE t ADD c int DEFAULT " + "1 + " * (LOOP_BUDGET // 4) + "1"
        small = "ALTER TABLE t ADD c int DEFAULT " + "1 + " * (LOOP_BUDGET // 8) + "1"
        first = budget.take(big)  # longer than the whole budget: never on the loop
        second = budget.take(small)
        third = budget.take(small + " ")  # the budget is spent for this turn
        await asyncio.sleep(0)
        return first, second, third, budget.take(small + "  ")

    cache_clear()
    assert asyncio.run(scenario()) == (False, True, False, True)
