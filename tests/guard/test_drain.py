"""The drain's pure rules: which statements touch a drain's targets, who is let through, and
the drain's steps in the pipeline under the fake clock of test_pipeline (arm, wait for the
holders, drain_then, release after the attempt whatever its result)."""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from typing import Any

import pytest
from pgmigrate_proxy.guard import drain, pipeline
from pgmigrate_proxy.guard.blockers import BackendState, Blocker
from pgmigrate_proxy.guard.drain import (
    DrainScope,
    DrainSettings,
    DrainThen,
    HoldRule,
    Reach,
    holding_pids,
)
from pgmigrate_proxy.guard.pipeline import GuardContext
from pgmigrate_proxy.guard.policy import BlockingAction, Verdict
from pgmigrate_proxy.guard.steps import (
    Acks,
    Announce,
    Arm,
    Event,
    Inject,
    LockHolders,
    Recheck,
    Release,
    Send,
    Signal,
    Sleep,
)
from pgmigrate_proxy.guard.unit import HeldUnit
from pgmigrate_proxy.protocol.extended import QueryResult

from tests.guard.test_pipeline import ALTER, TABLE, Fake, View, blocker, settings

SCOPE = DrainScope.from_rows(
    "app",
    [
        ("any", "public", "app_item"),
        ("any", "public", "App Item View"),
        ("any", "archive", "app_item_2020"),  # a partition, in another schema
        ("writes", "public", "app_order"),  # references app_item
    ],
    [("app_touch",)],
)


@pytest.mark.parametrize(
    ("sql", "touches"),
    [
        ("SELECT * FROM app_item WHERE id = 1", True),
        ("SELECT * FROM public.app_item", True),
        ('SELECT * FROM "public"."app_item"', True),
        ("SELECT * FROM other.app_item", False),  # same name, schema not the target's
        ("SELECT * FROM App_Item", True),  # unquoted: folded to lower case
        ('SELECT * FROM "App_Item"', False),  # quoted: another relation
        ('SELECT * FROM "App Item View"', True),
        ("SELECT * FROM app_item_2020", True),  # unqualified: any schema counts
        ("SELECT * FROM public.app_item_2020", False),
        ("UPDATE x SET a = 1 WHERE id IN (SELECT id FROM app_item)", True),
        ("WITH d AS (SELECT 1) SELECT * FROM unrelated JOIN app_item USING (id)", True),
        ("SELECT * FROM app_order", False),  # an FK partner: reading it locks no target
        ("SELECT * FROM app_order FOR UPDATE", True),
        ("INSERT INTO app_order (item_id) VALUES (1)", True),
        ("DELETE FROM app_order", True),
        ("SELECT * FROM unrelated", False),
        ("SELECT lower(name), now() FROM unrelated", False),  # PostgreSQL's own functions
        ("SELECT pg_catalog.app_touch()", False),
        ("SELECT app_touch()", True),  # a user function may touch anything
        ("SELECT s.app_touch(1)", True),
        ("SELECT 1", False),
        ("BEGIN", False),
        ("SET search_path = public", False),
        ("DO $$ BEGIN PERFORM 1; END $$", True),  # unreadable: conservatively held
        ("EXECUTE stmt(1)", True),
        ("SELEC * FROM nowhere", True),
        ("SELECT 1; SELECT * FROM app_item", True),
    ],
)
def test_touches(sql: str, touches: bool) -> None:
    assert SCOPE.touches(sql) is touches


def test_a_relation_in_two_reaches_takes_the_wider() -> None:
    scope = DrainScope.from_rows("app", [("writes", "public", "t"), ("any", "public", "t")])
    assert scope.relations["t"] == {("public", Reach.WRITES), ("public", Reach.ANY)}
    assert scope.touches("SELECT * FROM t")


def test_holding_pids_are_granted_locks_on_the_targets_only() -> None:
    rows = [
        (11, TABLE, "RowExclusiveLock", True),
        (12, TABLE, "AccessShareLock", False),  # waiting: holds nothing yet
        (13, 999, "AccessShareLock", True),  # another relation
        (14, TABLE, "AccessShareLock", True),
    ]
    assert holding_pids(rows, {TABLE}) == {11, 14}


@dataclass
class Session:
    database: str = "app"
    backend_pid: int = 0


def test_the_rule_holds_new_work_on_the_targets_but_not_holders_nor_the_drainer() -> None:
    rule = HoldRule(SCOPE, own_pid=100, let_through={7})
    touching = ["SELECT * FROM app_item"]
    assert rule.should_hold(Session(), touching)
    assert rule.should_hold(Session(backend_pid=8), ["SELECT 1", *touching])
    assert not rule.should_hold(Session(backend_pid=7), touching)  # already holds a lock
    assert not rule.should_hold(Session(backend_pid=100), touching)  # the draining session
    assert not rule.should_hold(Session(database="other"), touching)
    assert not rule.should_hold(Session(), ["SELECT * FROM unrelated"])
    assert rule.should_hold(Session(), None)  # text unknown: held
    assert not rule.should_hold(Session(backend_pid=7), None)


