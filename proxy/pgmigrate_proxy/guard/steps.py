"""The waits of the DDL pipeline: what guard/pipeline.py yields, what the driver answers with.

Each step is a frozen dataclass; the comment after it says what the driver sends back. Admin
steps (FindBlockers, BlockingPids, Activity, WaiterOwns, Signal, LockHolders) may instead be
answered by throwing AdminDown into the pipeline. Frames and QueryResults are the protocol
layer's types.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from pgmigrate_proxy.guard.policy import Verdict
from pgmigrate_proxy.protocol.framing import Frame
from pgmigrate_proxy.sql import LockMode


class AdminDown(Exception):
    """Thrown into the pipeline when an admin step failed (connection lost, timed out)."""


@dataclass(frozen=True)
class Now:
    """-> float: the driver's clock (monotonic seconds)."""


@dataclass(frozen=True)
class Sleep:
    """-> None, after `seconds`."""

    seconds: float


@dataclass(frozen=True)
class WaitIdle:
    """-> None, once the server has answered everything sent before the unit."""


@dataclass(frozen=True)
class Inject:
    """-> QueryResult: one query of the proxy's own on the session's server connection (its
    replies kept from the client)."""

    sql: str
    params: Sequence[str | None] = ()


@dataclass(frozen=True)
class Send:
    """-> None: write the unit to the server; its replies are collected for Replies."""

    data: bytes


@dataclass(frozen=True)
class Replies:
    """-> list[Frame] | None: the sent unit's replies once complete; None when they are not
    complete within `timeout` seconds (None: wait as long as it takes; 0: just look)."""

    timeout: float | None


@dataclass(frozen=True)
class FindBlockers:
    """-> list[Blocker] (admin): sessions holding or awaiting conflicting locks."""

    targets: Mapping[int, LockMode]
    protected: frozenset[int]
    database: str
    viewer: int | None


@dataclass(frozen=True)
class BlockingPids:
    """-> list[int] (admin): pg_blocking_pids(pid)."""

    pid: int


@dataclass(frozen=True)
class Activity:
    """-> list[Blocker] (admin): pg_stat_activity of these sessions."""

    pids: tuple[int, ...]
    viewer: int | None


@dataclass(frozen=True)
class WaiterOwns:
    """-> (viewer OID | None, bool) (admin): see AdminConnection.waiter_owns."""

    pid: int


@dataclass(frozen=True)
class Signal:
    """-> bool (admin): pg_terminate_backend or pg_cancel_backend, per `verdict`."""

    pid: int
    verdict: Verdict


@dataclass(frozen=True)
class Notice:
    """-> None: a NoticeResponse to the client."""

    severity: str
    message: str
    detail: str | None = None


@dataclass(frozen=True)
class Deliver:
    """-> None: frames to the client (the unit's replies, or the proxy's own answer)."""

    frames: tuple[Frame, ...]


@dataclass(frozen=True)
class Event:
    """-> None: one structured line in the operator's log (`level`: logging's level names)."""

    name: str
    fields: Mapping[str, object] = field(default_factory=dict)
    level: str = "INFO"


@dataclass(frozen=True)
class LockHolders:
    """-> list[(pid, relation, mode, granted)] (admin): pg_locks rows on these relations
    (guard/drain.py's LOCKS_SQL)."""

    relations: tuple[int, ...]
    database: str


class SessionInfo(Protocol):
    """What a hold predicate reads of a client session."""

    @property
    def database(self) -> str: ...
    @property
    def backend_pid(self) -> int: ...  # its server connection's backend, 0 when it has none


class HoldPredicate(Protocol):
    """What the gate is armed with (guard/drain.py's HoldRule)."""

    def should_hold(self, session: SessionInfo, statements: Sequence[str] | None) -> bool: ...


@dataclass(frozen=True)
class Arm:
    """-> None: arm the proxy's gate with a drain's rule (it holds new work on the targets)."""

    rule: HoldPredicate


@dataclass(frozen=True)
class Recheck:
    """-> None: the armed rule lets more sessions through now: what it held of theirs goes on."""


@dataclass(frozen=True)
class Release:
    """-> None: release what the armed rule held, in order, and disarm it (and announce the
    end of the drain to the other proxies, when it was announced)."""


@dataclass(frozen=True)
class Announce:
    """-> Acks | None: announce the armed drain to the other proxies on the database and wait
    (drain_ack_timeout at most) for the acknowledgements of those up; None: this proxy does not
    coordinate (no drain channel). Its end goes out with the Release."""

    rule: HoldPredicate  # guard/drain.py's HoldRule
    targets: tuple[int, ...]
    hold_seconds: float  # the drain's own bound: a proxy holds for it this long at most


@dataclass(frozen=True)
class Acks:
    """What an Announce got: the proxies up that acknowledged and those that did not in time
    (their names, host:pid), and how long it waited."""

    acked: tuple[str, ...]
    missing: tuple[str, ...]
    waited: float
    sent: bool = True  # False: the admin connection could not send it
    drain: str = ""  # the drain's id on the drain channel (its end names it)


Step = (
    Now | Sleep | WaitIdle | Inject | Send | Replies | FindBlockers | BlockingPids | Activity
    | WaiterOwns | Signal | Notice | Deliver | Event | LockHolders | Arm | Recheck | Release
    | Announce
)  # fmt: skip
