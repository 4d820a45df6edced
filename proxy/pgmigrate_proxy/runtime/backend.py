"""One connection to PostgreSQL, apart from any client: its transport, what it still owes (the
reply queue), the proxy's own requests on it, and where its replies go.

A client session attaches to it (the pooler will hand one to many sessions in turn) and, once
logged in, turns on the relay: from then on every chunk the server sends is scanned here and
written straight to the client transport (a bound method given at `relay` time, no hop
through the session), except the replies to the proxy's own requests (`exchange`, `inject`),
which are kept from the client. While not relaying (authentication, a session draining to
send its own error) the chunks go to the holder's `server_data` as they came. `detach` hands
the connection back only when it owes nothing: no reply outstanding, no message half read.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import Final, Protocol

from pgmigrate_proxy.errors import ServerBusy, ServerLost
from pgmigrate_proxy.protocol import extended
from pgmigrate_proxy.protocol.framing import (
    HEADER_SIZE,
    Frame,
    FrameScanner,
    FramingError,
    message_types,
)
from pgmigrate_proxy.protocol.messages import (
    BackendKeyData,
    DecodeError,
    ErrorResponse,
    ReadyForQuery,
)
from pgmigrate_proxy.protocol.prepared import ServerStatements
from pgmigrate_proxy.protocol.replies import Owner, ReplyQueue, UnexpectedReply
from pgmigrate_proxy.protocol.retry import RetryWindow
from pgmigrate_proxy.protocol.types import BackendType, TransactionStatus
from pgmigrate_proxy.runtime.stats import UNPOOLED
from pgmigrate_proxy.runtime.upstream import UpstreamProtocol

#: Backend frames the reply queue must always see (protocol/replies.py); every frame while it
#: says it needs every reply. Migration sessions also read the errors that stream past (COPY):
#: they fail the virtual block.
BACKEND_WATCH: Final = frozenset((
    BackendType.READY_FOR_QUERY, BackendType.COPY_IN_RESPONSE, BackendType.ERROR_RESPONSE,
))  # fmt: skip
#: Without reply tracking (no guard) the relay reads only the transaction status.
STATUS_WATCH: Final = frozenset((BackendType.READY_FOR_QUERY,))
#: (frozensets: FrameScanner.watch finds their table without hashing the members again)
ALL_TYPES: Final = frozenset(range(256))
log = logging.getLogger("pgmigrate_proxy.session")
_INJECTED_NAME: Final = "pgmigrate_proxy"
_READY_FOR_QUERY: Final = BackendType.READY_FOR_QUERY.value
_ERROR_RESPONSE: Final = BackendType.ERROR_RESPONSE.value
_IDLE: Final = TransactionStatus.IDLE
_STATUSES: Final = {bytes([s]): s for s in TransactionStatus}
#: The same by the status byte's value (the relay's shortcut reads the byte, not a slice).
_STATUS_OF: Final = [_STATUSES.get(bytes([value])) for value in range(256)]
_COPY_IN: Final = (BackendType.COPY_IN_RESPONSE, BackendType.COPY_BOTH_RESPONSE)
#: Server messages that may come at any time: passed on even amid an injected query's replies.
ASYNCHRONOUS: Final = (
    BackendType.NOTIFICATION_RESPONSE, BackendType.PARAMETER_STATUS, BackendType.NOTICE_RESPONSE,
)  # fmt: skip


class ServerListener(Protocol):
    """Whoever holds a server connection: told what the relay cannot handle by itself."""

    def server_data(self, data: bytes) -> None:
        """The server's bytes as they came, while the relay is off (authentication, draining)."""

    def server_violation(self, exc: Exception) -> None:
        """The server broke the protocol: nothing more of it can be passed on."""

    def server_lost(self, last_words: bytes) -> None:
        """The connection is gone; `last_words`: its FATAL taken aside from the proxy's own
        requests, which the client must see as a relayed statement's would."""

    def pause_client_reading(self) -> None: ...
    def resume_client_reading(self) -> None: ...


