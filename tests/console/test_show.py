"""The admin console's SHOW commands with real clients connected: pgbouncer's columns, rows
that agree with what the clients and PostgreSQL say; psql against `pgbouncer` too."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from pgmigrate_proxy.console import guardview, pools

from tests.console.conftest import client, console, show
from tests.fixtures.postgres import PgInfo
from tests.fixtures.proxy import RunningProxy

pytestmark = pytest.mark.integration

Keep = Callable[[psycopg.Connection[Any]], psycopg.Connection[Any]]
PSQL = shutil.which("psql")


def test_show_pools_clients_servers_with_clients_connected(
    console_proxy: RunningProxy, pg: PgInfo, opened: Keep
) -> None:
    first = opened(client(console_proxy, application_name="show-one"))
    second = opened(client(console_proxy, application_name="show-two"))
    second.execute("BEGIN")
    second.execute("SELECT 1")
    pids = {first.info.backend_pid, second.info.backend_pid}
    admin = opened(console(console_proxy, pg.superuser))

    columns, found = show(admin, "POOLS")
    assert tuple(columns) == pools.POOLS_COLUMNS
    (pool,) = [row for row in found if row["user"] == "u_trust"]
    assert pool["database"] == "postgres"
    assert (pool["cl_active"], pool["cl_waiting"]) == (2, 0)
    assert pool["sv_active"] == 2  # session mode: each client holds its server
    assert pool["pool_mode"] == "session"

    columns, found = show(admin, "CLIENTS")
    assert tuple(columns) == pools.CONNECTION_COLUMNS
    by_name = {row["application_name"]: row for row in found}
    assert by_name["show-one"]["user"] == "u_trust"
    assert by_name["show-one"]["database"] == "postgres"
    assert by_name["show-one"]["state"] == "active"
    assert by_name["show-one"]["link"] == first.info.backend_pid
    assert by_name["show-one"]["addr"] == "127.0.0.1"
    consoles = [row for row in found if row["database"] == "pgmigrate"]
    assert len(consoles) == 1 and consoles[0]["user"] == pg.superuser
    assert len({row["id"] for row in found}) == len(found)

    columns, found = show(admin, "SERVERS")
    assert tuple(columns) == pools.CONNECTION_COLUMNS
    assert {row["remote_pid"] for row in found} == pids
    assert {row["state"] for row in found} == {"active"}
    assert {row["port"] for row in found} == {pg.port}
    linked = {row["link"] for row in found}
    assert linked == {by_name["show-one"]["id"], by_name["show-two"]["id"]}
    second.execute("COMMIT")


@pytest.mark.parametrize("guard", [True, False])
def test_show_stats_count_what_went_through(
    proxy_factory: Callable[..., RunningProxy], pg: PgInfo, opened: Keep, guard: bool
) -> None:
    proxy = proxy_factory(admin_users=(pg.superuser,), guard=guard)
    conn = opened(client(proxy))
    for _ in range(5):
        conn.execute("SELECT repeat('x', 1000)").fetchone()
    admin = opened(console(proxy, pg.superuser))
    columns, found = show(admin, "STATS")
    assert columns[:9] == [
        "database", "total_server_assignment_count", "total_xact_count", "total_query_count",
        "total_received", "total_sent", "total_xact_time", "total_query_time", "total_wait_time",
    ]  # fmt: skip
    (stats,) = [row for row in found if row["database"] == "postgres"]
    assert stats["total_query_count"] >= 5
    assert stats["total_xact_count"] >= 5
    assert stats["total_sent"] >= 5 * 1000  # the repeated x's came back
    assert stats["total_received"] >= 5 * len("SELECT repeat('x', 1000)")
    columns, found = show(admin, "STATS_TOTALS")
    assert tuple(columns) == pools.STATS_TOTALS_COLUMNS
    (totals,) = [row for row in found if row["database"] == "postgres"]
    assert totals["query_count"] >= stats["total_query_count"]


@pytest.mark.parametrize(
    ("mode", "guard"), [("session", True), ("session", False), ("transaction", True)]
)
def test_show_stats_time_queries_and_transactions(
    proxy_factory: Callable[..., RunningProxy], pg: PgInfo, opened: Keep, mode: str, guard: bool
) -> None:
    """query_time counts a query's run on the server, xact_time its transaction's, idle in
    transaction included; the averages are per query and per transaction, in microseconds."""
    proxy = proxy_factory(admin_users=(pg.superuser,), guard=guard, pool_mode=mode)
    conn = opened(client(proxy))
    conn.execute("SELECT pg_sleep(0.3)")
    conn.execute("BEGIN")
    conn.execute("SELECT pg_sleep(0.2)")
    time.sleep(0.5)  # idle in transaction: xact_time, not query_time
    conn.execute("COMMIT")
    admin = opened(console(proxy, pg.superuser))
    _, found = show(admin, "STATS_TOTALS")
    (totals,) = [row for row in found if row["database"] == "postgres"]
    assert 500_000 <= totals["query_time"] < 1_000_000, totals
    assert totals["xact_time"] >= totals["query_time"] + 450_000, totals
    _, found = show(admin, "STATS")
    (stats,) = [row for row in found if row["database"] == "postgres"]
    assert stats["total_query_time"] >= totals["query_time"]
    per_query = stats["total_query_time"] / stats["total_query_count"]
    per_xact = stats["total_xact_time"] / stats["total_xact_count"]
    assert abs(stats["avg_query_time"] - per_query) <= 1  # (rounding)
    assert abs(stats["avg_xact_time"] - per_xact) <= 1
    assert stats["avg_xact_time"] >= 500_000  # (1 s over 2 transactions, at least)


def test_show_databases_users_config_state_version_help(
    console_proxy: RunningProxy, pg: PgInfo, opened: Keep
) -> None:
    opened(client(console_proxy))
    admin = opened(console(console_proxy, pg.superuser))
    columns, found = show(admin, "DATABASES")
    assert tuple(columns) == pools.DATABASES_COLUMNS
    names = {row["name"]: row for row in found}
    assert names["postgres"]["port"] == pg.port
    assert names["postgres"]["current_connections"] == 1
    assert names["postgres"]["paused"] == 0
    assert {"pgbouncer", "pgmigrate"} <= set(names)
    columns, found = show(admin, "USERS")
    assert tuple(columns) == pools.USERS_COLUMNS
    assert "u_trust" in {row["name"] for row in found}

    columns, found = show(admin, "CONFIG")
    assert columns == ["key", "value", "default", "changeable"]
    config = {row["key"]: row for row in found}
    assert config["admin_users"]["value"] == f"{pg.superuser},u_trust"
    assert config["default_pool_size"]["changeable"] == "yes"
    assert config["upstream"]["changeable"] == "no"
    assert pg.superuser_password not in config["upstream"]["value"]

    _, found = show(admin, "STATE")
    state = {row["key"]: row["value"] for row in found}
    assert (state["active"], state["paused"], state["guard"]) == ("yes", "no", "on")
    assert state["admin_connection"] == "up"
    _, found = show(admin, "VERSION")
    assert found[0]["version"].startswith("pgmigrate-proxy ")
    _, found = show(admin, "HELP")
    assert any(row["command"].startswith("PAUSE") for row in found)
    _, found = show(admin, "HELD")
    assert found == []
    columns, _ = show(admin, "HELD")
    assert tuple(columns) == guardview.HELD_COLUMNS


@pytest.mark.skipif(PSQL is None, reason="psql is not installed")
def test_psql_on_the_pgbouncer_alias(console_proxy: RunningProxy, opened: Keep) -> None:
    opened(client(console_proxy, application_name="seen-by-psql"))
    env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
    env.update(
        PGHOST=console_proxy.host, PGPORT=str(console_proxy.port), PGUSER="u_trust",
        PGDATABASE="pgbouncer", PGCONNECT_TIMEOUT="10", PGSSLMODE="disable", LC_ALL="C",
    )  # fmt: skip
    assert PSQL is not None
    done = subprocess.run(
        [PSQL, "-X", "-A", "-F", "|", "-c", "SHOW CLIENTS", "-c", "SHOW VERSION"],
        env=env, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    header = done.stdout.splitlines()[0].split("|")
    assert tuple(header) == pools.CONNECTION_COLUMNS
    assert "seen-by-psql" in done.stdout
    assert "pgmigrate-proxy" in done.stdout
    bad = subprocess.run(
        [PSQL, "-X", "-c", "SELECT 1"], env=env, capture_output=True, text=True, timeout=30
    )
    assert bad.returncode != 0
    assert "invalid command" in bad.stderr
