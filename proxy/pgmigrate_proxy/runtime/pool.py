"""The server-connection pools, one per (database, user): idle servers, clients waiting for
one, the counts that the pool, database and user limits bound, check-in (rollback and reset
query), the check on reuse, and closing what outlived server_lifetime or server_idle_timeout.

A server in a pool (idle, or between its client and the next) is parked: the pool is its
listener and its relay drops what the server sends unasked (notices), so that the proxy's own
requests (`ServerConnection.exchange`) work on it and a lost one is noticed at once. In
transaction pooling a server idle at a transaction's end while nobody waits is lent instead:
idle in the pool but still attached to its client, which takes it back at no cost (Lease.owner).
Clients waiting for a server queue here without a task (Waiter): a released server goes to the
first, and one timer per pool applies query_wait_timeout and the reserve pool's turn. With
passthrough authentication the pool never opens servers itself (`opener` None): it grows
only by the logins of its clients; an opener (another auth type) lets it open one on demand.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Final, Protocol

from pgmigrate_proxy.errors import ConnectionFailure, ProxyError
from pgmigrate_proxy.poolconfig import PoolSettings
from pgmigrate_proxy.protocol.framing import frame
from pgmigrate_proxy.protocol.messages import ErrorResponse
from pgmigrate_proxy.protocol.prepared import Registry
from pgmigrate_proxy.protocol.sqlstate import SqlState
from pgmigrate_proxy.protocol.startup_options import startup_settings
from pgmigrate_proxy.protocol.types import BackendType, FrontendType, TransactionStatus
from pgmigrate_proxy.runtime.backend import ServerConnection
from pgmigrate_proxy.runtime.stats import PoolStats
from pgmigrate_proxy.settings import EMPTY_QUERY

log = logging.getLogger("pgmigrate_proxy.pool")

#: Opens a logged-in, idle server connection for a pool (auth types other than passthrough),
#: alone or with the ParameterStatus values its login reported (the pool's welcome for clients).
Opener = Callable[[], Awaitable[ServerConnection | tuple[ServerConnection, dict[str, str]]]]
#: The startup parameters kept per client and set on the server it gets when they differ.
SYNCED_PARAMETERS: Final = (
    "application_name", "client_encoding", "datestyle", "timezone", "search_path",
    "intervalstyle", "standard_conforming_strings",
)  # fmt: skip
#: How often a pool looks for servers past server_idle_timeout or server_lifetime (at most).
_REAP_SECONDS: Final = 1.0


class Waiter(Protocol):
    """A client queued for a server without a task (PoolLink): offered the next released one."""

    waiting_since: float  # time.monotonic() when it began to wait

    def offer(self, lease: Lease) -> bool:
        """Take `lease` (True), or not (False: no longer waiting)."""
        ...

    def wait_timed_out(self) -> None:
        """It waited past query_wait_timeout: end its session with the error."""
        ...


class Lender(Protocol):
    """The client a server is lent from (PoolLink): still attached to it, idle in the pool."""

    def revoke(self) -> None:
        """Detach the lent server from the client (it then gets another at its next data)."""
        ...


class QueryWaitTimeout(ProxyError):
    """A client waited longer than query_wait_timeout for a server (pgbouncer's words)."""

    sqlstate = SqlState.PROTOCOL_VIOLATION


def unpoolable(options: str) -> str | None:
    """The first part of a startup `options` string that transaction pooling cannot carry to
    every server its client gets (None: all can be): anything but a synced parameter
    (SYNCED_PARAMETERS) or a pgmigrate.* setting (the proxy's own)."""
    settings, other = startup_settings(options)
    if other is not None:
        return other
    for name, value in settings.items():
        if name not in SYNCED_PARAMETERS and not name.startswith("pgmigrate."):
            return f"-c {name}={value}"
    return None


def _spelling(value: str) -> str:
    return value.lower().replace("-", "").replace("_", "").replace(" ", "")


def welcome_for(welcome: dict[str, str], parameters: dict[str, str]) -> dict[str, str]:
    """What a client logging in without a server is told (ParameterStatus): a pool server's
    values, the synced startup parameters the client gave overriding them (in the server's
    spelling when they differ only in case or separators: UTF8 for utf8)."""
    wanted = synced(parameters)
    told = {}
    for name, value in welcome.items():
        mine = wanted.get(name.lower())
        told[name] = value if mine is None or _spelling(mine) == _spelling(value) else mine
    return told


def reported(parameters: dict[str, str]) -> dict[str, str]:
    """The synced parameters among a login's ParameterStatus values (names lowercased)."""
    lowered = {k.lower(): v for k, v in parameters.items()}
    return {k: lowered[k] for k in SYNCED_PARAMETERS if k in lowered}


def synced(parameters: dict[str, str]) -> dict[str, str]:
    """The startup parameters a pooled server must carry for this client (names lowercased):
    those given in the startup packet, and as `-c name=value` in its `options` (the packet's
    own win, as in PostgreSQL)."""
    lowered, _ = startup_settings(parameters.get("options", ""))
    lowered.update((k.lower(), v) for k, v in parameters.items())
    return {k: lowered[k] for k in SYNCED_PARAMETERS if k in lowered}


@dataclass(eq=False)
class Lease:
    """What a pool keeps about one of its servers."""

    server: ServerConnection
    pool: Pool
    born: float
    login: dict[str, str]  # its login client's synced parameters (what RESET ALL returns to)
    options: str = ""  # its login client's startup `options` (RESET ALL returns to them too)
    #: what RESET ALL returns the synced parameters to: `login`, and for the others what the
    #: login was told (ParameterStatus: the server's defaults)
    defaults: dict[str, str] = field(default_factory=dict)
    current: dict[str, str] = field(default_factory=dict)  # what they are now
    idle_since: float = 0.0
    cancels: int = 0  # cancel requests in flight for it: not handed out meanwhile
    #: idle in the pool but still attached to the client it served last (lent, not parked):
    #: that client takes it back at its next data at no cost; another takes it with revoke
    owner: Lender | None = None

    def __post_init__(self) -> None:
        self.defaults = {**self.defaults, **self.login}
        self.current = dict(self.defaults)

    # --- ServerListener while parked --------------------------------------------------------

    def server_data(self, data: bytes) -> None:
        pass

    def server_violation(self, exc: Exception) -> None:
        log.warning("server %s: invalid message while pooled: %s", self.server.server_pid, exc)
        self.server.abort()

    def server_lost(self, last_words: bytes) -> None:
        self.pool.lost(self)

    def pause_client_reading(self) -> None:
        pass

    def resume_client_reading(self) -> None:
        pass


def _idle(server: ServerConnection) -> bool:
    return server.status is TransactionStatus.IDLE


def _drop(data: bytes) -> None:
    """Where a parked server's unasked messages go."""


def park(lease: Lease) -> None:
    """Make the pool the server's listener (it owes nothing: see ServerConnection.detach)."""
    server = lease.server
    server.attach(lease)
    server.relay(_drop, tracking=True)


def unpark(lease: Lease) -> None:
    lease.server.detach()


async def simple_query(server: ServerConnection, sql: str) -> str | None:
    """Run `sql` as a simple Query of the proxy's own; the error's message, or None."""
    frames = await server.exchange(frame(FrontendType.QUERY, sql.encode() + b"\0"))
    for item in frames:
        if item.type == BackendType.ERROR_RESPONSE:
            return dict(ErrorResponse.decode(item.payload).fields).get("M", "error")
    return None


class Pool:
    """The servers of one (database, user)."""

    def __init__(
        self, registry: PoolRegistry, key: tuple[str, str], settings: PoolSettings,
        opener: Opener | None,
    ) -> None:  # fmt: skip
        self.registry = registry
        self.key = key
        self.settings = settings
        self.opener = opener
        self.idle: deque[Lease] = deque()  # most recently used last (handed out LIFO)
        self.leases: dict[ServerConnection, Lease] = {}  # every server counted here
        #: FIFO: a waiting acquire's future, or a client queued without a task (Waiter)
        self.waiters: deque[asyncio.Future[Lease] | Waiter] = deque()
        self.tasks: set[asyncio.Task[None]] = set()
        self._reaper: asyncio.TimerHandle | None = None
        self._sweeper: asyncio.TimerHandle | None = None  # query_wait_timeout of queued clients
        self._reserve_opening = 0  # servers opening for queued clients
        self._refill: asyncio.TimerHandle | None = None  # a min_pool_size retry after a failure
        self.size_opening = 0  # servers its opener is logging in
        #: the ParameterStatus values of a server of this pool (its defaults: application_name
        #: empty), for clients the proxy logs in without a server (None: none known yet)
        self.welcome: dict[str, str] | None = None
        self._welcome_exact = False  # learned from a server the pool opened (no client's values)
        #: done when the login that teaches the pool its welcome ends (concurrent logins wait)
        self.learning: asyncio.Future[None] | None = None
        self.closing = False
        self.stats = PoolStats()  # its counters (the admin console and metrics read them)

    @property
    def size(self) -> int:
        return len(self.leases) + self.size_opening

    def room(self, extra: int = 0) -> bool:
        """Whether one more server may be counted (pool_size + `extra`, database, user)."""
        if self.size >= self.settings.pool_size + extra:
            return False
        return self.registry.room(self.key, self.settings)

    # --- servers coming in ----------------------------------------------------------------------

    def join(
        self, server: ServerConnection, parameters: dict[str, str],
        told: dict[str, str] | None = None,
    ) -> Lease:  # fmt: skip
        """A server just logged in for a client of this pool (with these startup parameters,
        and `told` these ParameterStatus values): count it (the client holds it)."""
        options = parameters.get("options", "")
        login = synced(parameters)
        if told:
            self.learn(told, set(login))
        lease = Lease(server, self, time.monotonic(), login, options, reported(told or {}))
        server.stats = self.stats
        self.leases[server] = lease
        return lease

    def learn(self, told: dict[str, str], chosen: set[str]) -> None:
        """A server login reported `told`; `chosen`: the synced parameters (lowercased) its
        client set, not the server's defaults: application_name is then taken as empty. A
        server the pool opened itself (no client's values) is the exact welcome."""
        if self._welcome_exact or (chosen and self.welcome is not None):
            return
        welcome = dict(told)
        for name in welcome:
            if name.lower() == "application_name" and "application_name" in chosen:
                welcome[name] = ""
        self.welcome = welcome
        self._welcome_exact = not chosen

    def release(self, lease: Lease) -> None:
        """A server that owes nothing and is idle comes back: to a waiter, idle, or closed."""
        server = lease.server
        if server.transport is None or server.status is not TransactionStatus.IDLE:
            self.close(lease)
            return
        now = time.monotonic()
        if self._outlived(lease, now):
            self.close(lease)
            return
        lease.idle_since = now
        if lease.cancels:
            park(lease)
            self.idle.append(lease)  # handed out once its cancel is delivered
            return
        if self._over():
            self.close(lease)  # a login beyond the pool's size or a limit (passthrough)
            return
        if self.waiters and self._hand_over(lease):
            return
        park(lease)
        self.idle.append(lease)
        self._schedule_reap()

    def passes(self, lease: Lease, now: float) -> bool:
        """Whether release would hand this server (idle, owing nothing, at a transaction's
        end) to its first waiter, from the server's side (PoolLink._pass_on): not past
        server_lifetime, no cancel in flight, not over a limit, and not to be checked before
        reuse (server_check_delay 0: check_due on every one). Notes it idle from `now`
        (time.monotonic())."""
        settings = self.settings
        if self._outlived(lease, now) or lease.cancels or self._over():
            return False
        if settings.server_check_query and settings.server_check_delay <= 0:
            return False
        lease.idle_since = now
        return True

    def check_in(self, lease: Lease, *, reset: bool) -> None:
        """The client left: roll back what it left open, run server_reset_query (`reset`),
        then release; a server that fails any of it is closed."""
        park(lease)
        task = asyncio.get_running_loop().create_task(self._check_in(lease, reset))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _check_in(self, lease: Lease, reset: bool) -> None:
        server = lease.server
        try:
            if server.status is not TransactionStatus.IDLE:
                error = await simple_query(server, "ROLLBACK")
                if error is not None or not _idle(server):
                    raise ConnectionError(f"ROLLBACK failed: {error}")
            query = self.settings.server_reset_query
            if reset and query:
                error = await simple_query(server, query)
                if error is not None:
                    raise ConnectionError(f"server_reset_query failed: {error}")
                lease.current = dict(lease.defaults)
        except (ConnectionError, ProxyError) as exc:
            log.info("server %s: closed on check-in: %s", server.server_pid, exc)
            self.close(lease)
            return
        unpark(lease)
        self.release(lease)

    def _hand_over(self, lease: Lease) -> bool:
        """Give a released (unparked) server to the first waiter, FIFO: a queued client
        attaches it at once (no task); a waiting acquire gets it parked."""
        waiters = self.waiters
        while waiters:
            waiter = waiters.popleft()
            if isinstance(waiter, asyncio.Future):
                if not waiter.done():
                    park(lease)
                    waiter.set_result(lease)
                    return True
            elif waiter.offer(lease):
                return True
        return False

    # --- clients queued without a task ----------------------------------------------------------

    def wait(self, waiter: Waiter) -> None:
        """Queue a client for the next released server (Waiter.offer); a periodic sweep, one
        timer per pool, applies query_wait_timeout and the reserve pool's turn."""
        self.waiters.append(waiter)
        if self._sweeper is None:
            self._schedule_sweep()

    def unwait(self, waiter: Waiter) -> None:
        """A queued client left."""
        with contextlib.suppress(ValueError):
            self.waiters.remove(waiter)

    def _sweep_limits(self) -> list[float]:
        settings = self.settings
        limits = [settings.query_wait_timeout] if settings.query_wait_timeout else []
        if self.opener is not None and settings.reserve_pool_size:
            limits.append(settings.reserve_pool_timeout)
        return limits

    def _schedule_sweep(self) -> None:
        limits = self._sweep_limits()
        if not limits or self.closing:
            return  # (nothing to time: queued clients wait for a release)
        delay = min(_REAP_SECONDS, max(0.01, min(limits) / 4))
        self._sweeper = asyncio.get_running_loop().call_later(delay, self._sweep)

    def _sweep(self) -> None:
        """query_wait_timeout for queued clients (pgbouncer's janitor), and reserve servers
        for those waiting past reserve_pool_timeout."""
        self._sweeper = None
        now = time.monotonic()
        settings = self.settings
        limit = settings.query_wait_timeout
        expired: list[Waiter] = []
        due = 0
        kept: deque[asyncio.Future[Lease] | Waiter] = deque()
        queued = False
        for waiter in self.waiters:
            if isinstance(waiter, asyncio.Future):
                if not waiter.done():
                    kept.append(waiter)
                continue
            waited = now - waiter.waiting_since
            if limit and waited >= limit:
                expired.append(waiter)
                continue
            kept.append(waiter)
            queued = True
            if waited >= settings.reserve_pool_timeout:
                due += 1
        self.waiters = kept
        for waiter in expired:
            waiter.wait_timed_out()
        if self.opener is not None and settings.reserve_pool_size:
            self._open_for_waiters(due, settings.reserve_pool_size)
        if queued:
            self._schedule_sweep()

    def _open_for_waiters(self, count: int, extra: int) -> None:
        """Open servers (with the opener, within pool_size + `extra` and the limits) until
        `count` are opening for queued clients; each goes to the first waiter."""
        if self.opener is None or self.closing:
            return
        while count > self._reserve_opening and self.room(extra):
            self._reserve_opening += 1
            self.size_opening += 1
            task = asyncio.get_running_loop().create_task(self._open_reserve())
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _open_reserve(self) -> None:
        try:
            lease = await self._open(counted=True)
        except (ConnectionError, ProxyError, OSError) as exc:
            log.warning("pool %s/%s: could not open a reserve server: %s",
                        self.key[0], self.key[1], exc)  # fmt: skip
            return
        finally:
            self._reserve_opening -= 1
        lease.idle_since = time.monotonic()
        self.release(lease)

    # --- servers going out ----------------------------------------------------------------------

    def take_idle(self, accept: Callable[[Lease], bool] | None = None) -> Lease | None:
        """An idle server (that `accept`s), unparked, or None: the most recently used (LIFO,
        as pgbouncer), a parked one before one lent to its last client (revoked from it: that
        client would then take another's at its next transaction)."""
        idle = self.idle
        lent = -1
        for index in range(len(idle) - 1, -1, -1):
            lease = idle[index]
            if lease.cancels or (accept is not None and not accept(lease)):
                continue
            if lease.owner is not None:
                if lent < 0 and lease.server.busy is None:  # (busy: a message half received)
                    lent = index
                continue
            return self._taken(index, accept)
        return self._taken(lent, accept) if lent >= 0 else None

    def _taken(self, index: int, accept: Callable[[Lease], bool] | None) -> Lease | None:
        lease = self.idle[index]
        del self.idle[index]
        if lease.server.gone:
            lease.owner = None
            self.leases.pop(lease.server, None)
            return self.take_idle(accept)
        self._unidle(lease)
        return lease

    def _unidle(self, lease: Lease) -> None:
        """A lease just taken out of `idle`: unparked, or revoked from its owner."""
        owner = lease.owner
        if owner is not None:
            lease.owner = None
            owner.revoke()
        else:
            unpark(lease)

    def lend(self, lease: Lease, owner: Lender) -> bool:
        """A server idle at a transaction's end, no client waiting: it stays attached to its
        client (`owner`) and counts as idle (see Lease.owner), when release would keep it;
        False when release would not (nothing done)."""
        if self.closing or lease.cancels or lease.server.transport is None:
            return False
        now = time.monotonic()
        if self._outlived(lease, now) or self._over():  # (as release)
            return False
        lease.owner = owner
        lease.idle_since = now
        self.idle.append(lease)
        if self._reaper is None:
            self._schedule_reap()
        return True

    def _outlived(self, lease: Lease, now: float) -> bool:
        """Past server_lifetime (0: a server is used once)."""
        lifetime = self.settings.server_lifetime
        return lifetime == 0 or now - lease.born > lifetime

    def _over(self) -> bool:
        """More servers than the pool's size and reserve, or than its database's or user's
        limit allows (release closes a server back then; lend does not lend it)."""
        settings = self.settings
        if len(self.leases) + self.size_opening > settings.pool_size + settings.reserve_pool_size:
            return True
        limited = settings.max_db_connections or settings.max_user_connections
        return bool(limited) and self.registry.over(self.key, settings)

    def reclaim(self, lease: Lease) -> None:
        """The owner of a lent server takes it back (it sends its next transaction)."""
        lease.owner = None
        idle = self.idle
        if idle and idle[-1] is lease:
            idle.pop()
        else:
            idle.remove(lease)

    async def acquire(self) -> Lease:
        """A server for a client: an idle one (checked if idle past server_check_delay), a
        new one (with an opener, within the limits), or the next released; QueryWaitTimeout
        after query_wait_timeout."""
        settings = self.settings
        loop = asyncio.get_running_loop()
        start = loop.time()
        while True:
            lease = self.take_idle()
            if lease is not None:
                if await self.checked(lease):
                    return lease
                continue
            if self.opener is not None and self.room():
                return await self._open()
            waiter: asyncio.Future[Lease] = loop.create_future()
            self.waiters.append(waiter)
            timeout = self._wait_limit(start, loop.time())
            try:
                lease = await asyncio.wait_for(asyncio.shield(waiter), timeout)
            except asyncio.TimeoutError:
                if waiter.done() and not waiter.cancelled():
                    lease = waiter.result()  # it came just now
                else:
                    waiter.cancel()
                    if self._reserve_due(start, loop.time()):
                        return await self._open()
                    raise QueryWaitTimeout("query_wait_timeout") from None
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self.release(waiter.result())  # not ours to keep: the client left
                waiter.cancel()
                raise
            unpark(lease)
            if not lease.server.gone and await self.checked(lease):
                return lease
            if lease.server.gone:
                self.leases.pop(lease.server, None)
            start = start if settings.query_wait_timeout else loop.time()

    def _wait_limit(self, start: float, now: float) -> float | None:
        """How long to wait for a release now: up to the reserve's turn or query_wait_timeout."""
        limits = []
        if self.settings.query_wait_timeout:
            limits.append(start + self.settings.query_wait_timeout - now)
        if self.opener is not None and self.settings.reserve_pool_size:
            reserve = start + self.settings.reserve_pool_timeout - now
            if reserve > 0:
                limits.append(reserve)
        return max(0.0, min(limits)) if limits else None

    def _reserve_due(self, start: float, now: float) -> bool:
        settings = self.settings
        if self.opener is None or not settings.reserve_pool_size:
            return False
        if now - start < settings.reserve_pool_timeout:
            return False
        if settings.query_wait_timeout and now - start >= settings.query_wait_timeout:
            return False
        return self.room(settings.reserve_pool_size)

    async def _open(self, *, counted: bool = False) -> Lease:
        assert self.opener is not None
        if not counted:
            self.size_opening += 1  # counted while it logs in
        try:
            opened = await asyncio.wait_for(self.opener(), self.settings.server_connect_timeout)
        except asyncio.TimeoutError:
            raise ConnectionFailure("server_connect_timeout: no server connection") from None
        finally:
            self.size_opening -= 1
        if isinstance(opened, tuple):
            server, told = opened
            return self.join(server, {}, told)
        return self.join(opened, {})

    def top_up(self) -> None:
        """Open servers in the background up to min_pool_size (with an opener, within the
        limits); they join the pool idle, or go to a waiting client."""
        if self.opener is None or self.closing or self._refill is not None:
            return
        if self.settings.server_lifetime == 0:  # (each would be closed at once: used once)
            return
        loop = asyncio.get_running_loop()
        for _ in range(self.settings.min_pool_size - self.size):
            if not self.room():
                return
            self.size_opening += 1  # counted at once: the next top_up does not open it again
            task = loop.create_task(self._open_idle())
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        if self.waiters:  # queued clients wait for a release: a closed server makes room
            queued = sum(not isinstance(w, asyncio.Future) for w in self.waiters)
            self._open_for_waiters(queued, 0)

    async def _open_idle(self) -> None:
        try:
            lease = await self._open(counted=True)
        except (ConnectionError, ProxyError, OSError) as exc:
            log.warning("pool %s/%s: could not open a server for min_pool_size: %s",
                        self.key[0], self.key[1], exc)  # fmt: skip
            if self._refill is None and not self.closing:  # retried, not in a loop
                self._refill = asyncio.get_running_loop().call_later(_REAP_SECONDS, self._retry)
            return
        lease.idle_since = time.monotonic()
        self.release(lease)

    def _retry(self) -> None:
        self._refill = None
        self.top_up()

    def check_due(self, lease: Lease) -> bool:
        """Whether the server must pass server_check_query before it is handed out."""
        settings = self.settings
        if not settings.server_check_query:
            return False
        return time.monotonic() - lease.idle_since >= settings.server_check_delay

    async def checked(self, lease: Lease) -> bool:
        """Run server_check_query on a server idle past server_check_delay; False: closed."""
        if not self.check_due(lease):
            return True
        query = self.settings.server_check_query
        park(lease)
        try:
            error = await simple_query(lease.server, "" if query == EMPTY_QUERY else query)
        except ConnectionError:
            error = "connection lost"
        except BaseException:  # the client left meanwhile: its answer would be owed
            self.close(lease)
            raise
        if error is not None or lease.server.status is not TransactionStatus.IDLE:
            log.info("server %s: failed its check (%s): closed", lease.server.server_pid, error)
            self.close(lease)
            return False
        unpark(lease)
        return True

    # --- closing --------------------------------------------------------------------------------

    def close(self, lease: Lease) -> None:
        """Stop counting a server and close it (a Terminate first when it is at a boundary)."""
        self.leases.pop(lease.server, None)
        if lease in self.idle:
            self.idle.remove(lease)
            if lease.owner is not None and lease.server.busy is None:
                self._unidle(lease)  # (else its owner hears it is lost: PoolLink.lent_lost)
            lease.owner = None
        server = lease.server
        if not server.gone:
            if server.busy is None:
                server.write(frame(FrontendType.TERMINATE))
            server.close()
        self.top_up()

    def lost(self, lease: Lease) -> None:
        """A parked (or lent) server's connection went away."""
        lease.owner = None
        self.leases.pop(lease.server, None)
        if lease in self.idle:
            self.idle.remove(lease)
        self.top_up()

    def forget(self, server: ServerConnection) -> None:
        """A client's server was closed with the client."""
        lease = self.leases.pop(server, None)
        if lease is not None and lease in self.idle:
            lease.owner = None
            self.idle.remove(lease)
        if lease is not None:
            self.top_up()

    def cancel_done(self, lease: Lease) -> None:
        """A cancel request for it was delivered: it may be handed out again."""
        lease.cancels -= 1
        if lease.owner is not None and lease.server.busy is not None:
            return
        if not lease.cancels and lease in self.idle and self.waiters:
            self.idle.remove(lease)
            self._unidle(lease)
            self.release(lease)

    def _schedule_reap(self) -> None:
        if self._reaper is None and (self.settings.server_idle_timeout or
                                     self.settings.server_lifetime):  # fmt: skip
            loop = asyncio.get_running_loop()
            delay = min(_REAP_SECONDS, self.settings.server_idle_timeout or _REAP_SECONDS)
            self._reaper = loop.call_later(delay, self._reap)

    def _reap(self) -> None:
        """Close idle servers past server_idle_timeout or server_lifetime (min_pool_size kept
        against the idle timeout)."""
        self._reaper = None
        now = time.monotonic()
        settings = self.settings
        for lease in list(self.idle):
            old = settings.server_lifetime and now - lease.born > settings.server_lifetime
            unused = settings.server_idle_timeout and now - lease.idle_since > (
                settings.server_idle_timeout
            )
            if old or (unused and self.size > settings.min_pool_size):
                log.debug("server %s: closed (idle or lifetime)", lease.server.server_pid)
                self.close(lease)
        if self.idle:
            self._schedule_reap()

    async def shutdown(self) -> None:
        self.closing = True
        if self._refill is not None:
            self._refill.cancel()
            self._refill = None
        if self._reaper is not None:
            self._reaper.cancel()
            self._reaper = None
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)
        for waiter in self.waiters:
            if isinstance(waiter, asyncio.Future):
                waiter.cancel()
        for lease in list(self.idle):
            self.close(lease)


