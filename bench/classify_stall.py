"""Classification stall benchmark: how long other clients wait while one sends hostile input.

A proxy (a subprocess, `python -m pgmigrate_proxy`) in front of an embedded PostgreSQL. A pinger
(a process of its own, so that it never waits for this one's GIL) runs `SELECT 1` round trips
through the proxy for the whole run and records the longest gap between two answers. For each
kind of hostile input, a sender writes the raw messages on a logged-in connection and drains
the replies up to the last ReadyForQuery (cheaply, so that its own CPU stays out of the
figures). Printed for each kind, the worst over --repeat runs:

- `worst gap`: the pinger's longest wait while the input went through the proxy (what other
  clients see: the target is tens of milliseconds);
- `loop late`: how late the proxy's own event loop was at worst (a probe in the proxy: a
  heartbeat every 2 ms; --stacks also prints where the main thread was while it was late
  over 20 ms). This is the proxy's share: the gap also holds the machine's load;
- `direct`: the pinger's worst gap (still through the proxy) while the same input goes
  straight to PostgreSQL: what the load itself costs on this machine, not the proxy's doing;
- and, first, the same figures idle, for the noise floor.

    python bench/classify_stall.py                 # every kind
    python bench/classify_stall.py --kinds query-10mb,deep --repeat 3
    python bench/classify_stall.py --stacks        # also: where the proxy's loop was late
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import psycopg
from pgmigrate_proxy.embedded_postgres import PostgresServer, libpq_url

MIGRATE = "-c pgmigrate.role=migrate"
_READY = b"Z\x00\x00\x00\x05"  # ReadyForQuery's header


def _message(mtype: bytes, payload: bytes) -> bytes:
    return mtype + struct.pack("!I", len(payload) + 4) + payload


def query(sql: str) -> bytes:
    return _message(b"Q", sql.encode() + b"\0")


def parse_sync(sql: str) -> bytes:
    # Parse (unnamed, no parameter types), Sync: PostgreSQL parses it and answers.
    return _message(b"P", b"\0" + sql.encode() + b"\0\0\0") + _message(b"S", b"")


def _nested(depth: int) -> str:
    return "abs(" * depth + "1" + ")" * depth


def _near_limit(unit: str, tail: str, limit: int = 32 * 1024 - 64) -> str:
    return unit * ((limit - len(tail)) // len(unit)) + tail


ALTER = "ALTER TABLE stall_target ADD COLUMN IF NOT EXISTS x int"


@dataclass(frozen=True)
class Kind:
    name: str
    options: str  # the sender's session options
    build: Callable[[], bytes]  # the messages it writes, in one go
    readies: int  # ReadyForQuery messages that end the replies
    note: str


KINDS = [
    Kind("query-10mb", "", lambda: query("SELECT 1;" * 1_000_000 + ALTER), 1,
         "a Query of a million `SELECT 1;` and an ALTER"),
    Kind("query-10mb-migration", MIGRATE, lambda: query("SELECT 1;" * 1_000_000 + ALTER), 1,
         "the same in a migration session"),
    Kind("near-limit", "", lambda: query(_near_limit("SELECT 1;", ALTER)), 1,
         "a Query just under 32 kB (MAX_CLASSIFIED): ~3600 statements, then an ALTER"),
    Kind("near-limit-ddl", "", lambda: query(_near_limit(f"{ALTER};", ALTER)), 1,
         "a Query just under 32 kB of ALTERs (each one a guarded statement to classify)"),
    Kind("near-limit-migration", MIGRATE, lambda: query(_near_limit("SELECT 1;", "SELECT 2")), 1,
         "a migration session's Query just under 32 kB: ~3600 statements"),
    Kind("deep", "", lambda: query(f"{ALTER} DEFAULT {_nested(600)}"), 1,
         "an ALTER whose DEFAULT nests abs() 600 deep"),
    Kind("deep-limit", "", lambda: query(f"{ALTER} DEFAULT {_nested(6000)}"), 1,
         "the same, 6000 deep (about 32 kB)"),
    Kind("deep-parens", "", lambda: query("SELECT " + "(" * 10000 + "1" + ")" * 10000), 1,
         "a SELECT of 10000 nested parentheses (not plain to the prefilter: '(')"),
    Kind("select-100mb", "", lambda: query("SELECT 1 /*" + "x" * 100_000_000 + "*/"), 1,
         "a SELECT with a 100 MB comment (passes by its first keyword)"),
    Kind("alter-100mb", "", lambda: query(f"{ALTER} /*" + "x" * 100_000_000 + "*/"), 1,
         "an ALTER with a 100 MB comment (guarded with unknown targets)"),
    Kind("parse-10mb", "", lambda: parse_sync("SELECT 1;" * 1_000_000 + ALTER), 1,
         "a Parse of 10 MB (a million statements: PostgreSQL refuses it)"),
    Kind("parse-near-limit", "", lambda: parse_sync(_near_limit("SELECT 1;", ALTER)), 1,
         "a Parse just under 32 kB"),
    Kind("migration-script", MIGRATE, lambda: query("SELECT 1;" * 19_999 + ALTER), 1,
         "a migration session's Query of 20000 statements (split off the loop, then run)"),
    Kind("pipelined-ddl", "", lambda: b"".join(query(f"CREATE TEMP TABLE IF NOT EXISTS t{i} ()")
                                               for i in range(20_000)), 20_000,
         "20000 distinct non-plain Queries in one write (each parsed: no cache hit)"),
]  # fmt: skip

PINGER = textwrap.dedent(
    """
    import sys, threading, time, psycopg
    conn = psycopg.connect(sys.argv[1], autocommit=True)
    worst, count, lock = [0.0], [0], threading.Lock()
    def run():
        last = time.perf_counter()
        while True:
            conn.execute("SELECT 1").fetchone()
            now = time.perf_counter()
            with lock:
                worst[0] = max(worst[0], now - last)
                count[0] += 1
            last = now
    threading.Thread(target=run, daemon=True).start()
    print("ready", flush=True)
    for line in sys.stdin:
        with lock:
            print(f"{worst[0]} {count[0]}", flush=True)
            worst[0], count[0] = 0.0, 0
    """
)


class Pinger:
    """SELECT 1 round trips in a process of its own; window() gives the worst gap since the
    last call (seconds) and the number of round trips."""

    def __init__(self, url: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", PINGER, url], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == "ready"

    def window(self) -> tuple[float, int]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()
        worst, count = self.proc.stdout.readline().split()
        return float(worst), int(count)

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def send(url: str, kind: Kind) -> float:
    """Write the kind's messages on a logged-in connection, drain to the last ReadyForQuery;
    the seconds it took."""
    data = kind.build()
    with psycopg.connect(url, autocommit=True, options=kind.options) as conn:
        sock = socket.socket(fileno=os.dup(conn.pgconn.socket))
        sock.setblocking(True)
        writer = threading.Thread(target=sock.sendall, args=(data,), daemon=True)
        try:
            start = time.perf_counter()
            writer.start()  # (replies come while it writes: read them meanwhile)
            seen, tail = 0, b""
            while seen < kind.readies:
                chunk = sock.recv(1 << 20)
                if not chunk:
                    break
                joined = tail + chunk[:8] if tail else b""
                seen += joined.count(_READY) + chunk.count(_READY)
                tail = chunk[-4:]
            writer.join()
            return time.perf_counter() - start
        finally:
            sock.detach()
            conn.pgconn.finish()  # (the protocol state is ours now: don't let psycopg talk)


PROBE = textwrap.dedent(
    """
    # The proxy with a loop-lateness probe: a heartbeat every 2 ms records how late the loop
    # was (the worst of the window), a thread samples the main thread's stack while it is
    # late; SIGUSR1 writes both to $PROBE_OUT and starts a new window.
    import asyncio, collections, os, signal, sys, threading, time, traceback
    from pgmigrate_proxy import cli
    beat, worst, samples = [None], [0.0], collections.Counter()
    main = threading.get_ident()
    async def heartbeat():
        while True:
            now = time.perf_counter()
            if beat[0] is not None:
                worst[0] = max(worst[0], now - beat[0] - 0.002)
            beat[0] = now
            await asyncio.sleep(0.002)
    def report():
        lines = [f"{worst[0] * 1000:.1f}"]
        lines += [f"{n * 3} ms: {where}" for where, n in samples.most_common(5)]
        with open(os.environ["PROBE_OUT"] + ".tmp", "w") as out:
            out.write("\\n".join(lines))
        os.replace(os.environ["PROBE_OUT"] + ".tmp", os.environ["PROBE_OUT"])
        worst[0] = 0.0
        samples.clear()
    run = cli.Service.run
    async def patched(self):
        loop = asyncio.get_running_loop()
        loop.create_task(heartbeat())
        loop.add_signal_handler(signal.SIGUSR1, report)
        return await run(self)
    cli.Service.run = patched
    def watch():
        while True:
            time.sleep(0.003)
            if beat[0] is not None and time.perf_counter() - beat[0] > 0.02:
                frame = sys._current_frames().get(main)
                stack = traceback.extract_stack(frame)[-5:] if frame else []
                where = " <- ".join(f"{os.path.basename(f.filename)}:{f.lineno}:{f.name}"
                                    for f in reversed(stack))
                samples[where] += 1
    threading.Thread(target=watch, daemon=True).start()
    sys.exit(cli.main())
    """
)


class Probe:
    """The proxy's own lateness, read from the probe above (with --with-profile)."""

    def __init__(self, pid: int, path: str) -> None:
        self.pid = pid
        self.path = path

    def window(self) -> tuple[float, list[str]]:
        """The loop's worst lateness (seconds) since the last call, and where it was late."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        os.kill(self.pid, signal.SIGUSR1)
        for _ in range(1000):
            with contextlib.suppress(FileNotFoundError), open(self.path) as report:
                first, *stacks = report.read().splitlines()
                return float(first) / 1000, stacks
            time.sleep(0.01)
        raise RuntimeError("the probe did not answer")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--kinds",
        default=",".join(k.name for k in KINDS),
        help="comma-separated, of: " + ", ".join(k.name for k in KINDS),
    )
    parser.add_argument("--repeat", type=int, default=1, help="runs of each kind (worst kept)")
    parser.add_argument("--no-direct", action="store_true", help="skip the direct reference")
    parser.add_argument(
        "--no-probe",
        action="store_true",
        help="run the proxy as it is, without the loop-lateness probe (no 'loop late' column)",
    )
    parser.add_argument("--stacks", action="store_true", help="print where the loop was late")
    args = parser.parse_args()  # fmt: skip
    by_name = {k.name: k for k in KINDS}
    wanted = [name.strip() for name in args.kinds.split(",") if name.strip()]
    unknown = [name for name in wanted if name not in by_name]
    if unknown:
        parser.error(f"unknown kinds: {', '.join(unknown)}")
    with PostgresServer(password="bench") as pg, tempfile.TemporaryDirectory() as tmp:
        port = _free_port()
        probe_out = os.path.join(tmp, "probe")
        program = ["-m", "pgmigrate_proxy"] if args.no_probe else ["-c", PROBE]
        env = dict(os.environ, PGMIGRATE_PROXY_UPSTREAM=pg.url(), PROBE_OUT=probe_out)
        proxy = subprocess.Popen(
            [sys.executable, *program, "--listen-port", str(port), "--log-level", "error"],
            env=env,
        )  # fmt: skip
        probe = None if args.no_probe else Probe(proxy.pid, probe_out)
        pinger = None
        try:
            url = libpq_url("127.0.0.1", port, "postgres", "bench", "postgres")
            for _ in range(200):
                try:
                    psycopg.connect(url).close()
                    break
                except psycopg.OperationalError:
                    time.sleep(0.05)
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute("CREATE TABLE IF NOT EXISTS stall_target (a int)")
            pinger = Pinger(url)
            time.sleep(0.5)
            pinger.window()
            late = probe.window()[0] if probe else 0.0
            time.sleep(2.0)
            idle, count = pinger.window()
            late = probe.window()[0] if probe else 0.0
            print(
                f"idle (2 s): worst gap {idle * 1000:.1f} ms over {count} round trips; "
                f"the proxy's loop at worst {late * 1000:.1f} ms late"
            )
            print(f"{'kind':<22} {'worst gap':>10} {'loop late':>10} {'direct':>9} {'sent in':>8}")
            for name in wanted:
                kind = by_name[name]
                gaps, lates, direct, took, stacks = [], [], [], 0.0, []
                for _ in range(args.repeat):
                    pinger.window()
                    if probe:
                        probe.window()
                    took = send(url, kind)
                    gaps.append(pinger.window()[0])
                    if probe:
                        late, where = probe.window()
                        lates.append(late)
                        stacks.extend(where)
                    if not args.no_direct:
                        send(pg.url(), kind)
                        direct.append(pinger.window()[0])
                shown_late = f"{max(lates) * 1000:.1f} ms" if lates else "-"
                shown = f"{max(direct) * 1000:.1f} ms" if direct else "-"
                print(
                    f"{name:<22} {max(gaps) * 1000:>7.1f} ms {shown_late:>10} {shown:>9} "
                    f"{took:>7.2f}s  {kind.note}"
                )
                if args.stacks:
                    for line in stacks:
                        print(f"    loop late {line}")
        finally:
            if pinger is not None:
                pinger.close()
            proxy.terminate()
            try:
                proxy.wait(30)
            except subprocess.TimeoutExpired:
                proxy.kill()
                proxy.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
