"""Pooler benchmark: pgbench -S in transaction mode, direct PostgreSQL vs pgbouncer vs the proxy.

Starts a throwaway PostgreSQL (max_connections sized for the direct clients and the idle test),
loads it with ``pgbench -i``, then starts pgbouncer and ``python -m pgmigrate_proxy``, both in
``pool_mode = transaction`` with ``default_pool_size`` 16, checking their clients against an
auth_file. Each pooler logs in to PostgreSQL as a role of its own (bench_pgbouncer,
bench_proxy), so a sampler thread counts each one's server connections in ``pg_stat_activity``
(every 0.2 s) while pgbench runs. It runs ``pgbench -S -n`` for every (clients, mode) pair
against the three targets in rotating order and prints TPS, proxy/pgbouncer and proxy/direct
ratios, the server connections of each target (peak / median of the samples), each pooler's CPU
per transaction, what went wrong (pgbouncer < 1.21 has no prepared statements in transaction
mode: its errors are reported, the run goes on), and the floor of issue 8. Then the idle-memory
test, on a fresh pooler each: (VmRSS with N idle logged-in clients - VmRSS with none) / N.
``--bare`` adds bench/barepool.py, a bare Python transaction pooler on uvloop that parses
nothing (a measuring stick: what the relay of a Python pooler costs here, without the proxy's
work). Shares relay.py's helpers.

    python bench/pooler.py                 # full: 16,256 clients x 3 modes x 3 reps x 10 s
    python bench/pooler.py --quick         # smoke test: 16,256 clients, 3 s runs, 100 idle
    python bench/pooler.py --idle-only     # the idle-memory test alone (1000 clients)
    python bench/pooler.py --duration 10 --reps 1 --idle-clients 0
    python bench/pooler.py --quick --idle-clients 0 --baseline HEAD~3  # before/after, one run
    python bench/pooler.py --quick --idle-clients 0 --profile /tmp/prof  # cProfile, per proxy
    python bench/pooler.py --quick --idle-clients 0 --modes simple,extended --bare
    python bench/pooler.py --quick --idle-clients 0 --build pure  # the interpreted relay

The proxy runs as ``pip install ./django-pgmigrate`` installs it: a wheel of this checkout is
built first (setup.py compiles the relay's hot path with mypyc), unpacked in the run's
temporary folder and put first on the proxy's PYTHONPATH; ``--build pure`` runs the checkout's
modules as they are (what an editable install and the tests run). ``--baseline`` runs pure."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import secrets
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import psycopg
import relay  # bench/relay.py: processes, PostgreSQL, /proc, tables, machine details
from psycopg import sql

if TYPE_CHECKING:
    from pgmigrate_proxy.embedded_postgres import PostgresServer

POOL_SIZE = 16
DIRECT, PGBOUNCER, PROXY = relay.DIRECT, relay.PGBOUNCER, relay.PROXY
BASELINE = relay.BASELINE  # the proxy of another git revision (--baseline)
BARE = "bare"  # bench/barepool.py, the bare Python transaction pooler (--bare)
TARGETS = (DIRECT, PGBOUNCER, PROXY)
#: whom each pooler logs in as
ROLES = {
    PGBOUNCER: "bench_pgbouncer", PROXY: "bench_proxy", BASELINE: "bench_baseline",
    BARE: "bench_bare",
}  # fmt: skip
FLOOR_RATIO = 0.7
ERROR_RE = re.compile(r"(ERROR|FATAL):\s*(.*)")


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
    idle_only: bool = False
    baseline: str | None = None  # a git revision whose proxy runs too (before/after)
    profile: Path | None = None  # run the proxies under cProfile, stats written here
    bare: bool = False  # also run bench/barepool.py (what a Python pooler's relay alone costs)
    build: str = "compiled"  # the proxy as pip installs it (compiled), or the checkout's modules


def parse_args(argv: Sequence[str]) -> Options:
    parser = argparse.ArgumentParser(prog="bench/pooler.py", description=__doc__.split("\n")[0])
    add = parser.add_argument
    add("--quick", action="store_true", help="smoke test: 1 rep, 3 s, 100 idle clients")
    add("--clients", type=relay._int_list, help="pgbench client counts (default 16,256)")
    add("--modes", type=relay._mode_list, help="pgbench -M (default simple,extended,prepared)")
    add("--reps", type=relay._count(1), help="repetitions of each run (default 3)")
    add("--duration", type=relay._count(1), help="seconds per pgbench run (default 10)")
    add("--idle-clients", type=relay._count(0), help="idle memory test size (default 1000)")
    add("--scale", type=relay._count(1), default=10, help="pgbench -i scale (default 10)")
    add("--pg", default=None, help="embedded | 15 | <bin dir> (default: env PGMIGRATE_PG)")
    add("--idle-only", action="store_true", help="only the idle-memory test (no pgbench)")
    add("--json", type=Path, dest="json_path", help="also write all results to this file")
    add("--baseline", help="also run the proxy of this git revision (e.g. HEAD~1), side by side")
    add("--profile", type=Path, help="run the proxies under cProfile; NAME.prof in this folder")
    add("--bare", action="store_true", help="also run bench/barepool.py, a bare Python pooler")
    add("--build", choices=("compiled", "pure"), default="compiled",
        help="the proxy as pip installs it (mypyc-compiled: the default), or pure")  # fmt: skip
    ns = parser.parse_args(argv)
    quick: bool = ns.quick
    return Options(
        clients=ns.clients or (16, 256),
        modes=ns.modes or relay.MODES,
        reps=relay._choose(ns.reps, quick, 1, 3),
        duration=relay._choose(ns.duration, quick, 3, 10),
        idle_clients=relay._choose(ns.idle_clients, quick, 100, 1000),
        scale=ns.scale,
        pg=ns.pg,
        json_path=ns.json_path,
        command=shlex.join(["python", "bench/pooler.py", *argv]),
        idle_only=ns.idle_only,
        baseline=ns.baseline,
        profile=ns.profile,
        bare=ns.bare,
        build=ns.build,
    )


# ----------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Run:
    """One pgbench run against one target, with the server connections seen meanwhile."""

    target: str
    clients: int
    mode: str
    rep: int
    tps: float | None
    transactions: int
    servers: int  # peak server connections (client backends of the target's role)
    servers_median: int  # the median of the samples: the steady state, logins aside
    exit_code: int
    error: str | None = None  # the first error pgbench printed, and how many clients aborted
    cpu_us: float | None = None  # the pooler's CPU time (utime + stime) per transaction


def cell(runs: Sequence[Run], clients: int, mode: str, target: str) -> list[Run]:
    return [r for r in runs if (r.clients, r.mode, r.target) == (clients, mode, target)]


def median_cpu(runs: Sequence[Run]) -> float | None:
    values = sorted(r.cpu_us for r in runs if r.cpu_us is not None and r.exit_code == 0)
    return values[len(values) // 2] if values else None


def median_tps(runs: Sequence[Run]) -> float | None:
    values = sorted(r.tps for r in runs if r.tps is not None and r.exit_code == 0)
    return values[len(values) // 2] if values else None


# ----------------------------------------------------------------------------- sampling


class ServerSampler:
    """Peak client backends per role in pg_stat_activity, polled in a thread."""

    QUERY = (
        "SELECT usename, count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'"
        " AND pid <> pg_backend_pid() AND (usename <> %s OR application_name = 'pgbench')"
        " GROUP BY usename"
    )

    def __init__(self, direct: relay.Endpoint, interval: float = 0.2) -> None:
        self._conn = psycopg.connect(direct.conninfo(application_name="pooler-bench"))
        self._conn.autocommit = True
        self._interval = interval
        self._samples: list[dict[str, int]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def close(self) -> None:
        self._conn.close()

    def sample(self) -> dict[str, int]:
        rows = self._conn.execute(self.QUERY, (relay.SUPERUSER,)).fetchall()
        return {str(user): int(count) for user, count in rows}

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._samples.append(self.sample())
            self._stop.wait(self._interval)

    @contextlib.contextmanager
    def during(self) -> Iterator[list[dict[str, int]]]:
        """The samples taken while the block runs (one dict per sample: role -> count)."""
        self._samples = []
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        try:
            yield self._samples
        finally:
            self._stop.set()
            self._thread.join()


# ----------------------------------------------------------------------------- targets


def create_roles(direct: relay.Endpoint) -> None:
    """One login role per pooler (the same password as the superuser's)."""
    with psycopg.connect(direct.conninfo(), autocommit=True) as conn:
        for role in ROLES.values():
            statement = sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}")
            conn.execute(statement.format(sql.Identifier(role), sql.Literal(direct.password)))


