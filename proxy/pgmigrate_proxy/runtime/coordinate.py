"""Several proxies, one drain (guard/coordination.py's messages and state, driven): each proxy
says hello on the drain channel and knows the others up; a drain announced by one arms the
others' gates (they acknowledge) until its end, its proxy's admin session is gone, or its bound.

Messages go out through the admin connection (PostgreSQL stamps each with the admin session's
pid: the proxy's liveness is that backend's, looked up in pg_stat_activity). They are received
on a connection of their own that does nothing but wait in `notifies()`: PostgreSQL delivers a
notification to an idle connection at once, whereas the shared admin connection gets them only
while it runs a query, which it does only while the guard works (a proxy with nothing held of
its own would see a drain start only at its next poll) and which waits behind the guard's
queries (statement_timeout 2 s); polling it often enough for a 100 ms pickup would add ten
queries a second per proxy, always. The listener's cost is one idle backend per proxy.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
from collections.abc import Callable, Collection, Coroutine
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from pgmigrate_proxy.admin import AdminConnection
from pgmigrate_proxy.events import Identity
from pgmigrate_proxy.guard import coordination as co
from pgmigrate_proxy.guard.drain import Gate, GateHold, HoldRule, holding_pids
from pgmigrate_proxy.guard.steps import Acks

log = logging.getLogger("pgmigrate_proxy.coordinate")

APPLICATION_NAME = "pgmigrate-proxy listen"
#: How often a proxy says hello again and forgets the proxies whose admin session is gone.
PRESENCE_SECONDS = 30.0
#: While another proxy's drain is held: how often its admin session is looked for.
WATCH_SECONDS = 0.2
#: The listener connection's reconnect delays.
RECONNECT_DELAY = 0.2
RECONNECT_MAX_DELAY = 5.0
#: At shutdown, how long the messages being sent get to go out.
CLOSE_SECONDS = 1.0


class Why(enum.Enum):
    """Why a proxy released another proxy's drain (the log's words)."""

    END = "its end was announced"
    GONE = "its proxy's admin session is gone"
    BYE = "its proxy shut down"
    BOUND = "it outlived its bound"
    CLOSING = "this proxy is shutting down"


class DrainCoordinator:
    """One per proxy with an admin connection and a drain channel. `gate()`: the gate that a
    drain of another proxy arms (GuardServices.drain_gate, looked up at each arm);
    `ack_timeout()`: drain_ack_timeout now."""

    def __init__(
        self,
        admin: AdminConnection,
        channel: str,
        gate: Callable[[], Gate],
        ack_timeout: Callable[[], float],
        identity: Identity | None = None,
    ) -> None:
        self.admin = admin
        self.channel = channel
        self.gate = gate
        self.ack_timeout = ack_timeout
        mine = identity or Identity.current()
        self.me = co.Proxy(mine.host, mine.pid, mine.instance)
        self.peers = co.Peers(self.me.instance)
        self.remote = co.RemoteDrains(self.me.instance)
        self.holds: dict[str, GateHold] = {}  # the other proxies' drains armed here
        self.waits: dict[str, tuple[co.AckWait, asyncio.Event]] = {}
        self.own: set[str] = set()  # this proxy's drains announced and not ended yet
        self.listening = asyncio.Event()  # set while the listener connection LISTENs
        self._loop = asyncio.get_running_loop()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._conn: psycopg.AsyncConnection[Any] | None = None  # the listener connection
        self._fd = -1  # its socket, watched by the loop
        self._watch: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None  # the next presence round
        self._closed = False
        self._serial = 0
        self._hello_pid = 0  # the admin backend the last hello went out from
        self._vouched: set[int] = set()  # backends whose role may act as an admin connection

    async def start(self) -> None:
        """LISTEN (or, PostgreSQL being down, keep trying in the background)."""
        try:
            await self._open()
        except (psycopg.Error, OSError) as exc:
            log.warning("drain channel: listener connection: %s", _one_line(exc))
            self._spawn(self._reopen())
        self._timer = self._loop.call_later(PRESENCE_SECONDS, self._presence_round)

    async def close(self) -> None:
        """End this proxy's drains, say bye, release the others', stop (what is being sent,
        an end among it, gets CLOSE_SECONDS to go out)."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=CLOSE_SECONDS)
        payloads = [co.encode(co.End(self.me, drain)) for drain in sorted(self.own)]
        self.own.clear()
        await self.admin.notify_all(self.channel, [*payloads, co.encode(co.Bye(self.me))])
        for drain in self.remote.all():
            self._release(drain, Why.CLOSING)
        await self._close_listener()
        tasks = [self._watch] if self._watch is not None else []
        for task in [*tasks, *self._tasks]:
            task.cancel()
        for task in [*tasks, *self._tasks]:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    # -- the draining proxy -------------------------------------------------------------------

    async def announce(self, rule: HoldRule, targets: Collection[int], bound: float) -> Acks:
        """Announce a drain and wait (ack_timeout at most) for the acks of the proxies up."""
        began = self._loop.time()
        await self._prune()
        self._serial += 1
        drain = f"{self.me.instance}-{self._serial}"
        wait = co.AckWait(drain, self.peers.up())
        done = asyncio.Event()
        if wait.complete:
            done.set()
        self.waits[drain] = (wait, done)
        self.own.add(drain)
        start = co.Start.of(self.me, drain, rule, targets, bound)
        try:
            sent = await self.admin.notify_all(self.channel, co.start_payloads(start))
            if sent and not done.is_set():
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(done.wait(), self.ack_timeout())
        except BaseException:  # cancelled (the session went): whatever was sent is ended
            self.end(drain)
            raise
        finally:
            self.waits.pop(drain, None)
        acked = tuple(str(ack.proxy) for ack in wait.acked.values())
        missing = tuple(str(proxy) for proxy in wait.missing)
        return Acks(acked, missing, self._loop.time() - began, sent, drain)

    def end(self, drain: str) -> None:
        """The drain's end, announced (once; never waits)."""
        if drain in self.own and not self._closed:  # (closing: close() sends it)
            self.own.discard(drain)
            self._spawn(self._send(co.End(self.me, drain)))

    # -- receiving ----------------------------------------------------------------------------

    def received(self, payload: str, sender: int) -> None:
        """A notification on the drain channel from backend `sender`. Anyone who may connect
        may NOTIFY: a proxy is taken as one (hello, drain start) only from a backend whose role
        may signal sessions as an admin connection's does, and its acks, ends and byes only
        from that same backend."""
        try:
            message = co.decode(payload)
        except co.ProtocolError as exc:
            log.debug("drain channel: ignored: %s", exc)
            return
        proxy = message.start.proxy if isinstance(message, co.StartPart) else message.proxy
        if proxy.instance == self.me.instance:
            return
        known = self.peers.sent_by(proxy.instance, sender)
        match message:
            case co.Hello(ask=ask):
                if not known:
                    self._spawn(self._welcome(proxy, sender, ask))
                elif ask:
                    self._spawn(self._send(co.Hello(self.me)))
            case co.Bye() if known:
                self.peers.forget(proxy.instance)
                for drain in self.remote.of(proxy.instance):
                    self._release(drain, Why.BYE)
            case co.StartPart():
                whole = self.remote.receive(message, sender, self._loop.time())
                if whole is not None:
                    self._spawn(self._arm(whole, sender))
            case co.Ack() if known:
                waiting = self.waits.get(message.drain)
                if message.to == self.me.instance and waiting and waiting[0].receive(message):
                    waiting[1].set()
            case co.End(drain=drain):
                if self.remote.end(drain, sender):
                    self._release(drain, Why.END)

    async def _trusted(self, proxy: co.Proxy, sender: int) -> bool:
        if sender in self._vouched:
            return True
        try:
            trusted = await self.admin.admin_like(sender)
        except Exception as exc:  # cannot tell: not now (a drain start is then not armed)
            log.warning("drain channel: cannot check backend %d: %s", sender, exc)
            return False
        if not trusted:
            log.warning(
                "drain channel: ignored %s's messages from backend %d: its role is neither a "
                "superuser nor a member of pg_signal_backend", proxy, sender,
            )  # fmt: skip
            return False
        if len(self._vouched) > 1024:
            self._vouched.clear()
        self._vouched.add(sender)
        if self.peers.seen(proxy, sender):
            log.info("proxy %s is up (admin backend %d)", proxy, sender)
        return True

    async def _welcome(self, proxy: co.Proxy, sender: int, ask: bool) -> None:
        if await self._trusted(proxy, sender) and ask:
            await self._send(co.Hello(self.me))

    async def _arm(self, start: co.Start, sender: int) -> None:
        """Arm the gate for another proxy's drain (if its sender may ask for it), then ack."""
        if not await self._trusted(start.proxy, sender):
            self.remote.refuse(start.drain)
            return
        if start.drain not in self.remote.held:  # ended (or this proxy closed) meanwhile
            return
        rule = start.rule()
        try:
            self.holds[start.drain] = self.gate().arm(rule)
            armed = True
        except Exception:  # a gate that cannot arm still acks: the drainer must not wait
            log.exception("drain %s of proxy %s: the gate could not arm", start.drain, start.proxy)
            armed = False
        log.info(
            "drain %s of proxy %s: holding new work on %d relation(s) of database %s",
            start.drain, start.proxy, len(start.relations), start.database,
        )  # fmt: skip
        if self._watch is None or self._watch.done():
            self._watch = self._loop.create_task(self._watch_origins())
        await self._armed(start, rule, armed)

    async def _armed(self, start: co.Start, rule: HoldRule, armed: bool) -> None:
        """Let through the sessions holding a lock on a target now (as the drainer does), ack."""
        if armed and start.oids:
            with contextlib.suppress(Exception):
                rows = await self.admin.lock_rows(start.oids, database=start.database)
                rule.let_through |= holding_pids(rows, start.oids)
        await self._send(co.Ack(self.me, start.drain, start.proxy.instance, armed))

    def _release(self, drain: str, why: Why) -> None:
        hold = self.holds.pop(drain, None)
        level = logging.WARNING if why in (Why.GONE, Why.BOUND) else logging.INFO
        log.log(level, "drain %s released here: %s", drain, why.value)
        if hold is not None:
            hold.release()

    async def _watch_origins(self) -> None:
        """While other proxies' drains are held: release those past their bound and those whose
        proxy's admin session is gone (a proxy killed mid-drain leaves nothing held here)."""
        while self.remote.held:
            await asyncio.sleep(WATCH_SECONDS)
            for drain in self.remote.expired(self._loop.time()):
                self._release(drain, Why.BOUND)
            origins = self.remote.origins()
            if not origins:
                continue
            try:
                alive = await self.admin.alive(origins)
            except Exception as exc:  # the admin connection is down: the bound still holds
                log.debug("drain channel: cannot look for the drainers: %s", exc)
                continue
            for drain in self.remote.gone(alive):
                self._release(drain, Why.GONE)
            # (the drainers gone are forgotten as proxies too; the others are not looked for)
            for proxy in self.peers.prune(alive | (self.peers.admin_pids() - origins)):
                log.info("proxy %s is gone (its admin session ended)", proxy)

    # -- presence -----------------------------------------------------------------------------

    def _presence_round(self) -> None:
        """Say hello again and forget the proxies gone, every PRESENCE_SECONDS (a timer, and a
        short task each time: no task waits on the loop while the proxy is idle)."""
        if self._closed:
            return
        self._spawn(self._presence())
        self._timer = self._loop.call_later(PRESENCE_SECONDS, self._presence_round)

    async def _presence(self) -> None:
        with contextlib.suppress(Exception):  # (a down admin connection is reopened here)
            await self.admin.ensure()
        await self._send(co.Hello(self.me))
        await self._prune()

    async def _prune(self) -> None:
        pids = self.peers.admin_pids()
        if not pids:
            return
        try:
            alive = await self.admin.alive(pids)
        except Exception as exc:  # cannot tell: keep them (the ack wait is bounded anyway)
            log.debug("drain channel: cannot look for the proxies: %s", exc)
            return
        for proxy in self.peers.prune(alive):
            log.info("proxy %s is gone (its admin session ended)", proxy)

    async def _open(self) -> None:
        """The listener connection: LISTEN, then its socket watched by the loop (each
        notification handled as it arrives, with no task waiting), then hello, asking."""
        conn = await self._connect()
        try:
            await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self.channel)))
            self._fd = conn.pgconn.socket
            self._loop.add_reader(self._fd, self._readable)
        except BaseException:
            await conn.close()
            raise
        self._conn = conn
        self.listening.set()
        await self._send(co.Hello(self.me, ask=True))

    def _readable(self) -> None:
        conn = self._conn
        if conn is None:
            return
        pgconn = conn.pgconn
        try:
            pgconn.consume_input()
            while (notify := pgconn.notifies()) is not None:
                self.received(notify.extra.decode(conn.info.encoding), notify.be_pid)
        except psycopg.Error as exc:
            self._lost(_one_line(exc))
            return
        if pgconn.status != psycopg.pq.ConnStatus.OK:
            self._lost("closed")

    def _lost(self, why: str) -> None:
        log.warning("drain channel: listener connection lost: %s", why)
        self._unwatch()
        self.listening.clear()
        self._spawn(self._reopen())

    def _unwatch(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            self._loop.remove_reader(fd)

    async def _reopen(self) -> None:
        """Reconnect the listener (backing off) until it listens again or the proxy closes."""
        await self._close_listener()
        delay = RECONNECT_DELAY
        while not self._closed:
            await asyncio.sleep(delay)
            delay = min(delay * 2, RECONNECT_MAX_DELAY)
            try:
                await self._open()
                return
            except (psycopg.Error, OSError) as exc:
                log.debug("drain channel: listener connection: %s", _one_line(exc))

    async def _close_listener(self) -> None:
        self._unwatch()
        conn, self._conn = self._conn, None
        self.listening.clear()
        if conn is None:
            return
        with contextlib.suppress(Exception):
            await conn.close()

    async def _connect(self) -> psycopg.AsyncConnection[Any]:
        params: dict[str, Any] = {"keepalives": "1", "keepalives_idle": "10",
                                  "keepalives_interval": "5", "keepalives_count": "3"}  # fmt: skip
        params.update(conninfo_to_dict(self.admin.conninfo))
        params["application_name"] = APPLICATION_NAME
        params.setdefault("connect_timeout", "5")
        return await psycopg.AsyncConnection.connect(make_conninfo("", **params), autocommit=True)

    async def _send(self, message: co.Hello | co.Bye | co.Ack | co.End) -> None:
        """One message through the admin connection; a hello goes first when its backend
        changed since the last (a reconnect): the others know this proxy by it."""
        payloads = [co.encode(message)]
        pid = self.admin.pid
        if pid != self._hello_pid and not isinstance(message, (co.Hello, co.Bye)):
            payloads.insert(0, co.encode(co.Hello(self.me)))
        if await self.admin.notify_all(self.channel, payloads):
            if isinstance(message, co.Hello) or len(payloads) > 1:
                self._hello_pid = pid
        else:
            log.debug("drain channel: not sent: %s", type(message).__name__)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        if self._closed:
            work.close()
            return
        task = self._loop.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__
