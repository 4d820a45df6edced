"""Helpers of the end-to-end guard scenarios (test_scenarios.py): application traffic straight to
PostgreSQL with per-query latencies, clients through the proxy that keep their notices, polling."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import psycopg
from psycopg import errors, sql

from tests.fixtures.postgres import PgInfo
from tests.fixtures.proxy import RunningProxy

T = TypeVar("T")

#: Every wait of these tests is bounded by this many seconds unless it says otherwise.
BOUND = 15.0
CONNECT_SECONDS = "10"


def wait_for(probe: Callable[[], T | None], what: str, timeout: float = BOUND) -> T:
    """Poll `probe` until it returns something truthy (every 10 ms, at most `timeout` s)."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.01)


def stays(probe: Callable[[], bool], what: str, seconds: float) -> None:
    """Poll `probe` for `seconds`: it must stay true throughout."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert probe(), f"no longer true: {what}"
        time.sleep(0.02)


@dataclass(frozen=True)
class Notice:
    severity: str
    message: str
    detail: str


@dataclass
class Client:
    """A psycopg connection through the proxy and the notices it received (in order)."""

    conn: psycopg.Connection[Any]
    notices: list[Notice] = field(default_factory=list)

    def messages(self, severity: str | None = None) -> list[str]:
        return [n.message for n in list(self.notices) if severity in (None, n.severity)]

    def has_notice(self, text: str, severity: str | None = None) -> bool:
        return any(text in message for message in self.messages(severity))

    def server_pid(self) -> int:
        row = self.conn.execute("SELECT pg_backend_pid()").fetchone()
        assert row is not None
        return int(row[0])


def connect_through(
    proxy: RunningProxy, pg: PgInfo, *, options: str = "", autocommit: bool = True
) -> Client:
    """The superuser through the proxy, with pgmigrate / PostgreSQL startup `options`."""
    params = {"connect_timeout": CONNECT_SECONDS, "application_name": "migration"}
    if options:
        params["options"] = options
    conn = psycopg.connect(proxy.conninfo(pg.superuser, **params), autocommit=autocommit)
    client = Client(conn)

    def keep(diag: psycopg.errors.Diagnostic) -> None:
        client.notices.append(
            Notice(
                diag.severity_nonlocalized or diag.severity or "",
                diag.message_primary or "",
                diag.message_detail or "",
            )
        )

    conn.add_notice_handler(keep)
    return client


@dataclass(frozen=True)
class Sample:
    start: float  # time.monotonic() when the query was sent
    latency: float  # seconds until its result (or its error)
    ok: bool


class Traffic:
    """Application sessions straight to PostgreSQL: short SELECTs and UPDATEs on one table in a
    loop, each query's start and latency recorded.

    A session the guard terminates (it held a lock on the table at the wrong moment) is counted
    in `killed` and reconnects; any other error is kept in `errors`.
    """

    def __init__(self, pg: PgInfo, table: str, sessions: int = 2, pause: float = 0.005) -> None:
        self._conninfo = pg.direct_conninfo(
            application_name="app-traffic",
            connect_timeout=CONNECT_SECONDS,
            options="-c statement_timeout=20s",
        )
        self._table = table
        self._pause = pause
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.samples: list[Sample] = []
        self.killed = 0
        self.errors: list[str] = []
        self._counts = [0] * sessions
        self._threads = [
            threading.Thread(target=self._loop, args=(i,), name=f"app-{i}", daemon=True)
            for i in range(sessions)
        ]

    def __enter__(self) -> Traffic:
        for thread in self._threads:
            thread.start()
        self.wait_queries(3)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)
        stuck = [t.name for t in self._threads if t.is_alive()]
        assert not stuck, f"application sessions still running a query: {stuck}"

    def wait_queries(self, count: int, timeout: float = BOUND) -> None:
        """Until every session has completed `count` more queries than now."""
        with self._lock:
            targets = [done + count for done in self._counts]

        def reached() -> bool:
            with self._lock:
                return all(done >= want for done, want in zip(self._counts, targets, strict=True))

        wait_for(reached, f"{count} more queries of each application session", timeout)

    def max_latency(self, since: float, until: float | None = None) -> float:
        """The longest query that ran (even partly) between `since` and `until` (default: now)."""
        until = time.monotonic() if until is None else until
        with self._lock:
            overlapping = [
                s.latency for s in self.samples if s.start <= until and s.start + s.latency >= since
            ]
        assert overlapping, "no application query ran in the window"
        return max(overlapping)

    def queries(self, since: float, until: float | None = None) -> int:
        until = time.monotonic() if until is None else until
        with self._lock:
            return sum(1 for s in self.samples if since <= s.start <= until)

    def _loop(self, index: int) -> None:
        table = sql.Identifier(self._table)
        statements = [
            sql.SQL("SELECT count(*) FROM {}").format(table),
            sql.SQL("UPDATE {} SET id = id WHERE id = %s").format(table),
        ]
        conn: psycopg.Connection[Any] | None = None
        turn = 0
        while not self._stop.is_set():
            start = time.monotonic()
            ok = False
            try:
                if conn is None:
                    conn = psycopg.connect(self._conninfo, autocommit=True)
                    start = time.monotonic()
                statement = statements[turn % 2]
                conn.execute(statement, (turn % 10 + 1,) if turn % 2 else None)
                ok = True
            except psycopg.OperationalError as exc:
                with self._lock:
                    if isinstance(exc, errors.AdminShutdown):
                        self.killed += 1
                    else:
                        self.errors.append(f"{type(exc).__name__}: {exc}")
                if conn is not None:
                    conn.close()
                conn = None
            except psycopg.Error as exc:
                with self._lock:
                    self.errors.append(f"{type(exc).__name__}: {exc}")
            latency = time.monotonic() - start
            with self._lock:
                self.samples.append(Sample(start, latency, ok))
                self._counts[index] += 1
            turn += 1
            self._stop.wait(self._pause)
        if conn is not None:
            conn.close()

    def summary(self, since: float, until: float | None = None) -> str:
        latency = self.max_latency(since, until)
        return (
            f"{self.queries(since, until)} application queries, max latency "
            f"{latency * 1000:.1f} ms, {self.killed} application session(s) terminated"
        )


class PgLog:
    """The PostgreSQL server log from the moment this object was made."""

    def __init__(self, pg: PgInfo) -> None:
        self._path = pg.server.log_path
        self._offset = self._size()

    def _size(self) -> int:
        path = self._path
        return path.stat().st_size if path is not None and path.exists() else 0

    def text(self) -> str:
        if self._path is None:
            return ""
        with self._path.open("rb") as log:
            log.seek(self._offset)
            return log.read().decode("utf-8", "replace")


def shutdown_socket(conn: psycopg.Connection[Any]) -> None:
    """Close the client's side of the connection under psycopg's feet (from any thread): the
    proxy sees the client go away; psycopg's own thread then fails on the dead socket."""
    import socket

    fd = os.dup(conn.fileno())
    with socket.socket(fileno=fd) as sock:
        sock.shutdown(socket.SHUT_RDWR)


