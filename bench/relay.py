"""Relay benchmark: pgbench -S straight to PostgreSQL, through pgbouncer, through pgmigrate_proxy.

Starts a throwaway PostgreSQL (``pgmigrate_proxy.embedded_postgres.PostgresServer``), loads it with
``pgbench -i``, starts pgbouncer (session mode) and ``python -m pgmigrate_proxy`` in front of it,
then runs ``pgbench -S -n`` for every (clients, mode) pair against the three targets in rotating
order, several repetitions each.  It reports median TPS, the proxy's ratios to direct and to
pgbouncer, each relay's CPU time per transaction (``/proc/<pid>/stat``), and the resident memory
each relay spends per idle client connection (``/proc/<pid>/status``).  Everything it starts is
stopped on exit, Ctrl-C and SIGTERM included.

    python bench/relay.py --quick          # smoke test, about a minute
    python bench/relay.py                  # full: 1,16,64 clients x 3 modes x 3 reps x 10 s
    python bench/relay.py --clients 16 --modes prepared --reps 5 --duration 20 --json out.json
    python bench/relay.py --pg 15          # Debian's /usr/lib/postgresql/15/bin
    python bench/relay.py --pool-mode transaction --quick   # = python bench/pooler.py --quick

``--pool-mode transaction`` runs the transaction-pooling benchmark (bench/pooler.py, with the
flags that follow): pgbench -S at 16 and 256 clients, pool size 16, against pgbouncer in
transaction mode and direct PostgreSQL. Without it (``session``), this one: pgbouncer in
session mode, every client with a server connection of its own.

Missing pgbouncer is skipped with a message; a proxy that does not start or cannot relay is
skipped the same way, so direct and pgbouncer figures still come out.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.metadata
import importlib.util
import json
import os
import platform
import pwd
import re
import resource
import secrets
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, TypeVar

import psycopg
from psycopg.conninfo import make_conninfo

if TYPE_CHECKING:
    from pgmigrate_proxy.embedded_postgres import PostgresServer

REPO = Path(__file__).resolve().parent.parent
PROXY_SOURCE = REPO / "proxy"
MODES = ("simple", "extended", "prepared")
POOL_MODES = ("session", "transaction")  # --pool-mode: transaction runs bench/pooler.py
DIRECT, PGBOUNCER, PROXY, BASELINE = "direct", "pgbouncer", "proxy", "baseline"
TARGETS = (DIRECT, PGBOUNCER, PROXY, BASELINE)
SERVICE_USER = "pgmigrate"  # the unprivileged account embedded_postgres.py runs PostgreSQL as
SUPERUSER = "postgres"
PGBOUNCER_BINARY = Path("/usr/sbin/pgbouncer")
FALLBACK_PGBENCH = Path("/usr/bin/pgbench")
READY_TIMEOUT = 30.0
TPS_RE = re.compile(r"^tps = ([0-9.]+) \(without initial connection time\)", re.MULTILINE)
TRANSACTIONS_RE = re.compile(r"^number of transactions actually processed: (\d+)", re.MULTILINE)
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
MICRO = "\N{MICRO SIGN}s"


T = TypeVar("T")


class BenchError(Exception):
    """A failure that ends the benchmark (or skips one target) with a one-line explanation."""


# ----------------------------------------------------------------------------- options


@dataclass(frozen=True)
class Options:
    clients: tuple[int, ...]
    modes: tuple[str, ...]
    reps: int
    duration: int
    idle_clients: int
    scale: int
    pg: str | None
    json_path: Path | None
    command: str
    baseline: str | None = None


def _int_list(text: str) -> tuple[int, ...]:
    values = tuple(int(part) for part in text.split(",") if part.strip())
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _mode_list(text: str) -> tuple[str, ...]:
    values = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = sorted(set(values) - set(MODES))
    if not values or unknown:
        raise argparse.ArgumentTypeError(f"modes are {','.join(MODES)}; got {text!r}")
    return values


def _count(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


def _choose(given: T | None, quick: bool, quick_default: T, default: T) -> T:
    """A flag given on the command line wins over --quick's default."""
    if given is not None:
        return given
    return quick_default if quick else default


