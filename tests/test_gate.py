"""The gate's own rules (runtime/gate.py): unarmed it holds nothing; armed, what a predicate
picks (statement-starting messages only, shown with their texts); several arms at once, each
release letting go what no other armed predicate holds, in the order held; a cancelled place is
skipped; the texts of a chunk (a Bind's statement looked up by name, None when unknown)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from pgmigrate_proxy.protocol.framing import Frame
from pgmigrate_proxy.protocol.types import FrontendType
from pgmigrate_proxy.runtime.gate import Gate, GatedSession, statement_texts

SESSION = GatedSession("test", "app", 42)


def query(sql: str) -> Frame:
    return Frame(FrontendType.QUERY.value, sql.encode() + b"\0", 0)


def parse(name: str, sql: str) -> Frame:
    return Frame(FrontendType.PARSE.value, f"{name}\0{sql}\0".encode() + b"\0\0", 0)


def bind(statement: str) -> Frame:
    return Frame(FrontendType.BIND.value, f"\0{statement}\0".encode() + b"\0\0\0\0\0\0", 0)


EXECUTE = Frame(FrontendType.EXECUTE.value, b"\0\0\0\0\0", 0)
SYNC = Frame(FrontendType.SYNC.value, b"", 0)


def naming(word: str) -> Any:
    def predicate(session: GatedSession, texts: Sequence[str] | None) -> bool:
        return texts is None or any(word in text for text in texts)

    return predicate


def test_holds_only_when_armed_and_picked() -> None:
    async def main() -> None:
        gate = Gate()
        assert gate.hold(SESSION, [query("SELECT 1")], {}) is None
        arm = gate.arm(naming("SELECT"))
        assert gate.hold(SESSION, [query("SELECT 1")], {}) is not None
        assert gate.hold(SESSION, [query("BEGIN")], {}) is None
        assert gate.hold(SESSION, [SYNC], {}) is None  # (no statement starts with it)
        arm.release()
        arm.release()  # idempotent
        assert not gate.arms and gate.waiting == 0
        assert gate.hold(SESSION, [query("SELECT 1")], {}) is None

    asyncio.run(main())


def test_release_in_order_and_a_cancelled_place_skipped() -> None:
    async def main() -> list[int]:
        gate = Gate()
        arm = gate.arm(lambda session, texts: True)
        order: list[int] = []

        async def held(n: int, place: asyncio.Future[Any]) -> None:
            await place
            order.append(n)

        places = [gate.hold(SESSION, [query(f"SELECT {n}")], {}) for n in range(3)]
        tasks = [asyncio.create_task(held(n, p)) for n, p in enumerate(places) if p is not None]
        await asyncio.sleep(0)
        tasks[1].cancel()  # its client left
        await asyncio.sleep(0)
        assert gate.waiting == 2
        arm.release()
        await asyncio.gather(*tasks, return_exceptions=True)
        assert gate.waiting == 0
        return order

    assert asyncio.run(main()) == [0, 2]


def test_two_arms_release_only_what_the_other_does_not_hold() -> None:
    async def main() -> None:
        gate = Gate()
        items = gate.arm(naming("items"))
        orders = gate.arm(naming("orders"))
        on_items = gate.hold(SESSION, [query("SELECT * FROM items")], {})
        on_both = gate.hold(SESSION, [query("SELECT * FROM items JOIN orders")], {})
        on_orders = gate.hold(SESSION, [query("SELECT * FROM orders")], {})
        assert on_items and on_both and on_orders
        items.release()
        await asyncio.sleep(0)
        assert on_items.done() and not on_both.done() and not on_orders.done()
        # a drain armed meanwhile is asked about what was held before it
        later = gate.arm(naming("JOIN"))
        orders.release()
        assert on_orders.done() and not on_both.done()
        later.release()
        assert on_both.done() and gate.waiting == 0

    asyncio.run(main())


def test_statement_texts() -> None:
    prepared = {"s1": parse("s1", "SELECT * FROM items").payload}
    assert statement_texts([query("SELECT 1")], {}) == ["SELECT 1"]
    batch = [parse("", "INSERT INTO t VALUES (1)"), bind(""), EXECUTE, SYNC]
    assert statement_texts(batch, {}) == ["INSERT INTO t VALUES (1)"]
    assert statement_texts([bind("s1"), EXECUTE, SYNC], prepared) == ["SELECT * FROM items"]
    assert statement_texts([bind("s2"), EXECUTE, SYNC], prepared) is None  # unknown
    assert statement_texts([EXECUTE, SYNC], prepared) is None  # a portal bound earlier
    assert statement_texts([Frame(FrontendType.QUERY.value, b"no end", 0)], {}) is None


def test_recheck_lets_go_what_the_predicate_no_longer_holds() -> None:
    async def main() -> None:
        gate = Gate()
        let_through: set[int] = set()
        arm = gate.arm(lambda session, texts: session.backend_pid not in let_through)
        first = gate.hold(GatedSession("a", "app", 7), [query("SELECT 1")], {})
        second = gate.hold(GatedSession("b", "app", 8), [query("SELECT 1")], {})
        assert first and second
        let_through.add(7)
        arm.recheck()
        assert first.done() and not second.done()
        arm.release()
        assert second.done()

    asyncio.run(main())
