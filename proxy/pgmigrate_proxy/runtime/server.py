"""The listening server: accepts clients, owns their sessions and cancel keys, shuts down."""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import time
from collections.abc import Callable, Collection
from dataclasses import replace
from typing import TYPE_CHECKING

from pgmigrate_proxy import __version__, logsetup
from pgmigrate_proxy.admin import AdminConnection, AdminLoginRefused, AdminUnavailable
from pgmigrate_proxy.config import RELOADABLE, Config
from pgmigrate_proxy.console import serve as console
from pgmigrate_proxy.console.host import Gate
from pgmigrate_proxy.guard import coordination
from pgmigrate_proxy.poolconfig import pool_settings
from pgmigrate_proxy.protocol.messages import CancelRequest
from pgmigrate_proxy.protocol.sqlstate import SqlState
from pgmigrate_proxy.runtime import guarding
from pgmigrate_proxy.runtime.clientauth import AuthService
from pgmigrate_proxy.runtime.context import SessionSettings
from pgmigrate_proxy.runtime.coordinate import DrainCoordinator
from pgmigrate_proxy.runtime.pool import PoolRegistry
from pgmigrate_proxy.runtime.publish import EventPublisher
from pgmigrate_proxy.runtime.roundwrites import RoundWrites
from pgmigrate_proxy.runtime.session import ClientSession
from pgmigrate_proxy.runtime.tls import client_side_context
from pgmigrate_proxy.runtime.upstream import UpstreamError, UpstreamTarget, send_cancel
from pgmigrate_proxy.settings import listen_address

if TYPE_CHECKING:
    from pgmigrate_proxy.metrics.http import MetricsServer

log = logging.getLogger("pgmigrate_proxy.server")

#: After the grace period, how long closing sessions get to flush their last error.
_CLOSE_SECONDS = 2.0


def install_event_loop_policy() -> str:
    """Use uvloop when it is importable; return the name of the loop in use."""
    try:
        import uvloop
    except ImportError:
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"


def session_settings(config: Config) -> SessionSettings:
    """The per-session view of a Config."""
    mode = config.effective_client_tls_mode()
    tls = None
    if mode != "disable" and config.client_tls_cert_file and config.client_tls_key_file:
        tls = client_side_context(config.client_tls_cert_file, config.client_tls_key_file)
    return SessionSettings(
        upstream=UpstreamTarget.from_params(config.upstream_params()),
        max_message_size=config.max_message_size,
        startup_timeout=config.startup_timeout,
        client_tls=tls,
        require_client_tls=mode == "require",
        proxy_version=__version__,
    )


def guard_settings(config: Config) -> guarding.GuardSettings | None:
    """The guard's view of a Config; None when the guard is off."""
    if not config.guard:
        return None
    return guarding.GuardSettings(
        action=config.blocking_action_value(),
        filters=config.guard_filters(),
        schedule=config.retry_schedule(),
        max_hold=config.max_hold,
        watch_interval=config.watch_interval,
        cancel_grace=config.cancel_grace,
        drain=config.drain_settings(),
        report_events=config.report_events,
        migration_lock=config.migration_lock,
        migration_lock_timeout=config.migration_lock_timeout,
    )


async def _start_metrics(server: ProxyServer, listen: str) -> MetricsServer:
    """Serve /metrics on `listen` (metrics_listen) from this loop (metrics/http.py says why).
    Imported here: prometheus_client takes ~80 ms to import, and most proxies (the embedded
    one of every `migrate`) serve no metrics."""
    from prometheus_client import CollectorRegistry

    from pgmigrate_proxy.metrics.collect import ProxyCollector
    from pgmigrate_proxy.metrics.http import MetricsServer

    registry = CollectorRegistry(auto_describe=False)
    registry.register(ProxyCollector(server))
    metrics = MetricsServer(registry)
    host, port = listen_address(listen)
    await metrics.start(host, port)
    log.info("serving metrics on http://%s/metrics", listen.rpartition(":")[0] + f":{metrics.port}")
    return metrics


