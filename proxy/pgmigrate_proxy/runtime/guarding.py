"""The DDL pipeline's asyncio steps for one held unit: resolve, clear, forward, watch, retry.

The decisions (who is a blocker worth acting on, when to retry) are guard/'s pure
functions; this module only runs them against the admin connection and the session's own
server connection, and reports each step to the client (NoticeResponse) and the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import psycopg

from pgmigrate_proxy.admin import AdminConnection, AdminUnavailable
from pgmigrate_proxy.guard.blockers import Blocker
from pgmigrate_proxy.guard.policy import BlockingAction, Decision, Filters, Verdict, decide
from pgmigrate_proxy.guard.retry import RetrySchedule, is_retryable
from pgmigrate_proxy.protocol.extended import QueryResult
from pgmigrate_proxy.protocol.framing import Frame
from pgmigrate_proxy.protocol.messages import ErrorResponse
from pgmigrate_proxy.protocol.types import BackendType, TransactionStatus
from pgmigrate_proxy.settings import default
from pgmigrate_proxy.sql import LockMode, Statement, targets_query

log = logging.getLogger("pgmigrate_proxy.guard")

#: How long to wait for terminated or cancelled blockers to let go of their locks.
_RELEASE_SECONDS = 2.0
_RELEASE_POLL = 0.01
#: How often a held statement re-checks its blockers while it waits (blocking_action=show).
_SHOW_POLL = 0.1
#: How long a finished statement waits for the watch to complete (and report) an action.
_WATCH_FINISH = 1.0
#: Back-off while the admin connection is down: from 1 s, doubling, to 30 s.
_ADMIN_BACKOFF = 1.0
_ADMIN_BACKOFF_MAX = 30.0


@dataclass(frozen=True)
class GuardSettings:
    """What the pipeline needs from the Config, for one session."""

    action: BlockingAction = BlockingAction.TERMINATE
    filters: Filters = field(default_factory=Filters)
    schedule: RetrySchedule = field(default_factory=RetrySchedule)
    max_hold: float = default("max_hold")
    watch_interval: float = default("watch_interval")
    cancel_grace: float = default("cancel_grace")


@dataclass
class GuardServices:
    """Shared by every session of a server: the admin connection and who is in flight."""

    admin: AdminConnection | None
    in_flight: set[int] = field(default_factory=set)  # backends running guarded statements
    rng: random.Random = field(default_factory=random.Random)
    admin_down_until: float = 0.0  # while down, statements go out without looking for blockers
    admin_backoff: float = 0.0

    def usable_admin(self, now: float) -> AdminConnection | None:
        """The admin connection, unless it failed lately (then retried with backoff)."""
        return self.admin if now >= self.admin_down_until else None

    def admin_failed(self, now: float) -> bool:
        """Start or lengthen the back-off; True the first time (to warn once per outage)."""
        first = self.admin_backoff == 0.0
        self.admin_backoff = min(max(self.admin_backoff * 2, _ADMIN_BACKOFF), _ADMIN_BACKOFF_MAX)
        self.admin_down_until = now + self.admin_backoff
        return first

    def admin_ok(self) -> None:
        if self.admin_backoff:
            log.info("admin connection is back: blockers are looked for again")
        self.admin_backoff = 0.0


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
    executes: int = 0  # with expect 0: Executes whose last reply ends the unit

    @property
    def closes_batch(self) -> bool:
        """Ends with Sync (or is a Query): the connection is at a batch boundary after it."""
        return self.expect > 0


class GuardedSession(Protocol):
    """What the pipeline needs from the session it runs for."""

    @property
    def server_pid(self) -> int: ...
    @property
    def database(self) -> str: ...
    @property
    def status(self) -> TransactionStatus: ...
    @property
    def can_inject(self) -> bool: ...
    async def wait_idle(self) -> None: ...
    @property
    def gone(self) -> bool: ...
    async def inject(self, sql: str, params: Sequence[str | None] = ()) -> QueryResult: ...
    async def exchange(self, data: bytes, expect: int, executes: int = 0) -> list[Frame]: ...
    def known_targets(self, statements: Iterable[Statement]) -> dict[int, LockMode]: ...
    def remember_targets(
        self, statements: Iterable[Statement], targets: dict[int, LockMode]
    ) -> None: ...
    def deliver(self, frames: Iterable[Frame]) -> None: ...
    def notice(self, severity: str, message: str, detail: str | None = None) -> None: ...


async def run(
    session: GuardedSession, services: GuardServices, settings: GuardSettings, unit: HeldUnit
) -> None:
    """Take one held unit through the pipeline; the client gets exactly the replies of one run."""
    pipeline = _Pipeline(session, services, settings, unit)
    services.in_flight.add(session.server_pid)
    try:
        await pipeline.run()
    finally:
        services.in_flight.discard(session.server_pid)


class _Pipeline:
    """The state of one unit's trip through the pipeline."""

    def __init__(
        self,
        session: GuardedSession,
        services: GuardServices,
        settings: GuardSettings,
        unit: HeldUnit,
    ) -> None:
        self.session = session
        self.services = services
        self.settings = settings
        self.unit = unit
        self.loop = asyncio.get_running_loop()
        self.started = self.loop.time()
        self.targets: dict[int, LockMode] = {}
        self.first_seen: dict[int, float] = {}
        self.reported: set[tuple[int, Verdict]] = set()
        self.saved_lock_timeout: str | None = None

    def elapsed(self) -> float:
        return self.loop.time() - self.started

    async def run(self) -> None:
        await self.session.wait_idle()
        # The proxy's own queries need a batch boundary; after the unit there is one only
        # when the unit ends with Sync. Elsewhere (mid-batch) the targets come from when the
        # statement was prepared, and the statement goes out without a lock_timeout of ours.
        injecting = self.session.can_inject
        if injecting:
            await self._resolve()
            self.session.remember_targets(self.unit.statements, self.targets)
        else:
            self.targets = self.session.known_targets(self.unit.statements)
        injecting = injecting and self.unit.closes_batch
        # Only alone in its own implicit transaction: inside a transaction block, a failed
        # attempt aborts the client's transaction and a second one would only get 25P02.
        idle = self.session.status is TransactionStatus.IDLE
        retryable = self.unit.retryable and injecting and idle
        attempt = 0
        try:
            while not self.session.gone:
                attempt += 1
                if not await self._clear():
                    self._give_up()
                    return
                timeout_ms = self._timeout_ms(retryable)
                if injecting and timeout_ms is not None:
                    await self.session.inject(
                        "SELECT set_config('lock_timeout', $1, false)", [f"{timeout_ms}ms"]
                    )
                frames = await self._attempt()
                error = _error(frames)
                if error is None or not self._retry(error, retryable, attempt):
                    self._finished(frames, error, attempt)
                    return
                delay = self.settings.schedule.next_delay(
                    attempt, self.services.rng, elapsed=self.elapsed()
                )
                self.session.notice(
                    "NOTICE",
                    f"pgmigrate: lock not available ({error.message}); retrying in "
                    f"{delay * 1000:.0f} ms (attempt {attempt + 1})",
                )
                _event("retry", attempt=attempt, delay_ms=round(delay * 1000), code=error.code)
                await asyncio.sleep(delay)
        finally:
            await self._restore(injecting)

    # --- the steps -------------------------------------------------------------------------

    async def _resolve(self) -> None:
        """The targets, and the session's lock_timeout to put back afterwards."""
        result = await self.session.inject("SELECT current_setting('lock_timeout')")
        if result.rows:
            self.saved_lock_timeout = result.rows[0][0]
        self.targets = await resolve_targets(self.session, self.unit.statements)

    async def _clear(self) -> bool:
        """Act on the blockers until none is left to wait for; False: the budget is spent."""
        admin = self.services.usable_admin(self.loop.time())
        if admin is None and self.services.admin is not None and self.targets:
            self.session.notice(
                "WARNING", "pgmigrate: admin connection down: blocking sessions not looked for"
            )
        if admin is None or not self.targets:
            return True
        hold_until = self.started + self.settings.max_hold
        while True:
            try:
                blockers = await admin.find_blockers(
                    self.targets, self._protected(), database=self.session.database
                )
            except (AdminUnavailable, psycopg.Error) as exc:
                self._admin_lost(exc)
                return True
            self.services.admin_ok()
            decisions = self._decide(blockers)
            acted = await self._act(decisions)
            if acted:
                await self._wait_released(admin, acted)
                continue
            waiting = [d for d in decisions if d.verdict is Verdict.REPORT]
            if not waiting or self.settings.action is not BlockingAction.SHOW:
                return True
            if not self.settings.schedule.attempts_left(self.elapsed()):
                return False
            if self.loop.time() >= hold_until:
                return True  # held long enough: try with the short lock_timeout
            await asyncio.sleep(_SHOW_POLL)

    async def _attempt(self) -> list[Frame]:
        """Send the unit; while it runs, watch who blocks its backend and act on them."""
        done = asyncio.Event()
        watcher = self.loop.create_task(self._watch(done))
        try:
            unit = self.unit
            return await self.session.exchange(unit.data, unit.expect, unit.executes)
        finally:
            # The statement often completes *because* a blocker was just terminated: let the
            # watch finish that action and report it (cancelled mid-way, the blocker would be
            # gone without a notice or a log line), but not wait long for it.
            done.set()
            finished, _ = await asyncio.wait({watcher}, timeout=_WATCH_FINISH)
            if not finished:
                watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher

    async def _watch(self, done: asyncio.Event) -> None:
        """Until `done`: who blocks the statement's backend, acted on."""
        admin = self.services.usable_admin(self.loop.time())
        if admin is None:
            return
        pid = self.session.server_pid
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(done.wait(), self.settings.watch_interval)
            if done.is_set():
                return
            try:
                pids = [p for p in await admin.blocking_pids(pid) if p > 0]
                if pids and not done.is_set():
                    blockers = await admin.activity(pids)
                    if not done.is_set():  # finished meanwhile: they block nothing now
                        await self._act(self._decide(blockers))
            except (AdminUnavailable, psycopg.Error) as exc:
                self._admin_lost(exc)
                return

    async def _restore(self, injecting: bool) -> None:
        status = self.session.status
        if not injecting or self.session.gone or status is TransactionStatus.FAILED:
            return
        if self.saved_lock_timeout is not None:
            await self.session.inject(
                "SELECT set_config('lock_timeout', $1, false)", [self.saved_lock_timeout]
            )

    # --- decisions and actions ---------------------------------------------------------------

    def _protected(self) -> set[int]:
        protected = set(self.services.in_flight)
        protected.add(self.session.server_pid)
        admin = self.services.admin
        if admin is not None and admin.connected:
            protected.add(admin.pid)
        return protected

    def _decide(self, blockers: list[Blocker]) -> list[Decision]:
        now = self.loop.time()
        for blocker in blockers:
            self.first_seen.setdefault(blocker.pid, now)
        return decide(
            blockers,
            self.settings.action,
            self.settings.filters,
            database=self.session.database,
            protected_pids=self._protected(),
            first_seen=self.first_seen,
            now=now,
            cancel_grace=self.settings.cancel_grace,
        )

    async def _act(self, decisions: list[Decision]) -> list[int]:
        """Signal the blockers the decisions name; report each once; return who was signalled."""
        admin = self.services.admin
        acted: list[int] = []
        for decision in decisions:
            if decision.verdict is Verdict.SKIP:
                continue
            blocker = decision.blocker
            if decision.acts and admin is not None:
                signal = admin.terminate if decision.verdict is Verdict.TERMINATE else admin.cancel
                try:
                    if await signal(blocker.pid):
                        acted.append(blocker.pid)
                except (AdminUnavailable, psycopg.Error) as exc:
                    self._admin_lost(exc)
                    continue
            key = (blocker.pid, decision.verdict)
            if key not in self.reported:
                self.reported.add(key)
                self._report(decision)
        return acted

    async def _wait_released(self, admin: AdminConnection, pids: list[int]) -> None:
        """Poll until the signalled backends no longer block (or a short deadline)."""
        deadline = self.loop.time() + _RELEASE_SECONDS
        remaining = set(pids)
        while remaining and self.loop.time() < deadline:
            await asyncio.sleep(_RELEASE_POLL)
            try:
                still = await admin.find_blockers(
                    self.targets, self._protected(), database=self.session.database
                )
            except (AdminUnavailable, psycopg.Error):
                return
            remaining &= {b.pid for b in still}

    def _report(self, decision: Decision) -> None:
        blocker = decision.blocker
        verb = {
            Verdict.TERMINATE: "terminated",
            Verdict.CANCEL: "cancelled",
            Verdict.REPORT: "blocked by",
        }[decision.verdict]
        who = _describe(blocker)
        severity = "WARNING" if decision.acts else "NOTICE"
        self.session.notice(
            severity,
            f"pgmigrate: {verb} {who}",
            f"{decision.reason.value}; query: {blocker.query}" if blocker.query else None,
        )
        _event(
            verb.replace(" ", "_"),
            pid=blocker.pid,
            state=blocker.state.value if blocker.state else None,
            xact_age=_round(blocker.xact_age),
            query_age=_round(blocker.query_age),
            application_name=blocker.application_name,
            user=blocker.usename,
            query=blocker.query,
            context=dict(blocker.context) if blocker.context else None,
            reason=decision.reason.value,
            statement_pid=self.session.server_pid,
        )

    # --- outcomes ------------------------------------------------------------------------------

    def _timeout_ms(self, retryable: bool) -> int | None:
        """The lock_timeout of the next attempt: short when it can be redone, else the budget."""
        schedule = self.settings.schedule
        if retryable:
            return schedule.lock_timeout_ms(self.elapsed())
        remaining = schedule.remaining(self.elapsed())
        return None if math.isinf(remaining) else max(1, int(remaining * 1000))

    def _retry(self, error: ErrorResponse, retryable: bool, attempt: int) -> bool:
        if not retryable or not is_retryable(error.code):
            return False
        return self.settings.schedule.attempts_left(self.elapsed())

    def _finished(self, frames: list[Frame], error: ErrorResponse | None, attempts: int) -> None:
        outcome = "failed" if error is not None else "applied"
        _event(
            outcome,
            attempts=attempts,
            elapsed_ms=round(self.elapsed() * 1000),
            code=error.code if error is not None else None,
            statement=_summary(self.unit.statements),
        )
        if error is not None and is_retryable(error.code):
            # Before the replies: a notice after their ReadyForQuery would reach the client
            # between statements (unseen, or taken for the next statement's).
            self.session.notice(
                "WARNING",
                f"pgmigrate: lock budget spent after {attempts} attempt(s) "
                f"({self.elapsed():.1f} s)",
            )
        self.session.deliver(frames)

    def _give_up(self) -> None:
        """The budget ran out while waiting for blockers: answer 55P03 without sending."""
        message = (
            f"pgmigrate: lock budget of {self.settings.schedule.budget:g} s spent waiting for "
            "blocking sessions; the statement was not sent"
        )
        error = ErrorResponse.build("ERROR", "55P03", message)
        status = self.session.status
        after = TransactionStatus.FAILED if status is not TransactionStatus.IDLE else status
        frames = [Frame(BackendType.ERROR_RESPONSE, error.encode()[5:], 0)]
        frames += [Frame(BackendType.READY_FOR_QUERY, bytes([after]), 0)] * self.unit.expect
        self.session.deliver(frames)
        _event("gave_up", elapsed_ms=round(self.elapsed() * 1000))

    def _admin_lost(self, exc: Exception) -> None:
        if self.services.admin_failed(self.loop.time()):
            log.warning(
                "admin connection unavailable (%s): guarded statements go out with the short "
                "lock_timeout and retries only",
                exc,
            )
            self.session.notice(
                "WARNING", "pgmigrate: cannot look for blocking sessions (admin connection down)"
            )


async def resolve_targets(
    session: GuardedSession, statements: Iterable[Statement]
) -> dict[int, LockMode]:
    """The OIDs and lock modes of the statements' targets, with the session's own search_path
    (run on its own server connection, at a batch boundary)."""
    targets: dict[int, LockMode] = {}
    for statement in statements:
        query = targets_query(statement)
        if query is None:
            continue
        answer = await session.inject(query.sql, query.params)
        for target, relid in answer.rows:
            if target is None or relid is None:
                continue
            mode = query.modes[int(target)]
            oid = int(relid)
            if oid not in targets or mode > targets[oid]:
                targets[oid] = mode
    return targets


def _error(frames: list[Frame]) -> ErrorResponse | None:
    for item in frames:
        if item.type == BackendType.ERROR_RESPONSE:
            return ErrorResponse.decode(item.payload)
    return None


def _describe(blocker: Blocker) -> str:
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


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _event(event: str, **fields: object) -> None:
    """One structured log line per pipeline event."""
    shown = {k: v for k, v in fields.items() if v is not None}
    text = " ".join(f"{k}={v!r}" for k, v in shown.items())
    log.info("guard %s %s", event, text, extra={"fields": {"event": event, **shown}})
