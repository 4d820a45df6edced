"""The gate's own rules (runtime/gate.py): unarmed it holds nothing; armed, what its predicate
picks (statement-starting messages only); release lets them go in the order held and disarms;
a cancelled place is skipped."""

from __future__ import annotations

import asyncio
from typing import Any

from pgmigrate_proxy.protocol.framing import Frame
from pgmigrate_proxy.protocol.types import FrontendType
from pgmigrate_proxy.runtime.gate import Gate


class _Session:
    peer = "test"


QUERY = Frame(FrontendType.QUERY.value, b"SELECT 1\0", 0)
SYNC = Frame(FrontendType.SYNC.value, b"", 0)


def test_holds_only_when_armed_and_picked() -> None:
    gate = Gate()
    assert not gate.holds(_Session(), QUERY)
    gate.arm(lambda session, item: item.payload.startswith(b"SELECT"))
    assert gate.holds(_Session(), QUERY)
    assert not gate.holds(_Session(), SYNC)  # (no statement starts with it)
    gate.release()
    assert gate.predicate is None and not gate.holds(_Session(), QUERY)


def test_release_in_order_and_a_cancelled_place_skipped() -> None:
    async def main() -> list[int]:
        gate = Gate()
        gate.arm(lambda session, item: True)
        order: list[int] = []

        async def held(n: int, place: asyncio.Future[Any]) -> None:
            await place
            order.append(n)

        places = [gate.hold() for _ in range(3)]
        tasks = [asyncio.create_task(held(n, p)) for n, p in enumerate(places)]
        await asyncio.sleep(0)
        tasks[1].cancel()  # its client left
        await asyncio.sleep(0)
        assert gate.waiting == 2
        gate.release()
        await asyncio.gather(*tasks, return_exceptions=True)
        assert gate.waiting == 0
        return order

    assert asyncio.run(main()) == [0, 2]
