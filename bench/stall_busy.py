"""The busy-table scenario of bench/stall.py (--scenario busy): the application's workers run short
transactions on the table continuously, through the proxy in transaction pooling when the target
has one (straight to PostgreSQL otherwise), while a migration adds a column and then an
index-backed constraint; optionally one long idle-in-transaction blocker straight to PostgreSQL.

Each worker loops: BEGIN; UPDATE one row by random id; (half the time) a SELECT of another;
the transaction lasts 1 to 20 ms (the client waits inside it); COMMIT; a 2 ms pause. A
transaction's latency is from BEGIN to the end of COMMIT. Sessions killed are counted from the
PostgreSQL log ("terminating connection due to administrator command", one line per backend
ended by pg_terminate_backend).
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

KILLED = "terminating connection due to administrator command"


@dataclass(frozen=True)
class BusyScenario:
    table: str = "stall_item"
    rows: int = 1000
    workers: int = 16
    shortest: float = 0.001  # a transaction's length, drawn from [shortest, longest]
    longest: float = 0.020
    think: float = 0.002  # pause between a worker's transactions
    warmup: float = 1.0  # workers alone before the blocker / migration
    blocker_seconds: float = 0.0  # 0: no long blocker
    migration_delay: float = 1.0  # from the blocker's read to the migration
    settle: float = 1.0  # workers go on after the migration ends


@dataclass(frozen=True)
class Txn:
    start: float
    latency: float
    ok: bool
    longest_statement_gap: float  # how long the client waited inside it (its own length)


@dataclass
class BusyResult:
    transactions: int
    window_transactions: int
    app_max_ms: float
    app_p99_ms: float
    longest_inflight_ms: float  # the longest transaction the workers meant to run (1 to 20 ms)
    baseline_max_ms: float  # the longest transaction outside the migration (the machine's noise)
    errors: int
    error_samples: tuple[str, ...]
    killed: int  # backends ended by pg_terminate_backend during the run
    blocker_killed: bool | None  # None: no blocker
    migration_seconds: float
    migration_ok: bool
    migration_error: str | None
    migration_notes: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)


def _worker(
    conninfo: str,
    scenario: BusyScenario,
    seed: int,
    stop: threading.Event,
    out: list[Txn],
    errors: list[str],
) -> None:
    rng = random.Random(seed)
    table = sql.Identifier(scenario.table)
    update = sql.SQL("UPDATE {} SET v = v + 1 WHERE id = %s").format(table)
    select = sql.SQL("SELECT v FROM {} WHERE id = %s").format(table)
    conn: psycopg.Connection[Any] | None = None
    while not stop.is_set():
        started = time.monotonic()
        length = rng.uniform(scenario.shortest, scenario.longest)
        try:
            if conn is None or conn.closed:
                conn = psycopg.connect(conninfo, autocommit=True, prepare_threshold=None)
                started = time.monotonic()
            with conn.transaction():
                conn.execute(update, (rng.randint(1, scenario.rows),))
                time.sleep(length / 2)
                if rng.random() < 0.5:
                    conn.execute(select, (rng.randint(1, scenario.rows),))
                time.sleep(length / 2)
            out.append(Txn(started, time.monotonic() - started, True, length))
        except psycopg.Error as exc:
            out.append(Txn(started, time.monotonic() - started, False, length))
            errors.append(f"{exc.sqlstate or type(exc).__name__}: {str(exc).strip()[:160]}")
            if conn is not None:
                conn.close()
            conn = None
            stop.wait(0.05)  # as an application would before it reconnects
        stop.wait(scenario.think)
    if conn is not None:
        conn.close()


def _blocker(
    conninfo: str, scenario: BusyScenario, ready: threading.Event, out: list[bool]
) -> None:
    """Reads the table, stays idle in transaction; out: [True] when it was killed."""
    try:
        with psycopg.connect(conninfo, application_name="stall-blocker") as conn:
            conn.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(scenario.table)))
            ready.set()
            time.sleep(scenario.blocker_seconds)
            conn.commit()
        out.append(False)
    except psycopg.Error:
        out.append(True)
    finally:
        ready.set()


def _p99(values: Sequence[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] if ordered else 0.0


def _log_size(path: Path | None) -> int:
    return path.stat().st_size if path is not None and path.exists() else 0


def _killed_since(path: Path | None, offset: int) -> int:
    if path is None or not path.exists():
        return 0
    with path.open("rb") as log:
        log.seek(offset)
        return log.read().decode("utf-8", "replace").count(KILLED)


Migrate = Callable[[], tuple[bool, str | None, tuple[str, ...]]]


def run_busy(
    app_conninfo: str,
    blocker_conninfo: str,
    migrate: Migrate,
    scenario: BusyScenario,
    server_log: Path | None,
) -> BusyResult:
    """Workers on `app_conninfo` (the proxy or PostgreSQL), the blocker straight to PostgreSQL,
    then `migrate()`; the measurements."""
    stop = threading.Event()
    samples: list[list[Txn]] = [[] for _ in range(scenario.workers)]
    errors: list[str] = []
    offset = _log_size(server_log)
    threads = [
        threading.Thread(
            target=_worker,
            args=(app_conninfo, scenario, seed, stop, samples[seed], errors),
            daemon=True,
        )
        for seed in range(scenario.workers)
    ]
    for thread in threads:
        thread.start()
    blocked: list[bool] = []
    blocker_thread = None
    try:
        time.sleep(scenario.warmup)
        if scenario.blocker_seconds > 0:
            ready = threading.Event()
            blocker_thread = threading.Thread(
                target=_blocker, args=(blocker_conninfo, scenario, ready, blocked), daemon=True
            )
            blocker_thread.start()
            ready.wait(30)
            time.sleep(scenario.migration_delay)
        began = time.monotonic()
        ok, error, notes = migrate()
        ended = time.monotonic()
        time.sleep(scenario.settle)
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    if blocker_thread is not None:
        blocker_thread.join(scenario.blocker_seconds + 30)
    every = [t for per in samples for t in per]
    window = [t for t in every if t.start < ended and t.start + t.latency > began]
    latencies = [t.latency * 1000 for t in window]
    inside = {id(t) for t in window}
    outside = [t.latency * 1000 for t in every if id(t) not in inside and t.ok]
    return BusyResult(
        transactions=len(every),
        window_transactions=len(window),
        app_max_ms=max(latencies, default=0.0),
        app_p99_ms=_p99(latencies),
        longest_inflight_ms=max((t.longest_statement_gap for t in window), default=0.0) * 1000,
        baseline_max_ms=max(outside, default=0.0),
        errors=sum(1 for t in every if not t.ok),
        error_samples=tuple(dict.fromkeys(errors))[:3],
        killed=_killed_since(server_log, offset),
        blocker_killed=(blocked[0] if blocked else None) if scenario.blocker_seconds > 0 else None,
        migration_seconds=ended - began,
        migration_ok=ok,
        migration_error=error,
        migration_notes=notes,
    )
