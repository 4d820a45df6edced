"""Stall benchmark: application latency while a migration meets an idle-in-transaction session.

The scenario of ``pgmigrate-proxy demo`` (pgmigrate_proxy.demo): application workers run short
SELECTs and UPDATEs by random id on ``stall_item`` for the whole run, straight to PostgreSQL; a
session reads the table and stays idle in transaction (20 s by default); one second later
``python manage.py migrate stallapp 0002`` (an AddField: ALTER TABLE ... ADD COLUMN) runs in the
Django project bench/django_pgmigrate_1_6, in a virtualenv of its own with Django and
django-pgmigrate 1.6 from PyPI. The table is created by the project's initial migration. Targets:

- direct: plain Django ``migrate`` straight to PostgreSQL (the ALTER waits for the blocker);
- pgmigrate16: django-pgmigrate 1.6 with its defaults (blocking action Terminate, checked every
  second, no lock_timeout), straight to PostgreSQL;
- proxy: plain Django ``migrate`` through ``pgmigrate-proxy`` (a subprocess) with
  blocking_action=terminate; the migrate session is a migration session (application_name);
- proxy-show: the same with blocking_action=show and lock_budget (5 s by default): the
  migration fails with 55P03 once the budget is spent, or succeeds if the blocker ends first;
- proxy-drain: the same with blocking_action=drain (drain_timeout 2 s, drain_then terminate).

--scenario busy (bench/stall_busy.py, issue 11 item 4): 16 workers run short transactions (1 to
20 ms, some with two statements) on the table continuously, through the proxy in transaction
pooling for the proxy targets (straight to PostgreSQL for pgmigrate16 and direct); the migration
is `migrate stallapp 0003` (ADD COLUMN, then ADD CONSTRAINT ... UNIQUE: an index build); once
without a long blocker and once with an idle-in-transaction one straight to PostgreSQL
(--busy-runs). Reported per run and target: app max and p99 over the transactions that
overlapped the migration, app errors, sessions killed (PostgreSQL's log), migration wall time.

    python bench/stall.py                          # all targets, 20 s blocker
    python bench/stall.py --scenario busy --blocker-seconds 10
    python bench/stall.py --blocker-seconds 5 --targets direct,proxy --json out.json
    python bench/stall.py --pg 15                  # Debian's /usr/lib/postgresql/15/bin

The virtualenv is created once under $XDG_CACHE_HOME (default ~/.cache)/pgmigrate-bench/.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import re
import secrets
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import psycopg
import relay  # bench/relay.py: process helpers, tables, machine details
from psycopg import sql
from psycopg.conninfo import make_conninfo

relay.ensure_importable()
import stall_busy  # noqa: E402  (bench/stall_busy.py)
from pgmigrate_proxy.demo import (  # noqa: E402
    Migration,
    MigrationOutcome,
    Result,
    Scenario,
    describe_blocker,
    prepare_table,
    run_scenario,
)

if TYPE_CHECKING:
    from pgmigrate_proxy.embedded_postgres import PostgresServer

BENCH = Path(__file__).resolve().parent
DJANGO_PROJECT = BENCH / "django_pgmigrate_1_6"
REQUIREMENTS = ("django-pgmigrate==1.6.*", "Django>=4.2,<6", "psycopg[binary]")
VENV_PACKAGES = ("Django", "django-pgmigrate", "django-pglock", "django-pgactivity", "psycopg")
TABLE = "stall_item"  # the model's db_table
SUPERUSER = "postgres"
MIGRATION_APP_NAME = "stall-migration"
MIGRATE_TIMEOUT = 300.0
GOAL_PROXY_MS = 100.0
GOAL_PGMIGRATE_MS = 1000.0


@dataclass(frozen=True)
class Target:
    key: str
    title: str
    pgmigrate16: bool  # pgactivity, pglock and pgmigrate in INSTALLED_APPS
    proxy_args: tuple[str, ...] | None  # None: straight to PostgreSQL


def targets(budget: float) -> tuple[Target, ...]:
    show = ("--blocking-action", "show", "--lock-budget", f"{budget:g}")
    return (
        Target("direct", "PostgreSQL, plain Django migrate", False, None),
        Target("pgmigrate16", "django-pgmigrate 1.6 (Terminate)", True, None),
        Target("proxy", "pgmigrate-proxy, terminate", False, ("--blocking-action", "terminate")),
        Target("proxy-show", f"pgmigrate-proxy, show, {budget:g} s budget", False, show),
        Target("proxy-drain", "pgmigrate-proxy, drain (2 s, then terminate)", False, DRAIN),
    )


DRAIN = ("--blocking-action", "drain", "--drain-timeout", "2", "--drain-then", "terminate")
#: The proxy's pooling in the busy scenario: the application's traffic goes through it.
BUSY_POOL = ("--pool-mode", "transaction", "--default-pool-size", "20", "--max-client-conn", "200")
BUSY_RUNS = ("none", "long")


@dataclass(frozen=True)
class Options:
    blocker_seconds: float
    workers: int
    lock_budget: float
    targets: tuple[str, ...]
    pg: str | None
    venv: Path
    json_path: Path | None
    command: str
    scenario: str = "idle"
    busy_runs: tuple[str, ...] = BUSY_RUNS


@dataclass(frozen=True)
class TargetResult:
    target: Target
    result: Result | None
    migrate_alone_seconds: float | None  # manage.py migrate stallapp 0001, nothing in its way
    proxy_log: tuple[str, ...] = ()  # the proxy's guard lines
    error: str | None = None  # why the target was skipped


def default_venv() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "pgmigrate-bench" / "venv-pgmigrate16"


def parse_args(argv: Sequence[str]) -> Options:
    parser = argparse.ArgumentParser(
        prog="bench/stall.py", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    add = parser.add_argument
    add("--blocker-seconds", type=float, default=20.0, help="idle in transaction (default 20)")
    add("--workers", type=int, default=8, help="application workers (default 8)")
    add("--lock-budget", type=float, default=5.0, help="proxy-show's lock_budget (default 5)")
    keys = ",".join(t.key for t in targets(5.0))
    add(
        "--targets",
        default=None,
        help=f"comma-separated subset of {keys} (default: all; busy: all but direct)",
    )
    add("--pg", default=None, help="embedded | 15 | <bin dir> (default: env PGMIGRATE_PG)")
    add("--venv", type=Path, default=default_venv(), help="the Django virtualenv (cached)")
    add("--json", type=Path, dest="json_path", help="also write all results to this file")
    add("--scenario", choices=("idle", "busy"), default="idle", help="see above (default idle)")
    add(
        "--busy-runs",
        default=",".join(BUSY_RUNS),
        help="busy scenario: runs without (none) and with (long) the long blocker",
    )
    ns = parser.parse_args(argv)
    runs = tuple(k.strip() for k in ns.busy_runs.split(",") if k.strip())
    if not runs or set(runs) - set(BUSY_RUNS):
        parser.error(f"--busy-runs: a comma-separated subset of {','.join(BUSY_RUNS)}")
    if ns.scenario == "busy" and ns.workers == 8:
        ns.workers = 16  # the busy scenario's default
    if ns.targets is None:
        ns.targets = keys if ns.scenario == "idle" else keys.replace("direct,", "")
    chosen = tuple(k.strip() for k in ns.targets.split(",") if k.strip())
    unknown = sorted(set(chosen) - set(keys.split(",")))
    if unknown or not chosen:
        parser.error(f"--targets: unknown {', '.join(unknown) or 'empty list'}; choose from {keys}")
    return Options(
        blocker_seconds=ns.blocker_seconds,
        workers=ns.workers,
        lock_budget=ns.lock_budget,
        targets=chosen,
        pg=ns.pg,
        venv=ns.venv,
        json_path=ns.json_path,
        command=shlex.join(["python", "bench/stall.py", *argv]),
        scenario=ns.scenario,
        busy_runs=runs,
    )


# ----------------------------------------------------------------------------- the Django side


def ensure_venv(path: Path) -> Path:
    """The virtualenv's python, with REQUIREMENTS installed (once: a stamp file remembers)."""
    python, stamp = path / "bin" / "python", path / ".stall-requirements"
    wanted = "\n".join(REQUIREMENTS) + "\n"
    if python.exists() and stamp.exists() and stamp.read_text() == wanted:
        return python
    relay.note(f"creating {path} with {' '.join(REQUIREMENTS)} ...")
    path.parent.mkdir(parents=True, exist_ok=True)
    for argv in (
        [sys.executable, "-m", "venv", "--clear", str(path)],
        [
            str(python),
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            *REQUIREMENTS,
        ],
    ):
        done = subprocess.run(argv, capture_output=True, text=True, cwd=path.parent)
        if done.returncode:
            raise relay.BenchError(f"{shlex.join(argv)} failed: {done.stderr.strip()[-2000:]}")
    stamp.write_text(wanted)
    return python