def parse_args(argv: Sequence[str]) -> Options:
    parser = argparse.ArgumentParser(
        prog="bench/relay.py", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    add = parser.add_argument
    add(
        "--pool-mode",
        choices=POOL_MODES,
        default="session",
        help="transaction: run bench/pooler.py instead, with the other flags (see its --help)",
    )
    add("--quick", action="store_true", help="smoke test: 1 rep, 3 s, 16 clients, 100 idle clients")
    add("--clients", type=_int_list, help="pgbench client counts (default 1,16,64)")
    add("--modes", type=_mode_list, help="pgbench -M protocols (default simple,extended,prepared)")
    add("--reps", type=_count(1), help="repetitions of each run (default 3)")
    add("--duration", type=_count(1), help="seconds per pgbench run (default 10)")
    add(
        "--idle-clients", type=_count(0), help="connections for the idle memory test (default 1000)"
    )
    add("--scale", type=_count(1), default=10, help="pgbench -i scale factor (default 10)")
    add("--pg", default=None, help="embedded | 15 | <bin dir> (default: env PGMIGRATE_PG)")
    add("--json", type=Path, dest="json_path", help="also write all results to this file")
    add(
        "--baseline",
        metavar="REV",
        help="also run the proxy of git revision REV side by side (alternating with this one), "
        "for a before/after comparison in one run, e.g. --baseline HEAD~1",
    )
    ns = parser.parse_args(argv)
    quick: bool = ns.quick
    return Options(
        clients=_choose(ns.clients, quick, (16,), (1, 16, 64)),
        modes=_choose(ns.modes, quick, MODES, MODES),
        reps=_choose(ns.reps, quick, 1, 3),
        duration=_choose(ns.duration, quick, 3, 10),
        idle_clients=_choose(ns.idle_clients, quick, 100, 1000),
        scale=ns.scale,
        pg=ns.pg,
        json_path=ns.json_path,
        command=shlex.join(["python", "bench/relay.py", *argv]),
        baseline=ns.baseline,
    )


# ----------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Endpoint:
    """Where pgbench connects, and which process (if any) is the relay to meter."""

    name: str
    host: str
    port: int
    password: str
    pid: int | None = None
    user: str = SUPERUSER
    dbname: str = "postgres"

    def conninfo(self, **extra: str | int) -> str:
        return make_conninfo(
            "",
            host=self.host,
            port=self.port,
            user=self.user,
            password=self.password,
            dbname=self.dbname,
            sslmode="disable",  # as pgbench below: no relay here offers TLS
            **extra,
        )


@dataclass(frozen=True)
class Run:
    """One pgbench run against one target."""

    target: str
    clients: int
    mode: str
    rep: int
    tps: float | None
    transactions: int
    cpu_seconds: float | None
    error: str | None = None

    @property
    def cpu_us_per_transaction(self) -> float | None:
        if self.cpu_seconds is None or not self.transactions:
            return None
        return self.cpu_seconds / self.transactions * 1e6


@dataclass(frozen=True)
class Cell:
    """All repetitions of one (clients, mode, target)."""

    tps: tuple[float, ...]
    cpu_us: tuple[float, ...]
    failures: int

    @property
    def median(self) -> float | None:
        return statistics.median(self.tps) if self.tps else None

    @property
    def cpu_median(self) -> float | None:
        return statistics.median(self.cpu_us) if self.cpu_us else None


@dataclass(frozen=True)
class IdleResult:
    """Resident memory of a relay before and after N idle client connections."""

    target: str
    requested: int
    opened: int
    rss_before_kb: int
    rss_after_kb: int
    hwm_before_kb: int
    hwm_after_kb: int
    error: str | None = None

    @property
    def kb_per_client(self) -> float | None:
        if not self.opened:
            return None
        return (self.rss_after_kb - self.rss_before_kb) / self.opened


@dataclass(frozen=True)
class MachineInfo:
    nproc: int
    cpu_model: str
    kernel: str
    postgres: str
    pgbench: str
    pgbouncer: str
    python: str
    uvloop: str
    psycopg: str
    load_average: str  # 1-minute load at start and end: other work on the machine skews TPS


@dataclass(frozen=True)
class Report:
    options: Options
    machine: MachineInfo
    targets: tuple[str, ...]
    skipped: dict[str, str]
    runs: tuple[Run, ...]
    idle: tuple[IdleResult, ...]

    def cell(self, clients: int, mode: str, target: str) -> Cell:
        runs = [r for r in self.runs if (r.clients, r.mode, r.target) == (clients, mode, target)]
        return Cell(
            tps=tuple(r.tps for r in runs if r.tps is not None),
            cpu_us=tuple(c for r in runs if (c := r.cpu_us_per_transaction) is not None),
            failures=sum(1 for r in runs if r.error),
        )


# ----------------------------------------------------------------------------- /proc


def _stat_fields(pid: int) -> list[str]:
    """Fields of /proc/<pid>/stat after the command name (index 0 is field 3, the state)."""
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2 :].split()