class ReplyObserver(Protocol):
    """Reads the replies that pass to the client (a migration session's runner)."""

    def ready(self) -> None:
        """A ReadyForQuery passed on."""

    def passed_error(self, *, in_batch: bool) -> None:
        """An ErrorResponse passed on; `in_batch`: the server now skips to the next Sync."""

    def client_status(self) -> TransactionStatus:
        """The status the client's ReadyForQuery must carry."""


def _fatal(item: Frame) -> bool:
    """An ErrorResponse that ends the session (FATAL or PANIC)."""
    if item.type != BackendType.ERROR_RESPONSE:
        return False
    try:
        return ErrorResponse.decode(item.payload).severity in ("FATAL", "PANIC")
    except DecodeError:
        return False


class ServerConnection(UpstreamProtocol):
    """The asyncio protocol of one server connection, and its state (module docstring)."""

    __slots__ = (
        "_idle", "_observer", "_sink", "_sink_done", "_to_client", "_tracking",
        "database", "every_reply", "key", "listener", "on_idle", "replies", "scanner", "sent_at",
        "statements", "stats", "status", "window", "xact_at",
    )  # fmt: skip

    def __init__(self, database: str = "") -> None:
        super().__init__()
        self.database = database  # the database it is logged in to (the guard's queries)
        self.scanner = FrameScanner(watched=ALL_TYPES)
        self.replies = ReplyQueue()  # what the server still owes, and to whom
        self.status = TransactionStatus.IDLE
        self.key: BackendKeyData | None = None  # the server's own, for cancel requests
        self.listener: ServerListener | None = None
        self._to_client: Callable[[bytes], object] | None = None  # set while relaying
        self._observer: ReplyObserver | None = None
        self._tracking = False  # the reply queue is fed (the client's messages are watched)
        self.every_reply = False  # the scanner shows every frame (see watch)
        self._sink: list[Frame] | None = None
        self._sink_done: asyncio.Future[list[Frame]] | None = None
        self._idle: asyncio.Future[None] | None = None
        #: called after a ReadyForQuery 'I' passed on with nothing owed, at a message boundary,
        #: no request of the proxy's own in flight: `busy` is None (transaction pooling)
        self.on_idle: Callable[[], None] | None = None
        #: the proxy-wide prepared statements it holds (transaction pooling: runtime/statements.py)
        self.statements: ServerStatements | None = None
        self.stats = UNPOOLED  # its pool's counters (runtime/stats.py), once it joins one
        #: a batch of prepared statements whose replies are held back (protocol/retry.py)
        self.window: RetryWindow | None = None
        #: time.monotonic() when the query running now, and the transaction it is in, began
        #: (0: none): SHOW STATS's query_time and xact_time (see sending, and _ready)
        self.sent_at = 0.0
        self.xact_at = 0.0

    # --- who holds it ---------------------------------------------------------------------------

    def attach(self, listener: ServerListener) -> None:
        """Give the connection to a holder (its bytes go to `listener.server_data` until the
        holder turns the relay on)."""
        if self.listener is not None and self.listener is not listener:
            raise ServerBusy("the server connection is attached to another session")
        self.listener = listener

    def relay(
        self,
        to_client: Callable[[bytes], object],
        *,
        tracking: bool,
        observer: ReplyObserver | None = None,
    ) -> None:
        """Pass the server's chunks to `to_client` (the client transport's write), tracking the
        replies owed (`tracking`: the holder feeds the queue what it sends) or only the status."""
        self._to_client = to_client
        self._tracking = tracking
        self._observer = observer
        self.every_reply = False
        self.scanner.watch(BACKEND_WATCH if tracking else STATUS_WATCH)

    def redirect(self, to_client: Callable[[bytes], object]) -> None:
        """While relaying: pass the server's chunks to `to_client` instead (nothing else
        changes; a lent pooled server's unasked messages are dropped this way)."""
        self._to_client = to_client

    def unrelay(self) -> None:
        """Back to handing the holder raw chunks (it is closing, or handing the connection back)."""
        self._to_client = None

    @property
    def busy(self) -> str | None:
        """Why the connection cannot change hands now (None: it can)."""
        if self.transport is None:
            return "the server connection is lost"
        if self._to_client is not None and not self._tracking:
            return "its replies are not tracked (the DDL guard is off)"
        if self._sink is not None or self.replies.proxy_owed:
            return "a request of the proxy's own is in flight"
        if not self.replies.idle:
            return "replies are outstanding"
        if not self.scanner.at_boundary:
            return "a server message is half read"
        return None

    def detach(self) -> None:
        """Take the connection back from its holder; refused (ServerBusy) unless it owes nothing."""
        reason = self.busy
        if reason is not None:
            if self.transport is None:  # (terminated by PostgreSQL: 08006, not XX000)
                raise ServerLost("server closed the connection unexpectedly")
            raise ServerBusy(f"cannot detach the server connection: {reason}")
        self.listener = None
        self._to_client = None
        self._observer = None

    # --- the relay (hot path) -------------------------------------------------------------------

    def sending(self) -> None:
        """A client's request goes out with no query running (the relay checks sent_at first):
        a query begins, and a transaction unless one is open."""
        now = time.monotonic()
        self.sent_at = now
        if not self.xact_at:
            self.xact_at = now

    def _ready(self, status: TransactionStatus, queries: int = 1, more: bool = False) -> None:
        """`queries` ReadyForQuery relayed, the last with `status`: the connection's status and
        its pool's counters; the running query ended (`more`: others were sent behind it, the
        next runs from now) and, with status 'I', its transaction."""
        self.status = status
        stats = self.stats
        stats.query_count += queries
        if status is _IDLE:
            stats.xact_count += 1
        if not self.sent_at:
            return
        now = time.monotonic()
        stats.query_time += now - self.sent_at
        self.sent_at = now if more else 0.0
        if status is _IDLE:
            if self.xact_at:
                stats.xact_time += now - self.xact_at
            self.xact_at = now if more else 0.0

    def _settled(self) -> None:
        """After replies were fed to the queue: wake wait_idle once no ReadyForQuery is owed
        (or a COPY waits for the client), and stop showing the scanner every frame once the
        queue no longer needs them."""
        replies = self.replies
        idle = self._idle
        if idle is not None and not idle.done() and (not replies.readies or replies.copy_in):
            idle.set_result(None)
        if self.every_reply and not replies.needs_every_reply:
            self.watch()

    def data_received(self, data: bytes) -> None:
        if self._byte_waiter is not None:
            super().data_received(data)
            return
        to_client = self._to_client
        if to_client is None:
            if self.listener is not None:
                self.listener.server_data(data)
            return
        if self._tracking and self._sink is None and self.window is None and self._observer is None:
            last = self.scanner.last_watched(data)
            if last >= 0 and self._shortcut(data, last, to_client):
                return
        try:
            frames = self.scanner.feed(data)
            if self._sink is not None:
                self._sink_frames(frames)
                return
            if frames:
                if not self._tracking:  # (only ReadyForQuery is watched)
                    self._ready(ReadyForQuery.decode(frames[-1].payload).status, len(frames))
                else:
                    self._received(frames)
                    if self._observer is not None:
                        data = _rewrite_status(frames, data, self._observer.client_status())
                    if self.window is not None:
                        data = self._windowed(frames, data)
                        if not data:
                            return
        except (FramingError, DecodeError) as exc:
            if self.listener is not None:
                self.listener.server_violation(exc)
            return
        to_client(data)
        self.stats.bytes_sent += len(data)
        on_idle = self.on_idle  # (at a boundary: the shortcut's chunks are whole, not these)
        idle = frames and self.status is _IDLE and self.replies.idle
        if on_idle is not None and idle and self.scanner.at_boundary:
            on_idle()  # (the link checks the rest: see PoolLink.transaction_ended)

    def _shortcut(self, data: bytes, last: int, to_client: Callable[[bytes], object]) -> bool:
        """data_received for a chunk of whole frames, none watched but the last (a reply
        ending with its ReadyForQuery, or a run of rows): what feed and _received would do,
        without making frames. False when the last frame needs the general path."""
        mtype = data[last]
        if mtype == _READY_FOR_QUERY:
            if len(data) - last != HEADER_SIZE + 1:
                return False  # (malformed: the general path says so)
            status = _STATUS_OF[data[last + HEADER_SIZE]]
            if status is None:
                return False
            replies = self.replies
            try:
                replies.received(mtype)
            except UnexpectedReply as exc:
                if self.listener is not None:
                    self.listener.server_violation(DecodeError(str(exc)))
                return True
            self._ready(status, 1, not replies.empty)
            if self._idle is not None or self.every_reply:
                self._settled()  # (else it has nothing to do)
            to_client(data)
            self.stats.bytes_sent += len(data)
            on_idle = self.on_idle
            if on_idle is not None and status is _IDLE and replies.idle:
                on_idle()  # (the link checks the rest: see PoolLink.transaction_ended)
            return True
        if self.scanner.watches(mtype):
            return False
        to_client(data)  # (no frame watched: nothing to track)
        self.stats.bytes_sent += len(data)
        return True

    def _received(self, frames: list[Frame]) -> None:
        """Bookkeeping for watched server frames passed on to the client."""
        replies = self.replies
        observer = self._observer
        for item in frames:
            mtype = item.type
            try:
                replies.received(mtype)
            except UnexpectedReply as exc:
                raise DecodeError(str(exc)) from None
            if mtype == _READY_FOR_QUERY:
                status = _STATUSES.get(item.payload[:1])
                if status is None:
                    raise DecodeError("malformed ReadyForQuery")
                self._ready(status, 1, not replies.empty)
                if observer is not None:
                    observer.ready()
            elif mtype == _ERROR_RESPONSE and observer is not None:
                observer.passed_error(in_batch=replies.batch_open)
        self._settled()

    def _windowed(self, frames: list[Frame], data: bytes) -> bytes:
        """The part of a chunk passed on while a retry window holds replies back."""
        window = self.window
        assert window is not None
        data, over = window.feed(frames, data)
        if over:
            self.window = None
            self.watch()
            window.close()
        return data

    def watch(self) -> None:
        """Show the scanner every frame while the reply queue needs every reply (or the proxy
        takes replies aside), only those it must always see otherwise. The holder calls it
        when what it sent changed that (`replies.needs_every_reply is not every_reply`: read
        inline on the hot path, not through a property)."""
        every = self._sink is not None or self.replies.needs_every_reply or self.window is not None
        self.every_reply = every
        self.scanner.watch(ALL_TYPES if every else BACKEND_WATCH)

    def write(self, data: bytes) -> None:
        """Off the hot path (the relay writes to `transport` itself)."""
        if self.transport is not None and data:
            self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    # --- the proxy's own requests ---------------------------------------------------------------

    @property
    def sinking(self) -> bool:
        return self._sink is not None

    def _sink_frames(self, frames: list[Frame]) -> None:
        """Server frames while the proxy has requests of its own out: the replies to those
        (and what comes amid them) are kept from the client, the client's pass on."""
        sink = self._sink
        assert sink is not None
        replies = self.replies
        passed: list[bytes] = []
        for item in frames:
            try:
                owner = replies.received(item.type)
            except UnexpectedReply as exc:
                raise DecodeError(str(exc)) from None
            if item.type == BackendType.READY_FOR_QUERY:
                self.status = ReadyForQuery.decode(item.payload).status
            if owner is Owner.PROXY and item.type in _COPY_IN:
                # the client's held unit entered COPY FROM STDIN: the data must come from the
                # client, which waits behind the unit; the unit ends here and what is left of
                # its replies is the client's
                sink.append(item)
                replies.hand_over()
                continue
            if owner is Owner.CLIENT or (owner is None and not replies.proxy_owed):
                passed.append(item.raw)  # a reply to the client's request, sent before ours
                if item.type == BackendType.ERROR_RESPONSE and self._observer is not None:
                    # (ours go out only once the client's Syncs are answered: this is an
                    # error of a batch the client left open)
                    self._observer.passed_error(in_batch=True)
            else:
                sink.append(item)
        if passed and self._to_client is not None:
            self._to_client(b"".join(passed))
        if not replies.proxy_owed:
            taken, self._sink = sink, None
            done, self._sink_done = self._sink_done, None
            self.watch()
            if self._idle is not None and not self._idle.done() and not replies.readies:
                self._idle.set_result(None)
            if done is not None and not done.done():
                done.set_result(taken)

    @property
    def server_pid(self) -> int:
        return self.key.process_id if self.key is not None else 0

    @property
    def can_inject(self) -> bool:
        return self.replies.idle and self.status is not TransactionStatus.FAILED

    @property
    def batch_open(self) -> bool:
        """Extended-protocol messages went to the server since the last Sync."""
        return self.replies.batch_open

    @property
    def gone(self) -> bool:
        return self.transport is None

    async def wait_idle(self) -> None:
        """Until the server has answered everything sent before up to the last Sync: what
        follows in an open batch is answered only once a Sync or Flush goes out (the server
        holds those replies back), so it cannot be waited for; nor can a COPY FROM STDIN,
        which waits for the client's data."""
        while self.replies.readies and not self.replies.copy_in:
            self._idle = asyncio.get_running_loop().create_future()
            await self._idle
            self._idle = None

    async def exchange(self, data: bytes) -> list[Frame]:
        """Send data as the proxy's own requests; return every server frame that answers them
        (the reply queue knows what each of its messages expects, to Sync or to Flush)."""
        transport = self.transport
        if transport is None:
            raise ConnectionError("the server connection was lost")
        for mtype in message_types(data):
            self.replies.sent(mtype, Owner.PROXY)
        if not self.replies.proxy_owed:
            return []  # nothing in it expects a reply (a Flush alone)
        self._sink = []
        self._sink_done = asyncio.get_running_loop().create_future()
        self.watch()
        transport.write(data)
        return await self._sink_done

    async def inject(self, sql: str, params: Sequence[str | None] = ()) -> extended.QueryResult:
        """Run one query of the proxy's own; what came amid its replies for the client is in
        the result's `asynchronous`, for the caller to pass on."""
        frames = await self.exchange(
            extended.build_query(_INJECTED_NAME, sql, params) + extended.sync()
        )
        result = extended.QueryResult(rows=[])
        for item in frames:
            if item.type == BackendType.DATA_ROW:
                result.rows.append(extended.data_row(item.payload))
            elif item.type == BackendType.ERROR_RESPONSE:
                result.error = dict(ErrorResponse.decode(item.payload).fields)
                log.warning(
                    "server %s: injected query failed: %s", self.server_pid, result.error.get("M")
                )
            elif item.type in ASYNCHRONOUS:
                result.asynchronous.append(item)
        return result

    # --- asyncio.Protocol -----------------------------------------------------------------------

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self.transport = None
        last_words = b""
        window, self.window = self.window, None
        if window is not None:
            window.close()
        if self._sink is not None:
            last_words = b"".join(f.raw for f in self._sink if _fatal(f))
        for waiter in (self._sink_done, self._idle):
            if waiter is not None and not waiter.done():
                waiter.set_exception(ConnectionError("the server connection was lost"))
        if self.listener is not None:
            self.listener.server_lost(last_words)

    def pause_writing(self) -> None:
        if self.listener is not None:
            self.listener.pause_client_reading()

    def resume_writing(self) -> None:
        if self.listener is not None:
            self.listener.resume_client_reading()


def _rewrite_status(frames: list[Frame], data: bytes, status: TransactionStatus) -> bytes:
    """ReadyForQuery passed on raw carries the status the client must see."""
    changed = bytearray(data)
    for item in frames:
        if item.type == BackendType.READY_FOR_QUERY:
            changed[item.end - 1] = status
    return bytes(changed)
