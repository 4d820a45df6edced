"""How much SQL a session may classify on the event loop at a time; the rest goes to a thread.

Parsing costs about 1.5 ms a kB of the densest SQL (`SELECT 1;` repeated), and texts up to
MAX_CLASSIFIED (32 kB) are parsed: on the loop, one such text, or a chunk of many small
distinct statements (20000 pipelined Queries arrive in a few reads of 256 kB), froze every
other client for 50 to 270 ms. So each session gets LOOP_BUDGET bytes of uncached text to
classify per turn of the loop (refilled once the loop has run its other callbacks); a text
that does not fit is classified by `sql.classify_apart` in the default executor, while the
session's later messages wait behind it (hold.py) or its runner awaits it (migration.py).
Cached texts and texts too long to parse cost nothing, so ordinary traffic never leaves the loop.
"""

from __future__ import annotations

import asyncio

from pgmigrate_proxy.sql import Statement, classify
from pgmigrate_proxy.sql.classify import classify_apart, cost, remember

#: Bytes of uncached SQL one session may classify per turn of the loop (about 10 ms at worst).
LOOP_BUDGET = 8 * 1024


class LoopBudget:
    """One session's allowance of on-loop classification (see the module docstring)."""

    __slots__ = ("_refilling", "left")

    def __init__(self) -> None:
        self.left = LOOP_BUDGET
        self._refilling = False

    def take(self, sql: str) -> bool:
        """True when `sql` may be classified on the loop now (its cost is then spent)."""
        needed = cost(sql)
        if needed == 0:
            return True
        if needed > self.left:
            return False
        self.left -= needed
        if not self._refilling:
            self._refilling = True
            asyncio.get_running_loop().call_soon(self._refill)
        return True

    def _refill(self) -> None:
        self.left = LOOP_BUDGET
        self._refilling = False


async def classify_off_loop(sql: str) -> tuple[Statement, ...]:
    """classify(sql) in a worker thread; the answer is cached (on the loop) as classify's is."""
    found = await asyncio.get_running_loop().run_in_executor(None, classify_apart, sql)
    remember(sql, found)
    return found


async def classify_bounded(sql: str, budget: LoopBudget) -> tuple[Statement, ...]:
    """classify(sql): on the loop when the budget allows, else in a worker thread."""
    if budget.take(sql):
        return classify(sql)
    return await classify_off_loop(sql)