def process_tree(root: int) -> list[int]:
    """The process and its live descendants (the proxy may fork workers)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                pid = int(entry.name)
                children.setdefault(int(_stat_fields(pid)[1]), []).append(pid)
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, ()))
    return tree


def cpu_seconds(root: int) -> float:
    """utime + stime of the process tree, in seconds."""
    ticks = 0
    for pid in process_tree(root):
        with contextlib.suppress(OSError, IndexError):
            fields = _stat_fields(pid)
            ticks += int(fields[11]) + int(fields[12])
    return ticks / CLOCK_TICKS


def memory_kb(root: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) summed over the process tree, in kB."""
    rss = hwm = 0
    for pid in process_tree(root):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                key, _, value = line.partition(":")
                if key == "VmRSS":
                    rss += int(value.split()[0])
                elif key == "VmHWM":
                    hwm += int(value.split()[0])
    return rss, hwm


# ----------------------------------------------------------------------------- processes


@dataclass
class Service:
    """A subprocess we started and must stop, with the file its output goes to."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def failure(self, what: str) -> BenchError:
        """'<name> <what>: <last log line>' on the first line, the log tail below."""
        tail = self.log_tail()
        last = tail.splitlines()[-1].strip() if tail.strip() else "(empty log)"
        return BenchError(f"{self.name} {what}: {last}\n{tail}")

    def stop(self, timeout: float = 10.0) -> None:
        if self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@dataclass(frozen=True)
class Relay:
    """A relay under test: where to connect, and the process to meter and stop."""

    endpoint: Endpoint
    service: Service


def spawn(
    stack: contextlib.ExitStack,
    name: str,
    argv: list[str],
    log_path: Path,
    *,
    env: dict[str, str] | None = None,
    account: pwd.struct_passwd | None = None,
) -> Service:
    """Start argv in its own session (Ctrl-C reaches only us) and register its stop."""
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=log_path.parent,
            start_new_session=True,
            user=account.pw_uid if account else None,
            group=account.pw_gid if account else None,
            extra_groups=[] if account else None,
        )
    service = Service(name, process, log_path)
    stack.callback(service.stop)
    return service


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until_accepting(endpoint: Endpoint, service: Service) -> None:
    """Poll with a real connection (startup + auth) until it succeeds or the service dies."""
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        try:
            psycopg.connect(endpoint.conninfo(connect_timeout=3), autocommit=True).close()
            return
        except psycopg.OperationalError as exc:
            last_error = str(exc).strip()
        with contextlib.suppress(subprocess.TimeoutExpired):
            code = service.process.wait(0.2)
            raise service.failure(f"exited with status {code}")
        if time.monotonic() > deadline:
            raise service.failure(
                f"not accepting connections after {READY_TIMEOUT:.0f} s ({last_error})"
            )


def raise_open_file_limit(needed: int) -> None:
    """Idle clients, and the relays that inherit our limit, need one descriptor per socket."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            hard = needed  # only root may raise the hard limit; setrlimit says so if not
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
        except (ValueError, OSError) as exc:
            raise BenchError(f"cannot raise the open-file limit to {needed}: {exc}") from exc


