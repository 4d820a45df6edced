"""The drain's rules, pure: which relations a drain covers, which statements of other sessions
it holds, who is let through, and its sequence as steps (arm the gate, wait for the holders,
apply `then` to those left) that guard/pipeline.py runs before each attempt.

Which statements touch the targets is decided cheaply and conservatively, from the text alone:
a statement naming a covered relation (unqualified: in any schema; qualified: in that schema),
calling a function that is not PostgreSQL's own (a user-defined or extension function may touch
anything), or whose text cannot be read (does not parse, a DO block, EXECUTE) is held. A table
that only shares a foreign key with a target is held only for writes (reads of it lock no
target). Not seen: relations reached through a trigger or a rule of another table; `then` and
the attempt's short lock_timeout cover those, as they cover sessions that do not use the proxy.
"""

from __future__ import annotations

import enum
from collections.abc import Collection, Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Protocol

from pgmigrate_proxy import notices
from pgmigrate_proxy.guard.blockers import Blocker
from pgmigrate_proxy.guard.policy import BlockingAction, Decision, Verdict
from pgmigrate_proxy.guard.steps import (
    Acks,
    AdminDown,
    Announce,
    Arm,
    Event,
    HoldPredicate,
    Inject,
    LockHolders,
    Notice,
    Now,
    Recheck,
    SessionInfo,
    Sleep,
    Step,
)
from pgmigrate_proxy.protocol.extended import QueryResult
from pgmigrate_proxy.settings import default
from pgmigrate_proxy.sql.relations import references

__all__ = [
    "FUNCTIONS_SQL",
    "LOCKS_SQL",
    "SCOPE_SQL",
    "DrainScope",
    "DrainSettings",
    "DrainThen",
    "Gate",
    "GateHold",
    "HoldPredicate",
    "HoldRule",
    "NoGate",
    "Outcome",
    "Reach",
    "SessionInfo",
    "drain",
    "holders_to_wait_for",
    "holding_pids",
    "load_scope",
]

Steps = Generator[Step, Any, Any]



#: How often a drain looks whether the holders are done (or watch_interval, if shorter): the
#: table's new work waits at the proxy meanwhile, so each look saved is latency saved for the
#: application (one admin query a look, only while a drain runs).
DRAIN_POLL = 0.01

class DrainThen(enum.Enum):
    """What a drain does to the holders left after its timeout (drain_then's values)."""

    TERMINATE = "terminate"
    CANCEL = "cancel"  # escalates to terminate for idle-in-transaction holders, as `cancel` does
    GIVE_UP = "give_up"  # the guarded statement is answered 55P03, nobody is touched

    @property
    def action(self) -> BlockingAction | None:
        return _THEN_ACTIONS.get(self)


_THEN_ACTIONS = {
    DrainThen.TERMINATE: BlockingAction.TERMINATE,
    DrainThen.CANCEL: BlockingAction.CANCEL,
}
_DEFAULT_THEN = DrainThen(default("drain_then"))


@dataclass(frozen=True)
class DrainSettings:
    """drain_timeout and drain_then."""

    timeout: float = default("drain_timeout")
    then: DrainThen = _DEFAULT_THEN


class Reach(enum.Enum):
    """How a relation of a drain's scope relates to its targets."""

    ANY = "any"  # a target, a view over one, a partition or inheritance relative: any use locks
    WRITES = "writes"  # a foreign-key partner: its writes lock the target (RI checks), reads not


