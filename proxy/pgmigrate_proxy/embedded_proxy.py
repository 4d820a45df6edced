"""The public API for running a proxy inside another program (the Django app's `migrate`).

    proxy = EmbeddedProxy(Config(upstream=url, listen_port=0))
    proxy.start()                 # a thread with its own event loop; returns once listening
    ... connect to proxy.host:proxy.port ...
    proxy.stop()

`is_proxy(info)` tells from a connection's ParameterStatus whether it goes through a
pgmigrate-proxy, and `SESSION_OPTIONS` names what a session may set with
`-c pgmigrate.<name>=<value>` in its startup options. `SETTINGS` is the settings schema (each
setting's default, range and parser), with `parse_duration` / `format_duration`.
`start()` raises AdminLoginRefused when PostgreSQL refuses the guard's admin login (`PRIVILEGES`
says what that role needs).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable

from pgmigrate_proxy.admin import AdminLoginRefused
from pgmigrate_proxy.adminlogin import PRIVILEGES
from pgmigrate_proxy.config import Config
from pgmigrate_proxy.protocol.types import PROXY_PARAMETER
from pgmigrate_proxy.runtime.options import NAMES
from pgmigrate_proxy.runtime.server import ProxyServer
from pgmigrate_proxy.settings import SETTINGS, Rejected, format_duration, parse_duration

__all__ = [
    "PRIVILEGES",
    "PROXY_PARAMETER",
    "SESSION_OPTIONS",
    "SETTINGS",
    "AdminLoginRefused",
    "EmbeddedProxy",
    "Rejected",
    "format_duration",
    "is_proxy",
    "parse_duration",
]

log = logging.getLogger("pgmigrate_proxy.embedded_proxy")

#: The names a session may set as `-c pgmigrate.<name>=<value>`, besides `role=migrate`.
SESSION_OPTIONS = NAMES | {"role"}

_START_SECONDS = 30.0


def is_proxy(parameter_status: Callable[[str], str | None]) -> str | None:
    """The proxy's version when a connection goes through one (give it the connection's
    parameter_status lookup, e.g. psycopg's `conn.info.parameter_status`), else None."""
    return parameter_status(PROXY_PARAMETER)


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A uvloop loop when uvloop is there, without touching the process's event loop policy
    (the program that embeds the proxy keeps its own)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


class EmbeddedProxy:
    """A ProxyServer running in a background thread, on an event loop of its own."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.host = config.listen_host
        self.port = config.listen_port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: ProxyServer | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def start(self) -> EmbeddedProxy:
        """Start listening; raises what the server raised when it could not start."""
        if self._thread is not None:
            raise RuntimeError("the embedded proxy is already running")
        self._thread = threading.Thread(target=self._run, name="pgmigrate-proxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(_START_SECONDS):
            raise TimeoutError("the embedded pgmigrate-proxy did not start")
        if self._error is not None:
            self._thread.join()
            self._thread = None
            raise self._error
        return self

    def stop(self, grace: float = 0.0) -> None:
        """Close every session (after `grace` seconds) and end the thread."""
        loop, server, thread = self._loop, self._server, self._thread
        if loop is None or server is None or thread is None:
            return
        future = asyncio.run_coroutine_threadsafe(server.shutdown(grace), loop)
        try:
            future.result(grace + 10.0)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10.0)
            self._thread = None

    def __enter__(self) -> EmbeddedProxy:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _run(self) -> None:
        loop = new_event_loop()
        self._loop = loop
        try:
            server = ProxyServer(self.config)
            loop.run_until_complete(server.start())
        except BaseException as exc:  # report it to start(), in the caller's thread
            self._error = exc
            self._ready.set()
            loop.close()
            return
        self._server = server
        self.port = server.port
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()