def venv_versions(python: Path) -> dict[str, str]:
    code = (
        "import importlib.metadata as m, json; "
        f"print(json.dumps({{n: m.version(n) for n in {list(VENV_PACKAGES)!r}}}))"
    )
    # -I: not the checkout's django_pgmigrate.egg-info (2.0) from the current directory
    done = subprocess.run([str(python), "-I", "-c", code], capture_output=True, text=True)
    versions: dict[str, str] = json.loads(done.stdout) if done.returncode == 0 else {}
    return versions


def django_env(host: str, port: int, dbname: str, password: str, pgmigrate: bool) -> dict[str, str]:
    drop = ("PYTHONPATH", "VIRTUAL_ENV", "DJANGO_SETTINGS_MODULE")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(
        STALL_DB_HOST=host,
        STALL_DB_PORT=str(port),
        STALL_DB_NAME=dbname,
        STALL_DB_USER=SUPERUSER,
        STALL_DB_PASSWORD=password,  # in the environment: never on a command line
        STALL_DB_APPLICATION_NAME=MIGRATION_APP_NAME,
        STALL_PGMIGRATE="1" if pgmigrate else "0",
        PYTHONUNBUFFERED="1",
    )
    return env


def manage(
    python: Path, args: Sequence[str], env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(python), "manage.py", *args],
        cwd=DJANGO_PROJECT,
        env=env,
        capture_output=True,
        text=True,
        timeout=MIGRATE_TIMEOUT,
    )


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_PSYCOPG_ERROR = re.compile(r"^psycopg\.errors\.(\w+): (.*)$", re.MULTILINE)