class PoolRegistry:
    """Every pool of the proxy, and the counts per database and per user."""

    def __init__(self, settings_for: Callable[[str, str], PoolSettings]) -> None:
        self.settings_for = settings_for
        self.pools: dict[tuple[str, str], Pool] = {}
        self.openers: dict[tuple[str, str], Opener] = {}
        #: the proxy-wide prepared statements of its pools' servers (runtime/statements.py)
        self.statements = Registry()

    def pool(self, database: str, user: str) -> Pool:
        key = (database, user)
        pool = self.pools.get(key)
        if pool is None:
            pool = Pool(self, key, self.settings_for(database, user), self.openers.get(key))
            self.pools[key] = pool
            pool.top_up()  # (counted in the registry first: the limits see it)
        return pool

    def set_opener(self, database: str, user: str, opener: Opener | None) -> None:
        """Let the pool of (database, user) open logged-in servers itself (None: passthrough)."""
        if opener is None:
            self.openers.pop((database, user), None)
        else:
            self.openers[(database, user)] = opener
        pool = self.pools.get((database, user))
        if pool is not None:
            pool.opener = opener
            pool.top_up()
        elif opener is not None:
            self.pool(database, user)  # (made now: topped up to min_pool_size)

    def room(self, key: tuple[str, str], settings: PoolSettings) -> bool:
        """Whether max_db_connections and max_user_connections allow one more server."""
        database, user = key
        if settings.max_db_connections:
            count = sum(p.size for (db, _), p in self.pools.items() if db == database)
            if count >= settings.max_db_connections:
                return False
        if settings.max_user_connections:
            count = sum(p.size for (_, u), p in self.pools.items() if u == user)
            if count >= settings.max_user_connections:
                return False
        return True

    def close_idle(self) -> int:
        """Close every idle server (pgbouncer's RECONNECT for idle ones); how many were."""
        count = 0
        for pool in self.pools.values():
            for lease in list(pool.idle):
                pool.close(lease)
                count += 1
        return count

    def over(self, key: tuple[str, str], settings: PoolSettings) -> bool:
        """More servers than max_db_connections or max_user_connections (logins counted)."""
        database, user = key
        limit = settings.max_db_connections
        if limit and sum(p.size for (db, _), p in self.pools.items() if db == database) > limit:
            return True
        limit = settings.max_user_connections
        return bool(limit) and sum(p.size for (_, u), p in self.pools.items() if u == user) > limit

    async def shutdown(self) -> None:
        for pool in list(self.pools.values()):
            await pool.shutdown()