#: The scope of a drain, asked on the guarded session's own connection ($1: the targets' OIDs
#: as an array literal): the targets, their inheritance/partition ancestors and descendants,
#: the views over any of those (recursively), and their foreign-key partners both ways.
SCOPE_SQL = """\
WITH RECURSIVE t(oid) AS (SELECT pg_catalog.unnest($1::text::pg_catalog.oid[])),
up(oid) AS (SELECT oid FROM t UNION
  SELECT i.inhparent FROM pg_catalog.pg_inherits i JOIN up ON i.inhrelid = up.oid),
down(oid) AS (SELECT oid FROM t UNION
  SELECT i.inhrelid FROM pg_catalog.pg_inherits i JOIN down ON i.inhparent = down.oid),
tree(oid) AS (SELECT oid FROM up UNION SELECT oid FROM down),
views(oid) AS (SELECT r.ev_class FROM pg_catalog.pg_depend d
    JOIN pg_catalog.pg_rewrite r ON r.oid = d.objid
    WHERE d.classid = 'pg_catalog.pg_rewrite'::pg_catalog.regclass
    AND d.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass
    AND d.refobjid IN (SELECT oid FROM tree) AND r.ev_class <> d.refobjid
  UNION SELECT r.ev_class FROM views v JOIN pg_catalog.pg_depend d ON d.refobjid = v.oid
    AND d.classid = 'pg_catalog.pg_rewrite'::pg_catalog.regclass
    AND d.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass
    JOIN pg_catalog.pg_rewrite r ON r.oid = d.objid AND r.ev_class <> v.oid),
partners(oid) AS (
  SELECT conrelid FROM pg_catalog.pg_constraint
    WHERE contype = 'f' AND confrelid IN (SELECT oid FROM tree)
  UNION SELECT confrelid FROM pg_catalog.pg_constraint
    WHERE contype = 'f' AND conrelid IN (SELECT oid FROM tree)),
scope(oid, reach) AS (SELECT oid, 'any' FROM tree UNION ALL SELECT oid, 'any' FROM views
  UNION ALL SELECT oid, 'writes' FROM partners)
SELECT s.reach, n.nspname, c.relname FROM scope s
  JOIN pg_catalog.pg_class c ON c.oid = s.oid
  JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace"""

#: The names of the functions that are not PostgreSQL's own (user-defined, extensions').
FUNCTIONS_SQL = (
    "SELECT DISTINCT proname FROM pg_catalog.pg_proc WHERE pronamespace NOT IN"
    " ('pg_catalog'::pg_catalog.regnamespace, 'information_schema'::pg_catalog.regnamespace)"
)

#: Relation locks on the targets (admin connection; `relations`: OIDs, `database`: a name):
#: rows of (pid, relation, mode, granted). Fast-path locks are in pg_locks too.
LOCKS_SQL = (
    "SELECT l.pid, l.relation::int8 AS relation, l.mode, l.granted FROM pg_catalog.pg_locks l"
    " WHERE l.locktype = 'relation' AND l.pid IS NOT NULL"
    " AND l.database = (SELECT oid FROM pg_catalog.pg_database WHERE datname = %(database)s)"
    " AND l.relation = ANY(%(relations)s::pg_catalog.oid[])"
)

LockRow = tuple[int, int, str, bool]  # pid, relation OID, mode, granted


def holding_pids(rows: Iterable[LockRow], targets: Collection[int]) -> frozenset[int]:
    """The backends holding (granted) a lock on one of `targets`: the sessions a drain lets
    through, since holding their next statement would deadlock them against the drain."""
    return frozenset(pid for pid, relation, _, granted in rows if granted and relation in targets)


@dataclass(frozen=True)
class DrainScope:
    """What a drain covers in `database`: relation names (bare, as in pg_class) with the
    schemas and reach of each, and the names of the functions that are not PostgreSQL's."""

    database: str
    relations: Mapping[str, frozenset[tuple[str, Reach]]]
    functions: frozenset[str] = frozenset()

    @classmethod
    def from_rows(
        cls,
        database: str,
        scope_rows: Iterable[Sequence[Any]],
        function_rows: Iterable[Sequence[Any]] = (),
    ) -> DrainScope:
        """From SCOPE_SQL's rows (reach, schema, name) and FUNCTIONS_SQL's (name)."""
        relations: dict[str, set[tuple[str, Reach]]] = {}
        for reach, schema, name in scope_rows:
            relations.setdefault(str(name), set()).add((str(schema), Reach(reach)))
        functions = frozenset(str(row[0]) for row in function_rows)
        return cls(database, {k: frozenset(v) for k, v in relations.items()}, functions)

    def touches(self, sql: str) -> bool:
        """Whether `sql` may take a lock on a target (see the module's docstring)."""
        return _touches(self, sql)


@lru_cache(maxsize=4096)
def _parsed(sql: str) -> Any:
    return references(sql)


