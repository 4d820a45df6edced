"""The DDL pipeline's rules under a fake clock: a scripted server connection (attempts that
succeed or fail with a SQLSTATE after some time) and a scripted admin connection (blockers,
outages). No sockets, no sleeps: each test runs in microseconds and asserts on exact times."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import pytest
from pgmigrate_proxy import notices
from pgmigrate_proxy.guard import pipeline
from pgmigrate_proxy.guard.blockers import BackendState, Blocker
from pgmigrate_proxy.guard.pipeline import (
    LOCK_TIMEOUT_QUERY,
    SET_LOCK_TIMEOUT,
    WHO_AM_I,
    AdminHealth,
    GuardContext,
)
from pgmigrate_proxy.guard.policy import BlockingAction, Verdict
from pgmigrate_proxy.guard.retry import RetrySchedule
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
    Replies,
    Send,
    Signal,
    Sleep,
    WaiterOwns,
    WaitIdle,
)
from pgmigrate_proxy.guard.unit import UNRESOLVED, GuardSettings, HeldUnit, Resolution
from pgmigrate_proxy.protocol.extended import QueryResult
from pgmigrate_proxy.protocol.framing import Frame
from pgmigrate_proxy.protocol.messages import ErrorResponse
from pgmigrate_proxy.protocol.types import BackendType, TransactionStatus
from pgmigrate_proxy.sql import Statement, classify

PID = 100
TABLE = 500
ALTER = classify("ALTER TABLE t ADD COLUMN c int")[0]


def ok_frames() -> list[Frame]:
    return [
        Frame(BackendType.COMMAND_COMPLETE, b"ALTER TABLE\x00", 0),
        Frame(BackendType.READY_FOR_QUERY, b"I", 0),
    ]


def error_frames(code: str) -> list[Frame]:
    error = ErrorResponse.build("ERROR", code, f"error {code}")
    return [
        Frame(BackendType.ERROR_RESPONSE, error.encode()[5:], 0),
        Frame(BackendType.READY_FOR_QUERY, b"I", 0),
    ]


def blocker(pid: int, state: BackendState = BackendState.IDLE_IN_TRANSACTION) -> Blocker:
    return Blocker(pid=pid, state=state, datname="app", usename="app", query="SELECT 1")


@dataclass
class View:
    """The session as the pipeline reads it."""

    server_pid: int = PID
    database: str = "app"
    status: TransactionStatus = TransactionStatus.IDLE
    can_inject: bool = True
    gone: bool = False
    remembered: dict[str, Resolution] = field(default_factory=dict)

    def known_targets(self, statements: Iterable[Statement]) -> Resolution:
        found = [self.remembered.get(s.text) for s in statements]
        if any(r is None for r in found):
            return UNRESOLVED
        return Resolution.merge(r for r in found if r is not None)

    def remember_targets(self, statements: Iterable[Statement], resolved: Resolution) -> None:
        for statement in statements:
            self.remembered[statement.text] = resolved


@dataclass
class Fake:
    """The server, the admin connection and the clock, scripted.

    `attempts`: per attempt, (seconds it takes, SQLSTATE or None for success); the last one
    repeats. `blockers(now)`: who FindBlockers finds; signalled pids vanish. `admin_down(now)`:
    whether admin steps fail at that time. `allowed`: the rights answer of the targets query.
    """

    attempts: list[tuple[float, str | None]] = field(default_factory=lambda: [(0.01, None)])
    blockers: Callable[[float], list[Blocker]] = lambda now: []
    blocking: Callable[[float], list[int]] = lambda now: []
    admin_down: Callable[[float], bool] = lambda now: False
    allowed: bool = True
    owns: bool = True
    now: float = 0.0
    steps: list[Any] = field(default_factory=list)
    signalled: list[tuple[int, Verdict]] = field(default_factory=list)
    sent: int = 0
    _done_at: float = 0.0
    _result: list[Frame] = field(default_factory=list)

    def run(self, steps: Any) -> Any:
        reply: Any = None
        failure: Exception | None = None
        while True:
            try:
                step = steps.throw(failure) if failure else steps.send(reply)
            except StopIteration as stop:
                return stop.value
            self.steps.append(step)
            reply, failure = None, None
            try:
                reply = self.answer(step)
            except AdminDown as exc:
                failure = exc

    def answer(self, step: Any) -> Any:
        admin = (FindBlockers, BlockingPids, Activity, WaiterOwns, Signal)
        if isinstance(step, admin) and self.admin_down(self.now):
            raise AdminDown("connection refused")
        match step:
            case Now():
                return self.now
            case Sleep(seconds=seconds):
                self.now += seconds
                return None
            case WaitIdle() | Notice() | Deliver() | Event():
                return None
            case Inject(sql=sql):
                return self.inject(sql)
            case Send():
                took, code = self.attempts[min(self.sent, len(self.attempts) - 1)]
                timeouts = self.timeouts()
                if code == "55P03" and timeouts:  # a lock wait ends at the lock_timeout
                    took = int(timeouts[-1].removesuffix("ms")) / 1000
                self.sent += 1
                self._done_at = self.now + took
                self._result = ok_frames() if code is None else error_frames(code)
                return None
            case Replies(timeout=timeout):
                if timeout is None or self.now + timeout >= self._done_at:
                    self.now = max(self.now, self._done_at)
                    return self._result
                self.now += timeout
                return None
            case FindBlockers(protected=protected):
                gone = {pid for pid, _ in self.signalled}
                return [
                    b for b in self.blockers(self.now) if b.pid not in gone | set(protected)
                ]
            case BlockingPids():
                gone = {pid for pid, _ in self.signalled}
                return [p for p in self.blocking(self.now) if p not in gone]
            case Activity(pids=pids):
                return [blocker(pid) for pid in pids]
            case WaiterOwns():
                return (10, self.owns)
            case Signal(pid=pid, verdict=verdict):
                self.signalled.append((pid, verdict))
                return True
        raise AssertionError(step)

    def inject(self, sql: str) -> QueryResult:
        if sql == WHO_AM_I:
            return QueryResult(rows=[("10", "f")])
        if sql == LOCK_TIMEOUT_QUERY:
            return QueryResult(rows=[("0",)])
        if sql == SET_LOCK_TIMEOUT:
            return QueryResult(rows=[("",)])
        return QueryResult(rows=[("0", str(TABLE), "t" if self.allowed else "f")])

    # --- what happened ----------------------------------------------------------------------

    def of(self, kind: type) -> list[Any]:
        return [s for s in self.steps if isinstance(s, kind)]

    def delivered(self) -> list[Frame]:
        return [f for d in self.of(Deliver) for f in d.frames]

    def codes(self) -> list[str]:
        return [
            ErrorResponse.decode(f.payload).code
            for f in self.delivered()
            if f.type == BackendType.ERROR_RESPONSE
        ]

    def notices(self) -> list[str]:
        return [n.message for n in self.of(Notice)]

    def timeouts(self) -> list[str]:
        return [s.params[0] for s in self.of(Inject) if s.sql == SET_LOCK_TIMEOUT]


def settings(**changes: Any) -> GuardSettings:
    schedule = RetrySchedule(
        budget=changes.pop("budget", 1.0),
        lock_timeout=changes.pop("lock_timeout", 0.05),
        base_delay=0.05,
        max_delay=0.4,
        jitter=0.0,
    )
    return GuardSettings(schedule=schedule, **changes)


def run(
    fake: Fake,
    guard: GuardSettings | None = None,
    *,
    view: View | None = None,
    context: GuardContext | None = None,
    retryable: bool = True,
) -> View:
    view = view or View()
    unit = HeldUnit(b"Q...", (ALTER,), expect=1, retryable=retryable)
    context = context or GuardContext(rng=random.Random(0))
    fake.run(pipeline.run(view, context, guard or settings(), unit))
    return view


# --- retries and the budget ---------------------------------------------------------------------


def test_success_on_the_first_attempt_sets_then_restores_lock_timeout() -> None:
    fake = Fake()
    run(fake)
    assert fake.sent == 1
    assert fake.timeouts() == ["50ms", "0"]  # the attempt's, then the session's own back
    assert [f.type for f in fake.delivered()] == [BackendType.COMMAND_COMPLETE, 0x5A]


def test_lock_timeouts_are_retried_with_backoff_until_success() -> None:
    fake = Fake(attempts=[(0.05, "55P03"), (0.05, "40P01"), (0.01, None)])
    run(fake)
    assert fake.sent == 3
    assert [s.seconds for s in fake.of(Sleep)] == [0.05, 0.1]  # exponential, no jitter
    retries = [m for m in fake.notices() if "retrying" in m]
    assert retries == [
        notices.retrying("error 55P03", 50, 2),
        notices.retrying("error 40P01", 100, 3),
    ]
    assert fake.codes() == []  # the client sees only the successful attempt's replies


def test_the_budget_ends_the_retries_with_the_last_55P03() -> None:
    fake = Fake(attempts=[(0.05, "55P03")])
    run(fake, settings(budget=0.5))
    assert fake.codes() == ["55P03"]
    assert fake.now <= 0.5 + 1e-9  # attempts and sleeps never run past the budget
    assert any(m.startswith("pgmigrate: lock budget spent after") for m in fake.notices())
    assert fake.timeouts()[-2] != "50ms"  # the last attempt is cut to what is left


@pytest.mark.parametrize("code", ["57014", "42501", "23505"])
def test_other_errors_are_not_retried(code: str) -> None:
    fake = Fake(attempts=[(0.01, code)])
    run(fake)
    assert fake.sent == 1 and fake.codes() == [code]


def test_inside_a_transaction_block_one_attempt_with_the_whole_budget() -> None:
    fake = Fake(attempts=[(0.05, "55P03")])
    run(fake, settings(budget=2.0), view=View(status=TransactionStatus.IN_TRANSACTION))
    assert fake.sent == 1
    assert fake.timeouts()[0] == "2000ms"


# --- blockers ---------------------------------------------------------------------


def test_blockers_are_terminated_before_the_statement_is_sent() -> None:
    fake = Fake(blockers=lambda now: [blocker(7), blocker(8)])
    run(fake)
    assert fake.signalled == [(7, Verdict.TERMINATE), (8, Verdict.TERMINATE)]
    sent_at = fake.steps.index(fake.of(Send)[0])
    assert all(fake.steps.index(s) < sent_at for s in fake.of(Signal))
    assert notices.blocker(notices.TERMINATED, "pid 7, idle in transaction, user 'app'") in (
        fake.notices()
    )


def test_cancel_escalates_to_terminate_after_the_grace_period() -> None:
    """An idle-in-transaction blocker cannot be cancelled: reported until cancel_grace, then
    terminated (time measured from when it was first seen)."""
    fake = Fake(blockers=lambda now: [blocker(7)], attempts=[(0.05, "55P03")])
    guard = settings(action=BlockingAction.CANCEL, cancel_grace=0.3, budget=2.0)
    run(fake, guard)
    assert fake.signalled == [(7, Verdict.TERMINATE)]
    terminate_at = fake.steps.index(fake.of(Signal)[0])
    clock = [s for s in fake.steps[:terminate_at] if isinstance(s, Sleep)]
    assert sum(s.seconds for s in clock) >= 0.3 - 1e-9
    active = Fake(blockers=lambda now: [blocker(9, BackendState.ACTIVE)])
    run(active, settings(action=BlockingAction.CANCEL))
    assert active.signalled == [(9, Verdict.CANCEL)]


def test_show_holds_until_the_blocker_leaves() -> None:
    fake = Fake(blockers=lambda now: [blocker(7)] if now < 0.35 else [])
    run(fake, settings(action=BlockingAction.SHOW, budget=5.0))
    assert fake.signalled == []
    assert fake.sent == 1
    first_send = fake.steps.index(fake.of(Send)[0])
    assert sum(s.seconds for s in fake.steps[:first_send] if isinstance(s, Sleep)) >= 0.35
    assert sum("blocked by pid 7" in m for m in fake.notices()) == 1  # reported once


def test_show_gives_up_with_55P03_when_the_budget_is_spent_never_sending() -> None:
    fake = Fake(blockers=lambda now: [blocker(7)])
    run(fake, settings(action=BlockingAction.SHOW, budget=0.5, max_hold=10.0))
    assert fake.sent == 0
    assert fake.codes() == ["55P03"]
    assert notices.gave_up(0.5) in [
        ErrorResponse.decode(f.payload).message
        for f in fake.delivered()
        if f.type == BackendType.ERROR_RESPONSE
    ]


def test_max_hold_sends_the_statement_anyway_with_the_short_lock_timeout() -> None:
    fake = Fake(blockers=lambda now: [blocker(7)], attempts=[(0.05, "55P03")])
    run(fake, settings(action=BlockingAction.SHOW, budget=5.0, max_hold=0.3))
    first_send = fake.steps.index(fake.of(Send)[0])
    held = sum(s.seconds for s in fake.steps[:first_send] if isinstance(s, Sleep))
    assert 0.3 - 1e-9 <= held < 0.45
    assert fake.timeouts()[0] == "50ms"


def test_the_watch_acts_on_blockers_that_appear_while_the_statement_runs() -> None:
    fake = Fake(attempts=[(0.5, None)], blocking=lambda now: [42] if now > 0.1 else [])
    run(fake, settings(watch_interval=0.05))
    assert fake.signalled == [(42, Verdict.TERMINATE)]
    assert fake.codes() == []


# --- rights ---------------------------------------------------------------------


def test_without_the_rights_the_statement_goes_out_untouched() -> None:
    fake = Fake(allowed=False, blockers=lambda now: [blocker(7)], blocking=lambda now: [7])
    run(fake)
    assert fake.sent == 1
    assert fake.of(FindBlockers) == [] and fake.of(BlockingPids) == [] and fake.signalled == []
    assert fake.timeouts() == []  # not even a lock_timeout of the proxy's


def test_mid_batch_the_watch_acts_only_when_the_waiter_owns_what_it_waits_for() -> None:
    for owns, expected in ((True, [(42, Verdict.TERMINATE)]), (False, [])):
        fake = Fake(attempts=[(0.3, None)], blocking=lambda now: [42], owns=owns)
        run(fake, view=View(can_inject=False))
        assert fake.signalled == expected
        assert fake.of(WaiterOwns)


# --- the admin connection ---------------------------------------------------------------------


def test_an_admin_outage_is_one_backoff_and_the_statement_is_never_held_for_it() -> None:
    context = GuardContext(health=AdminHealth(), rng=random.Random(0))
    fake = Fake(admin_down=lambda now: True, blockers=lambda now: [blocker(7)])
    run(fake, context=context)
    assert fake.sent == 1 and fake.codes() == []
    assert context.health.backoff == 1.0  # one failure seen, one backoff: not doubled twice
    assert sum("admin connection down: connection refused" in m for m in fake.notices()) == 1
    # a second statement within the back-off does not even try the admin connection, and its
    # notice says why as well
    again = Fake(admin_down=lambda now: True, blockers=lambda now: [blocker(7)])
    run(again, context=context)
    assert again.of(FindBlockers) == [] and context.health.backoff == 1.0
    assert sum("admin connection down: connection refused" in m for m in again.notices()) == 1
    # once it answers again, the back-off is forgotten
    later = Fake(now=5.0)
    run(later, context=context)
    assert later.of(FindBlockers) and context.health.backoff == 0.0


def test_a_client_that_leaves_while_held_gets_nothing_sent() -> None:
    view = View()
    fake = Fake(blockers=lambda now: [blocker(7)])

    def leaving(now: float) -> list[Blocker]:
        view.gone = True  # the client left while its statement waited
        return [blocker(7)]

    fake.blockers = leaving
    run(fake, settings(action=BlockingAction.SHOW), view=view)
    assert fake.sent == 0 and fake.delivered() == []


# --- the events (the log, the migration report) ---------------------------------------------------


def test_events_tell_one_unit_from_held_to_applied_with_each_attempt() -> None:
    """Each event carries the unit and the statement's backend; each attempt its lock wait (the
    whole of a 55P03 attempt; else until the in-flight watch last saw it blocked) and run time."""
    fake = Fake(
        blockers=lambda now: [blocker(7)],
        attempts=[(0.05, "55P03"), (0.3, None)],
        blocking=lambda now: [9] if now > 0.1 else [],
    )
    client = {"user": "app", "application_name": "migrate"}
    unit = HeldUnit(b"Q...", (ALTER,), expect=1, retryable=True)
    context = GuardContext(rng=random.Random(0))
    fake.run(pipeline.run(View(), context, settings(watch_interval=0.02), unit, client))
    events = [(e.name, dict(e.fields)) for e in fake.of(Event)]
    assert [name for name, _ in events] == [
        "held", "blockers", "terminated", "attempt", "retry",
        "blockers", "terminated", "attempt", "applied",
    ]  # fmt: skip
    found = [fields for name, fields in events if name == "blockers"]
    assert [f["pids"] for f in found] == [[7], [9]]  # the first found before, then in flight
    assert found[0]["targets"] == {str(TABLE): "AccessExclusiveLock"}
    assert all(fields["unit"] == 1 and fields["statement_pid"] == PID for _, fields in events)
    assert events[0][1] == {
        "unit": 1,
        "statement_pid": PID,
        "statement": ALTER.text,
        "relations": [f"{lock.relation} ({lock.mode.name})" for lock in ALTER.locks],
        "database": "app",
        "action": "terminate",
        "user": "app",
        "application_name": "migrate",
    }
    attempts = [fields for name, fields in events if name == "attempt"]
    assert [(a["attempt"], a["lock_wait_ms"], a["run_ms"], a["code"]) for a in attempts] == [
        (1, 50, 0, "55P03"),
        (2, 20, 280, None),  # sent at 0.10, seen blocked at 0.12, done at 0.40
    ]
    assert events[-1][1]["attempts"] == 2


def test_units_are_numbered_per_context_and_giving_up_says_so() -> None:
    context = GuardContext(rng=random.Random(0))
    first, second = Fake(), Fake(blockers=lambda now: [blocker(7)])
    run(first, context=context)
    run(second, settings(action=BlockingAction.SHOW, budget=0.3), context=context)
    assert {e.fields["unit"] for e in first.of(Event)} == {1}
    gave_up = [dict(e.fields) for e in second.of(Event) if e.name == "gave_up"]
    assert gave_up == [
        {"unit": 2, "statement_pid": PID, "attempts": 0, "elapsed_ms": 300, "code": "55P03"}
    ]