def column_exists(pg: PgInfo, table: str, column: str) -> bool:
    with pg.connect() as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_attribute WHERE attrelid = to_regclass(%s)"
            " AND attname = %s AND NOT attisdropped",
            (sql.Identifier(table).as_string(conn), column),
        ).fetchone()
    return row is not None and row[0] == 1


def backend_alive(pg: PgInfo, pid: int) -> bool:
    with pg.connect() as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,)
        ).fetchone()
    return row is not None and row[0] == 1


def backend_state(pg: PgInfo, pid: int) -> tuple[str | None, str | None] | None:
    """(state, wait_event_type) of a backend; None when it is gone."""
    with pg.connect() as conn:
        row = conn.execute(
            "SELECT state, wait_event_type FROM pg_stat_activity WHERE pid = %s", (pid,)
        ).fetchone()
    return None if row is None else (row[0], row[1])


def old_enough(pg: PgInfo, proxy: RunningProxy, pid: int) -> None:
    """Until backend `pid` passes the proxy's age filters (min_transaction_age, min_query_age):
    a blocker the blocking action acts on rather than spares."""
    config = proxy.server.config
    margin = 0.05

    def aged() -> bool:
        with pg.connect() as conn:
            row = conn.execute(
                "SELECT extract(epoch FROM now() - xact_start),"
                " extract(epoch FROM now() - query_start)"
                " FROM pg_stat_activity WHERE pid = %s",
                (pid,),
            ).fetchone()
        assert row is not None, f"backend {pid} is gone"
        xact_age, query_age = (float(v) if v is not None else 0.0 for v in row)
        return (
            xact_age >= config.min_transaction_age + margin
            and query_age >= config.min_query_age + margin
        )

    wait_for(aged, f"backend {pid} to pass the age filters")


def lines(text: str, *needles: str) -> Iterator[str]:
    for line in text.splitlines():
        if all(needle in line for needle in needles):
            yield line