# --- the drain in the pipeline ------------------------------------------------------------------


@dataclass
class DrainFake(Fake):
    """test_pipeline's Fake, also answering the drain's steps: `holders` are pg_locks' granted
    rows (pid) on the table; the scope's catalog queries answer SCOPE."""

    holders: tuple[int, ...] = ()
    scope_fails: bool = False
    acks: Acks | None = None  # what an Announce gets (None: this proxy does not coordinate)

    def answer(self, step: Any) -> Any:
        match step:
            case LockHolders():
                return [(pid, TABLE, "AccessShareLock", True) for pid in self.holders]
            case Arm() | Release() | Recheck():
                return None
            case Announce():
                return self.acks
        return super().answer(step)

    def inject(self, sql: str) -> QueryResult:
        if sql == drain.SCOPE_SQL:
            if self.scope_fails:
                return QueryResult(rows=[], error={"C": "42501"})
            return QueryResult(rows=[("any", "public", "t")])
        if sql == drain.FUNCTIONS_SQL:
            return QueryResult(rows=[("f",)])
        return super().inject(sql)

    def order(self) -> list[str]:
        kinds = (Arm, Announce, Release, Send)
        return [type(s).__name__ for s in self.steps if isinstance(s, kinds)]


def drain_settings(**changes: Any) -> Any:
    then = changes.pop("then", DrainThen.TERMINATE)
    timeout = changes.pop("timeout", 2.0)
    return settings(
        action=BlockingAction.DRAIN, drain=DrainSettings(timeout, then), budget=10.0, **changes
    )


def run(fake: Fake, guard: Any, view: View | None = None) -> View:
    view = view or View()
    unit = HeldUnit(b"Q...", (ALTER,), expect=1, retryable=True)
    fake.run(pipeline.run(view, GuardContext(rng=random.Random(0)), guard, unit))
    return view


def test_a_drain_waits_for_a_short_holder_and_terminates_nobody() -> None:
    holder = blocker(7, BackendState.ACTIVE)
    fake = DrainFake(blockers=lambda now: [holder] if now < 0.3 else [], holders=(7,))
    run(fake, drain_settings())
    assert fake.signalled == []
    assert fake.order() == ["Arm", "Announce", "Send", "Release"]
    rule = fake.of(Arm)[0].rule
    assert isinstance(rule, HoldRule) and rule.let_through == {7} and rule.own_pid == 100
    assert rule.scope.touches("SELECT * FROM t") and rule.scope.touches("SELECT f()")
    sleeps = [s.seconds for s in fake.of(Sleep)]
    # polled every DRAIN_POLL (10 ms: shorter than the 50 ms watch_interval)
    assert sleeps and all(s == drain.DRAIN_POLL for s in sleeps)
    assert fake.codes() == []
    assert any(e.name == "drained" for e in fake.of(Event))


def test_after_the_timeout_then_terminates_those_left() -> None:
    fake = DrainFake(blockers=lambda now: [blocker(7)])
    run(fake, drain_settings(timeout=0.5))
    assert fake.signalled == [(7, Verdict.TERMINATE)]
    # the first look at 0, then every DRAIN_POLL: the timeout is kept to the poll
    assert round(sum(s.seconds for s in fake.of(Sleep)), 3) >= 0.5
    assert fake.order() == ["Arm", "Announce", "Send", "Release"]
    assert fake.codes() == []


def test_transactions_begun_during_the_drain_are_not_waited_for_nor_killed() -> None:
    """Without a gate (or for sessions not through the proxy) new short transactions keep
    arriving: the drain waits for the holders of when it began, and `then` ends only those."""
    old = dataclasses.replace(blocker(7), xact_age=None)  # age unknown: counted as old

    def blockers(now: float) -> list[Blocker]:
        fresh = dataclasses.replace(blocker(8 + int(now * 100)), xact_age=0.001)
        return [old, fresh] if now < 5 else [fresh]

    fake = DrainFake(blockers=blockers)
    run(fake, drain_settings(timeout=0.3))
    assert fake.signalled == [(7, Verdict.TERMINATE)]  # the old one only


def test_a_drain_on_a_busy_table_goes_on_once_the_old_holders_are_done() -> None:
    def blockers(now: float) -> list[Blocker]:  # a new 1 ms-old transaction at every look
        return [dataclasses.replace(blocker(8), xact_age=0.001)]

    fake = DrainFake(blockers=blockers)
    run(fake, drain_settings(timeout=2.0))
    assert fake.signalled == [] and fake.sent == 1
    assert sum(s.seconds for s in fake.of(Sleep) if s.seconds == 0.05) <= 0.05  # one poll


