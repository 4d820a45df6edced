"""psql and pgbench through the proxy: multi-statement -c, \\copy, Ctrl-C, and pgbench's three
query modes."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from tests.fixtures.postgres import PgInfo
from tests.fixtures.proxy import RunningProxy
from tests.integration.probes import active_query_pid, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

PSQL = shutil.which("psql")
PGBENCH = shutil.which("pgbench")
needs_psql = pytest.mark.skipif(PSQL is None, reason="psql is not installed")
needs_pgbench = pytest.mark.skipif(PGBENCH is None, reason="pgbench is not installed")
BENCH_DB = "pgm_bench"


def client_env(proxy: RunningProxy, user: str, password: str | None = None) -> dict[str, str]:
    """The environment of a libpq command-line client pointed at the proxy (no PG* leaks in)."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
    env.update(
        PGHOST=proxy.host,
        PGPORT=str(proxy.port),
        PGUSER=user,
        PGDATABASE="postgres",
        PGCONNECT_TIMEOUT="10",
        PGSSLMODE="disable",
        LC_ALL="C",
    )
    if password is not None:
        env["PGPASSWORD"] = password
    return env


def psql(proxy: RunningProxy, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    assert PSQL is not None
    return subprocess.run(
        [PSQL, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-At", *args],
        env=client_env(proxy, "u_trust"),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@needs_psql
def test_psql_runs_several_statements_in_one_command(proxy: RunningProxy) -> None:
    done = psql(
        proxy,
        "-c",
        "CREATE TEMP TABLE ps (x int); INSERT INTO ps SELECT generate_series(1, 10);"
        " SELECT sum(x) FROM ps; SELECT current_setting('application_name')",
        "-c",
        "SELECT count(*) FROM ps",
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["55", "psql", "10"]


@needs_psql
def test_psql_copy(proxy: RunningProxy, tmp_path: Path) -> None:
    source, target = tmp_path / "in.csv", tmp_path / "out.csv"
    source.write_text("".join(f"{i},name {i}\n" for i in range(50_000)))
    done = psql(
        proxy,
        "-c",
        "CREATE TEMP TABLE pc (id int, name text)",
        "-c",
        f"\\copy pc FROM '{source}' WITH (FORMAT csv)",
        "-c",
        "SELECT count(*), sum(id) FROM pc",
        "-c",
        f"\\copy (SELECT * FROM pc ORDER BY id) TO '{target}' WITH (FORMAT csv)",
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [f"50000|{sum(range(50_000))}"]
    assert target.read_text() == source.read_text()


@needs_psql
def test_psql_ctrl_c_cancels_the_statement(
    proxy: RunningProxy, admin: psycopg.Connection[Any]
) -> None:
    assert PSQL is not None
    env = client_env(proxy, "u_trust") | {"PGAPPNAME": "pgm-psql-ctrl-c"}
    with subprocess.Popen(
        [PSQL, "-X", "-c", "SELECT pg_sleep(30)"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as child:
        try:
            wait_until(lambda: active_query_pid(admin, "pgm-psql-ctrl-c"), "pg_sleep to run")
            started = time.monotonic()
            child.send_signal(signal.SIGINT)
            _out, err = child.communicate(timeout=10)
            elapsed = time.monotonic() - started
        finally:
            child.kill()
    assert child.returncode != 0
    assert "canceling statement due to user request" in err, err
    assert elapsed < 5, f"psql needed {elapsed:.1f} s after Ctrl-C"


@pytest.fixture
def bench_db(admin: psycopg.Connection[Any]) -> Iterator[str]:
    """A database of its own for pgbench's tables, dropped afterwards."""
    name = sql.Identifier(BENCH_DB)
    admin.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(name))
    admin.execute(sql.SQL("CREATE DATABASE {}").format(name))
    yield BENCH_DB
    admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(name))


@needs_pgbench
def test_pgbench_in_every_query_mode(proxy: RunningProxy, pg: PgInfo, bench_db: str) -> None:
    assert PGBENCH is not None
    env = client_env(proxy, pg.superuser, pg.superuser_password) | {"PGDATABASE": bench_db}

    def pgbench(*args: str) -> str:
        done = subprocess.run([PGBENCH, *args], env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout + done.stderr

    pgbench("-i", "-s", "1", "-q")
    for mode in ("simple", "extended", "prepared"):
        report = pgbench("-M", mode, "-c", "4", "-j", "2", "-t", "200", "-n")
        processed = re.search(r"actually processed: (\d+)/(\d+)", report)
        assert processed is not None and processed.groups() == ("800", "800"), report
        failed = re.search(r"number of failed transactions: (\d+)", report)
        assert failed is not None and failed.group(1) == "0", report  # pgbench >= 15
