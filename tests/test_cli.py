"""The command line: exit 2 with one line on bad config, logging formats, signals and reload
(against a fake server; tests/test_service.py runs the real one)."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable, Iterator, Sequence
from datetime import datetime
from pathlib import Path

import pgmigrate_proxy
import pytest
from pgmigrate_proxy import cli, logsetup
from pgmigrate_proxy import embedded_postgres as embedded
from pgmigrate_proxy.config import RELOADABLE, Config, load_config

PROXY_ROOT = Path(pgmigrate_proxy.__file__).resolve().parent.parent
WAIT_SECONDS = 10.0


# --- fixtures ---------------------------------------------------------------------------------


class Records(logging.Handler):
    """Every record of logger `pgmigrate_proxy`, as (level name, message)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.entries: list[tuple[str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.entries.append((record.levelname, record.getMessage()))

    def messages(self, level: str | None = None) -> list[str]:
        return [msg for name, msg in self.entries if level in (None, name)]

    def text(self) -> str:
        return "\n".join(self.messages())


@pytest.fixture
def records() -> Iterator[Records]:
    """Capture the proxy's log records; restore the logger as it was afterwards."""
    logger = logging.getLogger(logsetup.LOGGER_NAME)
    saved = (list(logger.handlers), logger.level, logger.propagate)
    handler = Records()
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield handler
    logger.handlers[:] = saved[0]
    logger.setLevel(saved[1])
    logger.propagate = saved[2]


@pytest.fixture
def toml(tmp_path: Path) -> Path:
    path = tmp_path / "proxy.toml"
    path.write_text('upstream = "postgresql://app:s3cret@db/app"\nlisten_port = 0\n')
    return path


@pytest.fixture
def notify_socket(monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    with (
        tempfile.TemporaryDirectory(prefix="sdn-") as directory,
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock,
    ):
        sock.bind(f"{directory}/notify")
        sock.setblocking(False)
        monkeypatch.setenv("NOTIFY_SOCKET", f"{directory}/notify")
        yield sock


def notifications(sock: socket.socket) -> list[str]:
    """The first line of every datagram received so far."""
    lines = []
    while True:
        try:
            lines.append(sock.recv(4096).decode().split("\n")[0])
        except BlockingIOError:
            return lines


class FakeServer:
    """Stands in for runtime.server.ProxyServer."""

    refuse: Sequence[str] = ()  # keys reload() reports as needing a restart

    def __init__(self, config: Config) -> None:
        self.config = config
        self.host = config.listen_host
        self.port = config.listen_port or 45678
        self.started = False
        self.reloads: list[Config] = []
        self.grace: float | None = None
        self.release = asyncio.Event()
        self.release.set()

    async def start(self) -> None:
        self.started = True

    async def shutdown(self, grace: float | None = None) -> None:
        self.grace = grace
        await self.release.wait()

    def hurry(self) -> None:
        self.release.set()

    def reload(self, config: Config) -> list[str]:
        self.reloads.append(config)
        return list(self.refuse)


class RefusingServer(FakeServer):
    refuse = ("max_message_size",)


class StoppingServer(FakeServer):
    """Asks for its own SIGTERM as soon as it has started."""

    async def start(self) -> None:
        self.started = True
        os.kill(os.getpid(), signal.SIGTERM)


class BusyPortServer(FakeServer):
    async def start(self) -> None:
        raise OSError(98, "Address already in use")


async def until(predicate: Callable[[], object]) -> None:
    deadline = asyncio.get_running_loop().time() + WAIT_SECONDS
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.005)


def make_service(argv: Sequence[str], server: type[FakeServer] = FakeServer) -> cli.Service:
    config = load_config(argv, {})
    return cli.Service(argv, {}, config, server, "asyncio")


def drive(
    service: cli.Service, scenario: Callable[[FakeServer], Awaitable[None]]
) -> tuple[int, FakeServer]:
    """Run the service, play `scenario` once the server has started, return the exit code."""

    async def main() -> tuple[int, FakeServer]:
        task = asyncio.create_task(service.run())
        await until(lambda: isinstance(service.server, FakeServer) and service.server.started)
        assert isinstance(service.server, FakeServer)
        await scenario(service.server)
        return await asyncio.wait_for(task, WAIT_SECONDS), service.server

    return asyncio.run(main())


def signal_self(signum: signal.Signals) -> None:
    os.kill(os.getpid(), signum)


# --- exit 2 with one line ---------------------------------------------------------------------


def run_module(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("PGMIGRATE_PROXY_")}
    path = os.pathsep.join(p for p in (str(PROXY_ROOT), environ.get("PYTHONPATH")) if p)
    environ.update(PYTHONPATH=path, **(env or {}))
    return subprocess.run(
        [sys.executable, "-m", "pgmigrate_proxy", *args],
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    ("args", "env", "start"),
    [
        (["--listen-port", "abc"], {}, "invalid listen_port: 'abc' (allowed: an integer from 0"),
        ([], {"PGMIGRATE_PROXY_LOG_LEVEL": "loud"}, "invalid log_level: 'loud' (allowed: "),
        ([], {"PGMIGRATE_PROXY_LISTEN_PROT": "1"}, "unknown environment variable: "),
        (["--listen-prot", "1"], {}, "unknown option '--listen-prot' (allowed: --config"),
        (["--listen-port"], {}, "argument --listen-port: expected one argument"),
        (["--upstream", "host=db password=s3cret sslmode=no"], {}, "invalid upstream: 'host=db"),
    ],
)
def test_module_exits_2_with_one_line(args: list[str], env: dict[str, str], start: str) -> None:
    done = run_module(*args, env=env)
    assert done.returncode == 2, done
    assert done.stdout == ""
    assert done.stderr.startswith(f"pgmigrate-proxy: {start}")
    assert done.stderr.count("\n") == 1 and done.stderr.endswith("\n")
    assert "s3cret" not in done.stderr


def test_module_unknown_key_in_file(tmp_path: Path) -> None:
    path = tmp_path / "proxy.toml"
    path.write_text("listen_prot = 1\n")
    done = run_module("--config", str(path))
    assert done.returncode == 2
    assert done.stderr.startswith(f"pgmigrate-proxy: unknown key in {path}: listen_prot (allowed: ")
    assert done.stderr.count("\n") == 1


def test_module_version() -> None:
    done = run_module("--version")
    assert (done.returncode, done.stdout) == (0, f"pgmigrate-proxy {pgmigrate_proxy.__version__}\n")


def test_main_reports_config_errors(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PGMIGRATE_PROXY_SHUTDOWN_GRACE", "-1")
    assert cli.main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pgmigrate-proxy: invalid shutdown_grace: '-1' (allowed: ")
    assert err.endswith(", set by PGMIGRATE_PROXY_SHUTDOWN_GRACE\n")


def test_main_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "--listen-port LISTEN_PORT" in out
    assert "PGMIGRATE_PROXY_LISTEN_PORT" in out


def test_main_dispatches_subcommands(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[str]] = []

    def demo(args: list[str]) -> int:
        seen.append(args)
        return 7

    monkeypatch.setitem(cli.COMMANDS, "demo", demo)
    assert cli.main(["demo", "--fast"]) == 7
    assert seen == [["--fast"]]


# --- logging ----------------------------------------------------------------------------------


def emit_samples(fmt: str, records: Records) -> str:
    stream = io.StringIO()
    logsetup.configure("debug", fmt, stream=stream)
    log = logging.getLogger("pgmigrate_proxy.test")
    log.debug("connecting to %s", "postgresql://app:s3cret@db/app")
    log.info("session opened", extra={"fields": {"client": "127.0.0.1:5000", "pid": 42}})
    try:
        raise ValueError("password=s3cret")
    except ValueError:
        log.exception("failed")
    logging.getLogger("other").warning("not ours")
    return stream.getvalue()


def test_json_lines(records: Records) -> None:
    lines = emit_samples("json", records).splitlines()
    entries = [json.loads(line) for line in lines]
    assert [entry["level"] for entry in entries] == ["debug", "info", "error"]
    first, second, third = entries
    assert set(first) == {"ts", "level", "logger", "msg"}
    assert datetime.fromisoformat(first["ts"]).tzinfo is not None
    assert first["logger"] == "pgmigrate_proxy.test"
    assert first["msg"] == "connecting to postgresql://app:********@db/app"
    assert (second["msg"], second["client"], second["pid"]) == (
        "session opened",
        "127.0.0.1:5000",
        42,
    )
    assert third["msg"] == "failed"
    assert "ValueError: password=********" in third["exc"]
    assert "s3cret" not in "\n".join(lines)


def test_text_lines(records: Records) -> None:
    text = emit_samples("text", records)
    lines = text.splitlines()
    assert " DEBUG pgmigrate_proxy.test: connecting to postgresql://app:********@db/app" in lines[0]
    assert lines[1].endswith("session opened client='127.0.0.1:5000' pid=42")
    assert "s3cret" not in text


def test_configure_again_replaces_its_handler(records: Records) -> None:
    stream = io.StringIO()
    logsetup.configure("info", "text", stream=stream)
    logsetup.configure("warning", "json")
    logger = logging.getLogger(logsetup.LOGGER_NAME)
    assert len(logger.handlers) == 2  # ours and the `records` fixture's
    assert logger.level == logging.WARNING
    logger.warning("kept the stream")
    assert json.loads(stream.getvalue())["msg"] == "kept the stream"


# --- the service: signals and reload (fake server) --------------------------------------------


def test_start_sigterm_shutdown(toml: Path, records: Records, notify_socket: socket.socket) -> None:
    service = make_service(["--config", str(toml), "--shutdown-grace", "7"])

    async def scenario(server: FakeServer) -> None:
        signal_self(signal.SIGTERM)

    code, server = drive(service, scenario)
    assert code == 0
    assert server.grace == 7.0
    assert "listening on 127.0.0.1:45678 (asyncio)" in records.messages("INFO")
    assert "SIGTERM: shutting down, sessions get up to 7 s" in records.messages("INFO")
    assert notifications(notify_socket) == ["READY=1", "STOPPING=1"]


def test_sighup_reloads_and_reports(
    toml: Path, records: Records, notify_socket: socket.socket
) -> None:
    service = make_service(["--config", str(toml)])

    async def scenario(server: FakeServer) -> None:
        toml.write_text(
            'upstream = "postgresql://app:n3w@db2/app"\nlisten_port = 7000\n'
            'log_level = "debug"\nshutdown_grace = 1\n'
        )
        signal_self(signal.SIGHUP)
        await until(lambda: server.reloads)
        signal_self(signal.SIGTERM)

    code, server = drive(service, scenario)
    assert code == 0
    assert server.reloads[0].log_level == "debug"
    assert server.grace == 1.0  # the reloaded grace
    assert service.config.listen_port == 0  # not reloadable: kept
    assert service.config.upstream == "postgresql://app:n3w@db2/app"
    assert logging.getLogger(logsetup.LOGGER_NAME).level == logging.DEBUG
    assert (
        "reloaded configuration; changed: upstream (postgresql://app:********@db/app -> "
        "postgresql://app:********@db2/app), log_level ('info' -> 'debug'), "
        "shutdown_grace (30.0 -> 1.0)"
    ) in records.messages("INFO")
    assert "not reloadable, restart to apply: listen_port (0 -> 7000)" in records.messages(
        "WARNING"
    )
    assert "s3cret" not in records.text() and "n3w" not in records.text()
    assert notifications(notify_socket) == ["READY=1", "RELOADING=1", "READY=1", "STOPPING=1"]


def test_keys_the_server_refuses_are_kept(toml: Path, records: Records) -> None:
    service = make_service(["--config", str(toml)], RefusingServer)

    async def scenario(server: FakeServer) -> None:
        toml.write_text(toml.read_text() + "max_message_size = 8192\nstartup_timeout = 1\n")
        service.reload("test")
        signal_self(signal.SIGTERM)

    drive(service, scenario)
    assert service.config.max_message_size == Config().max_message_size
    assert service.config.startup_timeout == 1.0
    assert "not reloadable, restart to apply: max_message_size (268435456 -> 8192)" in (
        records.messages("WARNING")
    )


def test_reload_without_changes_still_reaches_the_server(toml: Path, records: Records) -> None:
    service = make_service(["--config", str(toml)])

    async def scenario(server: FakeServer) -> None:
        service.reload("test")
        signal_self(signal.SIGTERM)

    _, server = drive(service, scenario)
    assert len(server.reloads) == 1  # e.g. to re-read rotated TLS files
    assert "reloaded configuration; nothing changed" in records.messages("INFO")


def test_bad_config_on_reload_keeps_the_old(
    toml: Path, records: Records, notify_socket: socket.socket
) -> None:
    service = make_service(["--config", str(toml)])
    before = service.config

    async def scenario(server: FakeServer) -> None:
        toml.write_text(toml.read_text() + "log_level = 'loud'\n")
        signal_self(signal.SIGHUP)
        await until(lambda: records.messages("ERROR"))
        signal_self(signal.SIGTERM)

    code, server = drive(service, scenario)
    assert code == 0
    assert server.reloads == []
    assert service.config == before
    assert records.messages("ERROR") == [
        "reload failed, keeping the running configuration: invalid log_level: 'loud' "
        f"(allowed: debug | info | warning | error), set by {toml}"
    ]
    assert notifications(notify_socket) == ["READY=1", "RELOADING=1", "READY=1", "STOPPING=1"]


def test_upstream_cannot_become_embedded_while_running(toml: Path, records: Records) -> None:
    service = make_service(["--config", str(toml)])

    async def scenario(server: FakeServer) -> None:
        toml.write_text("listen_port = 0\n")
        service.reload("test")
        signal_self(signal.SIGTERM)

    _, server = drive(service, scenario)
    assert server.reloads[0].upstream == "postgresql://app:s3cret@db/app"
    assert service.config.upstream == "postgresql://app:s3cret@db/app"
    assert records.messages("WARNING") == [
        "not reloadable, restart to apply: upstream (postgresql://app:********@db/app -> "
        "(embedded))"
    ]


def test_embedded_upstream_is_kept_on_reload(tmp_path: Path, records: Records) -> None:
    url = "postgresql://postgres:pw@127.0.0.1:5999/postgres"
    config = Config(listen_port=0, upstream=url)
    service = cli.Service([], {}, config, FakeServer, "asyncio", embedded_url=url)

    async def scenario(server: FakeServer) -> None:
        service.reload("test")
        signal_self(signal.SIGTERM)

    _, server = drive(service, scenario)
    assert server.reloads[0].upstream == url
    assert "reloaded configuration; nothing changed" in records.messages("INFO")


def test_second_stop_signal_ends_the_grace(toml: Path, records: Records) -> None:
    service = make_service(["--config", str(toml)])

    async def scenario(server: FakeServer) -> None:
        server.release.clear()
        signal_self(signal.SIGTERM)
        await until(lambda: server.grace is not None)
        signal_self(signal.SIGINT)  # hurry(): the fake's shutdown returns
        await until(lambda: "SIGINT again: ending the open sessions now" in records.messages())

    assert drive(service, scenario)[0] == 0


def test_listen_failure_exits_1(toml: Path, records: Records) -> None:
    code = cli.run_proxy(["--config", str(toml)], {}, BusyPortServer)
    assert code == 1
    assert records.messages("ERROR") == [
        "cannot listen on 127.0.0.1:0: [Errno 98] Address already in use"
    ]


def test_run_proxy_logs_its_version_first(toml: Path, records: Records) -> None:
    assert cli.run_proxy(["--config", str(toml)], {}, StoppingServer) == 0
    assert records.messages()[0].startswith(
        f"pgmigrate-proxy {pgmigrate_proxy.__version__} starting"
    )
    assert records.messages()[-1] == "stopped"


# --- the embedded PostgreSQL (faked) ----------------------------------------------------------


def test_embedded_failure_exits_1(records: Records, monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(choice: str | None = None) -> Path:
        raise embedded.EmbeddedPostgresError("no PostgreSQL binaries in /nowhere")

    monkeypatch.setattr(embedded, "resolve_bin_dir", missing)
    assert cli.run_proxy(["--listen-port", "0"], {}, FakeServer) == 1
    assert records.messages("ERROR") == [
        "cannot start the embedded PostgreSQL: no PostgreSQL binaries in /nowhere"
    ]


def test_reloadable_set_is_what_the_cli_reports() -> None:
    assert "listen_port" not in RELOADABLE and "log_level" in RELOADABLE


# --- secrets on the command line ---------------------------------------------------------------

SECRET = "Sup3rS3cret"


@pytest.mark.parametrize(
    "upstream",
    [
        f"postgresql://app:{SECRET}/x@db/app",  # "/" in the password: libpq reads a port
        f"postgresql://app:{SECRET} x@db/app",  # a space
        f"postgresql://app:{SECRET}@db:abc/app",  # a non-numeric port
        f"postgresql://app:{SECRET}@db:5432,db2:x/app",
        f"postgresql://app:a@{SECRET}:x/y@db/app",  # "@", ":" and "/" in the password
        f"postgresql://app:{SECRET}@db/app?sslmode=sometimes",
        f"postgresql://app@db/app?password={SECRET} x&sslmode=bogus",
        f"host=db password={SECRET} x port=5x",
        f"host=db password='{SECRET} port=5",  # unterminated quote
        f"host=db port=abc password={SECRET}",
    ],
)
@pytest.mark.parametrize(
    ("argv", "env"),
    [
        (["--upstream", "{}"], {}),
        (["--upstream", "host=db", "--admin-upstream", "{}"], {}),
        ([], {"PGMIGRATE_PROXY_UPSTREAM": "{}"}),
    ],
)
def test_malformed_upstreams_never_show_the_secret(
    upstream: str, argv: list[str], env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [arg.format(upstream) for arg in argv]
    env = {key: value.format(upstream) for key, value in env.items()}
    assert cli.load_or_report(argv, env) == 2
    err = capsys.readouterr().err
    assert err.startswith("pgmigrate-proxy: invalid ") and err.count("\n") == 1, err
    assert SECRET not in err


def test_non_numeric_port_is_one_line_and_exit_2() -> None:
    done = run_module("--upstream", "postgresql://app@db:abc/app")
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == (
        "pgmigrate-proxy: invalid upstream: 'postgresql://app@db:abc/app' (allowed: a libpq URL "
        "or key=value conninfo whose port is a number from 1 to 65535), set by --upstream\n"
    )


def test_a_password_in_argv_is_warned_about_once(toml: Path, records: Records) -> None:
    upstream = f"postgresql://app:{SECRET}@127.0.0.1:5/app"
    argv = ["--config", str(toml), "--upstream", upstream, "--admin-upstream", upstream]
    assert cli.run_proxy(argv, {}, StoppingServer) == 0
    warnings = [m for m in records.messages("WARNING") if "readable by every local user" in m]
    assert len(warnings) == 2 and "--upstream" in warnings[0] and "--admin-upstream" in warnings[1]
    assert "PGMIGRATE_PROXY_UPSTREAM" in warnings[0]
    assert SECRET not in records.text()


def test_no_warning_for_a_password_from_the_environment(toml: Path, records: Records) -> None:
    env = {"PGMIGRATE_PROXY_UPSTREAM": f"postgresql://app:{SECRET}@127.0.0.1:5/app"}
    assert cli.run_proxy(["--config", str(toml)], env, StoppingServer) == 0
    assert not [m for m in records.messages("WARNING") if "readable by every" in m]
    assert SECRET not in records.text()


def test_help_explains_each_option_and_lists_demo(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "demo the lock-queue stall" in out
    assert "--watch-interval WATCH_INTERVAL pause between `pg_blocking_pids()` polls" in out
    assert "Allowed: a duration from 10ms to 1min" in out
    assert "PGPASSWORD" in out