def service_account() -> pwd.struct_passwd | None:
    """As root, the unprivileged account to run pgbouncer as (pgbouncer refuses root)."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(SERVICE_USER)
    except KeyError:
        useradd = "useradd --system --user-group --no-create-home --shell /usr/sbin/nologin"
        subprocess.run([*useradd.split(), SERVICE_USER], check=True, capture_output=True)
        return pwd.getpwnam(SERVICE_USER)


def note(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- targets


def start_postgres(
    stack: contextlib.ExitStack, opts: Options, bin_dir: Path, password: str
) -> PostgresServer:
    from pgmigrate_proxy.embedded_postgres import EmbeddedPostgresError, PostgresServer

    max_connections = max(1200, opts.idle_clients + max(opts.clients) + 100)
    server = PostgresServer(
        bin_dir=bin_dir,
        superuser=SUPERUSER,
        password=password,
        settings={
            "max_connections": str(max_connections),
            "shared_buffers": "256MB",  # holds pgbench -s 10 (~160 MB): reads never hit disk
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
        },
    )
    stack.callback(server.stop)
    try:
        server.start()
    except EmbeddedPostgresError as exc:
        raise BenchError(str(exc)) from exc
    note(
        f"PostgreSQL {server.major_version} on {server.host}:{server.port}, "
        f"max_connections={max_connections}"
    )
    return server


def postgres_bin_dir(choice: str | None) -> Path:
    from pgmigrate_proxy.embedded_postgres import EmbeddedPostgresError, resolve_bin_dir

    try:
        return resolve_bin_dir(choice)
    except EmbeddedPostgresError as exc:
        raise BenchError(str(exc)) from exc


def find_pgbench(bin_dir: Path) -> Path:
    beside = bin_dir / "pgbench"
    for candidate in (beside, FALLBACK_PGBENCH):
        if os.access(candidate, os.X_OK):
            return candidate
    raise BenchError(f"pgbench not found (looked at {beside} and {FALLBACK_PGBENCH})")


def pgbouncer_ini(
    directory: Path, port: int, upstream_port: int, pool_size: int, pool_mode: str = "session"
) -> str:
    return f"""\
