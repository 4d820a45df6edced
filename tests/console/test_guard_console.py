"""The console's view of the guard with a held ALTER TABLE and a blocker: SHOW HELD, BLOCKERS,
EVENTS; RELEASE; TERMINATE / CANCEL BLOCKERS, refused for an admin_users role that could not
end the blocker itself in PostgreSQL (the privilege rule of DESIGN.md)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import psycopg
import pytest
from psycopg import errors, sql

from tests.console.conftest import STATS_USER, console, show
from tests.fixtures.postgres import PgInfo
from tests.fixtures.proxy import RunningProxy
from tests.fixtures.tables import scratch_table
from tests.guard.scenarios import connect_through, wait_for

pytestmark = pytest.mark.integration

Keep = Callable[[psycopg.Connection[Any]], psycopg.Connection[Any]]


@pytest.fixture
def table(pg: PgInfo) -> Iterator[str]:
    with scratch_table(pg, "console") as name:
        yield name


@pytest.fixture
def held(
    proxy_factory: Callable[..., RunningProxy], pg: PgInfo, table: str, opened: Keep
) -> Iterator[tuple[RunningProxy, psycopg.Connection[Any], Future[Any], int]]:
    """A proxy that shows blockers and holds (blocking_action show, max_hold 10 min), a blocker
    idle in transaction on `table`, and an ALTER TABLE held behind it (running in a thread):
    (proxy, blocker, the ALTER's future, the held statement's id)."""
    proxy = proxy_factory(
        admin_users=(pg.superuser, "u_trust"),
        stats_users=(STATS_USER,),
        blocking_action="show",
        max_hold="10min",
    )
    blocker = opened(pg.connect(application_name="console-blocker"))
    blocker.execute("BEGIN")
    blocker.execute(sql.SQL("SELECT * FROM {}").format(sql.Identifier(table)))
    migration = connect_through(proxy, pg)
    opened(migration.conn)
    alter = sql.SQL("ALTER TABLE {} ADD COLUMN added int").format(sql.Identifier(table))
    with ThreadPoolExecutor(1) as executor:
        running = executor.submit(migration.conn.execute, alter)
        admin = opened(console(proxy, pg.superuser))

        def held_row() -> dict[str, Any] | None:
            rows = show(admin, "HELD")[1]
            return rows[0] if rows and "shown" in rows[0]["blockers"] else None

        row = wait_for(held_row, "the ALTER to be held with its blocker shown")
        yield proxy, blocker, running, int(row["id"])
        if not running.done():
            blocker.rollback()
        running.result(timeout=30)


def _alive(pg: PgInfo, pid: int) -> bool:
    with pg.connect() as conn:
        found = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,))
        row = found.fetchone()
    return row is not None and row[0] == 1


def _events(conn: psycopg.Connection[Any], unit: int) -> list[str]:
    return [row["event"] for row in show(conn, "EVENTS 100")[1] if row["unit"] == unit]


def test_show_held_blockers_events_then_release(
    held: tuple[RunningProxy, psycopg.Connection[Any], Future[Any], int],
    pg: PgInfo,
    table: str,
    opened: Keep,
) -> None:
    proxy, blocker, running, unit = held
    blocker_pid = blocker.info.backend_pid
    admin = opened(console(proxy, pg.superuser))
    (row,) = show(admin, "HELD")[1]
    assert row["statement"] == f'ALTER TABLE "{table}" ADD COLUMN added int'
    assert row["targets"].startswith(f"{table} (AccessExclusiveLock), inheritors of {table} (")
    assert (row["user"], row["database"], row["application_name"]) == (
        pg.superuser, "postgres", "migration",
    )  # fmt: skip
    assert (row["state"], row["action"]) == ("holding", "show")
    assert row["blockers"] == f"pid {blocker_pid} shown"
    assert row["held_s"] >= 0 and row["held_since"].endswith("UTC")
    clients = show(admin, "CLIENTS")[1]
    assert {r["id"] for r in clients if r["application_name"] == "migration"} == {row["client_id"]}

    (found,) = show(admin, "BLOCKERS")[1]
    assert (found["held_id"], found["pid"], found["state"]) == (
        unit, blocker_pid, "idle in transaction",
    )  # fmt: skip
    assert (found["locks"], found["done"]) == ("AccessShareLock", "shown")
    assert found["application_name"] == "console-blocker"
    assert found["query"].startswith("SELECT * FROM")

    columns, events = show(admin, "EVENTS 100")
    assert columns == ["time", "event", "unit", "statement_pid", "fields"]
    mine = [e for e in events if e["unit"] == unit]
    # ("blockers": the pids found, announced before anything is done to them)
    assert [e["event"] for e in mine[:3]] == ["held", "blockers", "blocked_by"]
    assert json.loads(mine[1]["fields"])["pids"] == [blocker_pid]
    assert json.loads(mine[2]["fields"])["pid"] == blocker_pid
    assert "attempt" not in _events(admin, unit)
    stats = opened(console(proxy, STATS_USER))  # sees the events, not the blockers' queries
    (shown,) = [e for e in show(stats, "EVENTS")[1] if e["event"] == "blocked_by"]
    assert json.loads(shown["fields"])["query"] == "<insufficient privilege>"
    assert json.loads(mine[2]["fields"])["query"].startswith("SELECT * FROM")

    admin.execute(f"RELEASE {unit}")
    wait_for(lambda: "attempt" in _events(admin, unit), "the released ALTER to be sent")
    assert not running.done()  # sent with a short lock_timeout: it retries while blocked
    blocker.rollback()
    running.result(timeout=30)
    assert show(admin, "HELD")[1] == []
    assert _events(admin, unit)[-1] == "applied"
    with pytest.raises(errors.UndefinedObject, match="no statement is held with id"):
        admin.execute(f"RELEASE {unit}")


def test_terminate_blockers_only_for_a_role_that_could_itself(
    held: tuple[RunningProxy, psycopg.Connection[Any], Future[Any], int],
    pg: PgInfo,
    opened: Keep,
) -> None:
    proxy, blocker, running, unit = held
    blocker_pid = blocker.info.backend_pid
    powerless = opened(console(proxy, "u_trust"))  # in admin_users, no rights in PostgreSQL
    (seen,) = show(powerless, "BLOCKERS")[1]
    assert (seen["pid"], seen["query"]) == (blocker_pid, "<insufficient privilege>")
    with pytest.raises(errors.InsufficientPrivilege, match="permission denied to terminate"):
        powerless.execute(f"TERMINATE BLOCKERS {unit}")
    with pytest.raises(errors.InsufficientPrivilege, match="permission denied to cancel"):
        powerless.execute("CANCEL BLOCKERS")
    assert _alive(pg, blocker_pid)
    assert not running.done()

    admin = opened(console(proxy, pg.superuser))
    rows = admin.execute(f"TERMINATE BLOCKERS {unit}").fetchall()
    assert rows == [(unit, blocker_pid, "terminated")]
    running.result(timeout=30)  # the ALTER went on once its blocker was gone
    wait_for(lambda: not _alive(pg, blocker_pid), "the blocker to be gone")
    assert "console_terminated" in [r["event"] for r in show(admin, "EVENTS")[1]]


def test_cancel_blockers_ends_a_running_query(
    proxy_factory: Callable[..., RunningProxy], pg: PgInfo, table: str, opened: Keep
) -> None:
    proxy = proxy_factory(admin_users=(pg.superuser,), blocking_action="show", max_hold="10min")
    blocker = opened(pg.connect(application_name="console-sleeper"))
    query = sql.SQL("SELECT pg_sleep(60) FROM (SELECT 1) AS one, {}").format(sql.Identifier(table))
    migration = connect_through(proxy, pg)
    opened(migration.conn)
    admin = opened(console(proxy, pg.superuser))
    with ThreadPoolExecutor(2) as executor:
        with pg.connect() as direct:
            direct.execute(sql.SQL("INSERT INTO {} VALUES (1)").format(sql.Identifier(table)))
        sleeping = executor.submit(blocker.execute, query)
        wait_for(lambda: _active(pg, blocker.info.backend_pid), "the blocker's query to run")
        alter = sql.SQL("ALTER TABLE {} ADD COLUMN added int").format(sql.Identifier(table))
        running = executor.submit(migration.conn.execute, alter)

        def held_row() -> dict[str, Any] | None:
            rows = show(admin, "HELD")[1]
            return rows[0] if rows and rows[0]["blockers"] else None

        row = wait_for(held_row, "the ALTER to be held, its blocker shown")
        rows = admin.execute(f"CANCEL BLOCKERS {row['id']}").fetchall()
        assert rows == [(row["id"], blocker.info.backend_pid, "cancelled")]
        with pytest.raises(errors.QueryCanceled):
            sleeping.result(timeout=30)
        running.result(timeout=30)


def _active(pg: PgInfo, pid: int) -> bool:
    with pg.connect() as conn:
        found = conn.execute("SELECT state FROM pg_stat_activity WHERE pid = %s", (pid,))
        row = found.fetchone()
    return row is not None and row[0] == "active"