def failure(output: str, returncode: int) -> str:
    """'SQLSTATE message' from a failed manage.py's traceback, else its last line."""
    found = _PSYCOPG_ERROR.findall(output)
    if found:
        name, message = found[-1]
        code = getattr(getattr(psycopg.errors, name, None), "sqlstate", None) or name
        return f"{code} {message.strip()}"
    if "Lock timeout expired" in output:  # django-pgmigrate's own words for 55P03
        return "55P03 Lock timeout expired. Aborting..."
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    return f"exit {returncode}: {lines[-1] if lines else '(no output)'}"


def django_migration(python: Path, env: dict[str, str], to: str = "0002") -> Migration:
    def migrate() -> MigrationOutcome:
        try:
            done = manage(python, ["migrate", "stallapp", to, "--no-input"], env)
        except subprocess.TimeoutExpired:
            return MigrationOutcome(False, f"manage.py migrate timed out ({MIGRATE_TIMEOUT:g} s)")
        output = _ANSI.sub("", done.stdout + done.stderr)
        notes = tuple(line.strip() for line in _ANSI.sub("", done.stdout).splitlines())
        notes = tuple(line for line in notes if line)
        if done.returncode == 0:
            return MigrationOutcome(True, None, notes)
        return MigrationOutcome(False, failure(output, done.returncode), notes)

    return migrate


# ----------------------------------------------------------------------------- one target


def start_postgres(stack: contextlib.ExitStack, opts: Options, password: str) -> PostgresServer:
    from pgmigrate_proxy.embedded_postgres import EmbeddedPostgresError, PostgresServer

    server = PostgresServer(
        bin_dir=relay.postgres_bin_dir(opts.pg),
        superuser=SUPERUSER,
        password=password,
        settings={"max_connections": "100", "synchronous_commit": "off"},
    )
    stack.callback(server.stop)
    try:
        server.start()
    except EmbeddedPostgresError as exc:
        raise relay.BenchError(str(exc)) from exc
    relay.note(f"PostgreSQL {server.major_version} on {server.host}:{server.port}")
    return server