[databases]
* = host=127.0.0.1 port={upstream_port}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = scram-sha-256
auth_file = {directory / "userlist.txt"}
admin_users = {SUPERUSER}
pool_mode = {pool_mode}
max_client_conn = {max(2000, pool_size + 100)}
default_pool_size = {pool_size}
ignore_startup_parameters = extra_float_digits
log_connections = 0
log_disconnections = 0
log_stats = 0
"""


def pgbouncer_binary() -> Path | None:
    if PGBOUNCER_BINARY.exists():
        return PGBOUNCER_BINARY
    found = shutil.which("pgbouncer")
    return Path(found) if found else None


def start_pgbouncer(
    stack: contextlib.ExitStack,
    work: Path,
    opts: Options,
    upstream: Endpoint,
) -> Relay | None:
    """pgbouncer in session mode, as the service account when we are root."""
    binary = pgbouncer_binary()
    if binary is None:
        note("pgbouncer not found: skipped")
        return None
    account = service_account()
    directory = work / "pgbouncer"
    directory.mkdir()
    port = free_port()
    pool_size = max(opts.idle_clients, *opts.clients) + 50
    ini = directory / "pgbouncer.ini"
    ini.write_text(pgbouncer_ini(directory, port, upstream.port, pool_size))
    (directory / "userlist.txt").write_text(f'"{SUPERUSER}" "{upstream.password}"\n')
    if account:
        work.chmod(0o711)  # the service account may reach its directory, not list ours
        for path in (directory, *directory.iterdir()):
            os.chown(path, account.pw_uid, account.pw_gid)
    service = spawn(
        stack, PGBOUNCER, [str(binary), str(ini)], directory / "pgbouncer.log", account=account
    )
    endpoint = Endpoint(PGBOUNCER, "127.0.0.1", port, upstream.password, service.process.pid)
    wait_until_accepting(endpoint, service)
    note(f"pgbouncer on 127.0.0.1:{port} (pid {service.process.pid})")
    return Relay(endpoint, service)


def start_proxy(
    stack: contextlib.ExitStack,
    work: Path,
    server: PostgresServer,
    password: str,
    name: str = PROXY,
    source: Path = PROXY_SOURCE,
) -> Relay | str:
    """``python -m pgmigrate_proxy`` (from `source`) in front of the server; the reason when it
    does not come up."""
    port = free_port()
    argv = [sys.executable, "-m", "pgmigrate_proxy"]
    argv += f"--listen-host 127.0.0.1 --listen-port {port} --log-level warning".split()
    # as pgbouncer's max_client_conn here: the idle-memory test opens up to 1000 clients (a
    # baseline revision from before the pooler has no such limit, and no such flag)
    settings = source / "pgmigrate_proxy" / "settings.py"
    if settings.is_file() and '"max_client_conn"' in settings.read_text():
        argv += ["--max-client-conn", "2000"]
    path = os.pathsep.join(p for p in (str(source), os.environ.get("PYTHONPATH")) if p)
    # The upstream URL holds the password: pass it in the environment, not on the command line.
    upstream = server.url(password=password)
    env = {**os.environ, "PYTHONPATH": path, "PGMIGRATE_PROXY_UPSTREAM": upstream}
    service = spawn(stack, name, argv, work / f"{name}.log", env=env)
    endpoint = Endpoint(name, "127.0.0.1", port, password, service.process.pid)
    try:
        wait_until_accepting(endpoint, service)
    except BenchError as exc:
        service.stop()
        return str(exc)
    note(f"proxy on 127.0.0.1:{port} (pid {service.process.pid})")
    return Relay(endpoint, service)


# ----------------------------------------------------------------------------- pgbench


def pgbench(binary: Path, endpoint: Endpoint, args: list[str], timeout: float) -> str:
    argv = [str(binary), "-h", endpoint.host, "-p", str(endpoint.port), "-U", endpoint.user]
    argv += [*args, endpoint.dbname]
    env = {**os.environ, "PGPASSWORD": endpoint.password, "PGSSLMODE": "disable"}
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-5:])
        raise BenchError(f"pgbench exited with {done.returncode}: {tail}")
    return done.stdout


def run_once(
    binary: Path, endpoint: Endpoint, clients: int, mode: str, duration: int, rep: int
) -> Run:
    """One ``pgbench -S`` run; the relay's CPU time is read around it."""
    args = f"-S -n -c {clients} -j {min(clients, 2)} -T {duration} -M {mode}".split()
    cpu_before = cpu_seconds(endpoint.pid) if endpoint.pid else None
    try:
        output = pgbench(binary, endpoint, args, timeout=duration + 120)
    except (BenchError, subprocess.TimeoutExpired) as exc:
        return Run(endpoint.name, clients, mode, rep, None, 0, None, str(exc))
    cpu = (
        None
        if endpoint.pid is None or cpu_before is None
        else cpu_seconds(endpoint.pid) - cpu_before
    )
    tps, transactions = TPS_RE.search(output), TRANSACTIONS_RE.search(output)
    if not tps or not transactions:
        return Run(endpoint.name, clients, mode, rep, None, 0, None, f"unparsed: {output[-300:]}")
    return Run(endpoint.name, clients, mode, rep, float(tps[1]), int(transactions[1]), cpu)


def report_relay_logs(relays: Sequence[Relay]) -> None:
    """The proxy runs at --log-level warning: whatever it logged deserves a look."""
    for relay in relays:
        if relay.endpoint.name == PROXY and (tail := relay.service.log_tail()):
            note(f"the proxy logged (last lines of {relay.service.log_path.name}):\n{tail}")


def rotated(items: Sequence[Endpoint], shift: int) -> list[Endpoint]:
    shift %= len(items)
    return [*items[shift:], *items[:shift]]


def run_matrix(binary: Path, targets: Sequence[Endpoint], opts: Options) -> list[Run]:
    total = len(opts.clients) * len(opts.modes) * opts.reps * len(targets)
    runs: list[Run] = []
    for clients in opts.clients:
        for mode in opts.modes:
            for rep in range(opts.reps):
                for endpoint in rotated(targets, rep):
                    run = run_once(binary, endpoint, clients, mode, opts.duration, rep)
                    runs.append(run)
                    note(f"[{len(runs):3}/{total}] {describe(run)}")
    return runs


def describe(run: Run) -> str:
    head = f"c={run.clients:<3} {run.mode:<8} rep {run.rep + 1} {run.target:<9}"
    if run.error:
        return f"{head} FAILED: {run.error.splitlines()[0]}"
    cpu = run.cpu_us_per_transaction
    return head + f" {run.tps:10.0f} tps" + (f"  {cpu:6.1f} {MICRO}/tx" if cpu else "")


