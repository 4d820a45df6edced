"""`pgmigrate-proxy demo`: the command end to end, and its scenario against the test server."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable

import pytest
from pgmigrate_proxy.demo import Result, Scenario, prepare_table, render, run_scenario

from tests.fixtures.postgres import PgInfo
from tests.fixtures.proxy import RunningProxy

pytestmark = pytest.mark.integration

#: Small and short: the order of events is checked, never how long they took.
SCENARIO = Scenario(
    table="demo_test_item",
    rows=100,
    workers=2,
    blocker_seconds=2.0,
    migration_delay=0.3,
    warmup=0.1,
    settle=0.1,
)


def test_demo_command_compares_direct_and_proxy() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pgmigrate_proxy", "demo", "--blocker-seconds", "3"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    direct = [line for line in lines if line.startswith("direct PostgreSQL ")]
    proxied = [line for line in lines if line.startswith("through the proxy ")]
    assert len(direct) == 1 and len(proxied) == 1, done.stdout
    assert "applied" in direct[0] and "not ended: committed on its own" in direct[0], done.stdout
    assert "applied" in proxied[0] and "terminated after" in proxied[0], done.stdout
    assert "pgmigrate: terminated pid" in done.stdout  # the proxy's notice to the migration


def check_common(result: Result) -> None:
    assert result.migration.ok, result.migration
    assert result.queries > 0 and result.window_queries > 0
    assert "app max" in render([("run", result)])


def test_scenario_direct_waits_for_the_blocker(pg: PgInfo) -> None:
    url = pg.url()
    prepare_table(url, SCENARIO)
    result = run_scenario(url, url, SCENARIO, "direct")
    check_common(result)
    assert not result.blocker.terminated
    assert result.errors == 0, result.error_samples
    # The ALTER could only finish once the blocker had committed (the same clock for both).
    assert result.migration_started + result.migration_seconds >= result.blocker.ended_after


def test_scenario_through_proxy_terminates_the_blocker(
    pg: PgInfo, proxy_factory: Callable[..., RunningProxy]
) -> None:
    proxy = proxy_factory()
    url = pg.url()
    prepare_table(url, SCENARIO)
    result = run_scenario(url, proxy.url(pg.superuser), SCENARIO, "proxy")
    check_common(result)
    assert result.blocker.terminated
    assert any("pgmigrate: terminated pid" in note for note in result.migration.notes)