def test_then_give_up_answers_55P03_unsent_and_releases() -> None:
    fake = DrainFake(blockers=lambda now: [blocker(7)])
    run(fake, drain_settings(timeout=0.2, then=DrainThen.GIVE_UP))
    assert fake.signalled == [] and fake.sent == 0
    assert fake.codes() == ["55P03"]
    assert fake.order() == ["Arm", "Announce", "Release"]


def test_then_cancel_cancels_an_active_holder() -> None:
    fake = DrainFake(blockers=lambda now: [blocker(7, BackendState.ACTIVE)])
    run(fake, drain_settings(timeout=0.2, then=DrainThen.CANCEL))
    assert fake.signalled == [(7, Verdict.CANCEL)]


def test_a_failed_statement_releases_too_and_each_retry_drains_again() -> None:
    fake = DrainFake(attempts=[(0.05, "55P03"), (0.01, "42P01")])
    run(fake, drain_settings())
    assert fake.order() == [
        "Arm",
        "Announce",
        "Send",
        "Release",
        "Arm",
        "Announce",
        "Send",
        "Release",
    ]
    assert fake.codes() == ["42P01"]


def test_no_scope_no_hold_the_drain_still_waits_and_applies_then() -> None:
    fake = DrainFake(blockers=lambda now: [blocker(7)], scope_fails=True)
    run(fake, drain_settings(timeout=0.1))
    assert fake.order() == ["Send"]  # nothing armed, nothing to release
    assert fake.of(LockHolders) == []
    assert fake.signalled == [(7, Verdict.TERMINATE)]


def test_a_client_gone_while_draining_releases_and_sends_nothing() -> None:
    view = View()

    def blockers(now: float) -> list[Any]:
        view.gone = now >= 0.1
        return [blocker(7)]

    fake = DrainFake(blockers=blockers)
    run(fake, drain_settings(timeout=1.0), view)
    assert fake.sent == 0 and fake.signalled == []
    assert fake.order() == ["Arm", "Announce", "Release"]


def test_the_in_flight_watch_only_reports_under_drain() -> None:
    fake = DrainFake(attempts=[(0.2, None)], blocking=lambda now: [9])
    run(fake, drain_settings())
    assert fake.signalled == []
    assert not any(isinstance(s, Signal) for s in fake.steps)
    assert fake.of(Inject)  # (it ran, and watched: the blocker was only reported)


# --- several proxies: the announce ---------------------------------------------------------------


def test_the_drain_is_announced_once_armed_with_its_let_through_and_bound() -> None:
    holder = blocker(7, BackendState.ACTIVE)
    acks = Acks(acked=("b:1", "c:2"), missing=(), waited=0.004)
    fake = DrainFake(blockers=lambda now: [holder] if now < 0.1 else [], holders=(7,), acks=acks)
    run(fake, drain_settings(timeout=3.0))
    announce = fake.of(Announce)[0]
    assert announce.rule is fake.of(Arm)[0].rule  # the rule armed here, let_through and all
    assert announce.targets == (TABLE,)
    assert announce.hold_seconds == pytest.approx(3.0 + 0.05)  # drain_timeout + lock_timeout
    names = [e.name for e in fake.of(Event)]
    assert names.index("drain_announced") < names.index("drain")  # before waiting for holders
    announced = next(e for e in fake.of(Event) if e.name == "drain_announced")
    assert announced.fields["acked"] == ["b:1", "c:2"] and announced.level == "INFO"


def test_acks_missing_at_the_timeout_are_a_warning_and_the_drain_goes_on() -> None:
    acks = Acks(acked=("b:1",), missing=("c:2",), waited=1.0)
    fake = DrainFake(blockers=lambda now: [], acks=acks)
    run(fake, drain_settings())
    late = next(e for e in fake.of(Event) if e.name == "drain_ack_timeout")
    assert late.level == "WARNING" and late.fields["missing"] == ["c:2"]
    assert late.fields["waited_ms"] == 1000
    assert fake.order() == ["Arm", "Announce", "Send", "Release"]


def test_without_coordination_no_announce_event() -> None:
    fake = DrainFake(blockers=lambda now: [])
    run(fake, drain_settings())
    assert not any(e.name.startswith("drain_a") for e in fake.of(Event))
    assert fake.order() == ["Arm", "Announce", "Send", "Release"]


def test_a_holder_missed_by_the_snapshots_is_let_through_at_the_next_look() -> None:
    """A session whose first lock came after the arm's pg_locks snapshots: found holding at a
    look, it is let through (and the gate asked again), not held until `then` ends it."""
    holder = blocker(7, BackendState.IDLE_IN_TRANSACTION)
    fake = DrainFake(blockers=lambda now: [holder] if now < 0.2 else [], holders=())
    run(fake, drain_settings())
    rule = fake.of(Arm)[0].rule
    assert rule.let_through == {7}
    # asked again after the second snapshot, and when a look found it
    assert len(fake.of(Recheck)) == 2
    assert fake.signalled == []
