"""The DDL pipeline for one held unit, as generators of steps: every rule lives here, every wait
is a step (guard/steps.py) that runtime/guarding.py's driver carries out, so the rules run in
tests under a fake clock against a scripted server and admin connection.

resolve, clear, forward, watch, retry, report: DESIGN.md section 4.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Generator, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from pgmigrate_proxy import notices
from pgmigrate_proxy.guard import drain
from pgmigrate_proxy.guard.blockers import Blocker
from pgmigrate_proxy.guard.policy import BlockingAction, Decision, Verdict, decide
from pgmigrate_proxy.guard.retry import is_retryable
from pgmigrate_proxy.guard.steps import (
    Activity,
    AdminDown,
    BlockingPids,
    Deliver,
    Event,
    FindBlockers,
    Inject,
    Notice,
    Now,
    Release,
    Replies,
    Send,
    Signal,
    Sleep,
    Step,
    WaiterOwns,
    WaitIdle,
)
from pgmigrate_proxy.guard.unit import UNRESOLVED, GuardSettings, HeldUnit, Resolution
from pgmigrate_proxy.protocol.extended import QueryResult
from pgmigrate_proxy.protocol.framing import Frame
from pgmigrate_proxy.protocol.messages import ErrorResponse
from pgmigrate_proxy.protocol.sqlstate import SqlState
from pgmigrate_proxy.protocol.types import BackendType, TransactionStatus
from pgmigrate_proxy.sql import DATABASE_OWNER_SQL, LockMode, Statement, targets_query

#: How long to wait for terminated or cancelled blockers to let go of their locks.
RELEASE_SECONDS = 2.0
RELEASE_POLL = 0.01
#: How often a held statement re-checks its blockers while it waits (blocking_action=show).
SHOW_POLL = 0.1
#: Back-off while the admin connection is down: from 1 s, doubling, to 30 s.
ADMIN_BACKOFF = 1.0
ADMIN_BACKOFF_MAX = 30.0
#: The client's role and whether it owns the database (see DATABASE_OWNER_SQL).
WHO_AM_I = f"SELECT oid, ({DATABASE_OWNER_SQL}) FROM pg_roles WHERE rolname = current_user"
LOCK_TIMEOUT_QUERY = "SELECT current_setting('lock_timeout')"
SET_LOCK_TIMEOUT = "SELECT set_config('lock_timeout', $1, false)"

Steps = Generator[Step, Any, Any]


@dataclass
class AdminHealth:
    """Shared by every session of a server: whether the admin connection is there and usable.

    While it is down, statements go out without looking for blockers (never held waiting for
    it); it is tried again after a back-off that doubles with each failure seen.
    """

    present: bool = True  # an admin connection is configured
    down_until: float = 0.0
    backoff: float = 0.0
    reason: str | None = None

    def usable(self, now: float) -> bool:
        return self.present and now >= self.down_until

    def failed(self, now: float, reason: str) -> bool:
        """Start or lengthen the back-off; True the first time (to warn once per outage)."""
        first = self.backoff == 0.0
        self.backoff = min(max(self.backoff * 2, ADMIN_BACKOFF), ADMIN_BACKOFF_MAX)
        self.down_until = now + self.backoff
        self.reason = reason
        return first

    def ok(self) -> bool:
        """The admin connection answered; True when it had been down."""
        was_down = self.backoff != 0.0
        self.backoff, self.reason = 0.0, None
        return was_down


@dataclass
class GuardContext:
    """What a pipeline shares with the others of its server."""

    health: AdminHealth = field(default_factory=AdminHealth)
    in_flight: set[int] = field(default_factory=set)  # backends running guarded statements
    admin_pid: int = 0  # the admin session's backend, never acted on
    rng: random.Random = field(default_factory=random.Random)
    units: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    #: The units in the pipeline now, by unit id (the admin console's SHOW HELD reads them).
    held: dict[int, Pipeline] = field(default_factory=dict)
    #: Units the admin console released (RELEASE id): sent without waiting for blockers.
    released: set[int] = field(default_factory=set)


class SessionView(Protocol):
    """What the pipeline reads of the session it runs for (reading is not waiting)."""

    @property
    def server_pid(self) -> int: ...
    @property
    def database(self) -> str: ...
    @property
    def status(self) -> TransactionStatus: ...
    @property
    def can_inject(self) -> bool: ...
    @property
    def gone(self) -> bool: ...
    def known_targets(self, statements: Iterable[Statement]) -> Resolution: ...
    def remember_targets(self, statements: Iterable[Statement], resolved: Resolution) -> None: ...


def resolve(statements: Iterable[Statement]) -> Steps:
    """-> Resolution: the statements' targets (OIDs and modes, with the session's own
    search_path) and whether the client has the rights to take those locks, asked on its own
    server connection at a batch boundary, as the client (with its privileges, no one else's)."""
    who: QueryResult = yield Inject(WHO_AM_I)
    if who.error is not None or not who.rows or who.rows[0][0] is None:
        return UNRESOLVED
    viewer = int(who.rows[0][0])
    database_owner = who.rows[0][1] == "t"
    targets: dict[int, LockMode] = {}
    permitted = True
    for statement in statements:
        if statement.unknown_targets and not database_owner:
            permitted = False
        query = targets_query(statement)
        if query is None:
            continue
        answer: QueryResult = yield Inject(query.sql, query.params)
        permitted = permitted and answer.error is None
        for target, relid, allowed in answer.rows:
            if target is None or relid is None:
                continue
            permitted = permitted and allowed == "t"
            mode = query.modes[int(target)]
            oid = int(relid)
            targets[oid] = max(mode, targets.get(oid, mode))
    return Resolution(targets, permitted, viewer)


class Pipeline:
    """One unit's trip: `steps()` is the generator; the rest are its parts."""

    def __init__(
        self,
        view: SessionView,
        context: GuardContext,
        settings: GuardSettings,
        unit: HeldUnit,
        client: Mapping[str, object] | None = None,
    ) -> None:
        self.view = view
        self.context = context
        self.settings = settings
        self.unit = unit
        self.client = client or {}  # who sent it (user, application_name, ...), for the events
        self.unit_id = next(context.units)  # with statement_pid, ties a unit's events together
        self.started = 0.0
        self.blocked_seen: float | None = None  # when the in-flight watch last saw it blocked
        self.resolution = UNRESOLVED
        self.first_seen: dict[int, float] = {}
        self.reported: set[tuple[int, Verdict]] = set()
        self.found: list[int] = []  # the blockers last announced ("blockers" event)
        self.saved_lock_timeout: str | None = None
        self.scope: drain.DrainScope | None = None  # what a drain holds (blocking_action drain)
        self.give_up_message: str | None = None
        self.armed = False  # a drain's rule is armed on the gate: Release it after the attempt
        self.attempt = 0  # the attempt on the server now (0: held, not sent)

    def event(self, name: str, fields: Mapping[str, object], level: str = "INFO") -> Event:
        """A guard event of this unit: `unit` and `statement_pid` tie a unit's events together
        (in the log, the migration report, the admin console)."""
        tags = {"unit": self.unit_id, "statement_pid": self.view.server_pid}
        return Event(name, {**fields, **tags}, level)

    def steps(self) -> Steps:
        self.context.held[self.unit_id] = self
        try:
            yield from self._steps()
        finally:
            self.context.held.pop(self.unit_id, None)
            self.context.released.discard(self.unit_id)

    def _steps(self) -> Steps:
        self.started = yield Now()
        yield self.event(
            "held",
            {
                "statement": _summary(self.unit.statements),
                "relations": _relations(self.unit.statements),
                "database": self.view.database,
                "action": self.settings.action.value,
                **self.client,
            },
        )
        yield WaitIdle()
        # The proxy's own queries need a batch boundary; after the unit there is one only
        # when the unit ends with Sync. Elsewhere (mid-batch) the targets come from when the
        # statement was prepared, and the statement goes out without a lock_timeout of ours.
        injecting = self.view.can_inject
        if injecting:
            current: QueryResult = yield Inject(LOCK_TIMEOUT_QUERY)
            if current.rows:
                self.saved_lock_timeout = current.rows[0][0]
            self.resolution = yield from resolve(self.unit.statements)
            self.view.remember_targets(self.unit.statements, self.resolution)
            draining = self.settings.action is BlockingAction.DRAIN
            if draining and self.resolution.permitted and self.resolution.targets:
                targets = self.resolution.targets
                self.scope = yield from drain.load_scope(self.view.database, targets)
        else:
            self.resolution = self.view.known_targets(self.unit.statements)
        if self.resolution.resolved and not self.resolution.permitted:
            yield from self._untouched()
            return
        injecting = injecting and self.unit.closes_batch
        # Only alone in its own implicit transaction: inside a transaction block, a failed
        # attempt aborts the client's transaction and a second one would only get 25P02.
        idle = self.view.status is TransactionStatus.IDLE
        retryable = self.unit.retryable and injecting and idle
        copying = yield from self._attempts(injecting, retryable)
        saved = self.saved_lock_timeout
        # (a unit that ends in COPY FROM STDIN left the server reading the client's data: no
        # query of ours fits in there, the session keeps the attempt's lock_timeout)
        restore = injecting and saved is not None and not self.view.gone and not copying
        if restore and self.view.status is not TransactionStatus.FAILED:
            yield Inject(SET_LOCK_TIMEOUT, [saved])

    def _attempts(self, injecting: bool, retryable: bool) -> Steps:
        """-> True when the unit's replies end with the server waiting for COPY data."""
        attempt = 0
        while not self.view.gone:
            attempt += 1
            cleared = yield from self._clear()
            if not cleared or self.view.gone:
                yield from self._release()
            if not cleared:
                yield from self._give_up(attempt - 1)
                return
            if self.view.gone:
                # the client left while its statement was held: it is never sent
                yield self.event("dropped", {"attempts": attempt - 1})
                return
            timeout_ms = yield from self._timeout_ms(retryable)
            if injecting and timeout_ms is not None:
                yield Inject(SET_LOCK_TIMEOUT, [f"{timeout_ms}ms"])
            sent: float = yield Now()
            self.blocked_seen = None
            self.attempt = attempt
            frames = yield from self._attempt()
            yield from self._release()  # a drain's held statements go on, whatever the result
            self.attempt = 0
            error = _error(frames)
            elapsed = yield from self._elapsed()
            took = self.started + elapsed - sent
            yield self._attempt_event(attempt, timeout_ms, sent, took, error)
            schedule = self.settings.schedule
            again = retryable and error is not None and is_retryable(error.code)
            if error is None or not again or not schedule.attempts_left(elapsed):
                yield from self._finished(frames, error, attempt)
                return bool(frames) and frames[-1].type in _COPY_IN
            delay = schedule.next_delay(attempt, self.context.rng, elapsed=elapsed)
            delay_ms = round(delay * 1000)
            yield Notice("NOTICE", notices.retrying(error.message, delay_ms, attempt + 1))
            retry = {"attempt": attempt, "delay_ms": delay_ms, "code": error.code}
            yield self.event("retry", retry)
            yield Sleep(delay)

    def _elapsed(self) -> Steps:
        now: float = yield Now()
        return now - self.started

    def _attempt_event(
        self,
        attempt: int,
        timeout_ms: int | None,
        sent: float,
        took: float,
        error: ErrorResponse | None,
    ) -> Event:
        """One attempt: its lock wait (the whole attempt when it ended waiting for a lock, else
        until the in-flight watch last saw it blocked: a lower bound, by one watch_interval at
        most) and the rest, its run time."""
        if error is not None and is_retryable(error.code):
            waited = took
        elif self.blocked_seen is not None:
            waited = min(took, self.blocked_seen - sent)
        else:
            waited = 0.0
        return self.event(
            "attempt",
            {
                "attempt": attempt,
                "lock_timeout_ms": timeout_ms,
                "lock_wait_ms": round(waited * 1000),
                "run_ms": round((took - waited) * 1000),
                "code": error.code if error is not None else None,
            },
        )

    # --- the steps -------------------------------------------------------------------------

    def _untouched(self) -> Steps:
        """The client may not run the statement: send it as it came, once, with no lock_timeout
        of the proxy's and no blocker looked for, and let PostgreSQL answer it (it checks the
        rights before it queues for the lock)."""
        unit = self.unit
        yield Send(unit.data)
        frames: list[Frame] = yield Replies(None)
        reason = "the client lacks the rights to run it"
        yield self.event("not_guarded", {"reason": reason})
        yield Deliver(tuple(frames))

    def _admin_usable(self) -> Steps:
        now: float = yield Now()
        return self.context.health.usable(now)

    def _clear(self) -> Steps:
        """Act on the blockers until none is left to wait for; False: the budget is spent."""
        usable = yield from self._admin_usable()
        targets = self.resolution.targets
        if not usable and self.context.health.present and targets:
            yield Notice("WARNING", notices.admin_down(self.context.health.reason))
        if not usable or not targets:
            return True
        if self.settings.action is BlockingAction.DRAIN:
            return (yield from self._drain())
        hold_until = self.started + self.settings.max_hold
        while not self.view.gone:
            if self.unit_id in self.context.released:
                return True  # the admin console's RELEASE: send it now
            try:
                blockers = yield self._find_blockers()
            except AdminDown as exc:
                yield from self._admin_lost(exc)
                return True
            if self.context.health.ok():
                yield Event("admin_back", {}, "INFO")
            decisions = yield from self._decide(blockers)
            yield from self._announce(decisions)
            acted = yield from self._act(decisions)
            if acted is None:
                return True  # the admin connection went down while acting
            if acted:
                yield from self._wait_released(acted)
                continue
            waiting = [d for d in decisions if d.verdict is Verdict.REPORT]
            if not waiting or self.settings.action is not BlockingAction.SHOW:
                return True
            now: float = yield Now()
            if not self.settings.schedule.attempts_left(now - self.started):
                return False
            if now >= hold_until or self.unit_id in self.context.released:
                return True  # held long enough (or released): try with the short lock_timeout
            yield Sleep(SHOW_POLL)
        return True

    def _announce(self, decisions: list[Decision]) -> Steps:
        """The "blockers" event, when the blockers found differ from those last announced
        (before anything is done to them), with the targets they block."""
        pids = sorted({d.blocker.pid for d in decisions if d.verdict is not Verdict.SKIP})
        if pids and pids != self.found:
            self.found = pids
            targets = {str(oid): mode.name for oid, mode in self.resolution.targets.items()}
            yield self.event("blockers", {"pids": pids, "count": len(pids), "targets": targets})

    def _drain(self) -> Steps:
        """blocking_action = drain (guard/drain.py); False: give up (drain_then = give_up)."""
        view, settings = self.view, self.settings
        outcome, self.armed = yield from drain.drain(
            self, settings.drain, self.resolution.targets, self.scope, view.server_pid,
            view.database, settings.watch_interval, settings.schedule.lock_timeout,
        )  # fmt: skip
        if outcome is drain.Outcome.GIVE_UP:
            self.give_up_message = notices.drain_gave_up(settings.drain.timeout)
            return False
        return True

    def _release(self) -> Steps:
        if self.armed:
            self.armed = False
            yield Release()

    # what guard/drain.py uses of the pipeline (drain.Host)

    def find_blockers(self) -> FindBlockers:
        return self._find_blockers()

    def decide_as(self, blockers: list[Blocker], action: BlockingAction) -> Steps:
        return self._decide(blockers, action)

    def act(self, decisions: list[Decision]) -> Steps:
        return self._act(decisions)

    def wait_released(self, pids: list[int]) -> Steps:
        return self._wait_released(pids)

    def admin_lost(self, exc: Exception) -> Steps:
        return self._admin_lost(exc)

    def budget_left(self, now: float) -> bool:
        return self.settings.schedule.attempts_left(now - self.started)

    @property
    def gone(self) -> bool:
        return self.view.gone

    def _find_blockers(self) -> FindBlockers:
        view = self.view
        return FindBlockers(
            self.resolution.targets, self._protected(), view.database, self.resolution.viewer
        )

    def _attempt(self) -> Steps:
        """Send the unit; until its replies are in, watch who blocks its backend and act."""
        unit = self.unit
        yield Send(unit.data)
        watching = yield from self._admin_usable()
        while watching:
            frames: list[Frame] | None = yield Replies(self.settings.watch_interval)
            if frames is not None:
                return frames
            try:
                looked = yield from self._watch_once()
            except AdminDown as exc:
                yield from self._admin_lost(exc)
                looked = False
            if isinstance(looked, list):
                return looked
            watching = looked
        return (yield Replies(None))

    def _watch_once(self) -> Steps:
        """One look at who blocks the statement's backend, acted on. -> True to go on watching,
        False to stop, or the unit's replies when it completed meanwhile."""
        pid = self.view.server_pid
        pids = [p for p in (yield BlockingPids(pid)) if p > 0]
        if not pids:
            return True
        self.blocked_seen = yield Now()
        viewer = self.resolution.viewer
        if not self.resolution.resolved:
            viewer, owns = yield WaiterOwns(pid)
            if not owns:
                return True  # nothing is done for a client about locks it may not take
        blockers = yield Activity(tuple(pids), viewer)
        frames: list[Frame] | None = yield Replies(0)
        if frames is not None:
            return frames  # it finished meanwhile: they block nothing now
        decisions = yield from self._decide(blockers)
        yield from self._announce(decisions)
        return (yield from self._act(decisions)) is not None

    # --- decisions and actions ---------------------------------------------------------------

    def _protected(self) -> frozenset[int]:
        context = self.context
        return frozenset({*context.in_flight, self.view.server_pid, context.admin_pid})

    def _decide(self, blockers: list[Blocker], action: BlockingAction | None = None) -> Steps:
        now: float = yield Now()
        for blocker in blockers:
            self.first_seen.setdefault(blocker.pid, now)
        return decide(
            blockers,
            action or self.settings.action,
            self.settings.filters,
            database=self.view.database,
            protected_pids=self._protected(),
            first_seen=self.first_seen,
            now=now,
            cancel_grace=self.settings.cancel_grace,
        )

    def _act(self, decisions: list[Decision]) -> Steps:
        """-> the pids signalled, or None when the admin connection went down meanwhile.
        Each decision is reported once."""
        acted: list[int] = []
        for decision in decisions:
            if decision.verdict is Verdict.SKIP:
                continue
            blocker = decision.blocker
            if decision.acts:
                try:
                    if (yield Signal(blocker.pid, decision.verdict)):
                        acted.append(blocker.pid)
                except AdminDown as exc:
                    yield from self._admin_lost(exc)
                    return None
            key = (blocker.pid, decision.verdict)
            if key not in self.reported:
                self.reported.add(key)
                yield from self._report(decision)
        return acted

    def _wait_released(self, pids: list[int]) -> Steps:
        """Poll until the signalled backends no longer block (or a short deadline)."""
        now: float = yield Now()
        deadline = now + RELEASE_SECONDS
        remaining = set(pids)
        while remaining and now < deadline:
            yield Sleep(RELEASE_POLL)
            try:
                still: list[Blocker] = yield self._find_blockers()
            except AdminDown:
                return
            remaining &= {b.pid for b in still}
            now = yield Now()

    def _report(self, decision: Decision) -> Steps:
        blocker = decision.blocker
        verb = _VERBS[decision.verdict]
        seen = blocker.as_seen()  # what the client's role may see of it in pg_stat_activity
        severity = "WARNING" if decision.acts else "NOTICE"
        detail = f"{decision.reason.value}; query: {seen.query}" if seen.query else None
        yield Notice(severity, notices.blocker(verb, describe(seen)), detail)
        yield self.event(
            verb.replace(" ", "_"),
            {
                "pid": blocker.pid,
                "state": blocker.state.value if blocker.state else None,
                "xact_age": _round(blocker.xact_age),
                "query_age": _round(blocker.query_age),
                "application_name": blocker.application_name,
                "user": blocker.usename,
                "query": blocker.query,
                "context": dict(blocker.context) if blocker.context else None,
                "reason": decision.reason.value,
                "visible": None if blocker.visible else False,  # to the client's role
                "statement_pid": self.view.server_pid,
            },
        )

    # --- outcomes ------------------------------------------------------------------------------

    def _timeout_ms(self, retryable: bool) -> Steps:
        """The lock_timeout of the next attempt: short when it can be redone, else the budget."""
        elapsed = yield from self._elapsed()
        schedule = self.settings.schedule
        if retryable:
            return schedule.lock_timeout_ms(elapsed)
        remaining = schedule.remaining(elapsed)
        return None if math.isinf(remaining) else max(1, int(remaining * 1000))

    def _finished(self, frames: list[Frame], error: ErrorResponse | None, attempts: int) -> Steps:
        elapsed = yield from self._elapsed()
        fields = {
            "attempts": attempts,
            "elapsed_ms": round(elapsed * 1000),
            "code": error.code if error is not None else None,
            "statement": _summary(self.unit.statements),
        }
        yield self.event("failed" if error is not None else "applied", fields)
        if error is not None and is_retryable(error.code):
            # Before the replies: a notice after their ReadyForQuery would reach the client
            # between statements (unseen, or taken for the next statement's).
            yield Notice("WARNING", notices.budget_spent(attempts, elapsed))
        yield Deliver(tuple(frames))

    def _give_up(self, attempts: int) -> Steps:
        """The budget ran out while waiting for blockers: answer 55P03 without sending."""
        message = self.give_up_message or notices.gave_up(self.settings.schedule.budget)
        error = ErrorResponse.build("ERROR", SqlState.LOCK_NOT_AVAILABLE, message)
        status = self.view.status
        after = TransactionStatus.FAILED if status is not TransactionStatus.IDLE else status
        frames = [Frame(BackendType.ERROR_RESPONSE, error.encode()[5:], 0)]
        frames += [Frame(BackendType.READY_FOR_QUERY, bytes([after]), 0)] * self.unit.expect
        elapsed = yield from self._elapsed()
        fields = {"attempts": attempts, "elapsed_ms": round(elapsed * 1000)}
        # (before the replies, as a notice of it reaches a client that asked for events)
        yield self.event("gave_up", {**fields, "code": SqlState.LOCK_NOT_AVAILABLE.value})
        yield Deliver(tuple(frames))

    def _admin_lost(self, exc: Exception) -> Steps:
        now: float = yield Now()
        reason = str(exc) or type(exc).__name__
        if self.context.health.failed(now, reason):
            yield Event(
                "admin_down",
                {"reason": reason, "then": "guarded statements use lock_timeout and retries only"},
                "WARNING",
            )
            yield Notice("WARNING", notices.admin_down(reason))


def run(
    view: SessionView,
    context: GuardContext,
    settings: GuardSettings,
    unit: HeldUnit,
    client: Mapping[str, object] | None = None,
) -> Steps:
    """The pipeline's steps for one unit; the client gets exactly the replies of one run."""
    return Pipeline(view, context, settings, unit, client).steps()


_COPY_IN = (BackendType.COPY_IN_RESPONSE, BackendType.COPY_BOTH_RESPONSE)
_VERBS = {
    Verdict.TERMINATE: notices.TERMINATED,
    Verdict.CANCEL: notices.CANCELLED,
    Verdict.REPORT: notices.BLOCKED_BY,
}


def _error(frames: list[Frame]) -> ErrorResponse | None:
    for item in frames:
        if item.type == BackendType.ERROR_RESPONSE:
            return ErrorResponse.decode(item.payload)
    return None


def describe(blocker: Blocker) -> str:
    """A blocker in one line, as the notices say it."""
    if blocker.prepared_xact is not None:
        return f"prepared transaction {blocker.prepared_xact!r}"
    parts = [f"pid {blocker.pid}"]
    if blocker.state is not None:
        parts.append(blocker.state.value)
    age = blocker.xact_age if blocker.xact_age is not None else blocker.query_age
    if age is not None:
        parts.append(f"for {age:.1f} s")
    if blocker.application_name:
        parts.append(f"application_name {blocker.application_name!r}")
    if blocker.usename:
        parts.append(f"user {blocker.usename!r}")
    if blocker.context:
        parts.append(f"context {dict(blocker.context)}")
    return ", ".join(parts)


def _summary(statements: tuple[Statement, ...]) -> str:
    return "; ".join(s.text[:120] for s in statements)


def _relations(statements: tuple[Statement, ...]) -> list[str]:
    """The relations the statements lock, as written, with the mode each needs."""
    names = {f"{lock.relation} ({lock.mode.name})": None for s in statements for lock in s.locks}
    return list(names)


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)