def grant_reads(direct: relay.Endpoint) -> None:
    """Let the poolers' roles read pgbench's tables."""
    with psycopg.connect(direct.conninfo(), autocommit=True) as conn:
        for role in ROLES.values():
            statement = sql.SQL("GRANT SELECT ON ALL TABLES IN SCHEMA public TO {}")
            conn.execute(statement.format(sql.Identifier(role)))


def write_userlist(path: Path, user: str, password: str) -> Path:
    path.write_text(f'"{user}" "{password}"\n')
    path.chmod(0o600)
    return path


def start_pgbouncer(
    stack: contextlib.ExitStack, work: Path, direct: relay.Endpoint
) -> relay.Relay | None:
    binary = relay.pgbouncer_binary()
    if binary is None:
        relay.note("pgbouncer not found: skipped")
        return None
    account = relay.service_account()
    directory = work / "pgbouncer"
    directory.mkdir()
    port = relay.free_port()
    ini = directory / "pgbouncer.ini"
    text = relay.pgbouncer_ini(directory, port, direct.port, POOL_SIZE, pool_mode="transaction")
    ini.write_text(text)
    write_userlist(directory / "userlist.txt", ROLES[PGBOUNCER], direct.password)
    if account:
        for path in (directory, *directory.iterdir()):
            os.chown(path, account.pw_uid, account.pw_gid)
    log = directory / "pgbouncer.log"
    service = relay.spawn(stack, PGBOUNCER, [str(binary), str(ini)], log, account=account)
    endpoint = relay.Endpoint(
        PGBOUNCER, "127.0.0.1", port, direct.password, service.process.pid, user=ROLES[PGBOUNCER]
    )
    relay.wait_until_accepting(endpoint, service)
    return relay.Relay(endpoint, service)


