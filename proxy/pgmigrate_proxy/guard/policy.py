"""What to do with each blocker of a guarded statement: pure decisions, no I/O and no clock."""

from __future__ import annotations

import enum
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase

from pgmigrate_proxy.guard.blockers import (
    CLIENT_BACKEND,
    BackendState,
    Blocker,
    RelationLock,
    parse_pga_context,
    redact_query,
    report_query,
)
from pgmigrate_proxy.guard.retry import RetrySchedule, is_retryable
from pgmigrate_proxy.settings import default

__all__ = [
    "BackendState",
    "Blocker",
    "BlockingAction",
    "Decision",
    "Filters",
    "Reason",
    "RelationLock",
    "RetrySchedule",
    "Verdict",
    "decide",
    "is_retryable",
    "parse_pga_context",
    "redact_query",
    "report_query",
]


class BlockingAction(enum.Enum):
    """What the proxy does to the sessions that block a guarded statement (the setting's values)."""

    TERMINATE = "terminate"  # pg_terminate_backend: the default, as in django-pgmigrate
    CANCEL = "cancel"  # pg_cancel_backend; escalates for idle-in-transaction blockers
    SHOW = "show"  # report them and wait
    NONE = "none"  # report them, nothing else
    DRAIN = "drain"  # hold new work on the tables, wait for the holders, then drain_then


class Verdict(enum.Enum):
    """The outcome of the decision for one blocker."""

    TERMINATE = "terminate"
    CANCEL = "cancel"
    REPORT = "report"  # tell the client and the operator, do not touch
    SKIP = "skip"  # not ours to act on, nor worth reporting as a blocker we chose to spare


class Reason(enum.Enum):
    """Why a verdict was reached; the value is the wording for notices and logs."""

    ACTION = "blocking action"
    ESCALATED = "idle in transaction, not ended by a cancel: terminated after the grace period"
    ESCALATION_PENDING = "idle in transaction, not ended by a cancel: waiting for the grace period"
    ACTION_SHOW = "blocking action is show"
    ACTION_NONE = "blocking action is none"
    ACTION_DRAIN = "blocking action is drain: waiting for it to finish"
    PREPARED = "prepared transaction: it cannot be terminated, COMMIT or ROLLBACK PREPARED it"
    SPARED_STATE = "spared by the state filter"
    SPARED_TRANSACTION_AGE = "spared: transaction younger than the minimum age"
    SPARED_QUERY_AGE = "spared: query younger than the minimum age"
    SPARED_APPLICATION = "spared by the application_name filter"
    SPARED_USER = "spared by the user filter"
    PROTECTED = "protected session (the statement's own, the proxy's or another guarded one)"
    NO_BACKEND = "no backend process"
    NOT_CLIENT_BACKEND = "not a client backend (replication, autovacuum or background worker)"
    OTHER_DATABASE = "session of another database"
    NOT_IN_TRANSACTION = "no longer in a transaction: it holds no lock any more"


def _matches(value: str | None, patterns: Sequence[str]) -> bool:
    return value is not None and any(fnmatchcase(value, pattern) for pattern in patterns)


def _old_enough(age: float | None, minimum: float) -> bool:
    return minimum <= 0 or (age is not None and age >= minimum)


@dataclass(frozen=True)
class Filters:
    """Which blockers the action may touch; the others are reported. Every filter must pass.

    Ages are seconds: `min_transaction_age` against xact_start (what makes an idle-in-transaction
    blocker dangerous), `min_query_age` against query_start (django-pgactivity's "duration").
    Include lists left empty include everyone; patterns are case-sensitive globs.
    """

    min_transaction_age: float = default("min_transaction_age")
    min_query_age: float = default("min_query_age")
    states: frozenset[BackendState] = frozenset()
    application_names: tuple[str, ...] = ()
    exclude_application_names: tuple[str, ...] = ()
    users: tuple[str, ...] = ()
    exclude_users: tuple[str, ...] = ()

    def spares(self, blocker: Blocker) -> Reason | None:
        """The reason a filter spares `blocker`, or None when the action may touch it."""
        if self.states and blocker.state not in self.states:
            return Reason.SPARED_STATE
        if not _old_enough(blocker.xact_age, self.min_transaction_age):
            return Reason.SPARED_TRANSACTION_AGE
        if not _old_enough(blocker.query_age, self.min_query_age):
            return Reason.SPARED_QUERY_AGE
        name = blocker.application_name
        if self.application_names and not _matches(name, self.application_names):
            return Reason.SPARED_APPLICATION
        if _matches(name, self.exclude_application_names):
            return Reason.SPARED_APPLICATION
        if self.users and not _matches(blocker.usename, self.users):
            return Reason.SPARED_USER
        if _matches(blocker.usename, self.exclude_users):
            return Reason.SPARED_USER
        return None


