"""A client session's link to its pool: what it does with its login server, when it gives its
server back (client gone in session mode; each ReadyForQuery 'I' with nothing owed in
transaction mode: lent while nobody waits, see runtime/pool.py), how it gets one again (its
client's data waits in the holder meanwhile: at once, queued in the pool, or in a task), the
startup parameters set on the server it gets, and the session-state pins.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Final, Protocol

from pgmigrate_proxy.errors import ProxyError, ServerLost
from pgmigrate_proxy.poolconfig import PoolMode, SessionStateAction
from pgmigrate_proxy.protocol import extended
from pgmigrate_proxy.protocol.framing import Frame
from pgmigrate_proxy.protocol.sqlstate import SqlState
from pgmigrate_proxy.protocol.types import FrontendType, TransactionStatus
from pgmigrate_proxy.runtime import statements
from pgmigrate_proxy.runtime.autocommit import is_migration_session
from pgmigrate_proxy.runtime.detect import names_no_state, plain_query
from pgmigrate_proxy.runtime.hold import Holder, ServerSource
from pgmigrate_proxy.runtime.pool import (
    SYNCED_PARAMETERS,
    Lease,
    Pool,
    QueryWaitTimeout,
    park,
    reported,
    synced,
    unpark,
    unpoolable,
)
from pgmigrate_proxy.sql.session_state import drops_prepared, session_state

if TYPE_CHECKING:
    from pgmigrate_proxy.runtime.backend import ServerConnection
    from pgmigrate_proxy.runtime.pool import PoolRegistry

log = logging.getLogger("pgmigrate_proxy.pool")

#: Clients pinned to their server so far (session state in transaction mode), by reason.
PINS: Final[dict[str, int]] = {}


#: What a client refused for its startup options in transaction pooling is told to do instead.
OPTIONS_HINT: Final = (
    "set it with ALTER ROLE ... SET or ALTER DATABASE ... SET, or run SET after connecting "
    "(which pins the client to its server connection), or use pool_mode = session"
)


def options_refusal(
    parameters: Mapping[str, str], pools: PoolRegistry, migration_patterns: tuple[str, ...]
) -> str | None:
    """Why a client's startup `options` cannot be pooled (None: they can). In transaction
    pooling its server connections are shared, so only what the proxy sets again on each
    server the client gets (the synced parameters, as `-c TimeZone=UTC`) and pgmigrate.*
    settings are carried; anything else would stay behind as the defaults of the shared
    server, and is refused (pgbouncer 1.20+ refuses such options the same way). A migration
    session keeps its own server: everything is fine there."""
    options = parameters.get("options", "")
    if not options or is_migration_session(dict(parameters), migration_patterns):
        return None
    user = parameters.get("user", "")
    if pools.settings_for(parameters.get("database") or user, user).pool_mode is not (
        PoolMode.TRANSACTION
    ):
        return None
    part = unpoolable(options)
    if part is None:
        return None
    return (
        f'pgmigrate-proxy: the startup option "{part}" cannot be kept in transaction pooling '
        "mode (pool_mode = transaction): only application_name, client_encoding, DateStyle, "
        "TimeZone, search_path, IntervalStyle and standard_conforming_strings are"
    )


#: Characters of a refused statement repeated in its error.
_SHOWN: Final = 80


def _shown(sql: str) -> str:
    text = " ".join(sql.split())
    return text if len(text) <= _SHOWN else text[:_SHOWN] + "..."


#: The parameter views clients share (never changed once made): most clients of a pool have the
#: same one, and an idle client should cost little (bench/pooler.py's memory figure).
_VIEWS: Final[dict[tuple[tuple[str, str], ...], dict[str, str]]] = {}


def _shared(view: dict[str, str]) -> dict[str, str]:
    key = tuple(view.items())
    found = _VIEWS.get(key)
    if found is None:
        if len(_VIEWS) >= 1024:
            _VIEWS.clear()
        found = _VIEWS[key] = view
    return found


def _dropped(data: bytes) -> None:
    """Where a server's bytes for a client that left go."""


