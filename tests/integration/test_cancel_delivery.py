"""A CancelRequest relayed through the proxy is answered (the cancel connection closed) only
once PostgreSQL has closed the connection the proxy forwarded it on: clients take that close
as "the cancel has been delivered", and an earlier close lets it land on their next query."""

from __future__ import annotations

import asyncio
import contextlib
import os

import asyncpg
import pytest

from tests.fixtures.proxy import RunningProxy

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

#: Timed-out statements per case (PGMIGRATE_CANCEL_ROUNDS=500 for the issue's full loop).
ROUNDS = int(os.environ.get("PGMIGRATE_CANCEL_ROUNDS", "200"))


@pytest.mark.parametrize(
    ("timed_out", "following"),
    [
        # the loop: the timeout lands while pg_sleep runs
        ("SELECT pg_sleep(1)", "SELECT 1"),
        # the statement ends by itself while the cancel is on its way: a cancel still in
        # flight when the client goes on hits whatever runs next (a few per hundred, before)
        ("SELECT pg_sleep(0.003)", "SELECT 1 FROM pg_sleep(0.01)"),
    ],
    ids=["sleep-1s", "ends-by-itself"],
)
def test_a_timed_out_statement_s_cancel_never_lands_on_the_next_query(
    proxy: RunningProxy, timed_out: str, following: str
) -> None:
    async def main() -> list[str]:
        conn = await asyncpg.connect(proxy.url("u_trust"), timeout=10)
        hit = []
        try:
            for i in range(ROUNDS):
                # on timeout asyncpg sends a CancelRequest, waits for its connection to close,
                # then for the statement's ReadyForQuery, before it sends anything else
                try:
                    with contextlib.suppress(asyncio.TimeoutError):
                        await conn.fetch(timed_out, timeout=0.001)
                    assert await conn.fetchval(following, timeout=30) == 1
                except asyncpg.QueryCanceledError as exc:
                    hit.append(f"round {i}: {exc.query or following}")
        finally:
            await asyncio.wait_for(conn.close(), 10)
        return hit

    hit = asyncio.run(main())
    assert hit == [], f"{len(hit)} of {ROUNDS} rounds cancelled a statement: {hit[:5]}"
