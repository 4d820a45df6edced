"""`python -m pgmigrate_proxy` as a service: a real proxy process in front of a real PostgreSQL,
driven by SIGHUP and SIGTERM, with sd_notify messages on a real socket."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pgmigrate_proxy
import psycopg
import pytest
from pgmigrate_proxy.embedded_postgres import libpq_url

from tests.fixtures.postgres import PgInfo

pytestmark = pytest.mark.integration

PROXY_ROOT = Path(pgmigrate_proxy.__file__).resolve().parent.parent
LISTENING = re.compile(r"listening on 127\.0\.0\.1:(\d+) \((uvloop|asyncio)\)")
START_SECONDS = 90.0  # an embedded PostgreSQL may need initdb first
STEP_SECONDS = 20.0


class ProxyProcess:
    """`python -m pgmigrate_proxy ARGS` with its log lines collected by a reader thread."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pgmigrate_proxy", *args],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def output(self) -> str:
        with self._changed:
            return "\n".join(self.lines)

    def wait_for(
        self, pattern: str | re.Pattern[str], timeout: float = STEP_SECONDS
    ) -> re.Match[str]:
        """The first log line matching `pattern`, waiting for it to be printed."""
        regex = re.compile(pattern)

        def found() -> re.Match[str] | None:
            return next((m for m in map(regex.search, self.lines) if m), None)

        with self._changed:
            done = self._changed.wait_for(lambda: found() or self.proc.poll() is not None, timeout)
            match = found()
        assert match, f"no log line matches {regex.pattern!r} ({done=}):\n{self.output()}"
        return match

    def port(self) -> int:
        return int(self.wait_for(LISTENING, START_SECONDS).group(1))

    def send(self, signum: signal.Signals) -> None:
        self.proc.send_signal(signum)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(STEP_SECONDS)
        self._reader.join(STEP_SECONDS)


def proxy_env(**extra: str) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("PGMIGRATE_PROXY_") and key != "NOTIFY_SOCKET"
    }
    path = [str(PROXY_ROOT), *filter(None, [env.get("PYTHONPATH")])]
    env["PYTHONPATH"] = os.pathsep.join(path)
    env.update(extra)
    return env


@pytest.fixture
def start_proxy(
    request: pytest.FixtureRequest,
) -> Iterator[Callable[..., ProxyProcess]]:
    """Start proxy processes; at teardown kill what is left and show their logs on failure."""
    started: list[ProxyProcess] = []

    def start(*args: str, **env: str) -> ProxyProcess:
        started.append(ProxyProcess(list(args), proxy_env(**env)))
        return started[-1]

    yield start
    for proxy in started:
        proxy.stop()
        print(f"--- proxy log (exit {proxy.proc.returncode}) ---\n{proxy.output()}")


@pytest.fixture
def notify_socket() -> Iterator[tuple[socket.socket, str]]:
    with (
        tempfile.TemporaryDirectory(prefix="sdn-") as directory,
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock,
    ):
        sock.bind(f"{directory}/notify")
        sock.settimeout(START_SECONDS)
        yield sock, f"{directory}/notify"


def proxy_url(pg: PgInfo, port: int) -> str:
    return libpq_url("127.0.0.1", port, pg.superuser, pg.superuser_password)


def test_sighup_reload_then_sigterm_waits_for_the_session(
    pg: PgInfo, tmp_path: Path, start_proxy: Callable[..., ProxyProcess]
) -> None:
    config = tmp_path / "proxy.toml"
    config.write_text('listen_port = 0\nlog_level = "info"\nshutdown_grace = 60\n')
    proxy = start_proxy("--config", str(config), PGMIGRATE_PROXY_UPSTREAM=pg.url())
    url = proxy_url(pg, proxy.port())
    conn: psycopg.Connection[Any]
    with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)

        config.write_text('listen_port = 6999\nlog_level = "debug"\nshutdown_grace = 60\n')
        proxy.send(signal.SIGHUP)
        proxy.wait_for(r"reloaded configuration; changed: log_level \('info' -> 'debug'\)$")
        proxy.wait_for(r"not reloadable, restart to apply: listen_port \(0 -> 6999\)$")
        assert conn.execute("SELECT 2").fetchone() == (2,)

        proxy.send(signal.SIGTERM)
        proxy.wait_for(r"SIGTERM: shutting down, sessions get up to 60 s")
        with pytest.raises(subprocess.TimeoutExpired):
            proxy.proc.wait(0.5)  # the open session keeps it running
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(url, connect_timeout=5).close()  # no new clients
        assert conn.execute("SELECT 3").fetchone() == (3,)
    assert proxy.proc.wait(STEP_SECONDS) == 0
    proxy.wait_for(r"stopped$")
    assert pg.superuser_password not in proxy.output()