def start_proxy(
    stack: contextlib.ExitStack,
    work: Path,
    server: PostgresServer,
    password: str,
    target: Target,
    extra: Sequence[str] = (),
    name: str | None = None,
) -> relay.Endpoint:
    """``python -m pgmigrate_proxy`` for one target; the upstream (with its password) in env."""
    assert target.proxy_args is not None
    port = relay.free_port()
    argv = [sys.executable, "-m", "pgmigrate_proxy", "--listen-host", "127.0.0.1"]
    argv += ["--listen-port", str(port), "--log-level", "info"]
    argv += ["--migration-application-names", MIGRATION_APP_NAME, *target.proxy_args, *extra]
    name = name or target.key
    path = os.pathsep.join(p for p in (str(relay.PROXY_SOURCE), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path, "PGMIGRATE_PROXY_UPSTREAM": server.url()}
    service = relay.spawn(stack, name, argv, work / f"{name}.log", env=env)
    endpoint = relay.Endpoint(name, "127.0.0.1", port, password, service.process.pid)
    relay.wait_until_accepting(endpoint, service)
    relay.note(f"{target.key}: pgmigrate-proxy on 127.0.0.1:{port} ({' '.join(target.proxy_args)})")
    return endpoint


def recreate_database(server: PostgresServer, dbname: str) -> None:
    with psycopg.connect(server.url(), autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(dbname))
        )
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))


def run_target(
    target: Target, server: PostgresServer, password: str, python: Path, opts: Options, work: Path
) -> TargetResult:
    dbname = "stall_" + target.key.replace("-", "_")
    recreate_database(server, dbname)
    app = make_conninfo(
        host=server.host,
        port=server.port,
        user=SUPERUSER,
        password=password,
        dbname=dbname,
        sslmode="disable",
    )
    scenario = Scenario(table=TABLE, workers=opts.workers, blocker_seconds=opts.blocker_seconds)
    with contextlib.ExitStack() as stack:
        host, port = server.host, server.port
        if target.proxy_args is not None:
            try:
                proxy = start_proxy(stack, work, server, password, target)
            except relay.BenchError as exc:
                return TargetResult(target, None, None, error=str(exc).splitlines()[0])
            host, port = proxy.host, proxy.port
        env = django_env(host, port, dbname, password, target.pgmigrate16)
        began = time.monotonic()
        setup = manage(python, ["migrate", "stallapp", "0001", "--no-input"], env)
        alone = time.monotonic() - began
        if setup.returncode:
            output = _ANSI.sub("", setup.stdout + setup.stderr)
            return TargetResult(target, None, None, error=failure(output, setup.returncode))
        prepare_table(app, scenario, create=False)
        relay.note(f"{target.key}: running ({target.title}) ...")
        result = run_scenario(app, django_migration(python, env), scenario, label=target.key)
        log = work / f"{target.key}.log"
        lines = log.read_text(errors="replace").splitlines() if log.exists() else []
    relay.note(f"{target.key}: {summary(result)}")
    return TargetResult(target, result, alone, guard_events(lines))


def guard_events(lines: Sequence[str]) -> tuple[str, ...]:
    """The proxy log's guard events (without the repeated fields), warnings and errors."""
    events = []
    for line in lines:
        if " guard " in line:
            events.append(line.split(" guard ", 1)[1].split(" event=", 1)[0][:240])
        elif " WARNING " in line or " ERROR " in line:
            events.append(line[:240])
    return tuple(events)


def summary(result: Result) -> str:
    return (
        f"app max {result.app_max_ms:.0f} ms, p99 {result.app_p99_ms:.0f} ms, "
        f"{result.errors} errors; migration {result.migration_seconds:.2f} s "
        f"{'applied' if result.migration.ok else 'failed'}; blocker {describe_blocker(result)}"
    )


# ----------------------------------------------------------------------------- the busy scenario


@dataclass(frozen=True)
class BusyRow:
    run: str  # none | long
    target: Target
    result: stall_busy.BusyResult | None
    proxy_log: tuple[str, ...] = ()
    error: str | None = None