def compiled_source(work: Path) -> Path:
    """The proxy as `pip install ./django-pgmigrate` builds it: a wheel of this checkout
    (setup.py compiles the relay's hot path with mypyc), unpacked under `work`."""
    wheels = work / "wheel"
    relay.note("building the wheel (pip wheel --no-deps: mypyc compiles the hot path) ...")
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet",
         "--disable-pip-version-check", "-w", str(wheels), str(relay.REPO)],
        capture_output=True, text=True, check=False, timeout=900,
    )  # fmt: skip
    found = sorted(wheels.glob("*.whl"))
    if built.returncode != 0 or not found:
        raise relay.BenchError(f"pip wheel failed: {built.stderr.strip()[-2000:]}")
    target = work / "compiled"
    with zipfile.ZipFile(found[0]) as wheel:
        wheel.extractall(target)
    if not list(target.glob("pgmigrate_proxy/runtime/*.so")):
        raise relay.BenchError(
            f"the wheel has no compiled modules ({built.stderr.strip()[-500:]}): "
            "see setup.py, or run with --build pure"
        )
    return target


def start_proxy(
    stack: contextlib.ExitStack,
    work: Path,
    server: PostgresServer,
    password: str,
    name: str = PROXY,
    source: Path = relay.PROXY_SOURCE,
    profile: Path | None = None,
) -> relay.Relay | str:
    directory = work / f"{name}-{relay.free_port()}"
    directory.mkdir()
    userlist = write_userlist(directory / "userlist.txt", ROLES[name], password)
    port = relay.free_port()
    argv = [sys.executable, "-m", "pgmigrate_proxy", "--listen-host", "127.0.0.1"]
    if profile is not None:  # (written when the proxy exits on SIGTERM)
        profile.mkdir(parents=True, exist_ok=True)
        argv[1:1] = ["-m", "cProfile", "-o", str(profile / f"{name}.prof")]
    argv += f"--listen-port {port} --log-level warning --pool-mode transaction".split()
    argv += f"--default-pool-size {POOL_SIZE} --max-client-conn 5000".split()
    argv += ["--auth-type", "auth_file", "--auth-file", str(userlist)]
    env = {**os.environ, "PGMIGRATE_PROXY_UPSTREAM": server.url(password=password)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(source), env.get("PYTHONPATH")]))
    service = relay.spawn(stack, name, argv, directory / "proxy.log", env=env)
    return accepting(service, name, port, password)


