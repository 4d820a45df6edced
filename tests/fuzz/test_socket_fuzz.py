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

from fuzz.wire import Fuzzer, Report, Target
from tests.fixtures.postgres import PgInfo
from tests.fixtures.proxy import RunningProxy
from tests.integration.probes import open_fds

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

INPUTS = int(os.environ.get("PGMIGRATE_FUZZ_INPUTS", "2000"))
BATCH = 500
SEED = int(os.environ.get("PGMIGRATE_FUZZ_SEED", "1"))
CONCURRENCY = int(os.environ.get("PGMIGRATE_FUZZ_CONCURRENCY", "16"))

#: The known migration-session bugs (issue 9, items 2, 3 and 7), fixed on another branch.
KNOWN_MIGRATION_BUGS = (
    "issue 9 item 2: malformed Query/Parse in migration sessions hang or desynchronise, and "
    "exceptions escape Holder tasks; item 3: RecursionError on deeply nested DDL"
)


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


def fuzz(
    proxy: RunningProxy,
    log_since: Callable[[], list[str]],
    migration: bool,
    nested: bool = True,
    mid_batch_ddl: bool = True,
    concurrency: int = CONCURRENCY,
) -> Report:
    target = Target(proxy.host, proxy.port, "u_trust", log_lines=log_since, fds=open_fds)
    fuzzer = Fuzzer(
        target,
        seed=SEED,
        kinds=(migration,),
        hang_seconds=10.0,
        nested=nested,
        mid_batch_ddl=mid_batch_ddl,
        concurrency=concurrency,
    )

    async def body() -> Report:
        await fuzzer.check("before the first input")  # the baseline
        return await fuzzer.run(INPUTS, BATCH)

    return asyncio.run(body())


def _verdict(report: Report) -> str:
    lines = [report.summary(), *report.batch_problems[:5]]
    lines += [
        f"{o.kind} {o.case.index}: {o.detail} {o.case.data[:200]!r}" for o in report.failures[:5]
    ]
    return "\n".join(lines)


#: Found by this fuzzer in ordinary sessions, not among the known bugs (README, "Fuzzing"):
#: a guarded Query after a failed Execute and before its Sync hangs the session
#: (`scripts/fuzz replay 1:23`), and further hangs still to be minimized.
NEW_ORDINARY_BUGS = "hangs found by this fuzzer in ordinary sessions (README, Fuzzing)"


@pytest.mark.xfail(reason=NEW_ORDINARY_BUGS, strict=False)
def test_ordinary_sessions(
    proxy: RunningProxy, log_since: Callable[[], list[str]], fuzz_table: None
) -> None:
    # Without the two input families of known bugs (their own tests below).
    report = fuzz(proxy, log_since, migration=False, nested=False, mid_batch_ddl=False)
    assert not report.failures and not report.batch_problems, _verdict(report)
    assert report.kinds.get("answered", 0) > INPUTS // 4, report.summary()


@pytest.mark.xfail(reason=KNOWN_MIGRATION_BUGS, strict=False)
def test_migration_sessions(
    proxy: RunningProxy, log_since: Callable[[], list[str]], fuzz_table: None
) -> None:
    report = fuzz(proxy, log_since, migration=True)
    assert not report.failures and not report.batch_problems, _verdict(report)
    assert report.kinds.get("answered", 0) > INPUTS // 4, report.summary()


def test_a_fresh_client_after_fuzzing(proxy: RunningProxy) -> None:
    with psycopg.connect(proxy.conninfo("u_trust")) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
