"""What one run of the DDL pipeline works on: the held unit, the session's guard settings, and
what the client's own connection said about the unit's targets and rights."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from pgmigrate_proxy.guard.drain import DrainSettings
from pgmigrate_proxy.guard.policy import BlockingAction, Filters
from pgmigrate_proxy.guard.retry import RetrySchedule
from pgmigrate_proxy.settings import default
from pgmigrate_proxy.sql import LockMode, Statement


@dataclass(frozen=True)
class GuardSettings:
    """What the pipeline needs from the Config, for one session."""

    action: BlockingAction = BlockingAction.TERMINATE
    filters: Filters = field(default_factory=Filters)
    schedule: RetrySchedule = field(default_factory=RetrySchedule)
    max_hold: float = default("max_hold")
    watch_interval: float = default("watch_interval")
    cancel_grace: float = default("cancel_grace")
    drain: DrainSettings = field(default_factory=DrainSettings)  # blocking_action = drain
    report_events: bool = default("report_events")  # each event to the client too, as a notice
    migration_lock: bool = default("migration_lock")  # (migration sessions) one at a time
    migration_lock_timeout: float = default("migration_lock_timeout")  # 0: no limit


def needs_guard(statement: Statement) -> bool:
    """Whether the guard holds and watches `statement`: it can queue ordinary traffic behind it
    (guarded), or it waits for other transactions to end (CONCURRENTLY: older snapshots,
    lockers), which only the in-flight pg_blocking_pids watch sees."""
    return statement.guarded or statement.concurrently


def redoable(statements: Iterable[Statement]) -> bool:
    """Whether a failed attempt can simply be sent again: not for a statement that cannot run
    in a transaction block (it commits as it goes: an attempt cut short leaves an invalid
    index or a pending detach behind)."""
    return all(s.transactional for s in statements)


@dataclass
class HeldUnit:
    """The client's messages held for one guarded statement: a Query, or a batch to Sync."""

    data: bytes
    statements: tuple[Statement, ...]
    expect: int  # ReadyForQuery messages its replies end with (0: it ends with a Flush)
    retryable: bool  # alone in its own implicit transaction: an attempt can be redone

    @property
    def closes_batch(self) -> bool:
        """Ends with Sync (or is a Query): the connection is at a batch boundary after it."""
        return self.expect > 0


@dataclass(frozen=True)
class Resolution:
    """What the client's own server connection said about a unit's statements: their lock
    targets, whether the client may run them (has the rights PostgreSQL checks before it takes
    those locks: only then does the proxy act on blockers for it), and the client's role (whose
    view of pg_stat_activity the notices follow).

    Unresolved (`resolved` False: a statement that arrives mid-batch and was never prepared at
    a batch boundary), nothing is known beforehand: the statement goes out as it is and only the
    in-flight watch acts, each time after the admin connection has checked that the client's
    role owns the relation its backend waits for."""

    targets: Mapping[int, LockMode] = field(default_factory=dict)
    permitted: bool = False
    viewer: int | None = None  # the OID of the client's current_user
    resolved: bool = True

    @classmethod
    def merge(cls, parts: Iterable[Resolution]) -> Resolution:
        """Several statements' resolutions as one: permitted only if each is."""
        parts = list(parts)
        if not parts or not all(p.resolved for p in parts):
            return UNRESOLVED
        targets: dict[int, LockMode] = {}
        for part in parts:
            for oid, mode in part.targets.items():
                targets[oid] = max(mode, targets.get(oid, mode))
        return cls(targets, all(p.permitted for p in parts), parts[0].viewer)


#: Nothing known: the statement goes out untouched but for the checked in-flight watch.
UNRESOLVED = Resolution(resolved=False)