def run_busy_target(
    target: Target,
    run: str,
    server: PostgresServer,
    password: str,
    python: Path,
    opts: Options,
    work: Path,
) -> BusyRow:
    name = f"{target.key}-{run}"
    dbname = "busy_" + name.replace("-", "_")
    recreate_database(server, dbname)
    direct = make_conninfo(
        host=server.host, port=server.port, user=SUPERUSER, password=password, dbname=dbname,
        sslmode="disable",
    )  # fmt: skip
    scenario = stall_busy.BusyScenario(
        table=TABLE,
        workers=opts.workers,
        blocker_seconds=opts.blocker_seconds if run == "long" else 0.0,
    )
    with contextlib.ExitStack() as stack:
        host, port = server.host, server.port
        if target.proxy_args is not None:
            try:
                proxy = start_proxy(stack, work, server, password, target, BUSY_POOL, name)
            except relay.BenchError as exc:
                return BusyRow(run, target, None, error=str(exc).splitlines()[0])
            host, port = proxy.host, proxy.port
        env = django_env(host, port, dbname, password, target.pgmigrate16)
        setup = manage(python, ["migrate", "stallapp", "0001", "--no-input"], env)
        if setup.returncode:
            output = _ANSI.sub("", setup.stdout + setup.stderr)
            return BusyRow(run, target, None, error=failure(output, setup.returncode))
        prepare_table(direct, Scenario(table=TABLE, rows=scenario.rows), create=False)
        app = make_conninfo(direct, host=host, port=port, application_name="stall-app")
        migration = django_migration(python, env, "0003")

        def migrate() -> tuple[bool, str | None, tuple[str, ...]]:
            outcome = migration()
            return outcome.ok, outcome.error, outcome.notes

        relay.note(f"{name}: running ({target.title}, blocker: {run}) ...")
        result = stall_busy.run_busy(app, direct, migrate, scenario, server.log_path)
        log = work / f"{name}.log"
        lines = log.read_text(errors="replace").splitlines() if log.exists() else []
    relay.note(f"{name}: {busy_summary(result)}")
    return BusyRow(run, target, result, guard_events(lines))


def busy_summary(r: stall_busy.BusyResult) -> str:
    return (
        f"app max {r.app_max_ms:.0f} ms, p99 {r.app_p99_ms:.0f} ms, {r.errors} errors, "
        f"{r.killed} killed; migration {r.migration_seconds:.2f} s "
        f"{'applied' if r.migration_ok else 'failed: ' + str(r.migration_error)}"
    )


BUSY_HEADER = [
    "blocker",
    "target",
    "app max",
    "app p99",
    "app max outside",
    "app errors",
    "sessions killed",
    "migration wall time",
]


def busy_row(item: BusyRow) -> list[str]:
    r = item.result
    if r is None:
        return [item.run, item.target.title, "skipped", "", "", "", item.error or ""]
    outcome = "applied" if r.migration_ok else f"failed, {(r.migration_error or '?').split()[0]}"
    killed = str(r.killed)
    if r.blocker_killed is not None:
        killed += " (blocker among them)" if r.blocker_killed else " (blocker not)"
    return [
        "idle in transaction" if item.run == "long" else "none",
        item.target.title,
        f"{r.app_max_ms:.0f} ms",
        f"{r.app_p99_ms:.0f} ms",
        f"{r.baseline_max_ms:.0f} ms",
        str(r.errors),
        killed,
        f"{r.migration_seconds:.2f} s ({outcome})",
    ]


def busy_goals(rows: Sequence[BusyRow]) -> list[str]:
    """Issue 11's goals for the drain: without the long blocker, no error, nobody killed, app max
    <= the longest transaction + 20 ms (the longest outside the migration, which is what the
    machine makes of a 20 ms transaction); with it and then=terminate, only the blocker killed."""
    lines = []
    for item in rows:
        r = item.result
        if item.target.key != "proxy-drain" or r is None:
            continue
        if item.run == "none":
            bound = max(r.longest_inflight_ms, r.baseline_max_ms) + 20
            ok = r.errors == 0 and r.killed == 0 and r.app_max_ms <= bound and r.migration_ok
            said = f"{r.errors} errors, {r.killed} killed, app max {r.app_max_ms:.0f} ms"
            lines.append(
                f"Goal, drain without a long blocker: no error, nobody killed, app max <= "
                f"{bound:.0f} ms: {'PASS' if ok else 'FAIL'} ({said})"
            )
        else:
            ok = r.killed == 1 and bool(r.blocker_killed) and r.migration_ok
            lines.append(
                "Goal, drain with the long blocker (then=terminate): only the blocker killed: "
                f"{'PASS' if ok else 'FAIL'} ({r.killed} killed, blocker "
                f"{'among them' if r.blocker_killed else 'not'}, {r.errors} app errors)"
            )
    return lines