#: Unnamed Parse payloads _stateless passed (their texts repeat, the values go in Bind): a set
#: lookup instead of the scans. Short texts only, at most _SEEN_MAX of them (then cleared).
_SEEN_STATELESS: Final[set[bytes]] = set()
_SEEN_MAX, _SEEN_LENGTH = 1024, 512


def _seen_stateless(payload: bytes) -> None:
    if len(payload) <= _SEEN_LENGTH:
        if len(_SEEN_STATELESS) >= _SEEN_MAX:
            _SEEN_STATELESS.clear()
        _SEEN_STATELESS.add(payload)


def _stateless(text: bytes) -> bool:
    """session_state's answer without decoding, for the usual text (NUL-terminated): one
    plain DML statement (detect.plain_query) naming none of the state words leaves none."""
    return plain_query(text) and names_no_state(text)


class Refused(ProxyError):
    """A statement that leaves session state, in transaction mode with session_state refuse."""

    sqlstate = SqlState.FEATURE_NOT_SUPPORTED


class PooledSession(Protocol):
    """What the link needs of its client session."""

    peer: str
    chunks: int
    holder: Holder | None
    server: ServerConnection | None

    @property
    def at_boundary(self) -> bool: ...
    def attach(self, server: ServerConnection) -> None: ...
    def lend_server(self, take_back: Callable[[], None] | None) -> None: ...
    def detach(self) -> ServerConnection: ...
    def drop_server(self) -> None: ...
    def take_server(self, server: ServerConnection) -> None: ...
    def fail(self, code: str, message: str, **extra: str) -> None: ...


