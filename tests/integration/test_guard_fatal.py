"""PostgreSQL's FATAL reaches the client when the backend of a guarded statement is terminated
while the guard holds or runs it (issue 9, finding 5): the client sees 57P01, as it does for
a relayed statement, not "server closed the connection unexpectedly"."""

from __future__ import annotations

import secrets
import threading
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from tests.fixtures.proxy import RunningProxy
from tests.integration.probes import active_sessions, proxy_tasks, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

USER = "u_trust"
MIGRATE = "-c pgmigrate.role=migrate"
#: The statement goes out at once and waits in the lock queue (a long lock_timeout, no retry).
IN_FLIGHT = (
    "-c pgmigrate.blocking_action=none -c pgmigrate.lock_timeout=50s -c pgmigrate.lock_budget=50s"
)
#: The guard holds the statement back while it reports its blocker.
HELD = "-c pgmigrate.blocking_action=show -c pgmigrate.max_hold=50s -c pgmigrate.lock_budget=50s"

Conn = psycopg.Connection[Any]


@pytest.fixture
def table(admin: Conn) -> Iterator[str]:
    name = f"fatal_{secrets.token_hex(4)}"
    admin.execute(f"CREATE TABLE {name} (id int)")
    admin.execute(f"ALTER TABLE {name} OWNER TO {USER}")
    yield name
    admin.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE usename = %s AND pid <> pg_backend_pid()",
        [USER],
    )
    admin.execute(f"DROP TABLE IF EXISTS {name}")


def waiting_on_lock(admin: Conn, pid: int) -> bool:
    row = admin.execute(
        "SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s", [pid]
    ).fetchone()
    return row is not None and row[0] == "Lock"


@pytest.mark.parametrize("stage", ["in-flight", "held"])
@pytest.mark.parametrize("role", ["ordinary", "migration"])
def test_terminated_backend_of_a_guarded_statement(
    proxy: RunningProxy, admin: Conn, pg: Any, table: str, stage: str, role: str
) -> None:
    options = (IN_FLIGHT if stage == "in-flight" else HELD) + (
        f" {MIGRATE}" if role == "migration" else ""
    )
    held = threading.Event()
    outcome: list[BaseException | str] = []
    conninfo = proxy.conninfo(USER, connect_timeout="10")
    with pg.connect() as blocker, psycopg.connect(conninfo, options=options) as conn:
        blocker.execute("BEGIN")
        blocker.execute(f"SELECT * FROM {table}")  # ACCESS SHARE until the end of the test
        pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        conn.commit()
        conn.add_notice_handler(
            lambda d: held.set() if "blocked by" in (d.message_primary or "") else None
        )

        def alter() -> None:
            try:
                conn.execute(f"ALTER TABLE {table} ADD COLUMN x int")
                outcome.append("applied")
            except BaseException as exc:
                outcome.append(exc)

        worker = threading.Thread(target=alter, daemon=True)
        worker.start()
        if stage == "in-flight":
            wait_until(lambda: waiting_on_lock(admin, pid), "the ALTER to wait for its lock")
        else:
            wait_until(held.is_set, "the guard to report the blocker")
        admin.execute("SELECT pg_terminate_backend(%s)", [pid])
        worker.join(20)
        assert not worker.is_alive()
        blocker.execute("ROLLBACK")
    (error,) = outcome
    assert isinstance(error, psycopg.errors.AdminShutdown), repr(error)
    assert error.sqlstate == "57P01"
    wait_until(lambda: active_sessions(proxy) == 0, "the session to close")
    wait_until(lambda: not proxy_tasks(proxy), "the proxy's tasks to finish")
