"""`pgmigrate-proxy demo`: the lock-queue stall, straight to PostgreSQL and then through the proxy.

Application workers read and write a table; a session reads it and stays idle in transaction;
then a migration adds a column. Straight to PostgreSQL, the ALTER queues behind the idle
session and every application query queues behind the ALTER. Through the proxy, the idle
session is terminated first and the ALTER gets its lock at once. The scenario functions take
conninfo strings, so that bench/stall.py runs them against other targets.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import random
import select
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

#: (when it started, how long it took), monotonic seconds.
Sample = tuple[float, float]


@dataclass(frozen=True)
class Scenario:
    table: str = "pgmigrate_demo_item"
    rows: int = 1000
    workers: int = 8
    blocker_seconds: float = 5.0  # how long the blocker stays idle in transaction
    migration_delay: float = 1.0  # from the blocker's read to the migration
    think: float = 0.002  # each worker's pause between queries
    warmup: float = 0.5  # workers run alone before the blocker starts
    settle: float = 0.5  # workers keep running after the migration and the blocker end


@dataclass(frozen=True)
class MigrationOutcome:
    ok: bool
    error: str | None = None  # "SQLSTATE message" or the tool's last words
    notes: tuple[str, ...] = ()  # notices, or the migrate command's output


@dataclass(frozen=True)
class BlockerOutcome:
    terminated: bool  # ended by someone else (False: it committed on its own)
    ended_after: float  # seconds after its read


@dataclass(frozen=True)
class Result:
    label: str
    queries: int  # application queries in the whole run
    window_queries: int  # ... of which overlapped the migration
    app_max_ms: float  # over the queries that overlapped the migration
    app_p99_ms: float
    errors: int  # application queries (or reconnections) that failed, whole run
    error_samples: tuple[str, ...]
    migration_started: float  # seconds after the blocker's read
    migration_seconds: float  # wall time
    migration: MigrationOutcome
    blocker: BlockerOutcome


Migration = Callable[[], MigrationOutcome]


def _sql(template: str, scenario: Scenario) -> sql.Composed:
    return sql.SQL(template).format(sql.Identifier(scenario.table))


def prepare_table(conninfo: str, scenario: Scenario, *, create: bool = True) -> None:
    """(Re)create the table unless `create` is False (it exists, empty), and fill it."""
    with psycopg.connect(conninfo, autocommit=True) as conn:
        if create:
            conn.execute(_sql("DROP TABLE IF EXISTS {}", scenario))
            conn.execute(
                _sql("CREATE TABLE {} (id integer PRIMARY KEY, v integer NOT NULL)", scenario)
            )
        fill = _sql("INSERT INTO {} SELECT g, 0 FROM generate_series(1, %s) g", scenario)
        conn.execute(fill, (scenario.rows,))
        conn.execute(_sql("VACUUM ANALYZE {}", scenario))


def sql_migration(conninfo: str, scenario: Scenario) -> Migration:
    """The migration as one ALTER TABLE ... ADD COLUMN on its own autocommit connection."""

    def migrate() -> MigrationOutcome:
        notes: list[str] = []
        name = "demo-migration"
        try:
            with psycopg.connect(conninfo, autocommit=True, application_name=name) as conn:
                conn.add_notice_handler(
                    lambda d: notes.append(f"{d.severity}: {d.message_primary}")
                )
                conn.execute(_sql("ALTER TABLE {} ADD COLUMN note varchar(100)", scenario))
        except psycopg.Error as exc:
            return MigrationOutcome(False, _error_text(exc), tuple(notes))
        return MigrationOutcome(True, None, tuple(notes))

    return migrate


def _error_text(exc: psycopg.Error) -> str:
    lines = str(exc).strip().splitlines() or [type(exc).__name__]
    return f"{exc.sqlstate or type(exc).__name__} {lines[0]}"


def _worker(
    conninfo: str, scenario: Scenario, stop: threading.Event, out: tuple[list[Sample], list[str]]
) -> None:
    samples, errors = out
    rng = random.Random()
    queries = (
        _sql("SELECT v FROM {} WHERE id = %s", scenario),
        _sql("UPDATE {} SET v = v + 1 WHERE id = %s", scenario),
    )
    conn: psycopg.Connection[tuple[object, ...]] | None = None
    while not stop.is_set():
        try:
            if conn is None:
                conn = psycopg.connect(conninfo, autocommit=True, application_name="demo-app")
            query, key = rng.choice(queries), rng.randint(1, scenario.rows)
            began = time.monotonic()
            conn.execute(query, (key,))
            samples.append((began, time.monotonic() - began))
        except psycopg.Error as exc:
            errors.append(_error_text(exc))
            if conn is not None and conn.broken:
                conn.close()
                conn = None
            stop.wait(0.05)
        stop.wait(scenario.think)
    if conn is not None:
        conn.close()


def _blocker(
    conninfo: str,
    scenario: Scenario,
    ready: threading.Event,
    out: list[BlockerOutcome],
    read_at: list[float],
) -> None:
    """Read the table in a transaction, then stay idle in it; note when and how it ended."""
    conn = psycopg.connect(conninfo, application_name="demo-blocker")
    try:
        conn.execute(_sql("SELECT count(*) FROM {}", scenario))
        began = time.monotonic()
        read_at.append(began)
        ready.set()
        # The socket turns readable when the server ends the session (FATAL 57P01, then EOF).
        select.select([conn.fileno()], [], [], scenario.blocker_seconds)
        ended = time.monotonic() - began
        try:
            conn.commit()
            out.append(BlockerOutcome(False, ended))
        except psycopg.Error:
            out.append(BlockerOutcome(True, ended))
    finally:
        ready.set()
        conn.close()


def _p99(values: Sequence[float]) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)] if ordered else 0.0


def run_scenario(
    app_conninfo: str, migration: str | Migration, scenario: Scenario, label: str = ""
) -> Result:
    """Workers and the blocker on `app_conninfo`; the migration on `migration` (a conninfo
    for sql_migration, or a callable). The table must be ready (prepare_table)."""
    migrate = sql_migration(migration, scenario) if isinstance(migration, str) else migration
    stop, ready = threading.Event(), threading.Event()
    samples: list[Sample] = []
    errors: list[str] = []
    blocked: list[BlockerOutcome] = []
    read_at: list[float] = []
    workers = [
        threading.Thread(
            target=_worker, args=(app_conninfo, scenario, stop, (samples, errors)), daemon=True
        )
        for _ in range(scenario.workers)
    ]
    blocker = threading.Thread(
        target=_blocker, args=(app_conninfo, scenario, ready, blocked, read_at), daemon=True
    )
    try:
        for thread in workers:
            thread.start()
        time.sleep(scenario.warmup)
        blocker.start()
        ready.wait(30)
        time.sleep(scenario.migration_delay)
        began = time.monotonic()
        outcome = migrate()
        ended = time.monotonic()
        blocker.join(scenario.blocker_seconds + 30)
        time.sleep(scenario.settle)
    finally:
        stop.set()
        for thread in workers:
            thread.join(60)
    if not blocked or not read_at:
        raise RuntimeError("the blocker session did not start: " + "; ".join(errors[:3]))
    window = [took for start, took in samples if start <= ended and start + took >= began]
    return Result(
        label=label,
        queries=len(samples),
        window_queries=len(window),
        app_max_ms=max(window, default=0.0) * 1000,
        app_p99_ms=_p99(window) * 1000,
        errors=len(errors),
        error_samples=tuple(dict.fromkeys(errors))[:5],
        migration_started=began - read_at[0],
        migration_seconds=ended - began,
        migration=outcome,
        blocker=blocked[0],
    )


# --- the command ---------------------------------------------------------------------------------


@contextlib.contextmanager
def running_proxy(upstream: str, **settings: Any) -> Iterator[str]:
    """An in-process proxy (embed.EmbeddedProxy) in front of `upstream`; yields its URL."""
    from pgmigrate_proxy.config import Config
    from pgmigrate_proxy.embedded_postgres import libpq_url
    from pgmigrate_proxy.embedded_proxy import EmbeddedProxy

    config = Config(upstream=upstream, listen_host="127.0.0.1", listen_port=0, **settings)
    params = psycopg.conninfo.conninfo_to_dict(upstream)
    user, dbname = str(params.get("user", "postgres")), str(params.get("dbname", "postgres"))
    with EmbeddedProxy(config) as proxy:
        yield libpq_url(proxy.host, proxy.port, user, None, dbname)


def describe_blocker(result: Result) -> str:
    how = "terminated" if result.blocker.terminated else "not ended: committed on its own"
    return f"{how} after {result.blocker.ended_after:.1f} s"


def render(results: Sequence[tuple[str, Result]]) -> str:
    """The comparison table, one row per (name, result)."""
    lines = [f"{'':18}{'app max':>10}{'app p99':>10}{'app errors':>12}  {'migration':31}blocker"]
    for name, r in results:
        done = "applied" if r.migration.ok else f"failed ({r.migration.error})"
        migration = f"{r.migration_seconds:.2f} s, {done}"
        lines.append(
            f"{name:18}{r.app_max_ms:>7.0f} ms{r.app_p99_ms:>7.0f} ms{r.errors:>12}  "
            f"{migration:31}{describe_blocker(r)}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str]) -> int:
    """`pgmigrate-proxy demo [--pg embedded|15|DIR] [--blocker-seconds S] [--workers N]`."""
    from pgmigrate_proxy.embedded_postgres import (
        EmbeddedPostgresError,
        PostgresServer,
        resolve_bin_dir,
    )

    parser = argparse.ArgumentParser(prog="pgmigrate-proxy demo", description=__doc__)
    parser.add_argument("--pg", help="embedded | 15 | <bin dir> (default: env PGMIGRATE_PG)")
    parser.add_argument("--blocker-seconds", type=float, default=5.0)
    parser.add_argument("--workers", type=int, default=8)
    args = parser.parse_args(argv)
    scenario = Scenario(blocker_seconds=args.blocker_seconds, workers=args.workers)
    try:
        server = PostgresServer(bin_dir=resolve_bin_dir(args.pg), password=None)
        server.start()
    except (EmbeddedPostgresError, OSError) as exc:
        print(f"pgmigrate-proxy demo: cannot start PostgreSQL: {exc}")
        return 1
    try:
        url = server.url()
        print(
            f"PostgreSQL {server.major_version} on port {server.port}. Table {scenario.table} "
            f"({scenario.rows} rows); {scenario.workers} application workers run SELECT and "
            f"UPDATE by random id; a session reads the table and stays idle in transaction for "
            f"{scenario.blocker_seconds:g} s; {scenario.migration_delay:g} s later a migration "
            "runs ALTER TABLE ... ADD COLUMN.\n",
            flush=True,
        )
        results: list[tuple[str, Result]] = []
        print("1/2 straight to PostgreSQL ...", flush=True)
        prepare_table(url, scenario)
        results.append(("direct PostgreSQL", run_scenario(url, url, scenario, "direct")))
        print("2/2 the migration through the proxy (guard on, terminate) ...\n", flush=True)
        with running_proxy(url, guard=True, blocking_action="terminate") as proxy_url:
            prepare_table(url, scenario)
            results.append(("through the proxy", run_scenario(url, proxy_url, scenario, "proxy")))
    finally:
        server.stop()
    print(render(results))
    print(
        "\napp max / p99: latency of the application queries that overlapped the migration "
        f"({', '.join(str(r.window_queries) for _, r in results)} queries; a stalled worker "
        "sends nothing more until its query returns, so a stall shows in the max). The "
        "application connects straight to PostgreSQL in both runs; only the migration goes "
        "through the proxy."
    )
    for name, result in results:
        for line in (*result.migration.notes, *result.error_samples):
            print(f"{name}: {line}")
    return 0