def test_second_sigint_stops_at_once(
    pg: PgInfo, tmp_path: Path, start_proxy: Callable[..., ProxyProcess]
) -> None:
    """Ctrl-C twice: the first begins the graceful shutdown (10 minutes of grace here), the
    second ends it, while a client sits idle: the process exits without waiting the grace."""
    config = tmp_path / "proxy.toml"
    config.write_text('listen_port = 0\nshutdown_grace = 600\n')
    proxy = start_proxy("--config", str(config), PGMIGRATE_PROXY_UPSTREAM=pg.url())
    conn: psycopg.Connection[Any]
    with psycopg.connect(proxy_url(pg, proxy.port()), autocommit=True, connect_timeout=10) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        proxy.send(signal.SIGINT)
        proxy.wait_for(r"SIGINT: shutting down, sessions get up to 600 s")
        proxy.wait_for(r"waiting up to 600 s for 1 session\(s\) to end")
        assert proxy.proc.poll() is None  # the idle session keeps it running
        proxy.send(signal.SIGINT)
        assert proxy.proc.wait(STEP_SECONDS) == 0  # STEP_SECONDS: far below the grace
        proxy.wait_for(r"SIGINT again: ending the open sessions now")
        with pytest.raises(psycopg.OperationalError, match="administrator command"):
            conn.execute("SELECT 2")
    proxy.wait_for(r"stopped$")


def test_a_refused_admin_login_stops_the_start(
    pg: PgInfo, start_proxy: Callable[..., ProxyProcess]
) -> None:
    """The README's and the Dockerfile's URL without a user: libpq logs the admin connection in
    as the OS user, which PostgreSQL refuses. The proxy says why and exits 2 (a setup error)."""
    no_user = f"postgresql://{pg.host}:{pg.port}/postgres"
    proxy = start_proxy("--listen-port", "0", PGMIGRATE_PROXY_UPSTREAM=no_user)
    assert proxy.proc.wait(START_SECONDS) == 2
    refused = r"ERROR pgmigrate_proxy\.cli: the admin connection's login as .*"
    line = proxy.wait_for(refused).group(0)
    assert "(the URL names no user: libpq took PGUSER or the OS user) was refused: " in line
    assert "pg_read_all_stats and pg_signal_backend" in line
    assert "listening on" not in proxy.output()


def test_a_wrong_admin_password_stops_the_start(
    pg: PgInfo, start_proxy: Callable[..., ProxyProcess]
) -> None:
    wrong = libpq_url(pg.host, pg.port, pg.superuser, "not-the-password")
    proxy = start_proxy("--listen-port", "0", PGMIGRATE_PROXY_UPSTREAM=wrong)
    assert proxy.proc.wait(START_SECONDS) == 2
    proxy.wait_for(
        f"the admin connection's login as '{pg.superuser}' was refused: password "
        f'authentication failed for user "{pg.superuser}"; it logs in as the user of '
        "admin_upstream, else of upstream"
    )
    assert "not-the-password" not in proxy.output()


def test_an_unreachable_postgresql_at_start_is_a_warning(
    start_proxy: Callable[..., ProxyProcess],
) -> None:
    """Not reachable yet (PostgreSQL starting after the proxy): the proxy starts, as before."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))  # a port nobody listens on
        port = sock.getsockname()[1]
        nobody = f"postgresql://u@127.0.0.1:{port}/db"
        proxy = start_proxy("--listen-port", "0", PGMIGRATE_PROXY_UPSTREAM=nobody)
        proxy.port()
    proxy.wait_for(r"WARNING .*cannot open the admin connection: .*: guarded statements use")
    proxy.send(signal.SIGTERM)
    assert proxy.proc.wait(STEP_SECONDS) == 0


def test_sd_notify_ready_reloading_stopping(
    pg: PgInfo,
    start_proxy: Callable[..., ProxyProcess],
    notify_socket: tuple[socket.socket, str],
) -> None:
    sock, path = notify_socket
    proxy = start_proxy("--listen-port", "0", PGMIGRATE_PROXY_UPSTREAM=pg.url(), NOTIFY_SOCKET=path)

    def next_message() -> list[str]:
        return sock.recv(4096).decode().split("\n")

    ready = next_message()
    assert ready[0] == "READY=1"
    assert ready[1] == f"STATUS=listening on 127.0.0.1:{proxy.port()}"
    proxy.send(signal.SIGHUP)
    reloading = next_message()
    assert reloading[0] == "RELOADING=1"
    assert re.fullmatch(r"MONOTONIC_USEC=\d+", reloading[1])
    assert next_message()[0] == "READY=1"
    proxy.send(signal.SIGTERM)
    assert next_message() == ["STOPPING=1"]
    assert proxy.proc.wait(STEP_SECONDS) == 0


def test_without_upstream_an_embedded_postgresql_serves(
    start_proxy: Callable[..., ProxyProcess],
) -> None:
    proxy = start_proxy("--listen-port", "0", "--log-format", "json")
    proxy.port()
    started = proxy.wait_for(
        r'"msg": "started an embedded PostgreSQL \d+ at '
        r"postgresql://postgres@127\.0\.0\.1:(\d+)/postgres \(user postgres, trust"
    )
    assert "no upstream configured" in proxy.lines[1]
    pg_port = int(started.group(1))
    # A new user logs in through the proxy with no password to look up.
    conninfo = f"host=127.0.0.1 port={proxy.port()} user=postgres dbname=postgres"
    with psycopg.connect(conninfo, connect_timeout=10) as conn:
        assert conn.execute("SELECT current_setting('port')::int").fetchone() == (pg_port,)
    proxy.send(signal.SIGTERM)
    assert proxy.proc.wait(STEP_SECONDS * 2) == 0
    proxy.wait_for("stopping the embedded PostgreSQL")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", pg_port), 5).close()