@dataclass(frozen=True)
class Decision:
    """The verdict on one blocker and why."""

    blocker: Blocker
    verdict: Verdict
    reason: Reason

    @property
    def acts(self) -> bool:
        """True when the proxy signals the blocker's backend."""
        return self.verdict in (Verdict.TERMINATE, Verdict.CANCEL)


def _untouchable(blocker: Blocker, database: str, protected: Collection[int]) -> Reason | None:
    """Why `blocker` is out of reach whatever the action, or None."""
    if blocker.pid in protected:
        return Reason.PROTECTED
    if blocker.datname != database:
        return Reason.OTHER_DATABASE
    if blocker.prepared_xact is not None:
        return Reason.PREPARED
    if blocker.pid <= 0:
        return Reason.NO_BACKEND
    if blocker.backend_type != CLIENT_BACKEND:
        return Reason.NOT_CLIENT_BACKEND
    if blocker.state is BackendState.IDLE:
        return Reason.NOT_IN_TRANSACTION  # its lock row was from a moment ago: gone now
    return None


_REPORT_ONLY = {
    BlockingAction.SHOW: Reason.ACTION_SHOW,
    BlockingAction.NONE: Reason.ACTION_NONE,
    BlockingAction.DRAIN: Reason.ACTION_DRAIN,  # the drain (guard/drain.py) applies drain_then
}


def _decide_one(
    blocker: Blocker,
    action: BlockingAction,
    filters: Filters,
    seen_for: float,
    cancel_grace: float,
) -> tuple[Verdict, Reason]:
    if action in _REPORT_ONLY:
        return Verdict.REPORT, _REPORT_ONLY[action]
    spared = filters.spares(blocker)
    if spared is not None:
        return Verdict.REPORT, spared
    if action is BlockingAction.TERMINATE:
        return Verdict.TERMINATE, Reason.ACTION
    if blocker.state is not None and blocker.state.idle_in_transaction:
        if seen_for >= cancel_grace:
            return Verdict.TERMINATE, Reason.ESCALATED
        return Verdict.REPORT, Reason.ESCALATION_PENDING
    return Verdict.CANCEL, Reason.ACTION


def decide(
    blockers: Iterable[Blocker],
    action: BlockingAction,
    filters: Filters,
    *,
    database: str,
    protected_pids: Collection[int],
    first_seen: Mapping[int, float],
    now: float,
    cancel_grace: float,
) -> list[Decision]:
    """One Decision per blocker, in order.

    Never acts on `protected_pids` (the statement's own backend, the admin connection, other
    guarded statements), on backends that are not client backends, on sessions of databases
    other than `database`, nor on prepared transactions (reported). CANCEL turns into TERMINATE
    for an idle-in-transaction blocker first seen (`first_seen[pid]`, same clock as `now`) at
    least `cancel_grace` seconds ago, and reports it until then; SHOW, NONE and DRAIN only
    report.
    """
    decisions = []
    for blocker in blockers:
        reason = _untouchable(blocker, database, protected_pids)
        if reason is Reason.PREPARED:
            decisions.append(Decision(blocker, Verdict.REPORT, reason))
        elif reason is not None:
            decisions.append(Decision(blocker, Verdict.SKIP, reason))
        else:
            seen_for = now - first_seen.get(blocker.pid, now)
            verdict, reason = _decide_one(blocker, action, filters, seen_for, cancel_grace)
            decisions.append(Decision(blocker, verdict, reason))
    return decisions