class PoolLink(ServerSource):
    """One client's side of its pool (module docstring)."""

    __slots__ = (
        "_ended", "_idle_since", "_seen", "_take_back", "_timer", "lease", "leaving", "lent",
        "options", "pinned", "pool", "queued", "reserved", "session", "session_keeps",
        "transaction", "view", "waiting_since", "wanted",
    )  # fmt: skip

    def __init__(
        self, session: PooledSession, pool: Pool, parameters: dict[str, str], *, keep: bool
    ) -> None:
        self.session = session
        self.pool = pool
        #: gives its server back at each transaction's end (not a migration session: `keep`)
        self.transaction = pool.settings.pool_mode is PoolMode.TRANSACTION and not keep
        self.session_keeps = keep  # a migration session keeps its login server
        self.pinned: str | None = None  # why it keeps its server (transaction mode)
        self.wanted = synced(parameters)  # the synced parameters it set
        self.view = dict(self.wanted)  # with those it did not set as its login told it them
        self.options = parameters.get("options", "")
        self.lease: Lease | None = None
        self.reserved: Lease | None = None  # an idle server taken for it at login
        self._timer: asyncio.TimerHandle | None = None  # client_idle / idle_transaction_timeout
        self._seen = -1
        self._idle_since = 0.0
        self.waiting_since = 0.0  # time.monotonic() when it began waiting for a server (0: not)
        #: the client left while the guard finished a unit on its server: checked in after
        self.leaving = False
        self.queued = False  # in its pool's waiters without a task (acquire_at_once, offer)
        self.lent = False  # its server is idle in the pool, still attached to it (Lease.owner)
        self._take_back = self.take_back  # (made once: lent at each transaction's end)
        self._ended = self.transaction_ended  # (made once: its server's on_idle at each one)

    # --- login ----------------------------------------------------------------------------------

    def logged_in(
        self, server: ServerConnection, parameters: dict[str, str], told: dict[str, str]
    ) -> None:
        """The login server counts in the pool (its login was `told` these ParameterStatus
        values). Transaction mode gives it back at once (the client gets one at its first
        message); session mode swaps it for an idle one."""
        self.lease = self.pool.join(server, parameters, told)
        self._logged_in(told)
        if self.transaction:
            self._give_back(at_once=False)
            return
        if self.reserved is not None:  # taken before the client was told its server (reserve)
            self._give_back(at_once=True)

    def logged_in_without_server(self, told: dict[str, str]) -> None:
        """Transaction mode, logged in from the pool's parameters (`told`): the client gets a
        server at its first message."""
        self._logged_in(told)
        holder = self.session.holder
        assert holder is not None
        holder.wait_for_server(self)

    def _logged_in(self, told: dict[str, str]) -> None:
        """What either login sets up: the client's parameter view, its timers, and on its
        holder the schema-change hook and (transaction mode) the session-state watch and the
        prepared-statement map."""
        self.view = _shared({**reported(told), **self.wanted})
        self._arm()
        holder = self.session.holder
        assert holder is not None
        registry = self.pool.registry.statements
        holder.ddl_done = statements.invalidator(registry)
        if self.transaction:
            holder.state_watch = self.watch_state
            capacity = self.pool.settings.max_prepared_statements
            if capacity > 0:
                holder.prepared = statements.PreparedLink(registry, capacity)

    def reserve(self) -> int | None:
        """Session mode, before the client is told its server's process id: take an idle
        pooled server for it (its login server joins the pool instead); the id to announce."""
        if self.transaction or self.reserved is not None or self.session_keeps:
            return None
        self.reserved = self.pool.take_idle(self._same_defaults)
        return self.reserved.server.server_pid if self.reserved is not None else None

    def _give_back(self, *, at_once: bool) -> None:
        lease, self.lease = self.lease, None
        assert lease is not None
        server = self.session.detach()
        server.on_idle = None
        self.pool.release(lease)
        holder = self.session.holder
        assert holder is not None
        holder.wait_for_server(self, now=at_once)

    def _same_defaults(self, lease: Lease) -> bool:
        """Session mode swaps only onto a server whose reset values this client would have
        too: the same startup `options`, no synced parameter the client left unset."""
        if lease.options != self.options:
            return False
        return all(name in self.wanted for name in lease.login)

    def _attach(self, lease: Lease) -> None:
        """The client's server from now on (transaction mode: until its next ReadyForQuery 'I')."""
        self.lease = lease
        self.session.attach(lease.server)
        if self.transaction:
            lease.server.on_idle = self._ended

    async def acquire(self) -> None:
        """Get a server (the reserved one, or from the pool), set the client's parameters on
        it, attach it. A client that waited too long gets query_wait_timeout; a server lost
        meanwhile (terminated while its statements or parameters were set) is closed, and
        another one taken."""
        lease, self.reserved = self.reserved, None
        stats = self.pool.stats
        started = self.waiting_since = time.monotonic()
        while True:
            try:
                while lease is None or not await self.pool.checked(lease):
                    lease = await self.pool.acquire()
            except ProxyError as exc:
                self.waiting_since = 0.0
                log.info("session %s: %s", self.session.peer, exc)
                extra = {}
                if isinstance(exc, QueryWaitTimeout):
                    extra["detail"] = "no server connection became free in time"
                self.session.fail(exc.sqlstate, str(exc), **extra)
                return
            if await self._prepared(lease):
                break
            lease = None
        self.waiting_since = 0.0
        stats.waited(time.monotonic() - started)
        stats.server_assignment_count += 1
        self._attach(lease)

    async def _prepared(self, lease: Lease) -> bool:
        """Close the statements a schema change retired on the server and SET the client's
        parameters on it; False when PostgreSQL closed it meanwhile (it is closed here too:
        acquire takes another). Any other failure closes it and is raised."""
        park(lease)  # (the proxy's own queries need the relay on: the pool's, dropping)
        try:
            await statements.checkout(lease.server)
            await self._sync_parameters(lease)
            unpark(lease)
        except ServerLost:
            peer = self.session.peer
            log.info("session %s: server closed by PostgreSQL before use: taking another", peer)
            self.pool.close(lease)
            return False
        except BaseException:
            self.pool.close(lease)
            raise
        return True

    def acquire_at_once(self, *, queue: bool = True) -> bool | None:
        """acquire's fast path, without a task: an idle server that needs no check and no SET,
        attached now (True); or, when none is idle and the pool cannot open one, queued in the
        pool (None: `offer` attaches the next released server, FIFO); False: the holder runs
        acquire."""
        if self.reserved is not None:
            return False
        pool = self.pool
        lease = pool.take_idle(self._ready) if pool.idle else None
        if lease is None:
            if not queue or pool.idle or pool.closing:
                return False
            if pool.opener is not None and pool.room():
                return False  # (acquire opens one)
            self.queued = True
            self.waiting_since = time.monotonic()
            pool.wait(self)
            return None
        self._attach(lease)
        pool.stats.assigned_at_once()
        return True

    def offer(self, lease: Lease) -> bool:
        """The pool hands this queued client a released server (unparked): attached at once
        and the held data pumped when it is ready as it is; else acquire checks it and SETs
        the client's parameters in a task. False: not waiting any more."""
        holder = self.session.holder
        if not self.queued or holder is None:
            return False
        self._waited(time.monotonic())
        if not self._ready(lease):
            self.reserved = lease
            holder.acquire_now()
            return True
        self.pool.stats.server_assignment_count += 1
        self._attach(lease)
        holder.server_came()
        return True

    def _waited(self, now: float) -> None:
        """No longer queued (`now`: time.monotonic()): its wait counts in its pool's stats."""
        self.queued = False
        self.pool.stats.waited(now - self.waiting_since)
        self.waiting_since = 0.0

    def wait_timed_out(self) -> None:
        """Queued past query_wait_timeout (the pool's sweep)."""
        self.queued = False
        self.waiting_since = 0.0
        log.info("session %s: query_wait_timeout", self.session.peer)
        self.session.fail(
            QueryWaitTimeout.sqlstate, "query_wait_timeout",
            detail="no server connection became free in time",
        )  # fmt: skip

    def _ready(self, lease: Lease) -> bool:
        """An idle server this client can use as it is (acquire_at_once)."""
        return self._fits(lease) and not self.pool.check_due(lease)

    def _fits(self, lease: Lease) -> bool:
        """A server whose statements and parameters this client can use as they are."""
        prepared = lease.server.statements
        if prepared is not None and not prepared.current:
            return False  # (acquire closes what a schema change retired: statements.checkout)
        current = lease.current
        view = self.view  # (as _sync_parameters would find nothing to SET)
        return current == view or all(current.get(name) == value for name, value in view.items())

    async def _sync_parameters(self, lease: Lease) -> None:
        """SET the client's startup parameters that differ on the server (and those it did not
        set, to what its login told it); the ParameterStatus replies are not passed on (the
        client has its own values from its login)."""
        for name in SYNCED_PARAMETERS:
            value = self.view.get(name)
            if value is None or lease.current.get(name) == value:
                continue
            result = await lease.server.inject("SELECT set_config($1, $2, false)", (name, value))
            if result.error is not None:
                raise ConnectionError(f"could not set {name}: {result.error.get('M')}")
            lease.current[name] = value

    # --- giving the server back -----------------------------------------------------------------

    def server_idle(self) -> None:
        """The holder ran what it held (transaction mode): the server goes back to the pool
        if it is idle and owes nothing (see transaction_ended)."""
        lease = self.lease
        if not self.transaction or lease is None:
            return
        server = lease.server
        if server.status is TransactionStatus.IDLE and server.busy is None:
            self.transaction_ended()

    def transaction_ended(self) -> None:
        """Its server is idle, owes nothing, is at a message boundary (ServerConnection.on_idle,
        server_idle): back to the pool, unless pinned, a statement is held, or the client is
        amid a message. Lent when nobody waits (it stays attached; the client's next data
        takes it back: Holder._send); else straight to the first client queued (_pass_on)."""
        lease = self.lease
        if self.pinned is not None or lease is None or self.lent:
            return
        session = self.session
        holder = session.holder
        if holder is None or holder.holding or holder.task is not None:
            return
        if not session.at_boundary:
            return
        pool = self.pool
        if not pool.waiters:
            if pool.lend(lease, self):
                self.lent = True
                session.lend_server(self._take_back)
                return
        elif self._pass_on(lease):
            return
        self._give_back(at_once=False)

    def _pass_on(self, lease: Lease) -> bool:
        """transaction_ended's hand-over in one step, the way release, offer and server_came
        take it for the usual case: the first client queued in the pool has one chunk held,
        which a shortcut judged (Holder.takes), and can use the server as it is; it gets the
        server and its chunk goes out (Holder.server_came). False, with nothing changed, in
        any other case (_give_back then takes the general way)."""
        pool = self.pool
        waiter = pool.waiters[0]
        now = time.monotonic()  # (one clock read for both: passes, _waited)
        if type(waiter) is not PoolLink or not waiter.queued or not pool.passes(lease, now):
            return False
        taker = waiter.session
        holder = taker.holder
        server = lease.server
        if holder is None or not holder.takes(server) or not waiter._fits(lease):
            return False  # (no check is due: passes said so)
        pool.waiters.popleft()
        self.lease = None
        self.session.drop_server()
        taker.take_server(server)
        giver = self.session.holder
        assert giver is not None
        giver.wait_for_server(self)
        waiter._waited(now)
        pool.stats.server_assignment_count += 1
        waiter.lease = lease
        server.on_idle = waiter._ended
        holder.server_came()
        return True

    def take_back(self) -> None:
        """The client's next data while its server is lent: it is its own again, unless it
        needs server_check_query or a schema change retired statements on it first (then given
        back, and acquired as usual)."""
        lease = self.lease
        assert lease is not None and self.lent
        self.lent = False
        pool = self.pool
        pool.reclaim(lease)
        self.session.lend_server(None)
        prepared = lease.server.statements
        due = pool.settings.server_check_query and pool.check_due(lease)
        if due or (prepared is not None and not prepared.current):
            self._give_back(at_once=False)  # (acquire checks it, and closes retired statements)
        else:
            pool.stats.assigned_at_once()

    def revoke(self) -> None:
        """The pool gives this client's lent server to another client (or closes it): it is
        detached; the client gets a server at its next data."""
        lease, self.lease = self.lease, None
        assert lease is not None
        self.lent = False
        self.session.lend_server(None)
        server = self.session.detach()
        server.on_idle = None
        holder = self.session.holder
        assert holder is not None
        holder.wait_for_server(self)

    def return_lent(self) -> None:
        """The client ends while its server is lent (an idle timeout, the admin console): the
        server goes back to the pool instead of closing with the client."""
        lease = self.lease
        if not self.lent or lease is None:
            return
        self.lent = False
        self.pool.reclaim(lease)
        self.session.lend_server(None)
        if lease.server.busy is None:  # (else it closes with the client)
            self._give_back(at_once=False)

    def lent_lost(self) -> bool:
        """The lent server's connection went away (as a parked one's would: the client stays);
        False when it was not lent."""
        if not self.lent:
            return False
        lease, self.lease = self.lease, None
        assert lease is not None
        self.lent = False
        self.pool.lost(lease)
        holder = self.session.holder
        assert holder is not None
        holder.wait_for_server(self)
        return True

    def client_left(self, *, clean: bool) -> bool:
        """The client is gone: check its server in (rolled back, reset when it carries a
        session's state) if `clean` and it owes nothing; True when the pool took it."""
        lease = self.lease
        if lease is None:
            return False
        if self.lent:  # (its own again, to be checked in)
            self.lent = False
            self.pool.reclaim(lease)
        server = lease.server
        holder = self.session.holder
        held = holder is not None and (holder.holding or holder.task is not None)
        task = holder.task if holder is not None and holder.finishing else None
        if clean and task is not None and not self.leaving:
            # its guarded unit answered, the guard restores the server's settings: let it
            # finish (the session does not cancel it), then check the server in
            log.debug("session %s: left while the guard finishes its unit", self.session.peer)
            self.leaving = True
            server.on_idle = None
            server.relay(_dropped, tracking=True)  # (the replies of the guard's own requests
            server.watch()  # come through the relay; the client's, if any, have nowhere to go)
            self.pool.tasks.add(task)  # (a shutdown cancels it: the server is closed then)
            task.add_done_callback(self.pool.tasks.discard)
            task.add_done_callback(lambda _: self._left_after_unit())
            return True
        if not clean or held or server.busy is not None:
            return False
        self.lease = None
        server.unrelay()
        server.on_idle = None
        self.session.detach()
        reset = not self.transaction or self.pinned is not None
        query = self.pool.settings.server_reset_query
        if reset and server.statements is not None and drops_prepared(query):
            server.statements.clear()
        self.pool.check_in(lease, reset=reset)
        return True

    def _left_after_unit(self) -> None:
        """The guard's unit ended after its client left: the server is checked in, or closed
        when it cannot be (the unit failed, the server owes replies)."""
        lease = self.lease
        if lease is None or (not self.pool.closing and self.client_left(clean=True)):
            return
        self.lease = None
        lease.server.close()
        self.pool.forget(lease.server)

    def closed(self) -> None:
        """The session ended with its server closed by it (not checked in), or to be checked
        in once the guard's unit on it ends (`leaving`)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        holder = self.session.holder
        if holder is not None and holder.prepared is not None:
            holder.prepared.client.release_all()
        if self.queued:
            self.queued = False
            self.pool.unwait(self)
        self.lent = False  # (forget takes it out of the idle ones)
        if self.leaving:
            return
        lease, self.lease = self.lease, None
        if lease is not None:
            self.pool.forget(lease.server)
        if self.reserved is not None:
            self.pool.release(self.reserved)
            self.reserved = None

    # --- idle clients -------------------------------------------------------------------------

    def _arm(self) -> None:
        settings = self.pool.settings
        limits = [t for t in (settings.client_idle_timeout, settings.idle_transaction_timeout) if t]
        if limits:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(min(limits) / 2, self._tick)

    def _tick(self) -> None:
        """Close a client silent past client_idle_timeout, or past idle_transaction_timeout
        in an open transaction (checked every half of the shorter: up to 1.5 times late)."""
        self._timer = None
        session, settings = self.session, self.pool.settings
        now = asyncio.get_running_loop().time()
        server, holder = session.server, session.holder
        waiting = holder is not None and (holder.holding or holder.task is not None)
        owed = server is not None and not server.replies.idle
        if session.chunks != self._seen or waiting or owed:
            self._seen, self._idle_since = session.chunks, now
        idle = now - self._idle_since
        in_transaction = server is not None and server.status is not TransactionStatus.IDLE
        limit = settings.idle_transaction_timeout
        if limit and in_transaction and idle >= limit:
            session.fail(
                SqlState.IDLE_IN_TRANSACTION_SESSION_TIMEOUT,
                "idle transaction timeout",
                detail=f"idle in a transaction longer than idle_transaction_timeout ({limit:g} s)",
            )
            return
        limit = settings.client_idle_timeout
        if limit and idle >= limit:
            session.fail(
                SqlState.IDLE_SESSION_TIMEOUT,
                "client_idle_timeout",
                detail=f"idle longer than client_idle_timeout ({limit:g} s)",
            )
            return
        self._arm()

    # --- session state (transaction mode) -------------------------------------------------------

    def watch_state(self, item: Frame) -> None:
        """A Query or Parse going out: pin on session state (or refuse it: a FATAL)."""
        payload = item.payload
        if item.type == FrontendType.QUERY:
            if _stateless(payload):  # (not remembered: a Query's text carries its values)
                return
            sql = extended.query_text(item.payload)
            kinds = session_state(sql)
            reason = ", ".join(sorted(k.value for k in kinds)) if kinds else None
        else:
            if payload in _SEEN_STATELESS:
                return
            if payload[:1] == b"\0":  # unnamed
                end = payload.find(b"\0", 1)
                if end > 0 and _stateless(payload[1 : end + 1]):
                    _seen_stateless(payload)
                    return
            name, sql = extended.parse_statement(payload)
            if name:
                reason = "a named prepared statement"
            else:
                kinds = session_state(sql)
                reason = ", ".join(sorted(k.value for k in kinds)) if kinds else None
        if reason is None:
            return
        if self.pool.settings.session_state is SessionStateAction.REFUSE:
            raise Refused(
                f'pgmigrate-proxy: the statement "{_shown(sql)}" leaves session state '
                f"({reason}) on a shared server connection: refused in transaction pooling "
                "mode (session_state = refuse; SET LOCAL, set_config(..., true) and "
                "pg_advisory_xact_lock last only for the transaction)"
            )
        self.pin(reason)

    def pin(self, reason: str) -> None:
        if self.pinned is not None:
            return
        self.pinned = reason
        PINS[reason] = PINS.get(reason, 0) + 1
        holder = self.session.holder
        if holder is not None:
            holder.state_watch = None
        log.info(
            "session %s: pinned to its server connection for the rest of its session: %s",
            self.session.peer, reason,
        )  # fmt: skip