def _touches(scope: DrainScope, sql: str) -> bool:
    found = _parsed(sql)
    if found is None:
        return True
    for schema, name in found.relations:
        for where, reach in scope.relations.get(name, ()):
            if schema is not None and schema != where:
                continue
            if reach is Reach.ANY or found.writes:
                return True
    return any(
        schema not in _SYSTEM_SCHEMAS and name in scope.functions
        for schema, name in found.functions
    )


_SYSTEM_SCHEMAS = ("pg_catalog", "information_schema")


@dataclass(eq=False)
class HoldRule:
    """The predicate a drain arms the gate with. `let_through`: backends already holding a lock
    on a target (grows with each pg_locks snapshot); `own_pid`: the draining session's."""

    scope: DrainScope
    own_pid: int
    let_through: set[int] = field(default_factory=set)

    def should_hold(self, session: SessionInfo, statements: Sequence[str] | None) -> bool:
        """True: hold these statements (the start of a new transaction) until released.
        `statements` None: their text is unknown (a Bind of a statement the gate cannot name):
        held, conservatively."""
        if session.database != self.scope.database:
            return False
        pid = session.backend_pid
        if pid and (pid == self.own_pid or pid in self.let_through):
            return False
        return statements is None or any(self.scope.touches(sql) for sql in statements)


class GateHold(Protocol):
    """One armed rule; release() lets what it held go on, in order (idempotent); recheck()
    asks the rule again about what it holds (its let_through grew)."""

    def release(self) -> None: ...
    def recheck(self) -> None: ...


class Gate(Protocol):
    """The proxy-wide gate (runtime): armed with a predicate, it asks it about each new
    transaction's first statement of every client session and holds those it says to hold
    until the arm's release(). SessionInfo and HoldPredicate: guard/steps.py."""

    def arm(self, rule: HoldPredicate) -> GateHold: ...


class _NoHold:
    def release(self) -> None:
        return None

    def recheck(self) -> None:
        return None


class NoGate:
    """A gate that holds nothing: the drain then only waits for the holders and applies `then`."""

    def arm(self, rule: HoldPredicate) -> GateHold:
        return _NoHold()


def load_scope(database: str, targets: Collection[int]) -> Steps:
    """-> DrainScope | None: the targets' scope, asked on the session's own connection (None
    when the catalog cannot be read there: nothing will be held)."""
    oids = "{" + ",".join(str(oid) for oid in sorted(targets)) + "}"
    scope: QueryResult = yield Inject(SCOPE_SQL, [oids])
    if scope.error is not None:
        return None
    functions: QueryResult = yield Inject(FUNCTIONS_SQL)
    rows = functions.rows if functions.error is None else []
    return DrainScope.from_rows(database, scope.rows, rows)


class Host(Protocol):
    """What the drain uses of the pipeline it runs in."""

    def event(self, name: str, fields: Mapping[str, object], level: str = ...) -> Event: ...
    def find_blockers(self) -> Step: ...
    def decide_as(self, blockers: list[Blocker], action: BlockingAction) -> Steps: ...
    def act(self, decisions: list[Decision]) -> Steps: ...
    def wait_released(self, pids: list[int]) -> Steps: ...
    def admin_lost(self, exc: Exception) -> Steps: ...
    def budget_left(self, now: float) -> bool: ...
    @property
    def gone(self) -> bool: ...  # the client left (or its server connection was lost)


class Outcome(enum.Enum):
    """How a drain ended: go on with the attempt, or answer 55P03 without sending it."""

    DRAINED = "drained"  # no holder left (or the admin connection is gone: go on)
    THEN = "then"  # holders were left at the timeout, `then` was applied to them
    GIVE_UP = "give_up"