def warm_up(binary: Path, targets: list[Endpoint], opts: Options) -> dict[str, str]:
    """A short run per target: fills caches and pools, and drops a relay that cannot relay."""
    skipped: dict[str, str] = {}
    for endpoint in list(targets):
        run = run_once(binary, endpoint, max(opts.clients), "simple", min(2, opts.duration), 0)
        if run.error is None:
            continue
        if endpoint.name == DIRECT:
            raise BenchError(f"pgbench against PostgreSQL itself failed: {run.error}")
        note(f"{endpoint.name}: skipped, warm-up failed: {run.error}")
        skipped[endpoint.name] = f"warm-up failed: {run.error.splitlines()[0]}"
        targets.remove(endpoint)
    return skipped


# ----------------------------------------------------------------------------- idle memory


def measure_idle(relay: Relay, count: int) -> IdleResult:
    """VmRSS/VmHWM of the relay around ``count`` client connections that only log in."""
    pid = relay.service.process.pid
    rss_before, hwm_before = memory_kb(pid)
    connections: list[psycopg.Connection[tuple[object, ...]]] = []
    error = None
    try:
        try:
            for _ in range(count):
                connections.append(psycopg.connect(relay.endpoint.conninfo(connect_timeout=10)))
        except psycopg.Error as exc:
            error = f"connection {len(connections) + 1} failed: {str(exc).strip()}"
        rss_after, hwm_after = memory_kb(pid)
    finally:
        for connection in connections:
            connection.close()
    return IdleResult(
        relay.endpoint.name,
        count,
        len(connections),
        rss_before,
        rss_after,
        hwm_before,
        hwm_after,
        error,
    )


def wait_for_backends(direct: Endpoint, at_most: int, timeout: float = 30.0) -> None:
    """Poll until PostgreSQL is down to ``at_most`` client backends (freed by a stopped relay)."""
    query = "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'"
    deadline = time.monotonic() + timeout
    with psycopg.connect(direct.conninfo(), autocommit=True) as conn:
        while True:
            row = conn.execute(query).fetchone()
            if row is None or row[0] <= at_most or time.monotonic() > deadline:
                return
            time.sleep(0.2)


def idle_phase(direct: Endpoint, relays: Sequence[Relay], opts: Options) -> list[IdleResult]:
    """One relay at a time, each stopped afterwards so that its server connections close
    before the next relay needs as many (max_connections is sized for one idle test)."""
    results = []
    for relay in relays:
        note(f"idle memory: {opts.idle_clients} connections to {relay.endpoint.name} ...")
        result = measure_idle(relay, opts.idle_clients)
        results.append(result)
        note(f"idle memory: {relay.endpoint.name}: {format_idle(result)}")
        relay.service.stop()
        wait_for_backends(direct, at_most=max(opts.clients) + 5)
    return results


def format_idle(result: IdleResult) -> str:
    per = result.kb_per_client
    text = (
        f"VmRSS {result.rss_before_kb} -> {result.rss_after_kb} kB, "
        f"VmHWM {result.hwm_after_kb} kB, "
        + (f"{per:.1f} kB per idle client" if per is not None else "no client connected")
    )
    return text + (f" ({result.error})" if result.error else "")


# ----------------------------------------------------------------------------- machine info


