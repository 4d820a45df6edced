"""pgbench through transaction pooling: 64 clients on 8 server connections (the issue's
figures), in simple and extended query modes, every transaction processed and none failed."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable
from typing import Any

import psycopg
import pytest

from tests.fixtures.postgres import PgInfo
from tests.fixtures.proxy import RunningProxy
from tests.integration.probes import wait_until
from tests.integration.test_cli_clients import PGBENCH, bench_db, client_env, needs_pgbench

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]
__all__ = ["bench_db"]  # (the fixture, used here by name)

POOL_SIZE = 8
CLIENTS = 64


@needs_pgbench
@pytest.mark.parametrize("mode", ["simple", "extended"])
def test_pgbench_32_clients_on_4_servers(
    proxy_factory: Callable[..., RunningProxy],
    pg: PgInfo,
    admin: psycopg.Connection[Any],
    bench_db: str,
    mode: str,
) -> None:
    assert PGBENCH is not None
    proxy = proxy_factory(pool_mode="transaction", default_pool_size=POOL_SIZE)
    env = client_env(proxy, pg.superuser, pg.superuser_password) | {"PGDATABASE": bench_db}
    direct = env | {"PGHOST": pg.host, "PGPORT": str(pg.port)}

    def pgbench(*args: str, environ: dict[str, str] = env) -> str:
        done = subprocess.run(
            [PGBENCH, *args], env=environ, capture_output=True, text=True, timeout=150
        )
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout + done.stderr

    pgbench("-i", "-s", "1", "-q", environ=direct)
    report = pgbench("-M", mode, "-c", str(CLIENTS), "-j", "2", "-t", "50", "-n")
    processed = re.search(r"actually processed: (\d+)/(\d+)", report)
    expected = str(CLIENTS * 50)
    assert processed is not None and processed.groups() == (expected, expected), report
    print(mode, re.findall(r"tps = [\d.]+", report))  # (shown with -s: not asserted)
    failed = re.search(r"number of failed transactions: (\d+)", report)
    assert failed is not None and failed.group(1) == "0", report

    def backends() -> bool:
        # a login's own server closed because the pool was full may still be exiting: its
        # backend leaves pg_stat_activity a moment after the proxy closed it
        row = admin.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = %s", [bench_db]
        ).fetchone()
        return row is not None and row[0] <= POOL_SIZE

    wait_until(backends, f"at most {POOL_SIZE} server connections left on {bench_db}")

    async def pool_size() -> int:
        return proxy.server.pools.pool(bench_db, pg.superuser).size

    assert proxy.call(pool_size()) <= POOL_SIZE
