"""The `pgmigrate-proxy` command: load the config, run the proxy, answer SIGTERM/SIGINT/SIGHUP."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from pgmigrate_proxy import __version__, logsetup, sdnotify
from pgmigrate_proxy.config import (
    PROG,
    RELOADABLE,
    Config,
    ConfigError,
    changed_keys,
    env_var,
    flag,
    load_config,
    passwords_on_command_line,
)
from pgmigrate_proxy.errors import ConnectionFailure
from pgmigrate_proxy.metrics.http import MetricsListenError

if TYPE_CHECKING:
    from pgmigrate_proxy.embedded_postgres import PostgresServer

log = logging.getLogger("pgmigrate_proxy.cli")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Server(Protocol):
    """What the CLI needs of runtime.server.ProxyServer (tests pass a fake)."""

    host: str
    port: int

    async def start(self) -> None: ...
    async def shutdown(self, grace: float | None = None) -> None: ...
    def hurry(self) -> None: ...
    def reload(self, config: Config) -> list[str]: ...


ServerFactory = Callable[[Config], Server]


def _demo(argv: list[str]) -> int:
    from pgmigrate_proxy.demo import main as demo_main

    return demo_main(argv)


def _report(argv: list[str]) -> int:
    """`pgmigrate-proxy report EVENTS.jsonl [-o FILE.html]`: the migration report of the guard
    events in a JSON log (log_format = "json"), as one self-contained HTML page."""
    import argparse

    from pgmigrate_proxy import report

    parser = argparse.ArgumentParser(prog=f"{PROG} report", description=_report.__doc__)
    parser.add_argument("events", help='the proxy\'s log, written with log_format = "json"')
    parser.add_argument("-o", "--output", help="the HTML file to write (default: stdout)")
    parser.add_argument("--title", default="Migration report")
    args = parser.parse_args(argv)
    try:
        with open(args.events, encoding="utf-8", errors="replace") as lines:
            events = report.read_jsonl(lines)
    except OSError as exc:
        print(f"{PROG} report: cannot read {args.events}: {exc.strerror}", file=sys.stderr)
        return EXIT_USAGE
    if not events:
        print(
            f"{PROG} report: no guard events in {args.events} (the proxy writes them as JSON "
            'lines with log_format = "json" and log_level info or debug)',
            file=sys.stderr,
        )
    page = report.render(events, title=args.title, source=os.path.basename(args.events))
    if args.output is None:
        sys.stdout.write(page)
        return EXIT_OK
    try:
        Path(args.output).write_text(page, encoding="utf-8")
    except OSError as exc:
        print(f"{PROG} report: cannot write {args.output}: {exc.strerror}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_OK


def _watch(argv: list[str]) -> int:
    """`pgmigrate-proxy watch [CONNINFO]`: print the guard events that the proxies in front of
    this database send (NOTIFY on events_channel), live, one line each (or JSON lines)."""
    import argparse

    from pgmigrate_proxy import watch

    parser = argparse.ArgumentParser(prog=f"{PROG} watch", description=_watch.__doc__)
    parser.add_argument(
        "conninfo",
        nargs="?",
        default="",
        help="a libpq URL or key=value conninfo (default: libpq's PG* variables)",
    )
    parser.add_argument(
        "--channel", default=None, help="the proxies' events_channel (default: pgmigrate_events)"
    )
    parser.add_argument("--json", action="store_true", help="print each event as one JSON line")
    args = parser.parse_args(argv)
    return watch.run(args.conninfo, args.channel, as_json=args.json)


#: Subcommands by name; the proxy itself runs when the first argument names none of them.
COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "demo": _demo,
    "report": _report,
    "watch": _watch,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `pgmigrate-proxy` and `python -m pgmigrate_proxy`; returns the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in COMMANDS:
        return COMMANDS[args[0]](args[1:])
    return run_proxy(args)


def run_proxy(
    argv: Sequence[str],
    environ: Mapping[str, str] | None = None,
    make_server: ServerFactory | None = None,
) -> int:
    """Run the proxy until SIGTERM or SIGINT: config, logging, embedded server, event loop."""
    environ = os.environ if environ is None else environ
    config = load_or_report(argv, environ)
    if isinstance(config, int):
        return config
    logsetup.configure(config.log_level, config.log_format)
    log.info("%s %s starting (pid %d)", PROG, __version__, os.getpid())
    for key in passwords_on_command_line(argv):
        log.warning(
            "the password in %s is readable by every local user (/proc/%d/cmdline): give it "
            "with PGPASSWORD, a passfile (passfile=... or ~/.pgpass) or %s instead",
            flag(key),
            os.getpid(),
            env_var(key),
        )
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(_startup_signals())
            embedded_url = None
            if config.upstream is None:
                embedded_url = start_embedded(config, stack)
                if embedded_url is None:
                    return EXIT_FAILURE
                config = replace(config, upstream=embedded_url)
            loop_name, make_server = _runtime(make_server)
            service = Service(argv, environ, config, make_server, loop_name, embedded_url)
            return asyncio.run(service.run())
        except _Interrupted as exc:
            log.info("%s during start-up: stopping", exc)
            return EXIT_OK


class _Interrupted(BaseException):
    """SIGTERM or SIGINT arrived before the event loop took the signals over."""


def _interrupt(signum: int, frame: object) -> None:
    raise _Interrupted(signal.Signals(signum).name)


@contextlib.contextmanager
def _startup_signals() -> Iterator[None]:
    """Until the loop's handlers are in place, SIGTERM/SIGINT unwind (stopping what started)."""
    previous = {signum: signal.signal(signum, _interrupt) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def load_or_report(argv: Sequence[str], environ: Mapping[str, str]) -> Config | int:
    """The Config, or the exit code after printing `pgmigrate-proxy: <why>`, --help or --version."""
    try:
        return load_config(argv, environ)
    except ConfigError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except SystemExit as exc:  # --help and --version print, then exit 0 the argparse way
        return exc.code if isinstance(exc.code, int) else EXIT_OK


def _runtime(make_server: ServerFactory | None) -> tuple[str, ServerFactory]:
    """The event loop's name and the server factory; an injected factory keeps asyncio's loop."""
    if make_server is not None:
        return "asyncio", make_server
    from pgmigrate_proxy.runtime.server import ProxyServer, install_event_loop_policy

    return install_event_loop_policy(), ProxyServer


def start_embedded(config: Config, stack: contextlib.ExitStack) -> str | None:
    """Start a throwaway PostgreSQL server stopped by `stack`; its URL, or None if it failed."""
    from pgmigrate_proxy.embedded_postgres import (
        EmbeddedPostgresError,
        PostgresServer,
        resolve_bin_dir,
    )

    log.warning("no upstream configured: starting an embedded PostgreSQL (set --upstream)")
    data_dir = Path(config.embedded_data_dir) if config.embedded_data_dir else None
    try:
        server = PostgresServer(
            bin_dir=resolve_bin_dir(config.embedded_pg),
            data_dir=data_dir,
            port=0,
            # A throwaway server listening on 127.0.0.1 only: trust authentication, so that
            # a new user can log in through the proxy without a password to look up.
            password=None,
        )
        stack.callback(_stop_embedded, server)
        server.start()
    except (EmbeddedPostgresError, OSError) as exc:
        log.error("cannot start the embedded PostgreSQL: %s", exc)
        return None
    url = server.url()
    kept = f"data kept in {data_dir}" if data_dir else "data removed on exit"
    log.warning(
        "started an embedded PostgreSQL %d at %s (user %s, trust authentication on "
        "127.0.0.1 only; %s)",
        server.major_version,
        logsetup.redact(url),
        server.superuser,
        kept,
    )
    return url


def _stop_embedded(server: PostgresServer) -> None:
    if server.pid is not None:
        log.info("stopping the embedded PostgreSQL")
    server.stop()


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Service:
    """One running proxy: start, signal handlers, reload on SIGHUP, graceful shutdown."""

    def __init__(
        self,
        argv: Sequence[str],
        environ: Mapping[str, str],
        config: Config,
        make_server: ServerFactory,
        loop_name: str,
        embedded_url: str | None = None,
    ) -> None:
        self.argv = list(argv)
        self.environ = environ
        self.config = config
        self.make_server = make_server
        self.loop_name = loop_name
        self.embedded_url = embedded_url
        self.server: Server | None = None
        self._stop: asyncio.Event | None = None

    async def run(self) -> int:
        """Serve until SIGTERM or SIGINT, then shut down within the grace period."""
        self._stop = asyncio.Event()
        server = self.server = self.make_server(self.config)
        for hook, handler in (("reload_hook", self.reload), ("stop_hook", self.request_stop)):
            if hasattr(server, hook):  # the admin console's RELOAD and SHUTDOWN
                setattr(server, hook, handler)
        with self._signal_handlers():
            try:
                await server.start()
            except MetricsListenError as exc:
                log.error("%s", exc)
                return EXIT_FAILURE
            except OSError as exc:
                where = _address(self.config.listen_host, self.config.listen_port)
                log.error("cannot listen on %s: %s", where, exc)
                return EXIT_FAILURE
            except ConnectionFailure as exc:  # the admin login refused: a setup error
                log.error("%s", exc)
                return EXIT_USAGE
            log.info("listening on %s (%s)", self._where(), self.loop_name)
            sdnotify.ready(f"listening on {self._where()}")
            await self._stop.wait()
            sdnotify.stopping()
            await server.shutdown(self.config.shutdown_grace)
        log.info("stopped")
        return EXIT_OK

    @contextlib.contextmanager
    def _signal_handlers(self) -> Iterator[None]:
        loop = asyncio.get_running_loop()
        handlers = {signum: self.request_stop for signum in STOP_SIGNALS}
        handlers[signal.SIGHUP] = self.reload
        for signum, handler in handlers.items():
            loop.add_signal_handler(signum, handler, signal.Signals(signum).name)
        try:
            yield
        finally:
            for signum in handlers:
                loop.remove_signal_handler(signum)

    def request_stop(self, reason: str = "stop requested") -> None:
        """Begin the graceful shutdown (SIGTERM, SIGINT); a second one ends its grace."""
        assert self._stop is not None, "run() has not started"
        if self._stop.is_set():  # a second Ctrl-C: stop at once
            log.warning("%s again: ending the open sessions now", reason)
            if self.server is not None:
                self.server.hurry()
            return
        log.info("%s: shutting down, sessions get up to %g s", reason, self.config.shutdown_grace)
        self._stop.set()

    def reload(self, reason: str = "reload requested") -> None:
        """Reload the config from the same flags, env and file (SIGHUP); keep it when invalid."""
        log.info("%s: reloading the configuration", reason)
        sdnotify.reloading()
        try:
            self.apply(load_config(self.argv, self.environ))
        except ConfigError as exc:
            log.error("reload failed, keeping the running configuration: %s", exc)
        except Exception as exc:
            log.error("reload failed, keeping the running configuration: %s", exc, exc_info=True)
        finally:
            sdnotify.ready(f"listening on {self._where()}")

    def _where(self) -> str:
        if self.server is None:
            return _address(self.config.listen_host, self.config.listen_port)
        return _address(self.server.host, self.server.port)

    def apply(self, new: Config) -> None:
        """Hand `new` to the server; log what changed and what needs a restart."""
        assert self.server is not None, "run() has not started"
        requested, refused = new, set[str]()
        if new.upstream is None:  # the embedded server, when there is one
            if self.embedded_url is None:
                refused.add("upstream")
            new = replace(new, upstream=self.embedded_url or self.config.upstream)
        changed = changed_keys(self.config, new)
        refused.update(self.server.reload(new))
        refused.update(key for key in changed if key not in RELOADABLE)
        old = self.config
        self.config = replace(new, **{key: getattr(old, key) for key in refused})
        if (old.log_level, old.log_format) != (self.config.log_level, self.config.log_format):
            logsetup.configure(self.config.log_level, self.config.log_format)
        applied = [key for key in changed if key not in refused]
        _log_reload(old, requested, applied, sorted(refused))


def _shown(config: Config, key: str) -> str:
    if key == "upstream":
        return config.upstream_redacted()
    if key == "admin_upstream":
        return config.admin_upstream_redacted()
    return repr(getattr(config, key))


def _log_reload(old: Config, new: Config, applied: list[str], refused: list[str]) -> None:
    def describe(keys: list[str]) -> str:
        return ", ".join(f"{key} ({_shown(old, key)} -> {_shown(new, key)})" for key in keys)

    if applied:
        log.info("reloaded configuration; changed: %s", describe(applied))
    else:
        log.info("reloaded configuration; nothing changed")
    if refused:
        log.warning("not reloadable, restart to apply: %s", describe(refused))