def command_version(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except OSError:
        return "n/a"
    return (done.stdout or done.stderr).strip().splitlines()[0] if done.returncode == 0 else "n/a"


def package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or "unknown"


def machine_info(direct: Endpoint, pgbench_binary: Path, load_at_start: float) -> MachineInfo:
    with psycopg.connect(direct.conninfo(), autocommit=True) as conn:
        row = conn.execute("SHOW server_version").fetchone()
    bouncer = pgbouncer_binary()
    return MachineInfo(
        nproc=os.cpu_count() or 0,
        cpu_model=cpu_model(),
        kernel=platform.release(),
        postgres=f"PostgreSQL {row[0] if row else '?'}",
        pgbench=command_version([str(pgbench_binary), "--version"]),
        pgbouncer=command_version([str(bouncer), "--version"]) if bouncer else "absent",
        python=platform.python_version(),
        uvloop=package_version("uvloop"),
        psycopg=package_version("psycopg"),
        load_average=f"{load_at_start:.2f} at start, {os.getloadavg()[0]:.2f} at end",
    )


# ----------------------------------------------------------------------------- report


def fmt_tps(cell: Cell) -> str:
    if cell.median is None:
        return "failed" if cell.failures else "n/a"
    spread = f" ({min(cell.tps):.0f}-{max(cell.tps):.0f})" if len(cell.tps) > 1 else ""
    return f"{cell.median:.0f}{spread}"


def fmt_ratio(numerator: Cell, denominator: Cell) -> str:
    if numerator.median is None or not denominator.median:
        return "n/a"
    return f"{numerator.median / denominator.median:.2f}"


def fmt_cpu(cell: Cell) -> str:
    return "n/a" if cell.cpu_median is None else f"{cell.cpu_median:.1f}"


def result_rows(report: Report) -> list[list[str]]:
    rows = []
    for clients in report.options.clients:
        for mode in report.options.modes:
            direct, bouncer, proxy, base = (report.cell(clients, mode, t) for t in TARGETS)
            row = [
                str(clients),
                mode,
                fmt_tps(direct),
                fmt_tps(bouncer),
                fmt_tps(proxy),
                fmt_ratio(proxy, direct),
                fmt_ratio(proxy, bouncer),
                fmt_cpu(bouncer),
                fmt_cpu(proxy),
            ]
            if report.options.baseline:
                row += [fmt_tps(base), fmt_ratio(proxy, base), fmt_cpu(base)]
            rows.append(row)
    return rows


def result_header(report: Report) -> list[str]:
    if not report.options.baseline:
        return RESULT_HEADER
    return [*RESULT_HEADER, "baseline TPS", "proxy/baseline", f"baseline CPU {MICRO}/tx"]


RESULT_HEADER = [
    "clients",
    "mode",
    "direct TPS",
    "pgbouncer TPS",
    "proxy TPS",
    "proxy/direct",
    "proxy/pgbouncer",
    f"pgbouncer CPU {MICRO}/tx",
    f"proxy CPU {MICRO}/tx",
]
IDLE_HEADER = [
    "relay",
    "idle clients",
    "VmRSS before kB",
    "VmRSS after kB",
    "VmHWM after kB",
    "kB per idle client",
]


def idle_rows(report: Report) -> list[list[str]]:
    return [
        [
            r.target,
            f"{r.opened}/{r.requested}",
            str(r.rss_before_kb),
            str(r.rss_after_kb),
            str(r.hwm_after_kb),
            "n/a" if r.kb_per_client is None else f"{r.kb_per_client:.1f}",
        ]
        for r in report.idle
    ]


def text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=True))
        for row in [header, *rows]
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def machine_line(machine: MachineInfo) -> str:
    return (
        f"{machine.nproc} CPUs ({machine.cpu_model}), Linux {machine.kernel}; "
        f"{machine.postgres}; {machine.pgbench}; {machine.pgbouncer}; "
        f"Python {machine.python}, uvloop {machine.uvloop}, psycopg {machine.psycopg}; "
        f"load average {machine.load_average}"
    )


def render(report: Report) -> str:
    opts = report.options
    header = (
        f"pgbench -S -n, {opts.duration} s per run, {opts.reps} rep(s), median "
        f"(min-max) TPS; CPU = relay utime+stime per transaction"
    )
    parts = [header, "", text_table(result_header(report), result_rows(report))]
    if report.idle:
        parts += ["", text_table(IDLE_HEADER, idle_rows(report))]
    parts += [f"skipped {name}: {why}" for name, why in report.skipped.items()]
    parts += ["", "Markdown for the README:", ""]
    parts += [markdown_table(result_header(report), result_rows(report))]
    if report.idle:
        parts += ["", markdown_table(IDLE_HEADER, idle_rows(report))]
    parts += ["", f"Command: `{opts.command}`", "", f"Machine: {machine_line(report.machine)}"]
    return "\n".join(parts)


def write_json(report: Report, path: Path) -> None:
    data = dataclasses.asdict(report)
    data["cells"] = [
        {
            "clients": c,
            "mode": m,
            "target": t,
            "median_tps": cell.median,
            "cpu_us_per_tx": cell.cpu_median,
            "tps": list(cell.tps),
        }
        for c in report.options.clients
        for m in report.options.modes
        for t in TARGETS
        if (cell := report.cell(c, m, t)).tps
    ]
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


# ----------------------------------------------------------------------------- main


