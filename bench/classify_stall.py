"""Classification stall benchmark: how long other clients wait while one sends a huge Query.

A proxy (a subprocess, `python -m pgmigrate_proxy`) in front of an embedded PostgreSQL; one
client runs `SELECT 1` round trips for the whole run and records the longest gap between two
answers; meanwhile another sends a Query of N `SELECT 1;` statements followed by an ALTER
(the hardening finding: 10 MB froze every other client for 22 s) and reads its reply to the
end. Printed: the worst gap with the huge Query, and without it (the baseline).

    python bench/classify_stall.py                      # a million statements (10 MB)
    python bench/classify_stall.py --statements 20000 --migration
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import threading
import time

import psycopg
from pgmigrate_proxy.embedded_postgres import PostgresServer, libpq_url


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Pinger(threading.Thread):
    def __init__(self, conninfo: str) -> None:
        super().__init__(daemon=True)
        self.conn = psycopg.connect(conninfo, autocommit=True)
        self.stop = threading.Event()
        self.worst = 0.0
        self.count = 0

    def run(self) -> None:
        last = time.perf_counter()
        while not self.stop.is_set():
            self.conn.execute("SELECT 1").fetchone()
            now = time.perf_counter()
            self.worst = max(self.worst, now - last)
            self.count += 1
            last = now


def _measure(url: str, sql: str | None, options: str, seconds: float) -> tuple[float, int]:
    pinger = Pinger(url)
    pinger.start()
    time.sleep(0.5)
    pinger.worst = 0.0
    if sql is None:
        time.sleep(seconds)
    else:
        with psycopg.connect(url, autocommit=True, options=options) as conn:
            try:
                conn.execute(sql.encode())
            except psycopg.Error as exc:
                print(f"  the huge Query got: {exc.sqlstate} {exc}".splitlines()[0])
    pinger.stop.set()
    pinger.join()
    pinger.conn.close()
    return pinger.worst, pinger.count


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--statements", type=int, default=1_000_000)
    parser.add_argument("--migration", action="store_true", help="send it in a migration session")
    args = parser.parse_args()
    sql = "SELECT 1;" * args.statements + " ALTER TABLE stall_target ADD COLUMN x int"
    options = "-c pgmigrate.role=migrate" if args.migration else ""
    with PostgresServer(password="bench") as pg:
        port = _free_port()
        upstream = pg.url()
        proxy = subprocess.Popen(
            [sys.executable, "-m", "pgmigrate_proxy", "--upstream", upstream,
             "--listen-port", str(port), "--log-level", "warning"],
        )  # fmt: skip
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
            worst, count = _measure(url, sql, options, 0)
            print(f"with a Query of {len(sql) / 1e6:.1f} MB ({args.statements} statements): "
                  f"worst gap {worst * 1000:.1f} ms over {count} round trips")  # fmt: skip
            base, count = _measure(url, None, options, 3.0)
            print(f"baseline (3 s, nothing else): worst gap {base * 1000:.1f} ms over {count}")
        finally:
            proxy.terminate()
            proxy.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