def busy_render(opts: Options, rows: Sequence[BusyRow], machine_line: str) -> str:
    table = [busy_row(item) for item in rows]
    scenario = (
        f"{opts.workers} application workers, each looping over short transactions on {TABLE} "
        "(BEGIN; UPDATE by random id; half the time a SELECT; 1 to 20 ms in all; COMMIT; 2 ms "
        "pause), through the proxy in transaction pooling for the proxy targets (pool size 20), "
        "straight to PostgreSQL for django-pgmigrate 1.6; `manage.py migrate stallapp 0003` "
        "(ADD COLUMN, then ADD CONSTRAINT ... UNIQUE, an index build) after 1 s; with blocker: a "
        f"session straight to PostgreSQL reads the table and stays idle in transaction for "
        f"{opts.blocker_seconds:g} s, the migration 1 s after its read. App max / p99: the "
        "transactions that overlapped the migration, BEGIN to COMMIT; errors: the whole run; "
        "sessions killed: backends ended by pg_terminate_backend (PostgreSQL's log)."
    )
    parts = [scenario, "", relay.text_table(BUSY_HEADER, table), ""]
    for item in rows:
        r, key = item.result, f"{item.target.key}/{item.run}"
        if r is None:
            continue
        if r.migration_error:
            parts.append(f"{key}: migration error: {r.migration_error}")
        parts += [f"{key}: app error: {e}" for e in r.error_samples]
        parts += [f"{key}: proxy log: {line}" for line in item.proxy_log[-4:]]
    parts += ["", *busy_goals(rows), "", "Markdown for the README:", ""]
    parts += [relay.markdown_table(BUSY_HEADER, table), ""]
    parts += [f"Command: `{opts.command}`", "", f"Machine: {machine_line}"]
    return "\n".join(parts)


# ----------------------------------------------------------------------------- report


HEADER = [
    "target",
    "app max",
    "app p99",
    "app errors",
    "migration wall time",
    "migrate alone",
    "blocker ended?",
]


def row(item: TargetResult) -> list[str]:
    r = item.result
    if r is None:
        return [item.target.title, "skipped", "", "", item.error or "", "", ""]
    outcome = "applied" if r.migration.ok else f"failed, {(r.migration.error or '?').split()[0]}"
    blocker = r.blocker
    ended = "yes, terminated" if blocker.terminated else "no, committed"
    alone = "n/a" if item.migrate_alone_seconds is None else f"{item.migrate_alone_seconds:.2f} s"
    return [
        item.target.title,
        f"{r.app_max_ms:.0f} ms",
        f"{r.app_p99_ms:.0f} ms",
        str(r.errors),
        f"{r.migration_seconds:.2f} s ({outcome})",
        alone,
        f"{ended} after {blocker.ended_after:.1f} s",
    ]


def goal(results: Sequence[TargetResult]) -> str:
    by_key = {item.target.key: item.result for item in results}
    proxy, old = by_key.get("proxy"), by_key.get("pgmigrate16")
    text = (
        f"Goal: max application latency through the proxy <= {GOAL_PROXY_MS:.0f} ms where "
        f"django-pgmigrate 1.6 shows >= {GOAL_PGMIGRATE_MS / 1000:g} s: "
    )
    if proxy is None or old is None:
        return text + "n/a (needs the proxy and pgmigrate16 targets)"
    ok = proxy.app_max_ms <= GOAL_PROXY_MS and old.app_max_ms >= GOAL_PGMIGRATE_MS
    return text + (
        f"{'PASS' if ok else 'FAIL'} (proxy {proxy.app_max_ms:.0f} ms, "
        f"django-pgmigrate 1.6 {old.app_max_ms:.0f} ms)"
    )


