"""Guard events over NOTIFY: a real `pgmigrate-proxy watch` process prints a guarded ALTER's
events; payloads stay under PostgreSQL's limit and hold nothing a role without rights could not
see of the blocking session itself."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import closing
from typing import Any

import psycopg
import pytest
from pgmigrate_proxy import events
from psycopg import sql

from tests.fixtures.postgres import PgInfo
from tests.fixtures.proxy import RunningProxy
from tests.fixtures.tables import scratch_table
from tests.guard.scenarios import BOUND, connect_through, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

SECRET = "blocker-secret-" + secrets.token_hex(4)


@pytest.fixture
def table(pg: PgInfo) -> Iterator[str]:
    with scratch_table(pg, "evt") as name:
        yield name
        with pg.connect() as conn:  # (sessions still holding it go before the DROP)
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_locks"
                " WHERE relation = to_regclass(%s) AND pid <> pg_backend_pid()",
                (name,),
            )


class Watch:
    """`pgmigrate-proxy watch` as a subprocess, its output lines collected by a thread."""

    def __init__(self, *args: str) -> None:
        command = [sys.executable, "-m", "pgmigrate_proxy", "watch", *args]
        self.process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self.lines: list[str] = []
        self.errors: list[str] = []
        self._threads = [
            threading.Thread(target=self._read, args=(self.process.stdout, self.lines)),
            threading.Thread(target=self._read, args=(self.process.stderr, self.errors)),
        ]
        for thread in self._threads:
            thread.start()

    @staticmethod
    def _read(stream: Any, into: list[str]) -> None:
        for line in stream:
            into.append(line.rstrip("\n"))

    def ready(self) -> None:
        wait_for(lambda: any("listening" in e for e in self.errors), "watch to LISTEN")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        code = self.process.wait(BOUND)
        for thread in self._threads:
            thread.join(BOUND)
        return code


def hold(conn: psycopg.Connection[Any], table: str) -> int:
    """An idle-in-transaction blocker on `table` whose query text holds SECRET."""
    conn.execute("BEGIN")
    conn.execute(
        sql.SQL("SELECT *, {} AS secret FROM {}").format(sql.Literal(SECRET), sql.Identifier(table))
    )
    return conn.info.backend_pid


def test_watch_prints_a_guarded_alter_s_events(
    pg: PgInfo, proxy: RunningProxy, table: str
) -> None:
    watch = Watch(pg.url())
    try:
        watch.ready()
        with closing(pg.connect(application_name="blocker")) as blocker:
            blocker_pid = hold(blocker, table)
            client = connect_through(proxy, pg)
            client.conn.execute(sql.SQL("ALTER TABLE {} ADD COLUMN a int").format(
                sql.Identifier(table)))  # fmt: skip
            client.conn.close()

        def seen(name: str) -> list[str]:
            return [line for line in watch.lines if f" {name} " in line]

        wait_for(lambda: seen("applied"), "the applied event")
    finally:
        code = watch.stop()
    assert code == 0, watch.errors
    print("\n".join(watch.lines))
    assert seen("held") and table in seen("held")[0]
    assert f"pids=[{blocker_pid}]" in seen("blockers")[0]
    assert f"pid={blocker_pid}" in seen("terminated")[0]
    assert "attempts=1" in seen("applied")[0]
    names = [line.split()[2] for line in watch.lines]
    assert names.index("held") < names.index("blockers") < names.index("terminated")
    assert names.index("terminated") < names.index("applied")
    host = f"{os.uname().nodename}:{os.getpid()}"  # the proxy runs in this process
    assert all(line.split()[1] == host for line in watch.lines)
    assert not any(SECRET in line for line in watch.lines)


def test_watch_bad_conninfo_is_one_line_and_exit_2() -> None:
    watch = Watch("host=127.0.0.1 port=1 connect_timeout=2")
    code = watch.process.wait(BOUND)
    watch.stop()
    assert code == 2
    assert len(watch.errors) == 1 and "cannot connect" in watch.errors[0], watch.errors


def test_huge_statement_fits_the_payload_limit(
    pg: PgInfo, proxy: RunningProxy, table: str
) -> None:
    watch = Watch(pg.url(), "--json")
    try:
        watch.ready()
        with closing(pg.connect()) as blocker:
            hold(blocker, table)
            client = connect_through(proxy, pg)
            huge = "x" * 50_000
            client.conn.execute(
                sql.SQL("ALTER TABLE {} ADD COLUMN big text DEFAULT {}").format(
                    sql.Identifier(table), sql.Literal(huge)
                )
            )
            client.conn.close()
        wait_for(lambda: any('"applied"' in line for line in watch.lines), "the applied event")
    finally:
        assert watch.stop() == 0, watch.errors
    parsed = [json.loads(line) for line in watch.lines]
    assert {"held", "blockers", "terminated", "attempt", "applied"} <= {
        p["event"] for p in parsed
    }
    assert all(len(line.encode()) < 8000 for line in watch.lines)


def test_fit_cuts_the_longest_texts() -> None:
    identity = events.Identity("h", 1, "i")
    payload = events.event_payload(
        "held", {"statement": "ALTER TABLE t ADD c text DEFAULT '" + "é" * 9000 + "'",
                 "application_name": "a" * 5000, "unit": 3}, identity)  # fmt: skip
    assert len(payload.encode()) < events.PAYLOAD_LIMIT + 1
    parsed = json.loads(payload)
    assert parsed["unit"] == 3 and parsed["statement"].startswith("ALTER TABLE t")
    nothing_to_cut = events.fit({"kind": "event", "event": "x", "many": ["y" * 30] * 1000})
    assert json.loads(nothing_to_cut) == {"kind": "event", "event": "x", "truncated": True}


def test_public_drops_other_sessions_texts() -> None:
    fields = {"pid": 9, "state": "idle in transaction", "query": "SELECT secret",
              "context": {"k": 1}, "client_addr": "10.0.0.1", "user": "app", "xact_age": 1.5,
              "statement": "ALTER ROLE r PASSWORD 'hunter2'"}  # fmt: skip
    shown = events.public(fields)
    assert shown == {"pid": 9, "state": "idle in transaction", "user": "app", "xact_age": 1.5,
                     "statement": "ALTER ROLE r PASSWORD '***'"}  # fmt: skip


def test_a_role_without_rights_listens_and_sees_no_blocker_query(
    pg: PgInfo, proxy: RunningProxy, table: str
) -> None:
    """NOTIFY/LISTEN needs no privilege: u_trust (no rights) hears the events, and nothing in them
    is more than what that role sees of the blocker in pg_stat_activity itself, beyond its state
    and ages (no query text, no client address, no pga_context)."""
    received: list[str] = []
    blocking = closing(pg.connect(application_name="blocker"))
    with pg.connect("u_trust") as listener, blocking as blocker:
        listener.execute("LISTEN pgmigrate_events")
        blocker_pid = hold(blocker, table)
        seen = listener.execute(
            "SELECT query, client_addr FROM pg_stat_activity WHERE pid = %s", (blocker_pid,)
        ).fetchone()
        assert seen == ("<insufficient privilege>", None)  # what u_trust may see of it
        client = connect_through(proxy, pg)
        client.conn.execute(sql.SQL("ALTER TABLE {} ADD COLUMN a int").format(
            sql.Identifier(table)))  # fmt: skip
        client.conn.close()

        def applied() -> bool:
            received.extend(n.payload for n in listener.notifies(timeout=0.1))
            return any('"applied"' in p for p in received)

        wait_for(applied, "the applied event on u_trust's connection")
    parsed = [json.loads(p) for p in received]
    blocker_events = [p for p in parsed if p.get("pid") == blocker_pid]
    assert blocker_events and blocker_events[0]["application_name"] == "blocker"
    for payload in received:
        assert SECRET not in payload
        assert "127.0.0.1" not in payload.replace('"client":"127.0.0.1', "")
    assert all("query" not in p and "client_addr" not in p for p in parsed)


def test_publishing_never_waits_for_a_down_admin_connection() -> None:
    """Admin connection down (never connected): publish() returns at once, the send is skipped
    (no reconnect), and the publisher's task ends: nothing is left on the loop."""
    import asyncio

    from pgmigrate_proxy.admin import AdminConnection
    from pgmigrate_proxy.runtime.publish import EventPublisher

    async def scenario() -> tuple[bool, int]:
        admin = AdminConnection("host=127.0.0.1 port=1 connect_timeout=1")
        publisher = EventPublisher(admin, "pgmigrate_events")
        await publisher.start()
        for name in ("held", "blockers", "applied"):
            publisher.publish(name, {"unit": 1, "statement": "ALTER TABLE t ADD c int"})
        assert not publisher.board  # applied: held no more
        task = publisher._task
        assert task is not None
        await asyncio.wait_for(task, BOUND)
        await publisher.close()
        return admin.connected, len(asyncio.all_tasks())

    connected, tasks = asyncio.run(scenario())
    assert not connected and tasks == 1  # only the scenario itself