class ProxyServer:
    """Listens for clients and runs a ClientSession for each."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.settings = session_settings(config)
        self.host = config.listen_host
        self.port = config.listen_port
        self._server: asyncio.Server | None = None
        self._sessions: set[ClientSession] = set()
        self._starting: set[ClientSession] = set()  # between startup packet and login
        self._keys: dict[bytes, ClientSession] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._grace_over = asyncio.Event()  # hurry(): the shutdown stops waiting for sessions
        self.guard = guarding.GuardServices(admin=None)
        self.writes = RoundWrites()  # relayed bytes go out at the end of the loop's round
        self.guard_settings = guard_settings(config)
        self.migration_patterns = config.migration_application_names
        self.pools = PoolRegistry(lambda db, user: pool_settings(self.config, db, user))
        self.auth = AuthService.from_config(config, self._admin)
        # the admin console's (console/): client ids, PAUSE's gate, the service's hooks
        self._next_client = itertools.count(1)
        self.gate = Gate()
        self.started = time.time()
        self.reload_hook: Callable[[str], None] | None = None
        self.stop_hook: Callable[[str], None] | None = None
        self._wait_for_clients = False
        self.metrics: MetricsServer | None = None  # /metrics on metrics_listen

    @property
    def active_sessions(self) -> int:
        return len(self._sessions)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(logsetup.loop_exception_handler)
        if self.config.metrics_listen:  # first: a bad address leaves nothing else open
            self.metrics = await _start_metrics(self, self.config.metrics_listen)
        try:
            if self.config.guard or self.config.auth_type == "auth_query":
                await self._open_admin()
            await self._start_events()
            self._server = await loop.create_server(
                self._accept, self.config.listen_host, self.config.listen_port, backlog=1024
            )
        except BaseException:
            if self.metrics is not None:
                await self.metrics.close()
            raise
        self.port = self._server.sockets[0].getsockname()[1]

    async def _open_admin(self) -> None:
        """The admin connection the guard finds and ends blockers through; raises
        AdminLoginRefused when PostgreSQL refuses its login."""
        conninfo = self.config.admin_upstream or self.config.upstream or ""
        # One try per use: the guard backs off by itself while the connection is down, so
        # that statements never wait on reconnects.
        admin = AdminConnection(conninfo, reconnect_attempts=1)
        self.guard.admin = admin
        try:
            await admin.connect()
        except AdminLoginRefused:  # a setup error at start: the proxy does not start
            self.guard.admin = None
            await admin.close()
            raise
        except AdminUnavailable as exc:  # PostgreSQL unreachable: tried again when needed
            log.warning("%s: guarded statements use lock_timeout and retries until it is back", exc)

    async def _start_events(self) -> None:
        """NOTIFY of the guard events through the admin connection (events_channel)."""
        admin, channel = self.guard.admin, self.config.events_channel
        if admin is not None and channel and self.config.guard:
            self.guard.events = EventPublisher(admin, channel)
            await self.guard.events.start()
            self.guard.coordinator = DrainCoordinator(
                admin,
                coordination.channel(channel),
                lambda: self.guard.drain_gate,
                lambda: self.config.drain_ack_timeout,  # (as RELOAD or SET leave it)
                self.guard.events.identity,
            )
            await self.guard.coordinator.start()

    def _admin(self) -> AdminConnection | None:
        """The admin connection auth_query runs on (made on first use after a reload to it)."""
        if self.guard.admin is None and self.config.auth_type == "auth_query":
            conninfo = self.config.admin_upstream or self.config.upstream or ""
            self.guard.admin = AdminConnection(conninfo, reconnect_attempts=1)
        return self.guard.admin

    def _accept(self) -> ClientSession:
        session = ClientSession(self)
        self._sessions.add(session)
        session.client_id = next(self._next_client)
        self._idle.clear()
        return session

    # --- the SessionHub side --------------------------------------------------------------------

    def register(self, session: ClientSession) -> bytes:
        """Give a session its own secret key for CancelRequest."""
        while True:
            key = secrets.token_bytes(4)
            if key not in self._keys:
                self._keys[key] = session
                return key

    def admit(self, session: ClientSession) -> bool:
        """Whether a session may open its server connection to log in: at most
        max_startup_clients at once, each holding a PostgreSQL slot until it is done."""
        if len(self._starting) >= self.config.max_startup_clients:
            return False
        self._starting.add(session)
        return True

    def client_limit_reached(self) -> bool:
        """More clients than max_client_conn (this one counted)."""
        return len(self._sessions) > self.config.max_client_conn

    @property
    def sessions(self) -> Collection[ClientSession]:
        return list(self._sessions)

    def client_id(self, session: ClientSession) -> int:
        """The id the admin console knows a client by (SHOW CLIENTS, KILL_CLIENT)."""
        return session.client_id

    async def serve_console(self, session: ClientSession) -> None:
        """The admin console for a client of database pgmigrate or pgbouncer (console/)."""
        self._starting.discard(session)  # (it holds no PostgreSQL slot)
        await console.serve(self, session)

    def stop(self, *, wait_for_clients: bool) -> None:
        """SHUTDOWN from the admin console: through the service's stop (stop_hook), at once or
        once every client has left."""
        assert self.stop_hook is not None, "no service to stop"
        self._wait_for_clients = wait_for_clients
        self.stop_hook("SHUTDOWN from the admin console")
        if not wait_for_clients:
            self.hurry()

    def logged_in(self, session: ClientSession) -> None:
        self._starting.discard(session)
        self.gate.admitted(session)
        if self.auth is not None:  # the proxy logs in servers for this pool from now on
            user = session.parameters.get("user", "")
            database = session.parameters.get("database") or user
            if (database, user) not in self.pools.openers:
                settings = session.settings
                opener = self.auth.opener(lambda: settings.upstream, database, user)
                self.pools.set_opener(database, user, opener)

    def session_closed(self, session: ClientSession) -> None:
        self._starting.discard(session)
        self._sessions.discard(session)
        if self._keys.get(session.secret_key) is session:
            del self._keys[session.secret_key]
        if not self._sessions:
            self._idle.set()

    def cancel(self, request: CancelRequest) -> asyncio.Future[None] | None:
        """Forward a CancelRequest to the session it names; an unknown key is dropped silently.

        Returns the task delivering it, done once PostgreSQL has closed the connection the
        request went on (None for a dropped request).
        """
        session = self._keys.get(request.secret_key)
        key = session.server_key if session is not None else None
        if session is None or key is None or session.client_pid != request.process_id:
            return None
        forward = CancelRequest(key.process_id, key.secret_key)
        task = asyncio.get_running_loop().create_task(
            self._send_cancel(session.settings.upstream, forward)
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        lease = session.link.lease if session.link is not None else None
        if lease is not None:  # not handed to another client until delivered (pgbouncer's rule)
            lease.cancels += 1
            task.add_done_callback(lambda _: lease.pool.cancel_done(lease))
        return task

    @staticmethod
    async def _send_cancel(target: UpstreamTarget, request: CancelRequest) -> None:
        try:
            await send_cancel(target, request)
        except UpstreamError as exc:
            log.warning("cancel request not delivered: %s", exc)

    # --- lifecycle ------------------------------------------------------------------------------

    def reload(self, config: Config) -> list[str]:
        """Apply what can change while running; return the keys that need a restart."""
        fixed = [
            key
            for key in Config.__dataclass_fields__
            if key not in RELOADABLE and getattr(config, key) != getattr(self.config, key)
        ]
        keep = {key: getattr(self.config, key) for key in fixed}
        auth = AuthService.from_config(replace(config, **keep), self._admin, self.auth)
        self.config = replace(config, **keep)
        self.auth = auth  # the auth_file is read again
        self.settings = session_settings(self.config)
        self.guard_settings = guard_settings(self.config)
        self.migration_patterns = self.config.migration_application_names
        for pool in self.pools.pools.values():
            pool.settings = pool_settings(self.config, *pool.key)
        return fixed

    async def shutdown(self, grace: float | None = None) -> None:
        """Stop accepting, give sessions up to `grace` seconds to end, then close the rest."""
        grace = self.config.shutdown_grace if grace is None else grace
        if self._server is not None:
            self._server.close()
        if self.metrics is not None:
            await self.metrics.close()
        if self._sessions:
            log.info("waiting up to %.0f s for %d session(s) to end", grace, len(self._sessions))
            ends = (self._idle, self._grace_over)
            waits = [asyncio.ensure_future(event.wait()) for event in ends]
            timeout = None if self._wait_for_clients else grace
            await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            for waiting in waits:
                waiting.cancel()
        for session in list(self._sessions):
            session.fail(
                SqlState.ADMIN_SHUTDOWN, "terminating connection due to administrator command"
            )
        try:
            await asyncio.wait_for(self._idle.wait(), _CLOSE_SECONDS)
        except asyncio.TimeoutError:
            for session in list(self._sessions):
                session.abort()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.pools.shutdown()
        if self._server is not None:
            await self._server.wait_closed()
        if self.guard.coordinator is not None:
            await self.guard.coordinator.close()
        if self.guard.events is not None:
            await self.guard.events.close()
        if self.guard.admin is not None:
            await self.guard.admin.close()

    def hurry(self) -> None:
        """End the shutdown's grace now (a second SIGINT/SIGTERM): open sessions are closed."""
        self._grace_over.set()

    async def wait_closed(self) -> None:
        if self._server is not None:
            await self._server.wait_closed()
        await self._idle.wait()