def ensure_importable() -> None:
    """Let ``python bench/relay.py`` find the package in proxy/ when it is not installed."""
    if importlib.util.find_spec("pgmigrate_proxy") is None:
        sys.path.insert(0, str(PROXY_SOURCE))


def exit_on_sigterm(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def benchmark(opts: Options, stack: contextlib.ExitStack) -> Report:
    """Start everything (registering each stop on ``stack``), measure, and return the report."""
    load_at_start = os.getloadavg()[0]
    work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="pgmigrate-relay-")))
    password = secrets.token_urlsafe(18)
    bin_dir = postgres_bin_dir(opts.pg)
    binary = find_pgbench(bin_dir)
    server = start_postgres(stack, opts, bin_dir, password)
    direct = Endpoint(DIRECT, server.host, server.port, password)
    note(f"pgbench -i -s {opts.scale} ...")
    pgbench(binary, direct, ["-i", "-q", "-s", str(opts.scale)], timeout=1800)
    relays, skipped = start_relays(stack, work, opts, server, direct)
    targets = [direct, *(relay.endpoint for relay in relays)]
    skipped |= warm_up(binary, targets, opts)
    relays = [relay for relay in relays if relay.endpoint in targets]
    runs = run_matrix(binary, targets, opts)
    report_relay_logs(relays)
    machine = machine_info(direct, binary, load_at_start)
    idle = idle_phase(direct, relays, opts) if opts.idle_clients else []
    return Report(opts, machine, tuple(t.name for t in targets), skipped, tuple(runs), tuple(idle))


def start_relays(
    stack: contextlib.ExitStack,
    work: Path,
    opts: Options,
    server: PostgresServer,
    direct: Endpoint,
) -> tuple[list[Relay], dict[str, str]]:
    relays, skipped = [], {}
    bouncer = start_pgbouncer(stack, work, opts, direct)
    if bouncer is None:
        skipped[PGBOUNCER] = "pgbouncer not found"
    else:
        relays.append(bouncer)
    proxy = start_proxy(stack, work, server, direct.password)
    if isinstance(proxy, str):
        note(f"proxy: skipped: {proxy}")
        skipped[PROXY] = proxy.splitlines()[0]
    else:
        relays.append(proxy)
    if opts.baseline:
        source = baseline_source(work, opts.baseline)
        baseline = start_proxy(stack, work, server, direct.password, BASELINE, source)
        if isinstance(baseline, str):
            raise BenchError(f"the proxy of {opts.baseline} did not start: {baseline}")
        relays.append(baseline)
    return relays, skipped


def baseline_source(work: Path, revision: str) -> Path:
    """proxy/ of git revision `revision`, extracted under `work` (git archive: no checkout)."""
    target = work / "baseline"
    target.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", "--format=tar", revision, "proxy"],
        capture_output=True,
        check=False,
    )
    if archive.returncode != 0:
        raise BenchError(f"git archive {revision}: {archive.stderr.decode().strip()}")
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive.stdout, check=True)
    commit = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", revision],
        capture_output=True, text=True, check=False,
    ).stdout.strip()  # fmt: skip
    note(f"baseline: the proxy of {revision} ({commit})")
    return target / "proxy"


def pool_mode(argv: Sequence[str]) -> tuple[str, list[str]]:
    """--pool-mode's value (session unless given) and the other arguments."""
    parser = argparse.ArgumentParser(prog="bench/relay.py", add_help=False)
    parser.add_argument("--pool-mode", choices=POOL_MODES, default="session")
    known, rest = parser.parse_known_args(argv)
    return str(known.pool_mode), rest


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    mode, rest = pool_mode(args)
    if mode == "transaction":
        import pooler  # bench/pooler.py (this folder is on sys.path); it imports this module

        return pooler.main(rest)
    opts = parse_args(args)
    ensure_importable()
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    try:
        raise_open_file_limit(2 * opts.idle_clients + 1024)
        with contextlib.ExitStack() as stack:
            report = benchmark(opts, stack)
    except BenchError as exc:
        note(f"relay benchmark failed: {exc}")
        return 1
    except KeyboardInterrupt:
        note("interrupted; everything started was stopped")
        return 130
    print(render(report))
    if opts.json_path:
        write_json(report, opts.json_path)
        note(f"results written to {opts.json_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
