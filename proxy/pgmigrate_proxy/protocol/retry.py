"""Which batches of proxy-managed prepared statements may be resent after PostgreSQL found a
statement's cached plan stale (0A000 "cached plan must not change result type"), and the
holding back of such a batch's replies until they show it will not be.

A window opens for a batch the client sent whole in one chunk, from a proxy-mapped Bind or
Describe to its Sync, made of Bind, Describe and Execute only, while the server owed nothing.
The server's replies are held back while they are only BindComplete, ParameterDescription,
RowDescription, NoData and asynchronous messages: nothing the client can act on yet. The first
other reply closes the window and everything held goes on, in order. A stale-plan error
instead is resent (`resend`) when the server was idle (no transaction block: the batch ran in
an implicit transaction of its own, rolled back) and the batch describes every portal it
executes (the client learns the new row type from the resent batch's RowDescription; a client
that decodes rows with a description it cached, as asyncpg does, must get the error): then
everything up to the batch's ReadyForQuery is dropped (ParameterStatus and NotificationResponse
excepted: they are not repeated), and the caller resends the batch, once. No row, no
CommandComplete has reached the client: the resent batch's replies are the first it sees.
Otherwise the error goes on with what was held, and the caller only retires the statements,
so that the client's own Parse of them (asyncpg's retry) gets a fresh one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from pgmigrate_proxy.protocol.framing import Frame
from pgmigrate_proxy.protocol.messages import DecodeError, ErrorResponse
from pgmigrate_proxy.protocol.types import BackendType, FrontendType

#: SQLSTATE feature_not_supported, and where PostgreSQL raises it for a stale plan.
STALE_CODE = "0A000"
STALE_ROUTINE = "RevalidateCachedQuery"
STALE_MESSAGE = "cached plan must not change result type"
#: Client messages a window may hold (besides its closing Sync).
_IN_WINDOW = frozenset(t.value for t in (FrontendType.BIND, FrontendType.DESCRIBE,
                                         FrontendType.EXECUTE))  # fmt: skip
_SYNC = FrontendType.SYNC.value
_DESCRIBE = FrontendType.DESCRIBE.value
_EXECUTE = FrontendType.EXECUTE.value
#: Replies that say nothing yet about whether the batch's statements are stale.
_UNDECIDED = frozenset(
    t.value for t in (BackendType.BIND_COMPLETE, BackendType.PARAMETER_DESCRIPTION,
                      BackendType.ROW_DESCRIPTION, BackendType.NO_DATA,
                      BackendType.NOTICE_RESPONSE, BackendType.PARAMETER_STATUS,
                      BackendType.NOTIFICATION_RESPONSE)
)  # fmt: skip
#: Asynchronous messages passed on even when the batch is resent (its notices come again).
_KEPT = frozenset({BackendType.PARAMETER_STATUS.value, BackendType.NOTIFICATION_RESPONSE.value})
_ERROR = BackendType.ERROR_RESPONSE.value
_READY = BackendType.READY_FOR_QUERY.value


def stale_plan(payload: bytes) -> bool:
    """The payload of an ErrorResponse for a prepared statement whose plan went stale."""
    try:
        error = ErrorResponse.decode(payload)
    except DecodeError:
        return False
    if error.code != STALE_CODE:
        return False
    return error.fields.get("R") == STALE_ROUTINE or error.message == STALE_MESSAGE


def batch(frames: Sequence[Frame], first: int, length: int) -> bool:
    """Whether frames[first:] of a client chunk of `length` bytes make a batch a window may
    hold: Bind, Describe and Execute, back to back, then a Sync that ends the chunk."""
    last = len(frames) - 1
    if last <= first or frames[last].type != _SYNC or frames[last].end != length:
        return False
    end = frames[first].end
    for item in frames[first + 1 :]:
        if item.start != end:
            return False  # something unwatched between (or a frame begun earlier)
        if item.type not in _IN_WINDOW and item is not frames[last]:
            return False
        end = item.end
    return True


def describes(frames: Sequence[Frame], idle: bool) -> bool:
    """Whether a batch may be resent: sent while the server was `idle` (not in a transaction
    block), a Describe before each Execute (since the batch's start or the last Execute)."""
    if not idle:
        return False
    described = False
    for item in frames:
        if item.type == _DESCRIBE:
            described = True
        elif item.type == _EXECUTE:
            if not described:
                return False
            described = False
    return True


class RetryWindow:
    """The replies of one batch, held back until they show success (module docstring).
    `frames`: the client's messages of the batch, to resend if `resend`; `on_stale` is called
    at the stale-plan error (the caller holds the client's next messages from then on, when
    it resends)."""

    __slots__ = ("_held", "_kept", "frames", "on_stale", "resend", "stale")

    def __init__(
        self, frames: Sequence[Frame], on_stale: Callable[[RetryWindow], None], *, resend: bool
    ) -> None:
        self.frames = frames
        self.on_stale = on_stale
        self.resend = resend
        self.stale = False
        self._held: list[bytes] = []
        self._kept: list[bytes] = []

    def close(self) -> None:
        """The server is done with the window (over, or the connection lost): for the
        caller's subclass, which may be waiting for it."""

    def feed(self, frames: Sequence[Frame], data: bytes) -> tuple[bytes, bool]:
        """One chunk of the server's (`frames`: every complete frame in it): the bytes to pass
        to the client now, and whether the window is over (its ReadyForQuery came after a
        stale-plan error, or a reply showed the batch is not stale)."""
        for item in frames:
            mtype = item.type
            if mtype in _KEPT:
                self._kept.append(item.raw)
            if self.stale:
                if mtype == _READY:
                    return b"".join(self._kept) + data[item.end :], True
                continue
            if mtype in _UNDECIDED:
                continue
            if mtype == _ERROR and stale_plan(item.payload):
                self.stale = True
                self.on_stale(self)
                if not self.resend:  # the client gets the error (and what was held before)
                    self._held.append(data)
                    return self._release(), True
                self._held.clear()
                continue
            self._held.append(data)
            return self._release(), True
        if not self.stale:
            self._held.append(data)
        return b"", False

    def _release(self) -> bytes:
        out = b"".join(self._held)
        self._held.clear()
        return out
