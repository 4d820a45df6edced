"""The socket fuzzer at CI size against an in-process proxy: a few thousand generated and mutated
message streams after a valid startup, in ordinary and in migration sessions. After each batch
a fresh client is served, no traceback was logged, and the process's fds are back to baseline.
The long run is `scripts/fuzz socket` (README, "Fuzzing")."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Iterator

import psycopg
import pytest

from fuzz.wire import Fuzzer, Outcome, Report, Target, run_case
from tests.fixtures.postgres import PgInfo
from tests.fixtures.proxy import RunningProxy
from tests.integration.probes import close_idle_servers, open_fds

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

INPUTS = int(os.environ.get("PGMIGRATE_FUZZ_INPUTS", "2000"))
BATCH = 500
SEED = int(os.environ.get("PGMIGRATE_FUZZ_SEED", "1"))
CONCURRENCY = int(os.environ.get("PGMIGRATE_FUZZ_CONCURRENCY", "16"))

@pytest.fixture
def log_since(proxy_log: list[str]) -> Iterator[Callable[[], list[str]]]:
    """New log lines of the proxy and of asyncio (where escaped task exceptions land)."""
    lines = proxy_log
    handler = logging.Handler(logging.DEBUG)
    handler.emit = lambda record: lines.append(  # type: ignore[method-assign]
        logging.Formatter("%(levelname)s %(name)s: %(message)s").format(record)
    )
    asyncio_log = logging.getLogger("asyncio")
    asyncio_log.addHandler(handler)
    seen = 0

    def since() -> list[str]:
        nonlocal seen
        new, seen = lines[seen:], len(lines)
        return new

    yield since
    asyncio_log.removeHandler(handler)


@pytest.fixture
def fuzz_table(pg: PgInfo) -> Iterator[None]:
    with pg.connect() as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS fz_t (id int)")
        conn.execute("ALTER TABLE fz_t OWNER TO u_trust")
    yield
    with pg.connect() as conn:
        conn.execute("DROP TABLE IF EXISTS fz_t")


#: Failures of the concurrent run replayed one by one at the most (each hang costs its wait).
REPLAYS = 60
HANG_SECONDS = 10.0


def fuzz(
    proxy: RunningProxy,
    pg: PgInfo,
    log_since: Callable[[], list[str]],
    migration: bool,
    nested: bool = True,
    mid_batch_ddl: bool = True,
    concurrency: int = CONCURRENCY,
) -> tuple[Report, list[str]]:
    """The concurrent run's report, and the failures that are the proxy's: each failing input
    is sent again alone, through the proxy and straight to PostgreSQL; it counts when alone it
    still fails through the proxy and PostgreSQL does otherwise. (Run together, sessions wait
    on each other's locks: a TRUNCATE behind a session left open in a transaction, a CREATE
    INDEX CONCURRENTLY behind every older snapshot. PostgreSQL makes those wait too.)"""
    def fds() -> int:
        """The proxy's fds, its pools' idle servers closed first (a client that left cleanly
        leaves its server there: not a leak)."""
        close_idle_servers(proxy)
        return open_fds()

    target = Target(proxy.host, proxy.port, "u_trust", log_lines=log_since, fds=fds)
    fuzzer = Fuzzer(
        target,
        seed=SEED,
        kinds=(migration,),
        hang_seconds=HANG_SECONDS,
        nested=nested,
        mid_batch_ddl=mid_batch_ddl,
        concurrency=concurrency,
    )

    direct = Target(pg.host, pg.port, "u_trust")

    async def body() -> tuple[Report, list[str]]:
        await fuzzer.check("before the first input")  # the baseline
        report = await fuzzer.run(INPUTS, BATCH)
        proxy_only: list[str] = []
        for outcome in report.failures[:REPLAYS]:
            alone = await run_case(Target(proxy.host, proxy.port, "u_trust"), outcome.case,
                                   HANG_SECONDS)  # fmt: skip
            if not alone.failed:
                continue
            there = await run_case(direct, outcome.case, HANG_SECONDS)
            if there.kind != alone.kind:
                proxy_only.append(_describe(alone, there))
        unreplayed = len(report.failures) - REPLAYS
        if unreplayed > 0:
            proxy_only.append(f"{unreplayed} failures not replayed (more than {REPLAYS})")
        return report, proxy_only

    return asyncio.run(body())


def _describe(alone: Outcome, there: Outcome) -> str:
    return (
        f"{alone.kind} {alone.case.index} (PostgreSQL: {there.kind}): {alone.detail} "
        f"{alone.case.data[:200]!r}"
    )


def _verdict(report: Report, proxy_only: list[str]) -> str:
    return "\n".join([report.summary(), *report.batch_problems[:5], *proxy_only[:10]])


def test_ordinary_sessions(
    proxy: RunningProxy, pg: PgInfo, log_since: Callable[[], list[str]], fuzz_table: None
) -> None:
    report, proxy_only = fuzz(proxy, pg, log_since, migration=False)
    assert not proxy_only and not report.batch_problems, _verdict(report, proxy_only)
    assert report.kinds.get("answered", 0) > INPUTS // 4, report.summary()


def test_migration_sessions(
    proxy: RunningProxy, pg: PgInfo, log_since: Callable[[], list[str]], fuzz_table: None
) -> None:
    report, proxy_only = fuzz(proxy, pg, log_since, migration=True)
    assert not proxy_only and not report.batch_problems, _verdict(report, proxy_only)
    assert report.kinds.get("answered", 0) > INPUTS // 4, report.summary()


def test_a_fresh_client_after_fuzzing(proxy: RunningProxy) -> None:
    with psycopg.connect(proxy.conninfo("u_trust")) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