def machine(server: PostgresServer, versions: dict[str, str], load_at_start: float) -> str:
    with psycopg.connect(server.url(), autocommit=True) as conn:
        row_ = conn.execute("SHOW server_version").fetchone()
    in_venv = ", ".join(f"{name} {version}" for name, version in versions.items())
    return (
        f"{os.cpu_count()} CPUs ({relay.cpu_model()}), Linux {platform.release()}; "
        f"PostgreSQL {row_[0] if row_ else '?'}; Python {platform.python_version()}, "
        f"psycopg {relay.package_version('psycopg')}, uvloop {relay.package_version('uvloop')}; "
        f"Django venv: {in_venv}; load average {load_at_start:.2f} at start, "
        f"{os.getloadavg()[0]:.2f} at end"
    )


def render(opts: Options, results: Sequence[TargetResult], machine_line: str) -> str:
    rows = [row(item) for item in results]
    scenario = (
        f"{opts.workers} application workers (SELECT / UPDATE by random id, autocommit, straight "
        f"to PostgreSQL); a session reads {TABLE} and stays idle in transaction for "
        f"{opts.blocker_seconds:g} s; 1 s later `manage.py migrate stallapp 0002` (ADD COLUMN). "
        "App max / p99: the queries that overlapped the migration (a stalled worker sends nothing "
        "more until its query returns, so a stall shows in the max); errors: the whole run. "
        "Migrate alone: `migrate stallapp 0001` on the same target with nothing in its way "
        "(Python and Django start-up included)."
    )
    parts = [scenario, "", relay.text_table(HEADER, rows), ""]
    for item in results:
        r = item.result
        if r is None:
            continue
        if r.migration.error:
            parts.append(f"{item.target.key}: migration error: {r.migration.error}")
        parts += [f"{item.target.key}: app error: {e}" for e in r.error_samples]
        said = [n for n in r.migration.notes if "erminated" in n or "Blocked" in n or "Lock" in n]
        parts += [f"{item.target.key}: migrate said: {n}" for n in said[:3]]
        parts += [f"{item.target.key}: proxy log: {line}" for line in item.proxy_log[-4:]]
    parts += ["", goal(results), "", "Markdown for the README:", ""]
    parts += [relay.markdown_table(HEADER, rows), ""]
    parts += [f"Command: `{opts.command}`", "", f"Machine: {machine_line}"]
    return "\n".join(parts)


def write_json(
    path: Path, opts: Options, results: Sequence[TargetResult], machine_line: str
) -> None:
    data = {
        "options": dataclasses.asdict(opts),
        "machine": machine_line,
        "goal": goal(results),
        "results": [dataclasses.asdict(item) for item in results],
    }
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


# ----------------------------------------------------------------------------- main


def benchmark(opts: Options, stack: contextlib.ExitStack) -> str:
    load_at_start = os.getloadavg()[0]
    python = ensure_venv(opts.venv)
    versions = venv_versions(python)
    if not versions.get("django-pgmigrate", "").startswith("1.6"):
        raise relay.BenchError(f"{opts.venv} does not hold django-pgmigrate 1.6: {versions}")
    work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="pgmigrate-stall-")))
    password = secrets.token_urlsafe(18)
    server = start_postgres(stack, opts, password)
    chosen = [t for t in targets(opts.lock_budget) if t.key in opts.targets]
    if opts.scenario == "busy":
        rows = [
            run_busy_target(t, run, server, password, python, opts, work)
            for run in opts.busy_runs
            for t in chosen
        ]
        machine_line = machine(server, versions, load_at_start)
        if opts.json_path:
            data = {"options": dataclasses.asdict(opts), "machine": machine_line}
            data["results"] = [dataclasses.asdict(item) for item in rows]
            opts.json_path.write_text(json.dumps(data, indent=2, default=str) + "\n")
        return busy_render(opts, rows, machine_line)
    results = [run_target(t, server, password, python, opts, work) for t in chosen]
    machine_line = machine(server, versions, load_at_start)
    if opts.json_path:
        write_json(opts.json_path, opts, results, machine_line)
        relay.note(f"results written to {opts.json_path}")
    return render(opts, results, machine_line)


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(sys.argv[1:] if argv is None else argv)
    signal.signal(signal.SIGTERM, relay.exit_on_sigterm)
    try:
        with contextlib.ExitStack() as stack:
            report = benchmark(opts, stack)
    except relay.BenchError as exc:
        relay.note(f"stall benchmark failed: {exc}")
        return 1
    except KeyboardInterrupt:
        relay.note("interrupted; everything started was stopped")
        return 130
    print(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