def drain(
    host: Host,
    settings: DrainSettings,
    targets: Mapping[int, object],
    scope: DrainScope | None,
    own_pid: int,
    database: str,
    interval: float,
    attempt: float = 0.0,
) -> Steps:
    """-> (Outcome, armed): one drain before an attempt. Arms the gate (when there is a scope)
    and announces it to the other proxies (they arm theirs; `attempt`: the attempt's longest
    wait, for the bound they hold at most), waits at `interval` for the sessions holding
    conflicting locks to finish, and after `settings.timeout` applies `then` to those left.
    `armed` True: the caller must yield Release() once the attempt has its replies (or is not
    sent); that ends the announced drain too."""
    oids = tuple(sorted(targets))
    armed = False
    rule: HoldRule | None = None
    try:
        if scope is not None:
            rule = HoldRule(scope, own_pid)
            rule.let_through |= holding_pids((yield LockHolders(oids, database)), oids)
            yield Arm(rule)
            armed = True
            # (a session that got its first lock between the two snapshots is let through too,
            # and what the gate held of it meanwhile goes on)
            rule.let_through |= holding_pids((yield LockHolders(oids, database)), oids)
            yield Recheck()
            yield from _announce(host, rule, oids, settings.timeout + attempt)
        outcome = yield from _wait(host, settings, interval, rule if armed else None)
    except AdminDown as exc:
        yield from host.admin_lost(exc)
        outcome = Outcome.DRAINED  # go on: the attempt's lock_timeout still bounds the wait
    # (a run ended meanwhile, client gone or server lost, is released by the driver)
    return outcome, armed


def _announce(host: Host, rule: HoldRule, oids: tuple[int, ...], bound: float) -> Steps:
    """Several proxies: the others arm their gates for this drain and acknowledge; past
    drain_ack_timeout the drain goes on without those missing (a WARNING event names them)."""
    acks: Acks | None = yield Announce(rule, oids, bound)
    if acks is None:
        return
    waited = round(acks.waited * 1000)
    fields = {"acked": list(acks.acked), "waited_ms": waited}
    if not acks.sent:
        yield host.event("drain_not_announced", fields, "WARNING")
    elif acks.missing:
        yield host.event("drain_ack_timeout", {**fields, "missing": list(acks.missing)}, "WARNING")
    else:
        yield host.event("drain_announced", fields)


def _wait(host: Host, settings: DrainSettings, interval: float, rule: HoldRule | None) -> Steps:
    """Wait for the holders; each look lets through the sessions found holding (or awaiting) a
    lock on a target that the gate may have held meanwhile (one whose first lock came after the
    arm's snapshots): held, it would never end its transaction, and `then` would end it."""
    armed = rule is not None
    started: float = yield Now()
    timeout_ms = round(settings.timeout * 1000)
    yield host.event(
        "drain", {"timeout_ms": timeout_ms, "then": settings.then.value, "holding": armed}
    )
    shown = False
    while not host.gone:
        look: float = yield Now()
        blockers: list[Blocker] = yield host.find_blockers()
        if rule is not None:
            grown = {b.pid for b in blockers if b.pid} - rule.let_through
            if grown:
                rule.let_through |= grown
                yield Recheck()
        decisions: list[Decision] = yield from host.decide_as(blockers, BlockingAction.SHOW)
        left = holders_to_wait_for(decisions, look - started)
        now: float = yield Now()
        waited = {"waited_ms": round((now - started) * 1000)}
        if not left:
            yield host.event("drained", waited)
            return Outcome.DRAINED
        if not shown:  # once: on a busy table the holders change at each look
            shown = True
            yield Notice("NOTICE", notices.draining(len(left), settings.timeout))
        if now - started >= settings.timeout or not host.budget_left(now):
            break
        yield Sleep(min(interval, DRAIN_POLL, started + settings.timeout - now))
    else:
        return Outcome.DRAINED  # the client left: its statement is dropped, nobody is touched
    yield host.event("drain_timeout", {**waited, "left": [b.pid for b in left]}, "WARNING")
    action = settings.then.action
    if action is None:
        return Outcome.GIVE_UP
    decisions = yield from host.decide_as(left, action)
    acted = yield from host.act(decisions)
    if acted:
        yield from host.wait_released(acted)
    return Outcome.THEN


def holders_to_wait_for(decisions: Iterable[Decision], draining_for: float) -> list[Blocker]:
    """The blockers a drain waits for (and applies drain_then to): those in transactions that
    began before the drain did (`draining_for` seconds ago; an unknown age counts as older),
    never the skipped ones. A transaction begun since (a session the gate let through or could
    not hold: not through this proxy, or no gate yet) is short work that the attempt's
    lock_timeout waits for; killing it would be the mistake the drain is there to avoid."""
    return [
        d.blocker
        for d in decisions
        if d.verdict is not Verdict.SKIP
        and (d.blocker.xact_age is None or d.blocker.xact_age >= draining_for)
    ]