def accepting(service: relay.Service, name: str, port: int, password: str) -> relay.Relay | str:
    """The started pooler once it accepts a login as its role; why not, after stopping it."""
    endpoint = relay.Endpoint(
        name, "127.0.0.1", port, password, service.process.pid, user=ROLES[name]
    )
    try:
        relay.wait_until_accepting(endpoint, service)
    except relay.BenchError as exc:
        service.stop()
        return str(exc)
    return relay.Relay(endpoint, service)


def start_bare(
    stack: contextlib.ExitStack, work: Path, direct: relay.Endpoint
) -> relay.Relay | str:
    """bench/barepool.py: its first POOL_SIZE clients' logins make its pool (as bench_bare)."""
    directory = work / BARE
    directory.mkdir()
    port = relay.free_port()
    script = Path(__file__).with_name("barepool.py")
    argv = [sys.executable, str(script), direct.host, str(direct.port), str(port), str(POOL_SIZE)]
    service = relay.spawn(stack, BARE, argv, directory / "barepool.log")
    return accepting(service, BARE, port, direct.password)


# ----------------------------------------------------------------------------- pgbench


def run_once(
    binary: Path,
    endpoint: relay.Endpoint,
    sampler: ServerSampler,
    opts: Options,
    key: tuple[int, str, int],
) -> Run:
    """One ``pgbench -S`` run; pgbench's failures are kept as text, never raised."""
    clients, mode, rep = key
    argv = [str(binary), "-h", endpoint.host, "-p", str(endpoint.port), "-U", endpoint.user]
    argv += f"-S -n -c {clients} -j {min(clients, 2)} -T {opts.duration} -M {mode}".split()
    argv.append(endpoint.dbname)
    env = {**os.environ, "PGPASSWORD": endpoint.password, "PGSSLMODE": "disable"}
    cpu_before = relay.cpu_seconds(endpoint.pid) if endpoint.pid else None
    with sampler.during() as samples:
        try:
            done = subprocess.run(
                argv, env=env, capture_output=True, text=True, timeout=opts.duration + 180
            )
        except subprocess.TimeoutExpired:
            return Run(endpoint.name, clients, mode, rep, None, 0, 0, 0, -1, "pgbench timed out")
    role = ROLES.get(endpoint.name, relay.SUPERUSER)
    counts = sorted(sample.get(role, 0) for sample in samples) or [0]
    tps, transactions = relay.TPS_RE.search(done.stdout), relay.TRANSACTIONS_RE.search(done.stdout)
    error = summarize_errors(done.stderr, done.returncode)
    count = int(transactions[1]) if transactions else 0
    cpu = None
    if endpoint.pid and cpu_before is not None and count:
        cpu = (relay.cpu_seconds(endpoint.pid) - cpu_before) / count * 1e6
    return Run(
        endpoint.name,
        clients,
        mode,
        rep,
        float(tps[1]) if tps else None,
        count,
        counts[-1],
        counts[len(counts) // 2],
        done.returncode,
        error,
        cpu,
    )


def summarize_errors(stderr: str, code: int) -> str | None:
    """The first server error pgbench printed, and how many clients it aborted."""
    aborted = stderr.count(" aborted ")
    first = next((m[0] for m in map(ERROR_RE.search, stderr.splitlines()) if m), None)
    if first is None and code == 0:
        return None
    first = first or (stderr.strip().splitlines() or ["(no output)"])[-1]
    return f"exit {code}, {aborted} client(s) aborted: {first}"


def run_matrix(
    binary: Path, targets: Sequence[relay.Endpoint], sampler: ServerSampler, opts: Options
) -> list[Run]:
    total = len(opts.clients) * len(opts.modes) * opts.reps * len(targets)
    runs: list[Run] = []
    for clients in opts.clients:
        for mode in opts.modes:
            for rep in range(opts.reps):
                for endpoint in relay.rotated(targets, rep):
                    run = run_once(binary, endpoint, sampler, opts, (clients, mode, rep))
                    runs.append(run)
                    tps = "no tps" if run.tps is None else f"{run.tps:8.0f} tps"
                    relay.note(
                        f"[{len(runs):3}/{total}] c={clients:<3} {mode:<8} {endpoint.name:<9} "
                        f"{tps}, server conns peak {run.servers} median {run.servers_median}"
                        + (f"; {run.error}" if run.error else "")
                    )
    return runs


# ----------------------------------------------------------------------------- idle memory


def idle_phase(
    stack: contextlib.ExitStack,
    work: Path,
    server: PostgresServer,
    direct: relay.Endpoint,
    sampler: ServerSampler,
    opts: Options,
    source: Path,
) -> list[relay.IdleResult]:
    """A fresh pooler each (no freed memory of the pgbench runs to reuse), warmed by one login."""
    results = []
    (work / "idle-bouncer").mkdir()
    for name in (PGBOUNCER, PROXY):
        started = (
            start_pgbouncer(stack, work / "idle-bouncer", direct)
            if name == PGBOUNCER
            else start_proxy(stack, work, server, direct.password, source=source)
        )
        if started is None or isinstance(started, str):
            relay.note(f"idle memory: {name} did not start: {started}")
            continue
        psycopg.connect(started.endpoint.conninfo()).close()
        relay.note(f"idle memory: {opts.idle_clients} connections to {name} ...")
        result = relay.measure_idle(started, opts.idle_clients)
        relay.note(f"idle memory: {name}: {relay.format_idle(result)}; servers {sampler.sample()}")
        results.append(result)
        started.service.stop()
    return results


# ----------------------------------------------------------------------------- report


def fmt(value: float | None, pattern: str = "{:.0f}") -> str:
    return "n/a" if value is None else pattern.format(value)


def ratio(a: float | None, b: float | None) -> str:
    return "n/a" if a is None or not b else f"{a / b:.2f}"


HEADER = [
    "clients", "mode", "direct TPS", "pgbouncer TPS", "proxy TPS", "proxy/pgbouncer",
    "proxy/direct", "direct backends", "pgbouncer servers", "proxy servers",
    f"pgbouncer CPU {relay.MICRO}/tx", f"proxy CPU {relay.MICRO}/tx",
]  # fmt: skip


BASELINE_HEADER = ["baseline TPS", "proxy/baseline", f"baseline CPU {relay.MICRO}/tx"]


def baseline_cells(tps: dict[str, float | None], cells: dict[str, list[Run]]) -> list[str]:
    cpu = median_cpu(cells[BASELINE])
    return [fmt(tps[BASELINE]), ratio(tps[PROXY], tps[BASELINE]), fmt(cpu, "{:.1f}")]


BARE_HEADER = ["bare TPS", "bare/pgbouncer", f"bare CPU {relay.MICRO}/tx"]


def bare_cells(tps: dict[str, float | None], cells: dict[str, list[Run]]) -> list[str]:
    cpu = median_cpu(cells[BARE])
    failed = tps[BARE] is None or any(r.error for r in cells[BARE])
    return [
        "failed" if failed else fmt(tps[BARE]),
        "n/a" if failed else ratio(tps[BARE], tps[PGBOUNCER]),
        fmt(cpu, "{:.1f}"),
    ]


def rows(runs: Sequence[Run], opts: Options) -> list[list[str]]:
    out = []
    for clients in opts.clients:
        for mode in opts.modes:
            cells = {t: cell(runs, clients, mode, t) for t in (*TARGETS, BASELINE, BARE)}
            tps = {t: median_tps(c) for t, c in cells.items()}
            peak = {t: max((r.servers for r in c), default=0) for t, c in cells.items()}
            steady = {t: max((r.servers_median for r in c), default=0) for t, c in cells.items()}
            failed = {t: any(r.error for r in c) for t, c in cells.items()}
            out.append(
                [str(clients), mode]
                + [fmt(tps[t]) if not failed[t] or tps[t] else "failed" for t in TARGETS]
                + [ratio(tps[PROXY], tps[PGBOUNCER]), ratio(tps[PROXY], tps[DIRECT])]
                + [f"{peak[t]} / {steady[t]}" for t in TARGETS]
                + [fmt(median_cpu(cells[t]), "{:.1f}") for t in (PGBOUNCER, PROXY)]
                + (baseline_cells(tps, cells) if opts.baseline else [])
                + (bare_cells(tps, cells) if opts.bare else [])
            )
    return out


def floor_lines(runs: Sequence[Run], opts: Options) -> list[str]:
    lines = []
    for clients in opts.clients:
        for mode in ("simple", "extended"):
            if mode not in opts.modes:
                continue
            proxy, bouncer = (median_tps(cell(runs, clients, mode, t)) for t in (PROXY, PGBOUNCER))
            ok = proxy is not None and bouncer is not None and proxy >= FLOOR_RATIO * bouncer
            lines.append(
                f"floor {'PASS' if ok else 'FAIL'}: {mode} c={clients} proxy/pgbouncer "
                f"{ratio(proxy, bouncer)} (>= {FLOOR_RATIO})"
            )
            if clients > POOL_SIZE:
                peak = max((r.servers for r in cell(runs, clients, mode, PROXY)), default=0)
                verdict = "PASS" if peak <= POOL_SIZE else "FAIL"
                lines.append(
                    f"floor {verdict}: {mode} c={clients} proxy server connections {peak} "
                    f"(<= {POOL_SIZE})"
                )
    return lines


def error_lines(runs: Sequence[Run]) -> list[str]:
    seen: dict[tuple[str, int, str], str] = {}
    for r in runs:
        if r.error:
            seen.setdefault((r.target, r.clients, r.mode), r.error)
    return [f"{t} c={c} {m}: {e}" for (t, c, m), e in seen.items()]


def render(
    runs: Sequence[Run], idle: Sequence[relay.IdleResult], machine: relay.MachineInfo, opts: Options
) -> str:
    table = rows(runs, opts)
    header = [*HEADER, *(BASELINE_HEADER if opts.baseline else ())]
    header += BARE_HEADER if opts.bare else []
    head = (
        f"pgbench -S -n, transaction pooling, pool size {POOL_SIZE}, {opts.duration} s per run, "
        f"{opts.reps} rep(s), median TPS; CPU = the pooler's utime+stime per transaction;\n"
        "servers = server connections during the runs "
        "(peak / median of samples every 0.2 s: the peak includes pgbench's logins)"
    )
    parts = (
        [head, "", relay.text_table(header, table), "", *floor_lines(runs, opts)] if runs else []
    )
    if errors := error_lines(runs):
        parts += ["", "errors (first per cell):", *errors]
    if idle:
        parts += ["", relay.text_table(relay.IDLE_HEADER, idle_table(idle))]
    parts += ["", "Markdown for the README:"]
    if runs:
        parts += ["", relay.markdown_table(header, table)]
    if idle:
        parts += ["", relay.markdown_table(relay.IDLE_HEADER, idle_table(idle))]
    build = (
        "compiled with mypyc (as pip installs it)" if opts.build == "compiled" else "pure Python"
    )
    parts += ["", f"Command: `{opts.command}`", "", f"Proxy: {build}"]
    parts += ["", f"Machine: {relay.machine_line(machine)}"]
    return "\n".join(parts)


def idle_table(idle: Sequence[relay.IdleResult]) -> list[list[str]]:
    return [
        [r.target, f"{r.opened}/{r.requested}", str(r.rss_before_kb), str(r.rss_after_kb),
         str(r.hwm_after_kb), fmt(r.kb_per_client, "{:.2f}")]
        for r in idle
    ]  # fmt: skip


# ----------------------------------------------------------------------------- main


def pgbench_phase(
    stack: contextlib.ExitStack,
    work: Path,
    server: PostgresServer,
    direct: relay.Endpoint,
    sampler: ServerSampler,
    opts: Options,
    source: Path,
) -> list[Run]:
    """Load pgbench's tables, start both poolers, warm each target up, run the matrix."""
    binary = relay.find_pgbench(relay.postgres_bin_dir(opts.pg))
    relay.note(f"pgbench -i -s {opts.scale} ...")
    relay.pgbench(binary, direct, ["-i", "-q", "-s", str(opts.scale)], timeout=1800)
    grant_reads(direct)
    targets = [direct]
    bouncer = start_pgbouncer(stack, work, direct)
    if bouncer:
        targets.append(bouncer.endpoint)
    proxy = start_proxy(stack, work, server, direct.password, source=source, profile=opts.profile)
    if isinstance(proxy, str):
        relay.note(f"proxy: skipped: {proxy}")
    else:
        targets.append(proxy.endpoint)
    proxies = [] if isinstance(proxy, str) else [proxy]
    if opts.baseline:
        source = relay.baseline_source(work, opts.baseline)
        base = start_proxy(stack, work, server, direct.password, BASELINE, source, opts.profile)
        if isinstance(base, str):
            relay.note(f"baseline: skipped: {base}")
        else:
            targets.append(base.endpoint)
            proxies.append(base)
    if opts.bare:
        bare = start_bare(stack, work, direct)
        if isinstance(bare, str):
            relay.note(f"bare: skipped: {bare}")
        else:
            targets.append(bare.endpoint)
    warm_up = dataclasses.replace(opts, duration=2)
    for endpoint in targets:  # caches, pools
        run_once(binary, endpoint, sampler, warm_up, (16, "simple", 0))
    runs = run_matrix(binary, targets, sampler, opts)
    relay.report_relay_logs(proxies)
    for started in proxies if opts.profile else []:
        started.service.stop(timeout=60)  # (cProfile writes its file on the way out)
    return runs


def benchmark(opts: Options, stack: contextlib.ExitStack) -> str:
    load_at_start = os.getloadavg()[0]
    work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="pgmigrate-pooler-")))
    work.chmod(0o711)  # pgbouncer's account may reach its directories in it, not list it
    password = secrets.token_urlsafe(18)
    bin_dir = relay.postgres_bin_dir(opts.pg)
    binary = relay.find_pgbench(bin_dir)  # (machine_info reports its version)
    relay_opts = relay.Options(
        opts.clients, opts.modes, opts.reps, opts.duration, opts.idle_clients, opts.scale,
        opts.pg, None, opts.command,
    )  # fmt: skip
    server = relay.start_postgres(stack, relay_opts, bin_dir, password)
    direct = relay.Endpoint(DIRECT, server.host, server.port, password)
    create_roles(direct)
    sampler = ServerSampler(direct)
    stack.callback(sampler.close)
    source = relay.PROXY_SOURCE if opts.build == "pure" else compiled_source(work)
    runs = []
    if not opts.idle_only:
        runs = pgbench_phase(stack, work, server, direct, sampler, opts, source)
    machine = relay.machine_info(direct, binary, load_at_start)
    idle = (
        idle_phase(stack, work, server, direct, sampler, opts, source) if opts.idle_clients else []
    )
    if opts.json_path:
        data = {
            "options": dataclasses.asdict(opts),
            "machine": dataclasses.asdict(machine),
            "runs": [dataclasses.asdict(r) for r in runs],
            "idle": [dataclasses.asdict(r) for r in idle],
        }
        opts.json_path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    return render(runs, idle, machine, opts)


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(sys.argv[1:] if argv is None else argv)
    relay.ensure_importable()
    signal.signal(signal.SIGTERM, relay.exit_on_sigterm)
    try:
        relay.raise_open_file_limit(3 * opts.idle_clients + 3 * max(opts.clients) + 1024)
        with contextlib.ExitStack() as stack:
            print(benchmark(opts, stack))
    except relay.BenchError as exc:
        relay.note(f"pooler benchmark failed: {exc}")
        return 1
    except KeyboardInterrupt:
        relay.note("interrupted; everything started was stopped")
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
